"""The report's figures read back from their artists (not their pixels): the heatmap's columns
sit at their true steps, layers go by depth, the layer-wise norm lines are coloured by depth,
the Δ panel shows the report's own confidence intervals, a seed is joined across arms, and the
"second half" panel starts at half the steps.

Each figure is taken from the report's own entry points (``plots.val_curves`` etc.) by catching
it on its way to ``plots.save``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.collections import QuadMesh
from matplotlib.image import AxesImage

from stratopt_ds.study import plots
from stratopt_ds.study.layers import depth_order, layer_profile, short_name
from stratopt_ds.study.results import load_study
from stratopt_ds.study.stats import Rules, compare_all

SIZE = "tiny"
# The tiny model's parameters in the order ZeRO's parameter groups log them (the norms after all
# the matrices), not the model's.
MODEL = (["model.embed_tokens.weight"]
         + [f"model.layers.{i}.{part}.weight" for i in range(2)
            for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                         "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
                         "input_layernorm", "post_attention_layernorm")]
         + ["model.norm.weight", "lm_head.weight"])
LOGGED = [n for n in MODEL if "norm" not in n] + [n for n in MODEL if "norm" in n]
DEPTH_ORDER = (["embed"]
               + [f"{i}.{p}" for i in range(2) for p in ("norm1", "attn.q", "attn.k", "attn.v",
                                                         "attn.o", "norm2", "mlp.gate", "mlp.up",
                                                         "mlp.down")]
               + ["norm", "lm_head"])
SPIKE_LAYER, SPIKE_STEP = "model.layers.1.mlp.down_proj.weight", 190


def layer_scale(name: str) -> float:
    """A distinct, depth-ordered norm per layer: the embedding largest, the head smallest."""
    return 2.0 ** -DEPTH_ORDER.index(short_name(name))


def make_study(root: Path, steps: int = 295, arms=("adamw", "stratopt"), seeds=(0, 1, 2, 3),
               eval_steps=None, losses=None, spike_arm=None) -> Path:
    """A study directory as the runner leaves it: plan.yaml, and per run summary.json and
    metrics.jsonl with the layers logged in ZeRO's order (LOGGED)."""
    plan = {"name": "plots", "description": "figures", "baseline": arms[0],
            "seeds": {"init": list(seeds), "data": [100 + s for s in seeds]},
            "train": {"data": "synthetic", "steps": steps},
            "sizes": {SIZE: {"preset": "tiny"}}, "arms": list(arms)}
    (root / "plan.yaml").write_text(yaml.safe_dump(plan))
    eval_steps = eval_steps or [steps // 3, 2 * steps // 3, steps]
    rng = np.random.default_rng(0)
    for a, arm in enumerate(arms):
        for seed in seeds:
            final = (losses or {}).get((arm, seed),
                                       3.0 + 0.01 * a + 0.005 * seed + rng.normal(0, 0.001))
            if final is None:
                continue  # this run never started
            run_dir = root / SIZE / arm / f"seed{seed}"
            run_dir.mkdir(parents=True)
            scale = np.array([layer_scale(n) for n in LOGGED])
            with open(run_dir / "metrics.jsonl", "w") as f:
                for step in range(1, steps + 1):
                    norms = scale * np.exp(rng.normal(0, 0.05, len(LOGGED))) / step ** 0.5
                    if arm == spike_arm and step == SPIKE_STEP:
                        norms[LOGGED.index(SPIKE_LAYER)] *= 2.0 ** 12
                    f.write(json.dumps({"step": step, "loss": 3.0, "elapsed": 0.1 * step,
                                        "layer_norms": norms.tolist(),
                                        "layer_alpha": np.ones(len(LOGGED)).tolist()}) + "\n")
            curve = [[s, final + 1.0 / s] for s in eval_steps]
            (run_dir / "summary.json").write_text(json.dumps({
                "status": "ok", "steps": steps, "steps_done": steps, "seed": seed,
                "val_loss": curve[-1][1], "val_losses": curve, "layers": LOGGED}))
    return root


@pytest.fixture
def figures(monkeypatch):
    """The figures the plotting functions hand to plots.save, instead of files."""
    caught = []
    monkeypatch.setattr(plots, "save", lambda fig, path: caught.append(fig) or path)
    return caught


def profiles_of(study, arms=None):
    arms = arms or [a.name for a in study.plan.arms]
    return {arm: layer_profile(study.select(SIZE, arm)) for arm in arms}


def column_centres(ax) -> tuple[np.ndarray, np.ndarray]:
    """(x centre of each drawn column in data units, the drawn values [rows, columns]) of the
    heatmap on ``ax``: a QuadMesh's own vertices, or an image's extent split evenly (imshow)."""
    meshes = [c for c in ax.collections if isinstance(c, QuadMesh)]
    if meshes:
        coords = meshes[0].get_coordinates()            # [rows + 1, columns + 1, 2]
        edges = coords[0, :, 0]
        values = np.ma.getdata(meshes[0].get_array()).reshape(coords.shape[0] - 1, -1)
        return (edges[:-1] + edges[1:]) / 2, values
    image = next(a for a in ax.get_children() if isinstance(a, AxesImage))
    values = np.asarray(image.get_array())
    left, right = image.get_extent()[:2]
    width = (right - left) / values.shape[1]
    return left + width * (np.arange(values.shape[1]) + 0.5), values


def test_heatmap_columns_sit_at_their_true_steps(tmp_path, figures):
    """295 steps: 200 np.array_split bins (2 steps each up to step 190, then 1) drawn over an even
    extent put step 190 at ~140. The spike must be drawn at step 190, within one bin."""
    study = load_study(make_study(tmp_path, steps=295, spike_arm="stratopt"))
    profiles = profiles_of(study)
    plots.grad_norm_heatmap(profiles, SIZE, tmp_path / "heat.png")
    ax = figures[-1].axes[1]  # the stratopt panel
    centres, values = column_centres(ax)
    jump = values - np.nanmedian(values, axis=1, keepdims=True)  # against the row's own level
    row, column = np.unravel_index(np.nanargmax(jump), values.shape)
    labels = {t.get_position()[1]: t.get_text() for t in figures[-1].axes[0].get_yticklabels()}
    assert labels[row] == short_name(SPIKE_LAYER)  # the row drawn at the spiked layer's label
    width = np.diff(centres).max()
    assert abs(centres[column] - SPIKE_STEP) <= width, centres[column]
    # What the old axis did with the same spike: bin 94 of 200 even columns over 0..295.
    old_bin = next(i for i, b in enumerate(np.array_split(np.arange(1, 296), 200))
                   if SPIKE_STEP in b)
    assert abs((old_bin + 0.5) * 295 / 200 - 140) < 1.5
    # Every column ends where its steps end: the last at step 295, none past it.
    assert centres[-1] < 295 + 0.5 and centres[0] > 0


def test_layers_go_by_depth_and_the_axis_says_so(tmp_path, figures):
    assert [short_name(LOGGED[i]) for i in depth_order(LOGGED)] == DEPTH_ORDER
    study = load_study(make_study(tmp_path, steps=40))
    profiles = profiles_of(study)
    p = profiles["adamw"]
    assert p.layers == DEPTH_ORDER
    # The data moved with the names: each row's norm is its layer's scale (x step^-1/2).
    first = np.exp2(p.log_norm[:, 0])
    np.testing.assert_allclose(first, [2.0 ** -i for i in range(len(DEPTH_ORDER))], rtol=0.15)
    assert p.depth[0] == 0.0 and p.depth[-1] == 1.0 and p.depth == sorted(p.depth)

    plots.grad_norm_heatmap(profiles, SIZE, tmp_path / "heat.png")
    fig = figures[-1]
    ax = fig.axes[0]
    bottom, top = ax.get_ylim()
    assert top < bottom  # row 0 (the embedding) at the top
    ticks = sorted(ax.get_yticklabels(), key=lambda t: t.get_position()[1])
    assert [t.get_text() for t in ticks] == DEPTH_ORDER  # read from the top down
    assert "layer" in ax.get_ylabel()
    assert "before clipping" in fig.get_suptitle() or "pre-clip" in fig.get_suptitle()


def test_depth_order_of_other_layouts():
    grouped = ["lm_head.weight", "block.1", "model.norm.weight", "block.0",
               "model.embed_tokens.weight"]  # granularity "block"
    assert [grouped[i] for i in depth_order(grouped)] == [
        "model.embed_tokens.weight", "block.0", "block.1", "model.norm.weight", "lm_head.weight"]
    gpt2 = ["transformer.ln_f.weight", "transformer.h.1.attn.c_attn.weight",
            "transformer.h.0.ln_1.weight", "transformer.h.0.mlp.c_fc.weight",
            "transformer.h.0.attn.c_attn.weight", "transformer.wte.weight", "lm_head.weight"]
    assert [gpt2[i] for i in depth_order(gpt2)] == [
        "transformer.wte.weight", "transformer.h.0.ln_1.weight",
        "transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.weight",
        "transformer.h.1.attn.c_attn.weight", "transformer.ln_f.weight", "lm_head.weight"]


def test_layer_norm_lines_one_per_layer_coloured_by_depth(tmp_path, figures):
    study = load_study(make_study(tmp_path, steps=40))
    profiles = profiles_of(study)
    plots.layer_grad_norms(profiles, SIZE, tmp_path / "lines.png")
    fig = figures[-1]
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_lines()]
    assert [ax.get_title() for ax in panels] == ["adamw (n=4)", "stratopt (n=4)"]
    for ax, p in zip(panels, profiles.values()):
        assert ax.get_yscale() == "log"
        lines = ax.get_lines()
        assert [line.get_gid() for line in lines] == DEPTH_ORDER
        np.testing.assert_allclose(lines[0].get_ydata(), np.exp2(p.log_norm[0]))
        np.testing.assert_allclose(lines[0].get_xdata(), p.bin_centers)
        # Colours follow depth along the sequential map: embedding at one end, head at the other.
        colours = [np.array(line.get_color()) for line in lines]
        np.testing.assert_allclose(colours[0], plots.DEPTH_CMAP(0.0))
        np.testing.assert_allclose(colours[-1], plots.DEPTH_CMAP(1.0))
        block0 = [c for c, n in zip(colours, DEPTH_ORDER) if n.startswith("0.")]
        assert all(np.allclose(c, block0[0]) for c in block0)  # a block shares its depth
    assert "pre-clip" in fig.get_suptitle()


