"""The report's figures (PNG, matplotlib's Agg backend: no display needed).

One file per figure and size:

* ``val_curves``: validation loss against the step, mean ± SD over seeds; right: the second half
  of training (from half the planned steps to the end);
* ``final_loss``: top, the final loss of every seed, a thin line joining one seed across the arms;
  bottom, each arm's Δ to the baseline with the confidence interval of the report's test;
* ``grad_norm_heatmap``: layer x step of each layer's (pre-clip) gradient norm relative to the
  median layer, drawn on the true step edges of its bins, layers in depth order;
* ``layer_grad_norms``: per-layer ‖g_l‖ against the step (log y), one line per layer coloured
  by depth, one panel per arm (the seed paper's "layer-wise gradient norms" figure);
* ``alpha``: the distribution of the layer scales alpha per layer.

Each ``*_figure`` function builds the figure and returns it (None when there is nothing to draw);
the function of the same name without the suffix saves it and returns the path.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap, Normalize  # noqa: E402

from .layers import LayerProfile  # noqa: E402
from .results import FAILURES, OK, Study  # noqa: E402
from .stats import NO_TEST, Comparison  # noqa: E402

DPI = 110
MAX_LAYER_LABELS = 24   # more layer names than this on an axis are unreadable
# Depth colours: viridis without its palest yellow, which vanishes on white.
DEPTH_CMAP = ListedColormap(plt.get_cmap("viridis")(np.linspace(0.0, 0.9, 256)), name="depth")


def arm_colors(arms: list[str], baseline: str) -> dict[str, tuple]:
    """The baseline in black; the others from a qualitative map with enough distinct colours."""
    others = [a for a in arms if a != baseline]
    cmap = plt.get_cmap("tab10" if len(others) <= 10 else "tab20")
    colors = {a: cmap(i % cmap.N) for i, a in enumerate(others)}
    colors[baseline] = (0.0, 0.0, 0.0, 1.0)
    return colors


def save(fig, path: Path) -> Optional[Path]:
    if fig is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# Validation loss


def planned_steps(study: Study, size: str) -> Optional[int]:
    """The steps the size's runs train for (their summaries'), None when no run has one."""
    steps = [r.summary.steps for r in study.select(size) if r.summary and r.summary.steps]
    return max(steps) if steps else None


def val_curves_figure(study: Study, size: str):
    """Mean ± SD over seeds of the validation loss against the step; right: the second half.

    The right panel spans half the planned steps to the end, whatever the evaluation points are
    (the curves enter it from the left edge), and its y range fits what is inside it.
    """
    arms = [a.name for a in study.plan.arms]
    colors = arm_colors(arms, study.plan.baseline)
    drawn_curves = []
    for arm in arms:
        curves = [r.val_curve for r in study.select(size, arm) if r.state.status == OK]
        curves = [c for c in curves if c]
        if not curves:
            continue
        steps = np.array(sorted(set.intersection(*(set(s for s, _ in c) for c in curves))))
        if steps.size == 0:
            continue
        matrix = np.array([[dict(c)[s] for s in steps] for c in curves])
        mean = matrix.mean(axis=0)
        std = matrix.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros_like(mean)
        drawn_curves.append((arm, len(curves), steps, mean, std))
    if not drawn_curves:
        return None
    total = planned_steps(study, size) or max(int(c[2][-1]) for c in drawn_curves)
    total = max(total, max(int(c[2][-1]) for c in drawn_curves))
    half = total / 2
    fig, (ax_all, ax_zoom) = plt.subplots(1, 2, figsize=(13, 4.8))
    late_values = []
    for arm, n, steps, mean, std in drawn_curves:
        marker = "o" if len(steps) <= 20 else None
        for ax in (ax_all, ax_zoom):
            ax.plot(steps, mean, color=colors[arm], lw=2 if arm == study.plan.baseline else 1.3,
                    marker=marker, ms=3, label=f"{arm} (n={n})")
            ax.fill_between(steps, mean - std, mean + std, color=colors[arm], alpha=0.18, lw=0)
        late_values.extend(late_range(steps, mean - std, half))
        late_values.extend(late_range(steps, mean + std, half))
    ax_all.set_title(f"{size}: validation loss (mean ± SD over seeds)")
    ax_zoom.set_title(f"second half of training (steps {half:g}–{total})")
    for ax in (ax_all, ax_zoom):
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
    ax_zoom.set_xlim(half, total)
    lo, hi = min(late_values), max(late_values)
    pad = 0.05 * (hi - lo or 1e-3)
    ax_zoom.set_ylim(lo - pad, hi + pad)
    ax_zoom.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    return fig


def late_range(steps: np.ndarray, values: np.ndarray, start: float) -> list[float]:
    """The values a line through (steps, values) takes from ``start`` on: the points after it
    and the line's value at ``start`` itself (interpolated; the first point if it starts later)."""
    inside = values[steps >= start].tolist()
    if steps[0] < start:
        inside.append(float(np.interp(start, steps, values)))
    return inside or values[-1:].tolist()


