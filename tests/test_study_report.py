"""The report on a Protocol-A-shaped study directory written by hand (no training): planted
effects in the 3 x 2 x 2 layer-adaptive grid come out in the significance table and the factorial
model, an unfinished size shows as pending, a diverged run is counted."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from stratopt_ds.study.plan import load_plan
from stratopt_ds.study.report import power_statement, write_report
from stratopt_ds.study.stats import Rules

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL_A = ROOT / "stratopt_ds" / "study" / "plans" / "protocol_a.yaml"
# Planted: inverse scaling costs 0.03 nats, linear gains 0.03, sqrt changes nothing.
SCALING_EFFECT = {"linear": -0.03, "sqrt": 0.0, "inverse": 0.03}
LAYERS = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(6)] + ["lm_head.weight"]


def fake_run(run_dir: Path, seed: int, loss: float, status: str = "ok", steps: int = 30) -> None:
    """summary.json and metrics.jsonl as train.py writes them, with a plausible layer profile."""
    rng = np.random.default_rng(seed)
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(1, steps + 1):
            norms = np.exp(rng.normal(np.linspace(-2, 1, len(LAYERS)), 0.2)) / step ** 0.5
            alpha = np.exp(rng.normal(0, 0.3, len(LAYERS)))
            f.write(json.dumps({"step": step, "loss": loss + 1 / step,
                                "layer_norms": norms.tolist(), "layer_alpha": alpha.tolist()})
                    + "\n")
    curve = [[s, loss + 2 / s] for s in (10, 20, 30)]
    (run_dir / "summary.json").write_text(json.dumps({
        "status": status, "steps": steps, "steps_done": steps if status == "ok" else 12,
        "seed": seed, "val_loss": curve[-1][1], "val_losses": curve, "layers": LAYERS,
        "last_loss": loss}))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("protocol_a")
    shutil.copyfile(PROTOCOL_A, out / "plan.yaml")
    plan = load_plan(PROTOCOL_A, check_files=False)
    seed_effect = {s: 0.004 * (s - 2) for s, _ in plan.seeds}
    rng = np.random.default_rng(0)
    for run in plan.runs():
        if run.size == "1b" or (run.size == "500m" and run.seed > 1):
            continue  # 1b not started, 500m half done
        scaling = run.optimizer.split("-")[1] if run.optimizer.startswith("la-") else None
        # Final val loss = 3.3 + effect + seed effect + noise, minus the curve's 2/30 at step 30.
        loss = (3.3 + SCALING_EFFECT.get(scaling, 0.0) + seed_effect[run.seed]
                + rng.normal(0, 0.0015) - 2 / 30)
        diverged = run.size == "134m" and run.arm == "la-sqrt-b1const-clipglobal" and run.seed == 4
        fake_run(run.directory(out), run.seed, loss, "diverged" if diverged else "ok")
    md, js = write_report(out)
    return json.loads(js.read_text()), md.read_text()


def test_planted_effects_are_significant_and_the_null_arms_are_not(report):
    data, _ = report
    rows = {c["arm"]: c for c in data["comparisons"]["134m"]}
    assert len(rows) == 12
    for arm, c in rows.items():
        scaling = arm.split("-")[1]
        assert c["significant"] == (scaling != "sqrt"), arm
        assert c["test"] == "paired t"
        if scaling != "sqrt":
            assert c["diff"] == pytest.approx(SCALING_EFFECT[scaling], abs=0.005)
    assert rows["la-sqrt-b1const-clipglobal"]["n_pairs"] == 4  # its diverged seed is left out
    assert data["headline"]["la-sqrt-b1const-clipglobal"]["134m"]["failed"] == 1


def test_factorial_model_finds_the_scaling_factor_only(report):
    data, md = report
    table = {t["term"]: t for t in data["factorial"]["134m"]["table"]}
    assert table["C(scaling)"]["p"] < 1e-6
    assert table["C(momentum)"]["p"] > 0.001 and table["C(clip)"]["p"] > 0.001
    assert "| C(scaling) |" in md
    assert "skipped" in data["factorial"]["1b"]


def test_unfinished_sizes_show_as_pending(report):
    data, md = report
    assert data["headline"]["adamw"]["500m"]["n"] == 2
    cell = data["headline"]["adamw"]["1b"]
    assert cell["n"] == 0 and cell["not_finished"] == 5 and cell["failed"] == 0
    assert "| optimizer | 134m | 500m | 1b |" in md and "– (0) [5 not finished]" in md
    assert data["plots"]["1b"] == {}
    assert set(data["plots"]["134m"]) == {"val_curves", "final_loss", "grad_norm_heatmap", "alpha"}
    assert data["layer_norms"]["134m"]["adamw"]["largest_late"] == "lm_head"


def test_power_statement_median_of_an_even_count():
    """Protocol A has 12 comparisons: the median MDD is the mean of the middle two."""
    comparisons = [SimpleNamespace(mdd=x) for x in (4.0, 1.0, None, 3.0, 2.0)]
    p = power_statement(comparisons, Rules())
    assert (p["mdd_min"], p["mdd_median"], p["mdd_max"]) == (1.0, 2.5, 4.0)
    assert p["family_size"] == 5
