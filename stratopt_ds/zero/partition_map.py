"""Layer maps over DeepSpeed's flat fp32 partitions, for every ZeRO wrapper (docs/ALGORITHMS.md section 8).

Under ZeRO the inner optimizer steps one flat fp32 tensor per parameter group (stage 1/2, the
bf16 optimizer) or per sub-group (stage 3). Each flat tensor holds a contiguous run of one or
several parameters; a parameter (a layer) may continue on the neighbouring rank. For every flat
tensor ("slot") this module lists the fragments it holds, ``(start, length, layer)``, with the
layer ids of the optimizer's own numbering, which is the same on every rank.

Which DeepSpeed attributes are read (deepspeed 0.19.8; see shared/research/sharded_layerwise.md):

* stage 1/2 (``DeepSpeedZeroOptimizer``): ``round_robin_bit16_groups[i]`` is the true flat order,
  ``partition_size[i]`` the partition length, the rank comes from ``real_dp_process_group[i]``;
  the flat master is ``single_partition_of_fp32_groups[i]``. Gradients waiting for their group's
  turn are in ``averaged_gradients[i]`` (a list whose concatenation is the partition, or a
  buffer with ``flat_partition``) or, under CPU offload, in the master's ``.grad``.
* stage 3 (``DeepSpeedZeroOptimizer_Stage3``): ``fp16_groups[j]`` are the sub-group's
  parameters; ``grad_position[param_id] = (j, offset, partition_numel)``; rank ``r`` holds
  elements ``[r*n, (r+1)*n)`` of each parameter, of which ``min(n, max(0, ds_numel - r*n))``
  are real; the master is ``fp32_partitioned_groups_flat[j]``.
* the bf16 optimizer (``BF16_Optimizer``, bf16 + ZeRO-1): ``bf16_groups[i]`` in flat order,
  masters ``fp32_groups_flat_partition[i]``; it steps all groups in one call.

Padding is never part of a fragment, so it is neither measured nor updated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..layer_map import Fragment


class UnsupportedZeroSetting(ValueError):
    """A DeepSpeed setting under which exact per-layer norms are not implemented."""


@dataclass
class Slot:
    """One flat fp32 tensor the inner optimizer steps, and where its gradient waits before that."""

    flat: torch.Tensor
    fragments: list[Fragment]
    pending_grad: Callable[[], Optional[Sequence[torch.Tensor]]]  # pieces concatenating to the layout
    sources: list[tuple[torch.Tensor, int]]  # per fragment: the parameter and the offset inside it
    group_index: int                         # the inner optimizer's param group it steps with


def fragments_of_contiguous(params: Sequence[torch.Tensor], layer_of: Callable[[torch.Tensor], int],
                            part_start: int, part_len: int):
    """Fragments of a partition ``[part_start, part_start+part_len)`` of params laid end to end,
    and for each the parameter and the offset inside it where the fragment starts."""
    frags, sources, cursor, part_end = [], [], 0, part_start + part_len
    for p in params:
        lo, hi = max(cursor, part_start), min(cursor + p.numel(), part_end)
        if hi > lo:
            frags.append(Fragment(lo - part_start, hi - lo, layer_of(p)))
            sources.append((p, lo - cursor))
        cursor += p.numel()
    return frags, sources


def _rank(group) -> int:
    import deepspeed.comm as dist
    return dist.get_rank(group=group)


def stage12_slots(zo, layer_of) -> list[Slot]:
    if getattr(zo, "round_robin_gradients", False):
        raise UnsupportedZeroSetting("zero_optimization.round_robin_gradients=true is not supported "
                                     "by stratopt_ds (the flat order would not match the layer map); "
                                     "set it to false")
    slots = []
    for i, params in enumerate(zo.round_robin_bit16_groups):
        size = int(zo.partition_size[i])
        rank = _rank(zo.real_dp_process_group[i])
        flat = zo.single_partition_of_fp32_groups[i]

        def pending(i=i, flat=flat):
            if zo.cpu_offload:
                return None if flat.grad is None else [flat.grad]
            grads = zo.averaged_gradients.get(i) if isinstance(zo.averaged_gradients, dict) \
                else zo.averaged_gradients[i]
            if grads is None:
                return None
            flat_partition = getattr(grads, "flat_partition", None)
            return [flat_partition.view(-1)] if flat_partition is not None else list(grads)

        frags, sources = fragments_of_contiguous(params, layer_of, rank * size, size)
        slots.append(Slot(flat, frags, pending, sources, i))
    return slots


def stage3_slots(zo, layer_of) -> list[Slot]:
    if getattr(zo, "swap_optimizer", False):
        raise UnsupportedZeroSetting("offload_optimizer.device='nvme' is not supported by stratopt_ds; "
                                     "use 'cpu' or 'none'")
    slots = []
    for j, params in enumerate(zo.fp16_groups):
        flat = zo.fp32_partitioned_groups_flat[j]
        frags, sources = [], []
        for p in params:
            _, offset, n = zo.grad_position[zo.get_param_id(p)]
            rank = _rank(getattr(p, "ds_process_group", None) or zo.dp_process_group)
            valid = min(n, max(0, p.ds_numel - rank * n))
            if valid > 0:
                frags.append(Fragment(int(offset), int(valid), layer_of(p)))
                sources.append((p, rank * n))

        def pending(j=j, flat=flat):
            if zo.offload_optimizer:
                return None if flat.grad is None else [flat.grad]
            grads = zo.averaged_gradients[j] if j < len(zo.averaged_gradients) else None
            return None if grads is None else list(grads)

        slots.append(Slot(flat, frags, pending, sources, int(zo.sub_group_to_group_id[j])))
    return slots


def bf16_optimizer_slots(bo, layer_of) -> list[Slot]:
    slots = []
    groups = getattr(bo, "real_dp_process_group", None)
    for i, params in enumerate(bo.bf16_groups):
        flat = bo.fp32_groups_flat_partition[i]
        group = groups[i] if groups is not None else bo.dp_process_group
        rank = _rank(group)
        size = flat.numel()
        frags, sources = fragments_of_contiguous(params, layer_of, rank * size, size)
        # it steps every group in one call: nothing is ever pending
        slots.append(Slot(flat, frags, lambda: None, sources, i))
    return slots


def pending_rows(pieces: Sequence[torch.Tensor], frags: Sequence[Fragment],
                 first_piece: int = 0) -> list[tuple[int, int, int, int]]:
    """Fragment rows ``(piece index, start, length, layer)`` of ``frags`` (offsets in the flat
    layout) read from ``pieces``, whose concatenation is that layout: a fragment that spans
    pieces becomes one row per piece. Piece indices start at ``first_piece``, so the rows of
    several slots can go to the op in one call."""
    bounds, cursor = [], 0
    for piece in pieces:
        bounds.append((cursor, cursor + piece.numel()))
        cursor += piece.numel()
    rows = []
    for frag in frags:
        lo, hi = frag.start, frag.start + frag.length
        if hi > cursor:
            raise UnsupportedZeroSetting(f"DeepSpeed's pending gradient has {cursor} elements but the "
                                         f"layer map needs {hi}: unsupported gradient layout")
        for k, (start, end) in enumerate(bounds):
            a, b = max(lo, start), min(hi, end)
            if b > a:
                rows.append((first_piece + k, a - start, b - a, frag.layer))
    return rows