def test_delta_panel_shows_the_reports_intervals_and_seeds_are_joined(tmp_path, figures):
    arms = ("adamw", "stratopt", "la-linear-b1const-clipglobal")
    losses = {("stratopt", s): 2.97 + 0.004 * s + 0.001 * (s % 2) for s in range(4)}
    losses[("la-linear-b1const-clipglobal", 2)] = None  # one run missing: its line breaks
    study = load_study(make_study(tmp_path, steps=30, arms=arms, losses=losses))
    finals = {arm: study.final_losses(SIZE, arm) for arm in arms}
    comparisons = compare_all(finals, "adamw", Rules(**study.plan.analysis))
    plots.final_strip(study, SIZE, tmp_path / "final.png", comparisons)
    strip, delta = figures[-1].axes[:2]

    for i, c in enumerate(comparisons, start=1):
        bars = [b for b in delta.containers if b.lines[0].get_gid() == f"delta {c.arm}"]
        assert len(bars) == 1
        point, _, (segments,) = bars[0].lines
        assert point.get_xdata()[0] == i and point.get_ydata()[0] == pytest.approx(c.diff)
        (x0, low), (x1, high) = segments.get_segments()[0]
        assert (x0, low, high) == (i, pytest.approx(c.ci_low), pytest.approx(c.ci_high))
    assert comparisons[0].diff < 0 and comparisons[0].ci_high < 0  # stratopt: clearly lower
    assert "99% CI" in delta.get_title()

    points = np.concatenate([c.get_offsets() for c in strip.collections if len(c.get_offsets())])
    for seed in range(4):
        line = next(l for l in strip.get_lines() if l.get_gid() == f"seed {seed}")
        expected = [finals[arm].get(seed, np.nan) for arm in arms]
        np.testing.assert_allclose(line.get_ydata(), expected)
        for x, y in zip(line.get_xdata(), line.get_ydata()):
            if np.isfinite(y):  # the line goes through the seed's own (jittered) marker
                assert np.isclose(points, [x, y]).all(axis=1).any()
    assert np.isnan(next(l for l in strip.get_lines() if l.get_gid() == "seed 2").get_ydata()[2])


@pytest.mark.parametrize("steps, evals", [(30, [10, 20, 30]),
                                          (295, [50, 100, 150, 200, 250, 295])])
def test_second_half_panel_starts_at_half_the_steps(tmp_path, figures, steps, evals):
    """Evaluations every 10 of 30 steps: the old panel began at the 2nd of 3 points (step 20);
    every 50 of 295: at the 4th of 6 (step 200). Half the steps is 15 / 147.5."""
    study = load_study(make_study(tmp_path, steps=steps, eval_steps=evals))
    plots.val_curves(study, SIZE, tmp_path / "val.png")
    whole, zoom = figures[-1].axes[:2]
    assert zoom.get_xlim() == pytest.approx((steps / 2, steps))
    assert whole.get_xlim()[0] < evals[0]
    # The y range fits the curves inside the window, from their value at half the steps on.
    low, high = zoom.get_ylim()
    for line in zoom.get_lines():
        x, y = line.get_xdata(), line.get_ydata()
        at_half = np.interp(steps / 2, x, y)
        assert low <= min(at_half, y[-1]) and max(at_half, y[-1]) <= high
