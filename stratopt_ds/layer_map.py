"""Which elements of which tensor belong to which layer: the seam between maths and sharding.

The optimizer maths (``stratopt_ds.optim``) never asks *how* the parameters are laid out. It
asks a :class:`LayerMap` for the fragments of every tensor it steps, each fragment being a
contiguous run ``[start, start+length)`` of the flattened tensor that belongs to one layer.

* Single process / ZeRO stage 0: every tensor is one fragment (``granularity="tensor"``) or
  belongs with the other tensors of its transformer block to one layer (``"block"``).
* ZeRO 1/2/3 (``stratopt_ds.zero``): the tensors are flat fp32 partitions, each holding
  fragments of many layers; the map is built from DeepSpeed's partition bookkeeping. Summing
  and all-reducing per layer is the sharding strategy's job (:mod:`stratopt_ds.sharding`).

Layer ids are global: every rank numbers the layers of the whole model the same way, also
layers it holds no element of.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch

# A transformer block index inside a parameter name: "...layers.<i>." / ".h.<i>." / ".blocks.<i>."
_BLOCK_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")

# Depth of tensors that sit outside any block (embeddings, final norm, head), docs/ALGORITHMS.md section 6.
OUTSIDE_BLOCK_DEPTH = 0.5

def block_index(name: str) -> Optional[int]:
    """The transformer-block index of a parameter name, or None outside blocks."""
    match = _BLOCK_RE.search(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Fragment:
    start: int
    length: int
    layer: int


@dataclass
class LayerLayout:
    """The global layer numbering of a model: names, depths, and which layer each tensor joins."""

    layer_names: list[str]
    depths: list[float]
    layer_of: dict[str, int]  # parameter name -> layer id

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)


def layer_layout(names: Sequence[str], granularity: str = "tensor") -> LayerLayout:
    """Number the layers of the named tensors (docs/ALGORITHMS.md section 7), in order of first appearance.

    Depth ``u = i / (num_blocks - 1)`` for a tensor of block ``i`` (0 when there is a single
    block), 0.5 outside blocks. ``num_blocks`` is one more than the largest block index seen.
    """
    if granularity not in ("tensor", "block"):
        raise ValueError(f"invalid granularity={granularity!r}: expected one of 'tensor', 'block'")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if list(names).count(n) > 1})
        raise ValueError(f"parameter names must be unique; repeated: {dup[:5]}")
    blocks = [block_index(n) for n in names]
    num_blocks = max((b for b in blocks if b is not None), default=-1) + 1

    def depth(b: Optional[int]) -> float:
        if b is None:
            return OUTSIDE_BLOCK_DEPTH
        return b / (num_blocks - 1) if num_blocks > 1 else 0.0

    layer_names: list[str] = []
    depths: list[float] = []
    layer_of: dict[str, int] = {}
    by_key: dict[str, int] = {}
    for name, b in zip(names, blocks):
        key = f"block.{b}" if (granularity == "block" and b is not None) else name
        if key not in by_key:
            by_key[key] = len(layer_names)
            layer_names.append(key)
            depths.append(depth(b))
        layer_of[name] = by_key[key]
    return LayerLayout(layer_names, depths, layer_of)


@dataclass
class LayerMap:
    """Fragments of every stepped tensor, keyed by tensor identity, plus the layer numbering."""

    layout: LayerLayout
    fragments: dict[int, list[Fragment]] = field(default_factory=dict)
    _rows_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_layers(self) -> int:
        return self.layout.num_layers

    def fragments_of(self, tensor: torch.Tensor) -> list[Fragment]:
        try:
            return self.fragments[id(tensor)]
        except KeyError:
            raise KeyError("tensor is not in the layer map; was it added after the optimizer "
                           "was built? Rebuild the optimizer with all parameters.") from None

    def rows_of(self, tensors: Sequence[torch.Tensor]) -> tuple[tuple[int, int, int, int], ...]:
        """The fragment rows ``(index in tensors, start, length, layer)`` of ``tensors``.

        Built once per list of tensors and cached (a step would otherwise rebuild them from every
        fragment on the host); the fragments of a tensor never change within one map."""
        key = tuple(map(id, tensors))
        rows = self._rows_cache.get(key)
        if rows is None:
            rows = tuple((i, frag.start, frag.length, frag.layer)
                         for i, tensor in enumerate(tensors) for frag in self.fragments_of(tensor))
            if len(self._rows_cache) > 64:
                self._rows_cache.clear()
            self._rows_cache[key] = rows
        return rows


def whole_tensor_map(params: Iterable[torch.Tensor], names: Sequence[str],
                     granularity: str = "tensor") -> LayerMap:
    """The single-process map: each tensor is one fragment of its layer."""
    params = list(params)
    layout = layer_layout(names, granularity)
    frags = {id(p): [Fragment(0, p.numel(), layout.layer_of[n])] for p, n in zip(params, names)}
    return LayerMap(layout, frags)
