"""``report DIR``: the study's tables, tests and figures as Markdown and JSON under DIR/report/.

Built from the run directories alone (plus the plan copy the runner left in DIR), so it can be
re-made at any time, also for a study that is still running: missing runs show as pending.
"""
from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from . import plots
from .layers import LayerProfile, layer_profile
from .results import (EVENTS_FILE, FAILURES, INTERRUPTED, LOG_FILE, PENDING, Study, finite,
                      load_study)
from .stats import (Comparison, Rules, clean, compare_all, describe, factorial_anova,
                    residual_normality)


def write_report(directory: str | Path,
                 plan_path: Optional[str | Path] = None) -> tuple[Path, Path]:
    """Write DIR/report/report.md, report.json and plots/*.png; return the two report paths."""
    study = load_study(directory, plan_path)
    out = Path(directory) / "report"
    out.mkdir(parents=True, exist_ok=True)
    report = build_report(study, out)
    json_path, md_path = out / "report.json", out / "report.md"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    md_path.write_text(render_markdown(report))
    return md_path, json_path


def build_report(study: Study, out: Path) -> dict[str, Any]:
    plan = study.plan
    rules = Rules(**plan.analysis)
    sizes, arms = [s.name for s in plan.sizes], [a.name for a in plan.arms]
    report: dict[str, Any] = {
        "plan": plan.name, "description": plan.description, "directory": str(study.directory),
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "baseline": plan.baseline, "rules": vars(rules), "sizes": sizes, "arms": arms,
        "seeds": [list(s) for s in plan.seeds],
        "wall_time_s": study.wall_time(), "compute_time_s": compute_time(study),
        "sessions": study.sessions, "run_counts": run_counts(study),
        "headline": {}, "comparisons": {}, "factorial": {}, "normality": {}, "power": {},
        "failures": [], "layer_norms": {}, "plots": {},
    }
    for arm in arms:
        report["headline"][arm] = {size: headline_cell(study, size, arm) for size in sizes}
    for r in study.results:
        if r.state.status in FAILURES:
            report["failures"].append({"run": r.run.key, "size": r.run.size, "arm": r.run.arm,
                                       "seed": r.run.seed, "status": r.state.status,
                                       "reason": r.state.reason})
    for size in sizes:
        losses = {arm: study.final_losses(size, arm) for arm in arms}
        comparisons = compare_all(losses, plan.baseline, rules)
        report["comparisons"][size] = [c.to_dict() for c in comparisons]
        report["power"][size] = power_statement(comparisons, rules)
        report["normality"][size] = residual_normality(comparisons, losses)
        report["factorial"][size] = factorial_anova(factorial_rows(study, size))
        profiles = {arm: p for arm in arms if (p := layer_profile(study.select(size, arm)))}
        report["layer_norms"][size] = {arm: layer_summary(p) for arm, p in profiles.items()}
        report["plots"][size] = make_plots(study, size, profiles, out, comparisons)
    return report


def headline_cell(study: Study, size: str, arm: str) -> dict[str, Any]:
    runs = study.select(size, arm)
    d = describe(study.final_losses(size, arm).values())
    return {"n": d.n, "mean": d.mean, "std": d.std, "median": d.median, "cell": d.cell(),
            "failed": sum(r.state.status in FAILURES for r in runs),
            "not_finished": sum(r.state.status in (PENDING, INTERRUPTED) for r in runs)}


