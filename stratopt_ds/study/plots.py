"""The report's figures (PNG, matplotlib's Agg backend: no display needed).

One file per figure and size: validation-loss curves, final-loss strip plot, layer x step heatmap
of relative gradient norms, and the distribution of the layer scales alpha per layer.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .layers import LayerProfile  # noqa: E402
from .results import FAILURES, OK, Study  # noqa: E402

DPI = 110


def arm_colors(arms: list[str], baseline: str) -> dict[str, tuple]:
    """The baseline in black; the others from a qualitative map with enough distinct colours."""
    others = [a for a in arms if a != baseline]
    cmap = plt.get_cmap("tab10" if len(others) <= 10 else "tab20")
    colors = {a: cmap(i % cmap.N) for i, a in enumerate(others)}
    colors[baseline] = (0.0, 0.0, 0.0, 1.0)
    return colors


def save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def val_curves(study: Study, size: str, path: Path) -> Optional[Path]:
    """Mean ± SD over seeds of the validation loss against the step; right: the second half."""
    arms = [a.name for a in study.plan.arms]
    colors = arm_colors(arms, study.plan.baseline)
    fig, (ax_all, ax_zoom) = plt.subplots(1, 2, figsize=(13, 4.8))
    drawn, late_values = 0, []
    for arm in arms:
        curves = [r.val_curve for r in study.select(size, arm) if r.state.status == OK]
        curves = [c for c in curves if c]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves)))
        matrix = np.array([[dict(c)[s] for s in steps] for c in curves])
        mean = matrix.mean(axis=0)
        std = matrix.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros_like(mean)
        half = max(0, min(len(steps) // 2, len(steps) - 2))  # the zoom shows >= 2 points
        marker = "o" if len(steps) <= 20 else None
        for ax, sl in ((ax_all, slice(None)), (ax_zoom, slice(half, None))):
            ax.plot(steps[sl], mean[sl], color=colors[arm], lw=2 if arm == study.plan.baseline
                    else 1.3, marker=marker, ms=3, label=f"{arm} (n={len(curves)})")
            ax.fill_between(steps[sl], (mean - std)[sl], (mean + std)[sl], color=colors[arm],
                            alpha=0.18, lw=0)
        late_values.extend(((mean - std)[half:]).tolist() + ((mean + std)[half:]).tolist())
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax_all.set_title(f"{size}: validation loss (mean ± SD over seeds)")
    ax_zoom.set_title("second half of training")
    for ax in (ax_all, ax_zoom):
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
    lo, hi = min(late_values), max(late_values)
    pad = 0.05 * (hi - lo or 1e-3)
    ax_zoom.set_ylim(lo - pad, hi + pad)
    ax_zoom.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    return save(fig, path)


def final_strip(study: Study, size: str, path: Path) -> Optional[Path]:
    """One point per seed (jittered), mean ± SD in black; failures under the arm's name."""
    arms = [a.name for a in study.plan.arms]
    colors = arm_colors(arms, study.plan.baseline)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.75 * len(arms) + 2), 4.6))
    rng = np.random.default_rng(0)  # fixed jitter: the same picture every time
    labels, drawn = [], 0
    for i, arm in enumerate(arms):
        values = list(study.final_losses(size, arm).values())
        failed = sum(r.state.status in FAILURES for r in study.select(size, arm))
        labels.append(arm + (f"\n({failed} failed)" if failed else ""))
        if not values:
            continue
        drawn += 1
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(values)), values, s=28, color=colors[arm],
                   alpha=0.85, zorder=3)
        if len(values) > 1:
            ax.errorbar(i + 0.25, np.mean(values), yerr=np.std(values, ddof=1), fmt="_",
                        color="black", ms=14, capsize=3, zorder=4)
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xticks(range(len(arms)), labels, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title(f"{size}: final validation loss per seed (bar: mean ± SD)")
    ax.grid(axis="y", alpha=0.3)
    return save(fig, path)


def _grid(n: int, width: float, height: float, max_cols: int = 4):
    """Panels in rows of up to max_cols, sharing the y axis (the same layers, the same scale)."""
    cols = min(max_cols, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False,
                             sharey=True, layout="constrained")  # titles clear of tick labels
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _layer_ticks(ax, layers: list[str], axis: str = "y") -> None:
    step = max(1, math.ceil(len(layers) / 24))  # at most ~24 labels stay readable
    ticks = list(range(0, len(layers), step))
    if axis == "y":
        ax.set_yticks(ticks, [layers[t] for t in ticks], fontsize=6)
    else:
        ax.set_xticks([t + 1 for t in ticks], [layers[t] for t in ticks], fontsize=6, rotation=90)


def grad_norm_heatmap(profiles: dict[str, LayerProfile], size: str, path: Path) -> Optional[Path]:
    """Layer x step: log2 of each layer's gradient norm over the median of the layers."""
    if not profiles:
        return None
    values = np.concatenate([p.log_ratio[np.isfinite(p.log_ratio)] for p in profiles.values()])
    limit = float(np.percentile(np.abs(values), 99)) if values.size else 1.0
    limit = limit or 1.0
    layers = max(len(p.layers) for p in profiles.values())
    fig, axes = _grid(len(profiles), 4.4, min(9.0, 0.12 * layers + 1.6))  # ~110 rows at 134M
    image = None
    for ax, (arm, p) in zip(axes, profiles.items()):
        image = ax.imshow(p.log_ratio, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit,
                          interpolation="nearest",
                          extent=(0, p.bin_steps[-1], len(p.layers) - 0.5, -0.5))
        ax.set_title(f"{arm} (n={p.runs})", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        _layer_ticks(ax, p.layers)
    fig.suptitle(f"{size}: per-layer gradient norm relative to the median layer, "
                 f"log2, mean over seeds", fontsize=10)
    fig.colorbar(image, ax=axes, shrink=0.6,
                 label="log2(‖g_layer‖ / median over layers)")
    return save(fig, path)


def alpha_distribution(profiles: dict[str, LayerProfile], size: str, path: Path) -> Optional[Path]:
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
    fig.suptitle(f"{size}: distribution of the layer scale alpha per layer (box: quartiles, "
                 f"whiskers: 1.5 IQR)", fontsize=10)
    return save(fig, path)
