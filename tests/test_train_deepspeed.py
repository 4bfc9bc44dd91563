"""The main job under the real `deepspeed` launcher: 2 CPU ranks, ZeRO-2, StratOpt from the JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_deepspeed_launcher_trains_stratopt_from_the_config(tmp_path):
    out = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", "29811",
           "--module", "stratopt_ds.train", "--deepspeed_config", str(ROOT / "ds_configs" / "tiny_zero2_cpu.json"),
           "--steps", "20", "--batch-size", "16", "--out", str(out), "--no-progress", "--eval-batches", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["optimizer"] == "stratopt"
    losses = summary["losses"]
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for s in steps if "loss" in s) == 20  # rank 0 alone writes the log