def run_counts(study: Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in study.results:
        counts[r.state.status] = counts.get(r.state.status, 0) + 1
    return counts


def compute_time(study: Study) -> float:
    """Seconds of training summed over every attempt of every run: failed and killed ones too.

    An attempt that ended under the runner's eye (finished, diverged, crashed) left an event in
    ``runs.jsonl`` with its wall seconds. An attempt that was killed (the runner stopped it on
    Ctrl-C / SIGTERM, or the runner itself died) left none, only its header in ``train.log``
    (``==== <time> start:`` / ``resume:``): :func:`killed_attempts_time` derives its time from
    the ``elapsed`` of ``metrics.jsonl``.
    """
    events: dict[str, list[dict]] = {}
    path = study.directory / EVENTS_FILE
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            events.setdefault(event.get("run", ""), []).append(event)
    total = sum(float(e.get("seconds") or 0.0) for run_events in events.values()
                for e in run_events)
    for r in study.results:
        total += killed_attempts_time(r.directory, events.get(r.run.key, []))
    return float(total)


ATTEMPT_HEADER = re.compile(r"^==== (\S+) (start|resume): ")
RESUMED_AT = re.compile(r"^resumed from .* at step (\d+)\s*$")


@dataclass
class Attempt:
    started: Optional[datetime]     # from the header; None if unreadable
    resumed: bool
    resume_step: Optional[int]      # "resumed from ... at step N" (lost when the attempt was
                                    # killed before its buffered stdout was written); 0 at start
    event: bool = False             # the runner recorded its end in runs.jsonl


def attempts_of(run_dir: Path, run_events: list[dict]) -> list[Attempt]:
    """The attempts of a run from its ``train.log``, each marked with whether an event of
    ``runs.jsonl`` belongs to it: the attempt whose header time is the last one at or before the
    event's start (``finished - seconds``, both to the second)."""
    attempts: list[Attempt] = []
    log = Path(run_dir) / LOG_FILE
    if log.is_file():
        for line in log.read_text(errors="replace").splitlines():
            header = ATTEMPT_HEADER.match(line)
            if header:
                resumed = header.group(2) == "resume"
                attempts.append(Attempt(parse_time(header.group(1)), resumed,
                                        None if resumed else 0))
            elif attempts and (at := RESUMED_AT.match(line.strip())) and attempts[-1].resumed:
                attempts[-1].resume_step = int(at.group(1))
    if len(run_events) >= len(attempts):  # every attempt has its event (or no log to match)
        for attempt in attempts:
            attempt.event = True
        return attempts
    for event in run_events:
        finished = parse_time(event.get("finished"))
        if finished is None or not attempts:
            continue
        start = finished.timestamp() - float(event.get("seconds") or 0.0) + 2.0  # rounding
        owners = [a for a in attempts if a.started is None or a.started.timestamp() <= start]
        if owners:
            owners[-1].event = True
    return attempts


def killed_attempts_time(run_dir: Path, run_events: list[dict]) -> float:
    """Training seconds of a run's attempts that have no event in ``runs.jsonl`` (killed).

    train.py's ``elapsed`` (in every ``metrics.jsonl`` record) is the training time of the run
    so far, carried across attempts through the checkpoint: an attempt resumed at step N starts
    at the ``elapsed`` its checkpoint recorded, which is the ``elapsed`` of the records at step
    N (they are kept; the records after N, the work of a killed attempt that the resume repeats,
    are dropped). So the time a killed attempt contributed is the ``elapsed`` at the step the
    next attempt resumed from minus the ``elapsed`` at its own resume step; for the last attempt
    (the run is still interrupted) the last ``elapsed`` logged minus its own. A run of killed
    attempts whose inner resume steps are unknown counts as one (the differences add up).

    Chosen over the alternatives because it is what survives every kind of kill: an attempt
    killed by SIGKILL or SIGTERM writes no event and loses its buffered stdout, but its
    metrics records are flushed one by one; train.log's header times give only when an attempt
    started, not when it died (the next header can come hours later); checkpoints hold the same
    ``elapsed`` but are pruned and, once a run succeeds, deleted. It is a lower bound: the
    start-up of a killed attempt (data, model) and the steps it did after its last checkpoint
    are not in any ``elapsed`` that survives a resume, and a killed attempt that resumed after
    a failed one, with its resume line lost, counts 0. A killed last attempt that still wrote
    ``summary.json`` (its runner died, the run went on) counts the summary's ``wall_time``.
    """
    attempts = attempts_of(run_dir, run_events)
    if not attempts or all(a.event for a in attempts):
        return 0.0
    from ..metrics import read_records
    from ..summary import RunSummary

    metrics = Path(run_dir) / "metrics.jsonl"
    records = read_records(metrics) if metrics.is_file() else []
    elapsed = [(int(r["step"]), float(r["elapsed"])) for r in records
               if finite(r.get("elapsed")) and isinstance(r.get("step"), int)]

    def elapsed_at(step: Optional[int]) -> Optional[float]:
        if step is None:
            return None
        before = [e for s, e in elapsed if s <= step]
        return max(before) if before else 0.0

    last = attempts[-1]
    summary = RunSummary.read(Path(run_dir) / "summary.json")  # written by the last attempt
    if summary is not None and last.resume_step is None and summary.resumed_from:
        last.resume_step = int(summary.resumed_from)
    if not last.event:
        if summary is not None and finite(summary.wall_time) and summary.wall_time > 0:
            # The last attempt ran to its end without the runner: its own wall time, exactly.
            return float(summary.wall_time) + killed_attempts_time_before(
                attempts, elapsed_at, len(attempts) - 1)
    end = max((e for _, e in elapsed), default=0.0)
    return killed_attempts_time_before(attempts, elapsed_at, len(attempts), end)


def killed_attempts_time_before(attempts: list[Attempt], elapsed_at, stop: int,
                                end: Optional[float] = None) -> float:
    """The killed attempts among ``attempts[:stop]``: each group of consecutive killed attempts
    counts from the ``elapsed`` at its first resume step to the ``elapsed`` at the resume step of
    the attempt after it (``end`` when the group runs to ``stop == len(attempts)``)."""
    total, k = 0.0, 0
    while k < stop:
        if attempts[k].event:
            k += 1
            continue
        first = k
        while k < stop and not attempts[k].event:
            k += 1
        begin = elapsed_at(attempts[first].resume_step)
        if begin is None:
            continue  # resumed after a failed attempt from a step no file names: counted as 0
        if k < len(attempts):
            finish = elapsed_at(attempts[k].resume_step)
            if attempts[k].resume_step == 0:
                finish = None  # started afresh: what the killed attempts logged was discarded
        else:
            finish = end
        if finish is not None:
            total += max(0.0, finish - begin)
    return total


def parse_time(text: Any) -> Optional[datetime]:
    try:
        return datetime.fromisoformat(str(text))
    except ValueError:
        return None


def power_statement(comparisons: list[Comparison], rules: Rules) -> dict[str, Any]:
    mdds = sorted(c.mdd for c in comparisons if c.mdd is not None)
    m = len(comparisons)
    return {"alpha_per_test": rules.alpha / max(1, m), "family_size": m, "power": rules.power,
            "mdd_min": mdds[0] if mdds else None,
            "mdd_median": float(statistics.median(mdds)) if mdds else None,
            "mdd_max": mdds[-1] if mdds else None}


def factorial_rows(study: Study, size: str) -> list[dict[str, Any]]:
    """One row per successful run of a layer-adaptive arm, with its levels of the 3 factors."""
    from ..optim import preset_defaults

    rows = []
    for arm in study.plan.arms:
        if not arm.optimizer.startswith("la-"):
            continue
        hp = {**preset_defaults(arm.optimizer), **arm.opt_args}
        levels = {"scaling": hp["scaling"], "momentum": hp["beta1_mode"], "clip": hp["clip"]}
        for seed, loss in study.final_losses(size, arm.name).items():
            rows.append({"loss": loss, "seed": seed, **levels})
    return rows


def layer_summary(p: LayerProfile) -> dict[str, Any]:
    largest, smallest = p.extreme_layers()
    return {"runs": p.runs, "layers": len(p.layers), "spread_early_log2": clean(p.spread_early),
            "spread_late_log2": clean(p.spread_late), "largest_late": largest,
            "smallest_late": smallest}


def make_plots(study: Study, size: str, profiles: dict[str, LayerProfile], out: Path,
               comparisons: list[Comparison]) -> dict[str, str]:
    figures = {
        "val_curves": plots.val_curves(study, size, out / "plots" / f"val_curves_{size}.png"),
        "final_loss": plots.final_strip(study, size, out / "plots" / f"final_loss_{size}.png",
                                        comparisons),
        "grad_norm_heatmap": plots.grad_norm_heatmap(
            profiles, size, out / "plots" / f"grad_norm_heatmap_{size}.png"),
        "layer_grad_norms": plots.layer_grad_norms(
            profiles, size, out / "plots" / f"layer_grad_norms_{size}.png"),
        "alpha": plots.alpha_distribution(profiles, size, out / "plots" / f"alpha_{size}.png"),
    }
    return {name: str(path.relative_to(out)) for name, path in figures.items() if path}


# ------------------------------------------------------------------------------------------------
# Markdown


def fmt(x: Optional[float], spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def fmt_p(p: Optional[float]) -> str:
    return "n/a" if p is None else (f"{p:.2e}" if p < 1e-3 else f"{p:.4f}")


def render_markdown(report: dict[str, Any]) -> str:
    rules, base, sizes = report["rules"], report["baseline"], report["sizes"]
    counts = report["run_counts"]
    lines = [f"# Study report: {report['plan']}", "", report["description"], "",
             f"- directory: `{report['directory']}` (generated {report['generated']})",
             f"- runs: {sum(counts.values())} planned; "
             + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())),
             f"- wall time of the study: {report['wall_time_s'] / 60:.1f} min over "
             f"{len(report['sessions'])} runner invocation(s); training time summed over every "
             f"attempt of every run: {report['compute_time_s'] / 60:.1f} min (killed attempts "
             f"from their logged elapsed time, a lower bound)",
             f"- seeds (init, data): {', '.join(f'({a}, {b})' for a, b in report['seeds'])}", ""]
    lines += ["## Final validation loss", "",
              "Mean ± sample SD over seeds (n successful runs); failed runs are not in the "
              "mean.", ""]
    lines += table(["optimizer", *sizes],
                   [[arm] + [cell_text(report["headline"][arm][s]) for s in sizes]
                    for arm in report["arms"]])
    for size in sizes:
        lines += comparison_section(report, size, rules, base)
    lines += failure_section(report)
    lines += layer_section(report)
    lines += rules_section(rules)
    return "\n".join(lines) + "\n"


