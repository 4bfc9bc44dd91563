"""Layer-wise gradient norms and layer scales over training, per arm ("natural balance").

For every step the gradient norm of layer l is divided by the median over the layers at that
step: ``log2(‖g_l,t‖ / median_j ‖g_j,t‖)``. 0 means a layer gets a typical gradient; +1
twice the typical one. Dividing per step (not per layer over time) removes the overall decay of the
gradient norm during training and keeps what the layer-adaptive methods act on: how unequal the
layers are to each other. Seeds are averaged in log space (a geometric mean of the ratios).

The norms are the optimizer's per-layer gradient norms *before* clipping (``metrics.jsonl``'s
``layer_norms``). Layers are put in depth order here (embedding, blocks 0..n-1 each with its
norms, final norm, head), whatever order the run logged them in: under ZeRO the logged order
follows the parameter groups, not the model.
"""
from __future__ import annotations

import contextlib
import math
import re
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..layer_map import block_index
from .results import OK, RunResult, layer_series

MAX_BINS = 200          # columns of the heatmap: steps are averaged into at most this many bins
EDGE_FRACTION = 0.1     # "early" and "late" = the first and the last 10% of the steps


@dataclass
class LayerProfile:
    layers: list[str]            # short names, in depth order (:func:`depth_order`)
    bin_steps: np.ndarray        # [bins] last step of each bin
    log_ratio: np.ndarray        # [layers, bins] mean over seeds of log2(norm / median over layers)
    alpha: np.ndarray            # [layers, samples] every logged layer scale, all seeds pooled
    spread_early: float          # mean log2(max/min over layers) in the first 10% of the steps
    spread_late: float           # ... in the last 10%
    runs: int
    bin_edges: Optional[np.ndarray] = None  # [bins + 1] in steps: bin b covers edges[b]..edges[b+1]
    log_norm: Optional[np.ndarray] = None   # [layers, bins] mean over seeds and bin of log2 ‖g_l‖
    depth: Optional[list[float]] = None     # [layers] 0 (embedding) .. 1 (head), for colours

    def __post_init__(self):
        if self.bin_edges is None:  # bins of one step each, ending at bin_steps
            steps = np.asarray(self.bin_steps, dtype=float)
            self.bin_edges = edges_of(steps, steps)
        if self.depth is None:
            self.depth = list(np.linspace(0.0, 1.0, len(self.layers))) if len(self.layers) > 1 \
                else [0.0] * len(self.layers)

    @property
    def bin_centers(self) -> np.ndarray:
        return (self.bin_edges[:-1] + self.bin_edges[1:]) / 2

    def extreme_layers(self) -> tuple[str, str]:
        """(layer with the largest, layer with the smallest relative norm) late in training."""
        late = np.nanmean(self.log_ratio[:, -max(1, int(len(self.bin_steps) * EDGE_FRACTION)):],
                          axis=1)
        return self.layers[int(np.nanargmax(late))], self.layers[int(np.nanargmin(late))]


def short_name(layer: str) -> str:
    """model.layers.3.self_attn.q_proj.weight -> 3.attn.q"""
    name = re.sub(r"^model\.", "", layer)
    name = re.sub(r"\.weight$|\.bias$", "", name)
    name = re.sub(r"^layers\.", "", name)
    for long, short in (("self_attn.", "attn."), ("_proj", ""), ("input_layernorm", "norm1"),
                        ("post_attention_layernorm", "norm2"), ("embed_tokens", "embed")):
        name = name.replace(long, short)
    return name


# Where a layer sits: embedding, blocks, other tensors outside blocks, final norm, head.
_EMBED, _BLOCK, _OTHER, _FINAL_NORM, _HEAD = range(5)
_GROUPED_BLOCK = re.compile(r"^block\.(\d+)$")   # granularity "block": one layer per block
_EMBED_RE = re.compile(r"embed|(?:^|\.)(?:wte|wpe|tok_embeddings)(?:\.|$)")
_HEAD_RE = re.compile(r"lm_head|(?:^|\.)(?:head|output)(?:\.weight|\.bias)?$")
_NORM_RE = re.compile(r"norm|(?:^|\.)ln_f(?:\.|$)")
# Order of the tensors inside a block: the first pattern that matches (the rest keep their order).
_IN_BLOCK = [re.compile(p) for p in (
    r"input_layernorm|ln_1|attention_norm", r"q_proj|c_attn|qkv", r"k_proj", r"v_proj",
    r"o_proj|out_proj|attn\.c_proj", r"post_attention_layernorm|ln_2|ffn_norm",
    r"gate_proj", r"up_proj|c_fc", r"down_proj|mlp\.c_proj")]