def val_curves(study: Study, size: str, path: Path) -> Optional[Path]:
    return save(val_curves_figure(study, size), path)


# ------------------------------------------------------------------------------------------------
# Final loss: per seed, and the difference to the baseline


def final_strip_figure(study: Study, size: str, comparisons: Sequence[Comparison],
                       ci_level: Optional[float] = None):
    """Top: one point per seed (jittered), mean ± SD in black, a thin grey line joining each
    seed's points across the arms (seeds pair the arms: same init, same data order); failures
    under the arm's name. Bottom: Δ = arm − baseline with its CI, exactly the report's
    comparisons (:func:`stats.compare_all`): filled when Holm-significant."""
    plan = study.plan
    arms, baseline = [a.name for a in plan.arms], plan.baseline
    colors = arm_colors(arms, baseline)
    losses = {arm: study.final_losses(size, arm) for arm in arms}
    if not any(losses.values()):
        return None
    ci_level = plan.analysis.get("ci_level", 0.99) if ci_level is None else ci_level
    fig, (ax, ax_d) = plt.subplots(2, 1, sharex=True, height_ratios=(3, 2),
                                   figsize=(max(5.5, 0.75 * len(arms) + 2.5), 7.2),
                                   layout="constrained")
    rng = np.random.default_rng(0)  # fixed jitter: the same picture every time
    x_of: dict[tuple[str, int], float] = {}
    labels = []
    for i, arm in enumerate(arms):
        failed = sum(r.state.status in FAILURES for r in study.select(size, arm))
        labels.append(arm + (f"\n({failed} failed)" if failed else ""))
        values = losses[arm]
        if not values:
            continue
        for seed in values:
            x_of[(arm, seed)] = i + float(rng.uniform(-0.12, 0.12))
        ax.scatter([x_of[(arm, s)] for s in values], list(values.values()), s=28,
                   color=colors[arm], alpha=0.85, zorder=3)
        if len(values) > 1:
            v = list(values.values())
            ax.errorbar(i + 0.25, np.mean(v), yerr=np.std(v, ddof=1), fmt="_", color="black",
                        ms=14, capsize=3, zorder=4)
    seeds = sorted({s for v in losses.values() for s in v})
    for seed in seeds:  # NaN where the seed has no result: the line breaks there
        if sum(seed in losses[arm] for arm in arms) < 2:
            continue
        xs = [x_of.get((arm, seed), float(i)) for i, arm in enumerate(arms)]
        ys = [losses[arm].get(seed, np.nan) for arm in arms]
        ax.plot(xs, ys, color="0.55", lw=0.6, alpha=0.7, zorder=2, gid=f"seed {seed}")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title(f"{size}: final validation loss per seed (grey: one seed across arms; "
                 f"bar: mean ± SD)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)

    delta_panel(ax_d, arms, baseline, colors, comparisons, ci_level,
                plan.analysis.get("equivalence_margin"))
    ax_d.set_xticks(range(len(arms)), labels, rotation=40, ha="right", fontsize=8)
    ax_d.set_xlim(-0.6, len(arms) - 0.4)
    return fig


def delta_panel(ax, arms: list[str], baseline: str, colors: dict, comparisons: Sequence[Comparison],
                ci_level: float, margin: Optional[float]) -> None:
    """Δ vs the baseline with its CI per arm, at the arm's x position (the baseline's is 0)."""
    by_arm = {c.arm: c for c in comparisons}
    ax.axhline(0.0, color="black", lw=0.8)
    if margin:
        ax.axhspan(-margin, margin, color="0.85", lw=0, zorder=0,
                   label=f"equivalence margin ±{margin:g}")
    base_x = arms.index(baseline)
    ax.plot([base_x], [0.0], marker="D", color="black", ms=5, ls="none")
    shown_filled = shown_open = False
    for i, arm in enumerate(arms):
        c = by_arm.get(arm)
        if arm == baseline or c is None:
            continue
        if c.test == NO_TEST or c.diff is None or c.ci_low is None:
            ax.annotate("no test", (i, 0.0), ha="center", va="bottom", fontsize=7, color="0.4",
                        rotation=90, xytext=(0, 4), textcoords="offset points")
            continue
        filled = bool(c.significant)
        label = None
        if filled and not shown_filled:
            label, shown_filled = "significant (Holm)", True
        elif not filled and not shown_open:
            label, shown_open = "not significant", True
        ax.errorbar([i], [c.diff], yerr=[[c.diff - c.ci_low], [c.ci_high - c.diff]], fmt="o",
                    color=colors[arm], mfc=colors[arm] if filled else "white", ms=6, capsize=3,
                    lw=1.4, zorder=3, gid=f"delta {arm}", label=label)
    ax.set_ylabel(f"Δ vs {baseline} (nats)")
    ax.set_title(f"Δ = arm − {baseline}, mean with {ci_level * 100:g}% CI of the report's test "
                 f"(paired t or Welch)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best", frameon=False)


def final_strip(study: Study, size: str, path: Path,
                comparisons: Sequence[Comparison] = ()) -> Optional[Path]:
    return save(final_strip_figure(study, size, comparisons), path)


# ------------------------------------------------------------------------------------------------
# Layer-wise gradient norms and layer scales


def _grid(n: int, width: float, height: float, max_cols: int = 4, sharey: bool = True):
    """Panels in rows of up to max_cols, sharing the y axis (the same layers, the same scale)."""
    cols = min(max_cols, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False,
                             sharey=sharey, layout="constrained")  # titles clear of tick labels
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


_BLOCK_OF_SHORT = re.compile(r"^(?:block\.)?(\d+)(?:\.|$)")


def layer_ticks(layers: list[str]) -> tuple[list[float], list[str], list[float]]:
    """(tick positions, labels, block boundaries) for rows of layers in depth order: every layer
    when there are few; otherwise one label in the middle of each block ("block i", thinned to
    about MAX_LAYER_LABELS) and every layer outside the blocks (embedding, final norm, head),
    with the boundaries between blocks (row positions, for faint separating lines)."""
    if len(layers) <= MAX_LAYER_LABELS:
        return list(range(len(layers))), list(layers), []
    blocks: dict[str, list[int]] = {}
    outside: list[int] = []
    for row, name in enumerate(layers):
        match = _BLOCK_OF_SHORT.match(name)
        if match is None:
            outside.append(row)
        else:
            blocks.setdefault(match.group(1), []).append(row)
    step = max(1, math.ceil(len(blocks) / MAX_LAYER_LABELS))
    ticks = [(row, layers[row]) for row in outside]
    ticks += [((rows[0] + rows[-1]) / 2, f"block {b}")
              for i, (b, rows) in enumerate(blocks.items()) if i % step == 0]
    ticks.sort()
    bounds = sorted({rows[0] - 0.5 for rows in blocks.values()}
                    | {rows[-1] + 0.5 for rows in blocks.values()})
    bounds = [b for b in bounds if -0.5 < b < len(layers) - 0.5]
    return [t for t, _ in ticks], [label for _, label in ticks], bounds


def _layer_ticks(ax, layers: list[str], axis: str = "y") -> None:
    ticks, labels, _ = layer_ticks(layers)
    if axis == "y":
        ax.set_yticks(ticks, labels, fontsize=6)
    else:
        ax.set_xticks([t + 1 for t in ticks], labels, fontsize=6, rotation=90)


def grad_norm_heatmap_figure(profiles: dict[str, LayerProfile], size: str):
    """Layer x step: log2 of each layer's pre-clip gradient norm over the median of the layers.

    Columns are drawn between the true step edges of their bins (``pcolormesh``): the bins of
    :func:`layers.layer_profile` hold unequal numbers of steps whenever the steps do not divide
    into them. Rows go by depth, the embedding at the top and the head at the bottom.
    """
    if not profiles:
        return None
    values = np.concatenate([p.log_ratio[np.isfinite(p.log_ratio)] for p in profiles.values()])
    limit = float(np.percentile(np.abs(values), 99)) if values.size else 1.0
    limit = limit or 1.0
    layers = max(len(p.layers) for p in profiles.values())
    fig, axes = _grid(len(profiles), 4.4, min(9.0, 0.12 * layers + 1.6))  # ~110 rows at 134M
    mesh = None
    for k, (ax, (arm, p)) in enumerate(zip(axes, profiles.items())):
        rows = np.arange(len(p.layers) + 1) - 0.5
        mesh = ax.pcolormesh(p.bin_edges, rows, np.ma.masked_invalid(p.log_ratio),
                             cmap="RdBu_r", vmin=-limit, vmax=limit, shading="flat")
        ax.set_ylim(len(p.layers) - 0.5, -0.5)  # the embedding on top, the head at the bottom
        ax.set_xlim(p.bin_edges[0], p.bin_edges[-1])
        ax.set_title(f"{arm} (n={p.runs})", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        _layer_ticks(ax, p.layers)
        for bound in layer_ticks(p.layers)[2]:  # faint lines between the blocks
            ax.axhline(bound, color="0.4", lw=0.3, alpha=0.6)
        if k % min(4, len(profiles)) == 0:
            ax.set_ylabel("layer (input at the top, output at the bottom)", fontsize=8)
    fig.suptitle(f"{size}: per-layer gradient norm before clipping, relative to the median "
                 f"layer at each step (log2, mean over seeds)", fontsize=10)
    fig.colorbar(mesh, ax=axes, shrink=0.6,
                 label="log2(‖g_layer‖ / median over layers), pre-clip")
    return fig


def grad_norm_heatmap(profiles: dict[str, LayerProfile], size: str, path: Path) -> Optional[Path]:
    return save(grad_norm_heatmap_figure(profiles, size), path)


def layer_grad_norms_figure(profiles: dict[str, LayerProfile], size: str):
    """Per-layer ‖g_l‖ (pre-clip) against the step on a log axis, one line per layer coloured by
    its depth (embedding dark, head light), one panel per arm: the raw norms behind the heatmap,
    geometric mean over seeds and over the heatmap's step bins."""
    profiles = {arm: p for arm, p in profiles.items() if p.log_norm is not None}
    if not profiles:
        return None
    fig, axes = _grid(len(profiles), 4.2, 3.4)
    norm = Normalize(0.0, 1.0)
    for k, (ax, (arm, p)) in enumerate(zip(axes, profiles.items())):
        x = p.bin_centers
        for row, name in enumerate(p.layers):
            y = np.exp2(p.log_norm[row])
            if not np.isfinite(y).any():
                continue
            ax.plot(x, y, color=DEPTH_CMAP(norm(p.depth[row])), lw=0.8, alpha=0.85, gid=name)
        ax.set_yscale("log")
        ax.set_title(f"{arm} (n={p.runs})", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3, which="major")
        if k % min(4, len(profiles)) == 0:
            ax.set_ylabel("‖g_l‖ before clipping", fontsize=8)
    bar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=DEPTH_CMAP), ax=axes, shrink=0.6,
                       label="depth: blocks 0 … n−1 in between")
    bar.set_ticks([0.0, 1.0], labels=["embedding", "final norm,\nhead"])
    fig.suptitle(f"{size}: layer-wise gradient norms (pre-clip, geometric mean over seeds), "
                 f"one line per layer", fontsize=10)
    return fig