def cell_text(cell: dict[str, Any]) -> str:
    extra = []
    if cell["failed"]:
        extra.append(f"{cell['failed']} failed")
    if cell["not_finished"]:
        extra.append(f"{cell['not_finished']} not finished")
    return cell["cell"] + (f" [{', '.join(extra)}]" if extra else "")


def comparison_section(report: dict, size: str, rules: dict, base: str) -> list[str]:
    ci = f"{rules['ci_level'] * 100:g}% CI"
    margin = rules["equivalence_margin"]
    lines = ["", f"## {size}: each arm vs {base}", "",
             f"Δ = arm − {base} (negative: lower loss than {base}). Holm over "
             f"{len(report['comparisons'][size])} comparisons at FWER {rules['alpha']}; "
             f"TOST equivalence margin ±{margin} nats.", ""]
    rows = []
    for c in report["comparisons"][size]:
        rows.append([c["arm"], fmt(c["diff"], "+.4f"),
                     f"[{fmt(c['ci_low'], '+.4f')}, {fmt(c['ci_high'], '+.4f')}]",
                     fmt_p(c["p"]), fmt_p(c["p_holm"]), "**yes**" if c["significant"] else "no",
                     fmt(c["hedges_g"], "+.2f"), fmt_p(c["tost_p"]),
                     "yes" if c["equivalent"] else "no", fmt(c["mdd"]),
                     f"{c['test']} ({c['test_reason']})"])
    lines += table(["arm", "Δ mean", ci, "p", "Holm p", "significant", "Hedges' g",
                    f"TOST p (±{margin})", "equivalent", "MDD", "test (why)"], rows)
    power = report["power"][size]
    lines += ["", f"**Power.** At per-test α = {power['alpha_per_test']:.2g} (α/m, Holm's first "
              f"step) and power {power['power']}, the observed SDs give a minimum detectable "
              f"difference of {fmt(power['mdd_min'])}–{fmt(power['mdd_max'])} nats (median "
              f"{fmt(power['mdd_median'])}); smaller true differences are likely missed."]
    normality = report["normality"][size]
    if normality:
        lines += ["", f"**Normality of paired differences** (pooled, centred; Shapiro–Wilk): "
                  f"W = {normality['W']:.3f}, p = {fmt_p(normality['p'])}, n = {normality['n']}."]
    factorial = report["factorial"][size]
    lines += ["", f"**Factorial model of the layer-adaptive grid** "
              f"(`loss ~ C(scaling)*C(momentum)*C(clip) + C(seed)`, OLS, type-II ANOVA): "]
    if "skipped" in factorial:
        lines += [f"skipped: {factorial['skipped']}."]
    else:
        lines += [""] + table(["term", "df", "sum sq", "F", "p", "partial η²"],
                              [[t["term"], fmt(t["df"], ".0f"), fmt(t["sum_sq"], ".3g"),
                                fmt(t.get("F"), ".2f"), fmt_p(t.get("p")),
                                fmt(t.get("partial_eta_sq"), ".3f")] for t in factorial["table"]])
    plots_ = report["plots"][size]
    if plots_:
        lines += [""] + [f"![{name} {size}]({path})" for name, path in plots_.items()]
    return lines


