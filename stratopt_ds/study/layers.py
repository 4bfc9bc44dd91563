"""Layer-wise gradient norms and layer scales over training, per arm ("natural balance").

For every step the gradient norm of layer l is divided by the median over the layers at that
step: ``log2(‖g_l,t‖ / median_j ‖g_j,t‖)``. 0 means a layer gets a typical gradient; +1
twice the typical one. Dividing per step (not per layer over time) removes the overall decay of the
gradient norm during training and keeps what the layer-adaptive methods act on: how unequal the
layers are to each other. Seeds are averaged in log space (a geometric mean of the ratios).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .results import OK, RunResult, layer_series

MAX_BINS = 200          # columns of the heatmap: steps are averaged into at most this many bins
EDGE_FRACTION = 0.1     # "early" and "late" = the first and the last 10% of the steps


@dataclass
class LayerProfile:
    layers: list[str]
    bin_steps: np.ndarray        # [bins] last step of each bin
    log_ratio: np.ndarray        # [layers, bins] mean over seeds of log2(norm / median over layers)
    alpha: np.ndarray            # [layers, samples] every logged layer scale, all seeds pooled
    spread_early: float          # mean log2(max/min over layers) in the first 10% of the steps
    spread_late: float           # ... in the last 10%
    runs: int

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


def layer_profile(results: list[RunResult]) -> Optional[LayerProfile]:
    """The profile of one arm at one size from its successful runs; None without metrics."""
    ratios, alphas, spreads, layers = [], [], [], None
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
        layers = [short_name(x) for x in r.summary.layers]  # train.py always writes them
        with np.errstate(divide="ignore", invalid="ignore"):
            log_norm = np.log2(np.where(norms > 0, norms, np.nan))
        ratios.append(log_norm - np.nanmedian(log_norm, axis=1, keepdims=True))
        spreads.append(np.nanmax(log_norm, axis=1) - np.nanmin(log_norm, axis=1))
        alphas.append(alpha)
    if not ratios:
        return None
    mean_ratio = np.nanmean(np.stack(ratios), axis=0)            # [steps, layers]
    bins = np.array_split(np.arange(len(steps_ref)), min(MAX_BINS, len(steps_ref)))
    binned = np.stack([np.nanmean(mean_ratio[b], axis=0) for b in bins], axis=1)
    spread = np.nanmean(np.stack(spreads), axis=0)               # [steps]
    edge = max(1, int(len(spread) * EDGE_FRACTION))
    return LayerProfile(layers=layers, bin_steps=np.array([steps_ref[b[-1]] for b in bins]),
                        log_ratio=binned, alpha=np.concatenate(alphas, axis=0).T,
                        spread_early=float(np.nanmean(spread[:edge])),
                        spread_late=float(np.nanmean(spread[-edge:])), runs=len(ratios))
