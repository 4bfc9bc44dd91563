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
    assert set(data["plots"]["134m"]) == {"val_curves", "final_loss", "grad_norm_heatmap",
                                          "layer_grad_norms", "alpha"}
    assert data["layer_norms"]["134m"]["adamw"]["largest_late"] == "lm_head"


def test_power_statement_median_of_an_even_count():
    """Protocol A has 12 comparisons: the median MDD is the mean of the middle two."""
    comparisons = [SimpleNamespace(mdd=x) for x in (4.0, 1.0, None, 3.0, 2.0)]
    p = power_statement(comparisons, Rules())
    assert (p["mdd_min"], p["mdd_median"], p["mdd_max"]) == (1.0, 2.5, 4.0)
    assert p["family_size"] == 5


# ------------------------------------------------------------------------------------------------
# Training time over every attempt, killed ones included

CI_PLAN = ROOT / "stratopt_ds" / "study" / "plans" / "ci_tiny.yaml"  # tiny: adamw, stratopt x 2


def attempt_run(run_dir: Path, attempts: list[tuple[str, str, int | None]], last_step: int,
                summary: dict | None = None, per_step: float = 3.0) -> None:
    """A run directory after some attempts: train.log with one header per attempt (time, kind,
    the step its "resumed from" line names, None when the kill lost it), metrics.jsonl as the
    last attempt left it (elapsed = per_step x step; an evaluation record every 5 steps adds 0.5)."""
    run_dir.mkdir(parents=True)
    log = []
    for when, kind, step in attempts:
        log.append(f"\n==== 2026-01-01T{when}+00:00 {kind}: python -m stratopt_ds.train --config x")
        if step:
            log.append(f"resumed from {run_dir}/checkpoints/step_{step} at step {step}")
    (run_dir / "train.log").write_text("\n".join(log) + "\n")
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(1, last_step + 1):
            f.write(json.dumps({"step": step, "loss": 3.0, "elapsed": per_step * step}) + "\n")
            if step % 5 == 0:
                f.write(json.dumps({"step": step, "val_loss": 3.0,
                                    "elapsed": per_step * step + 0.5}) + "\n")
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))


def event(run: str, seconds: float, finished: str, **extra) -> str:
    return json.dumps({"run": run, "status": "ok", "seconds": seconds,
                       "finished": f"2026-01-01T{finished}+00:00", **extra}) + "\n"


def test_training_time_counts_killed_attempts(tmp_path):
    from stratopt_ds.study.report import compute_time, killed_attempts_time
    from stratopt_ds.study.results import load_study

    shutil.copyfile(CI_PLAN, tmp_path / "plan.yaml")
    ok = {"status": "ok", "steps": 20, "steps_done": 20, "val_loss": 3.0,
          "val_losses": [[20, 3.0]], "layers": LAYERS}
    # adamw/seed0: the first attempt was killed after its checkpoint at step 10; the resumed one
    # finished (40 s by the runner's clock). The killed one trained up to the elapsed at step 10.
    attempt_run(tmp_path / "tiny/adamw/seed0", [("10:00:00", "start", 0),
                                                ("12:00:00", "resume", 10)], 20,
                {**ok, "resumed_from": 10})
    # adamw/seed1: one attempt, recorded.
    attempt_run(tmp_path / "tiny/adamw/seed1", [("10:00:00", "start", 0)], 20, ok)
    # stratopt/seed0: killed at step 7 and not resumed yet.
    attempt_run(tmp_path / "tiny/stratopt/seed0", [("10:00:00", "start", 0)], 7)
    # stratopt/seed1: killed, resumed and killed again (its resume line lost with its stdout),
    # resumed at step 15 and finished: both killed attempts trained up to the elapsed at 15.
    attempt_run(tmp_path / "tiny/stratopt/seed1", [("10:00:00", "start", 0),
                                                   ("11:00:00", "resume", None),
                                                   ("12:00:00", "resume", 15)], 20,
                {**ok, "resumed_from": 15})
    (tmp_path / "runs.jsonl").write_text(
        event("tiny/adamw/seed0", 40.0, "12:00:40", resumed=True)
        + event("tiny/adamw/seed1", 50.0, "10:00:50")
        + event("tiny/stratopt/seed1", 20.0, "12:00:20", resumed=True))
    study = load_study(tmp_path)
    killed = {r.run.key: killed_attempts_time(r.directory, [
        json.loads(x) for x in (tmp_path / "runs.jsonl").read_text().splitlines()
        if json.loads(x)["run"] == r.run.key]) for r in study.results}
    assert killed == {"tiny/adamw/seed0": 30.5, "tiny/adamw/seed1": 0.0,
                      "tiny/stratopt/seed0": 21.0, "tiny/stratopt/seed1": 45.5}
    assert compute_time(study) == pytest.approx(40 + 50 + 20 + 30.5 + 21 + 45.5)


def test_training_time_of_other_kills(tmp_path):
    from stratopt_ds.study.report import killed_attempts_time

    # Killed before its first checkpoint, then started afresh: the killed work left no record.
    fresh = tmp_path / "fresh"
    attempt_run(fresh, [("10:00:00", "start", 0), ("11:00:00", "start", 0)], 20)
    assert killed_attempts_time(fresh, [json.loads(event("r", 60.0, "11:01:00"))]) == 0.0
    # The runner died and the run went on to its end: its summary's wall time, plus the killed
    # attempt before it up to the step the last one resumed from.
    orphan = tmp_path / "orphan"
    attempt_run(orphan, [("10:00:00", "start", 0), ("11:00:00", "resume", 10)], 20,
                {"status": "ok", "steps": 20, "val_loss": 3.0, "wall_time": 33.0,
                 "resumed_from": 10})
    assert killed_attempts_time(orphan, []) == pytest.approx(33.0 + 30.5)
    # Every attempt recorded: nothing added.
    assert killed_attempts_time(orphan, [json.loads(event("r", 1.0, "10:00:01")),
                                         json.loads(event("r", 1.0, "11:00:01"))]) == 0.0