def failure_section(report: dict) -> list[str]:
    lines = ["", "## Failures", ""]
    if not report["failures"]:
        return lines + ["None: every finished run ended with a finite validation loss."]
    lines += ["Diverged or crashed runs count against their arm and are never re-seeded.", ""]
    return lines + table(["run", "status", "reason"],
                         [[f["run"], f["status"], f["reason"]] for f in report["failures"]])


def layer_section(report: dict) -> list[str]:
    lines = ["", "## Layer-wise gradient norms", "",
             "Spread = log2(max/min) of the per-layer gradient norms at a step, averaged over the "
             "first / last 10% of the steps and over seeds (1.0 = the largest layer gradient is "
             "twice the smallest). Norms are the optimizer's per-layer gradient norms before "
             "clipping. The heatmaps show each layer's norm over the median layer at each step, "
             "layers by depth (embedding at the top); the line plots show each layer's norm "
             "itself, coloured by depth.", ""]
    rows = [[size, arm, str(s["runs"]), fmt(s["spread_early_log2"], ".2f"),
             fmt(s["spread_late_log2"], ".2f"), s["largest_late"], s["smallest_late"]]
            for size in report["sizes"] for arm, s in report["layer_norms"][size].items()]
    return lines + table(["size", "arm", "runs", "spread early", "spread late",
                          "largest (late)", "smallest (late)"], rows)


def rules_section(rules: dict) -> list[str]:
    return ["", "## Pre-declared analysis", "",
            "- Primary endpoint: final validation loss on the corpus' fixed validation windows "
            "(the same tokens for every run).",
            f"- Test: paired t-test on per-seed differences when ≥ 3 seeds are shared and their "
            f"Pearson correlation is ≥ {rules['welch_below_pairing_corr']}; Welch's t-test "
            f"otherwise.",
            f"- Multiplicity: Holm, FWER {rules['alpha']} per size. Interval: t-based "
            f"{rules['ci_level'] * 100:g}% CI of the mean difference of the test used.",
            "- Effect size: Hedges' g (mean difference over the pooled between-run SD, "
            "small-sample corrected).",
            f"- Equivalence: TOST with margin ±{rules['equivalence_margin']} nats at "
            f"α = {rules['alpha']}.",
            "- Failures (diverged / crashed): excluded from the means and tests, counted, never "
            "re-seeded."]


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