def _place(name: str) -> tuple[int, int, int]:
    """(group, block, position inside the block) of a full parameter or layer name."""
    grouped = _GROUPED_BLOCK.match(name)
    block = int(grouped.group(1)) if grouped else block_index(name)
    if block is not None:
        inside = next((i for i, p in enumerate(_IN_BLOCK) if p.search(name)), len(_IN_BLOCK))
        return _BLOCK, block, inside
    if _EMBED_RE.search(name):
        return _EMBED, 0, 0
    if _HEAD_RE.search(name):
        return _HEAD, 0, 0
    if _NORM_RE.search(name):
        return _FINAL_NORM, 0, 0
    return _OTHER, 0, 0


def depth_order(names: list[str]) -> list[int]:
    """Indices of ``names`` (summary.json's ``layers``) from the input to the output: embedding,
    block 0 (its norms and projections in the order of the forward pass), ..., the last block,
    the final norm, the head. Names it does not recognise keep their relative order."""
    return sorted(range(len(names)), key=lambda i: (*_place(names[i]), i))


def layer_depths(names: list[str]) -> list[float]:
    """Depth of each named layer in [0, 1] for colours: 0 the embedding, block i at
    (i + 1) / (blocks + 1), 1 the final norm and head (every tensor of a block shares its depth)."""
    places = [_place(n) for n in names]
    blocks = max((b for g, b, _ in places if g == _BLOCK), default=-1) + 1
    depths = []
    for group, block, _ in places:
        if group == _EMBED:
            depths.append(0.0)
        elif group == _BLOCK:
            depths.append((block + 1) / (blocks + 1))
        elif group == _OTHER:
            depths.append(0.5)
        else:
            depths.append(1.0)
    return depths


def edges_of(first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Bin edges in steps for bins covering steps first[b]..last[b]: half a step outside the
    outer steps, and half-way between one bin's last step and the next bin's first inside."""
    first, last = np.asarray(first, dtype=float), np.asarray(last, dtype=float)
    inner = (last[:-1] + first[1:]) / 2
    return np.concatenate([[first[0] - 0.5], inner, [last[-1] + 0.5]])


def step_bins(n: int) -> list[np.ndarray]:
    """Indices of ``n`` logged steps in consecutive bins of equal size k = ceil(n / MAX_BINS)
    (the last one shorter), at most MAX_BINS of them: every column of the heatmap and every
    point of the line plot averages the same number of steps."""
    k = max(1, math.ceil(n / MAX_BINS))
    return [np.arange(i, min(i + k, n)) for i in range(0, n, k)]


def layer_profile(results: list[RunResult]) -> Optional[LayerProfile]:
    """The profile of one arm at one size from its successful runs; None without metrics."""
    ratios, lognorms, alphas, spreads, layers = [], [], [], [], None
    steps_ref = None
    for r in results:
        if r.state.status != OK or not r.summary:
            continue
        steps, norms, alpha = layer_series(r.directory)
        if len(steps) == 0:
            continue
        if steps_ref is not None and len(steps) != len(steps_ref):
            continue  # runs of one arm have the same length; skip a truncated log
        steps_ref = steps
        names = list(r.summary.layers)  # train.py always writes them
        order = depth_order(names)
        norms, alpha = norms[:, order], alpha[:, order]
        layers = [short_name(names[i]) for i in order]
        depth = layer_depths([names[i] for i in order])
        with np.errstate(divide="ignore", invalid="ignore"):
            log_norm = np.log2(np.where(norms > 0, norms, np.nan))
        lognorms.append(log_norm)
        ratios.append(log_norm - np.nanmedian(log_norm, axis=1, keepdims=True))
        spreads.append(np.nanmax(log_norm, axis=1) - np.nanmin(log_norm, axis=1))
        alphas.append(alpha)
    if not ratios:
        return None
    bins = step_bins(len(steps_ref))

    def binned(per_step: np.ndarray) -> np.ndarray:  # [steps, layers] -> [layers, bins]
        with _quiet_nanmean():
            return np.stack([np.nanmean(per_step[b], axis=0) for b in bins], axis=1)

    with _quiet_nanmean():
        mean_ratio = np.nanmean(np.stack(ratios), axis=0)        # [steps, layers]
        mean_log_norm = np.nanmean(np.stack(lognorms), axis=0)   # [steps, layers]
        spread = np.nanmean(np.stack(spreads), axis=0)           # [steps]
    edge = max(1, int(len(spread) * EDGE_FRACTION))
    return LayerProfile(layers=layers, bin_steps=np.array([steps_ref[b[-1]] for b in bins]),
                        log_ratio=binned(mean_ratio), alpha=np.concatenate(alphas, axis=0).T,
                        spread_early=float(np.nanmean(spread[:edge])),
                        spread_late=float(np.nanmean(spread[-edge:])), runs=len(ratios),
                        bin_edges=edges_of([steps_ref[b[0]] for b in bins],
                                           [steps_ref[b[-1]] for b in bins]),
                        log_norm=binned(mean_log_norm), depth=depth)


@contextlib.contextmanager
def _quiet_nanmean():
    """A layer whose norm is NaN at every step of a bin (skipped steps) stays NaN, silently."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)
        yield
