"""What the main job logs: ``metrics.jsonl`` (one JSON object per step or evaluation),
TensorBoard events, and the one-line summary on the console.

A step record holds the loss, lr, tokens, the global and per-layer gradient norms, the layer
scales ``alpha`` and the clip and skip counters; an evaluation record holds ``val_loss``. The
per-layer lists follow the order of ``summary.json``'s ``"layers"``.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

import torch


def finite_or_none(x: float) -> Optional[float]:
    """JSON has no NaN/Inf: a skipped step logs null."""
    return x if math.isfinite(x) else None


def optimizer_stats(opt, engine_skipped: int = 0, engine_skipped_before: int = 0) -> dict[str, Any]:
    """Gradient norms and layer scales of the last step, and the running counters.

    ``engine_skipped``: steps an engine (DeepSpeed, on a gradient overflow) skipped before the
    optimizer saw them, so far; they count as skipped steps. When it grew since
    ``engine_skipped_before`` this step was one of them: the optimizer's last statistics are an
    older step's, so the norms and scales are logged as null rather than stale values.
    """
    ls, counters = opt.last_step, opt.layer_stats
    # One device-to-host copy of everything (a sync per statistic would stall a GPU step each
    # time), then host maths. The counts are exact in float64 (far below 2**53).
    n = ls.norms.numel()
    host = torch.cat([ls.norms.double(), ls.alpha.double(), counters.clip_count.sum().double().reshape(1),
                      counters.skipped_steps.double().reshape(1)]).cpu()
    norms, alpha = host[:n], host[n:2 * n]
    if engine_skipped > engine_skipped_before:  # this step never reached the optimizer
        norms, alpha = torch.full_like(norms, math.nan), torch.full_like(alpha, math.nan)
    return {"grad_norm": finite_or_none(norms.square().sum().sqrt().item()),
            "layer_norm_max": finite_or_none(norms.max().item()),
            "alpha_min": finite_or_none(alpha.min().item()),
            "alpha_mean": finite_or_none(alpha.mean().item()),
            "alpha_max": finite_or_none(alpha.max().item()),
            "clip_events": int(host[2 * n]),
            "skipped_steps": int(host[2 * n + 1]) + engine_skipped,
            # per layer, in the order of summary.json's "layers": the layer-wise analysis
            "layer_norms": [finite_or_none(x) for x in norms.tolist()],
            "layer_alpha": [finite_or_none(x) for x in alpha.tolist()]}


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; a torn last line (a killed writer) is dropped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


class MetricsLog:
    """Writes ``out/metrics.jsonl`` and, unless disabled, TensorBoard events to ``out/tensorboard``.

    Nothing is written when ``out`` is None (ranks other than 0). ``resume_step`` keeps the
    records up to that step and drops the rest (they belong to steps the resumed run repeats).
    """

    def __init__(self, out: Optional[str], layer_names: list[str], resume_step: int = 0,
                 tensorboard: bool = True):
        self.file, self.tb, self.layer_names = None, None, layer_names
        if out is None:
            return
        Path(out).mkdir(parents=True, exist_ok=True)
        path = Path(out) / "metrics.jsonl"
        kept = []
        if resume_step and path.exists():
            kept = [r for r in read_records(path) if r.get("step", 0) <= resume_step]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, path)
        self.file = open(path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # ~1 s to import: only when used

            # purge_step drops events a killed run wrote after its last checkpoint
            self.tb = SummaryWriter(str(Path(out) / "tensorboard"),
                                    purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"train/{key}" if key != "val_loss" else "val/loss",
                                       value, step)
            for key in ("layer_norms", "layer_alpha"):
                for name, value in zip(self.layer_names, record.get(key) or []):
                    if value is not None:
                        self.tb.add_scalar(f"{key}/{name}", value, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def print_summary(s) -> None:
    """One run's summary (a :class:`stratopt_ds.summary.RunSummary`) in two lines."""
    val = "n/a" if s.val_loss is None else f"{s.val_loss:.4f}"
    first = "n/a" if s.first_loss is None else f"{s.first_loss:.4f}"
    last = "n/a" if s.last_loss is None else f"{s.last_loss:.4f}"
    print(f"{s.optimizer} on {s.preset} ({s.params:,} params), {s.steps_done} of "
          f"{s.steps} steps, {s.tokens:,} tokens, status {s.status}")
    print(f"  loss {first} -> {last} | val loss {val} | {s.tokens_per_s:,.0f} tokens/s | "
          f"train {s.train_time:.1f}s | norm all-reduce {100 * s.norm_allreduce_share:.1f}% | "
          f"wall {s.wall_time:.1f}s | skipped steps {s.skipped_steps}")
