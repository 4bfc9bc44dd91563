"""``optimizer.sharding``: where the per-layer sums of squares of a step come from.

Every optimizer of the package holds one sharding strategy, public as ``optimizer.sharding``:

* :class:`LocalSharding` (the default): every tensor the optimizer steps is whole in this
  process, as in a single process, DDP or ZeRO stage 0 (whose gradients are already averaged).
  Each tensor is one fragment of its layer (or of its block's layer); no collective.
* :class:`stratopt_ds.zero.ZeroBinding`: DeepSpeed ZeRO steps flat partitions holding fragments
  of many layers, and a layer may continue on another rank. The strategy adds the sums of the
  groups DeepSpeed has not stepped yet and all-reduces the length-L vector once per step.

Both answer the same two questions:

* ``starts_step(ids)``: does this call of ``step()`` (the tensors ``ids``) begin an engine step?
  Under ZeRO the inner optimizer is called once per parameter group; the norms are taken at the
  first call and reused by the others.
* ``layer_sq(pairs, device)``: the per-layer float64 sums of squares of the step's gradients,
  complete (all groups) and reduced across ranks, for ``pairs`` of (tensor, gradient).

Entry points bind ZeRO explicitly (``stratopt_ds.deepspeed.initialize``, the accelerate and HF
integrations, the ZeRO checkpoint helpers). A bare ``deepspeed.initialize`` leaves the optimizer
local; its first step then finds the wrapper by reference lookup and logs that it did
(:func:`stratopt_ds.zero.attach`).
"""
from __future__ import annotations

from typing import Iterable

import torch

from .layer_map import LayerMap
from .ops import fragment_sumsq


def local_layer_sq(layer_map: LayerMap, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]],
                   device: torch.device) -> torch.Tensor:
    """Per-layer sums of squares of the local gradient fragments, as a float64 vector of length L.

    The sums are taken by :func:`stratopt_ds.ops.fragment_sumsq` (native kernel or PyTorch
    reference, by device): fp64 per layer, added over the fragments in a fixed order. Layers
    with no local fragment stay 0.
    """
    pairs = list(pairs)
    rows = layer_map.rows_of([tensor for tensor, _ in pairs])
    return fragment_sumsq([grad for _, grad in pairs], rows, layer_map.num_layers, device)


class LocalSharding:
    """Every stepped tensor whole in this process: its map, and no collective."""

    is_local = True
    kind = "local"

    def __init__(self, layer_map: LayerMap):
        self.layer_map = layer_map

    def starts_step(self, ids: set[int]) -> bool:
        return True

    def layer_sq(self, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> torch.Tensor:
        return local_layer_sq(self.layer_map, pairs, device)