def layer_grad_norms(profiles: dict[str, LayerProfile], size: str, path: Path) -> Optional[Path]:
    return save(layer_grad_norms_figure(profiles, size), path)


def alpha_distribution_figure(profiles: dict[str, LayerProfile], size: str):
    """Box per layer of the layer scale alpha over all logged steps and seeds (log axis)."""
    if not profiles:
        return None
    layers = max(len(p.layers) for p in profiles.values())
    fig, axes = _grid(len(profiles), min(12.0, 0.16 * layers + 2.2), 3.6,
                      max_cols=4 if layers <= 30 else 2)
    for ax, (arm, p) in zip(axes, profiles.items()):
        data = [row[np.isfinite(row) & (row > 0)] for row in p.alpha]
        ax.boxplot(data, showfliers=False, widths=0.6,
                   medianprops={"color": "tab:red"}, boxprops={"color": "tab:blue"})
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_title(f"{arm} (n={p.runs})", fontsize=9)
        ax.set_ylabel("alpha (layer LR scale)", fontsize=8)
        _layer_ticks(ax, p.layers, axis="x")
    positive = np.concatenate([p.alpha[np.isfinite(p.alpha) & (p.alpha > 0)]
                               for p in profiles.values()])
    if positive.size:  # one range for every panel, at least a factor 2 around alpha = 1
        axes[0].set_ylim(min(0.5, positive.min()) / 1.2, max(2.0, positive.max()) * 1.2)
    fig.suptitle(f"{size}: distribution of the layer scale alpha per layer, input to output "
                 f"(box: quartiles, whiskers: 1.5 IQR)", fontsize=10)
    return fig


def alpha_distribution(profiles: dict[str, LayerProfile], size: str, path: Path) -> Optional[Path]:
    return save(alpha_distribution_figure(profiles, size), path)
