"""Bind a stratopt_ds optimizer to the DeepSpeed wrapper that drives it.

A ZeRO wrapper calls the inner ``step()`` once per parameter group (stage 1/2) or sub-group
(stage 3), but a layer's norm needs every group: a block's weights and its norm weights sit in
different weight-decay groups, and global clipping needs all layers. So at the first inner call
of each engine step the optimizer sums squares over the group in hand *and* over the groups
still waiting (their gradients sit in DeepSpeed's buffers), all-reduces that one vector, and
keeps the resulting per-layer scalars for the remaining calls of the same step.

Waiting gradients have not yet been through DeepSpeed's ``unscale_and_clip_grads``; their sums
are divided by the square of the same combined scale DeepSpeed will apply (computed from the
same attributes: ``clip_grad`` and ``_global_grad_norm``), so every norm is of the gradient the
optimizer actually steps with.
"""
from __future__ import annotations

import gc
import logging
from typing import Optional

import torch
import torch.distributed as dist

from ..layer_map import LayerMap
from ..ops import fragment_sumsq
from ..sharding import local_layer_sq
from .partition_map import (Slot, UnsupportedZeroSetting, bf16_optimizer_slots, pending_rows,
                            stage12_slots, stage3_slots)
from .reduction import LayerSqAllReduce
from .support import check_topology

logger = logging.getLogger(__name__)

_CLIP_EPS = 1e-6  # DeepSpeed's: clip = (norm + 1e-6) / clip_grad


def _wrapper_kind(wrapper) -> Optional[str]:
    name = type(wrapper).__name__
    if name in ("FP16_Optimizer", "FP16_UnfusedOptimizer"):
        raise UnsupportedZeroSetting("bf16/fp16 with zero_optimization.stage=0 wraps the optimizer in "
                                     f"DeepSpeed's {name}, which stratopt_ds does not support; use ZeRO "
                                     "stage >= 1 for bf16, or fp32 at stage 0")
    if "MiCS" in name:
        raise UnsupportedZeroSetting("MiCS (zero_optimization.mics_shard_size) is not supported by "
                                     "stratopt_ds: its shard group is not the data-parallel group")
    return {"DeepSpeedZeroOptimizer": "stage12", "DeepSpeedZeroOptimizer_Stage3": "stage3",
            "BF16_Optimizer": "bf16"}.get(name)


def find_wrapper(optimizer):
    """The DeepSpeed wrapper whose ``.optimizer`` is ``optimizer`` (looked up once, at attach).

    The wrapper refers to the optimizer either directly (CPython keeps instance attributes
    inline) or through its ``__dict__`` once that has been materialised; both are checked."""
    candidates = []
    for referrer in gc.get_referrers(optimizer):
        if isinstance(referrer, dict):
            candidates.extend(owner for owner in gc.get_referrers(referrer)
                              if getattr(owner, "__dict__", None) is referrer)
        else:
            candidates.append(referrer)
    for owner in candidates:
        if getattr(owner, "optimizer", None) is optimizer and _wrapper_kind(owner) is not None:
            return owner
    return None


class ZeroBinding:
    """Slots, the sharded layer map and the reducer for one DeepSpeed wrapper."""

    def __init__(self, wrapper, optimizer, reduce_enabled: bool = True):
        kind = _wrapper_kind(wrapper)
        if kind is None:
            raise UnsupportedZeroSetting(f"{type(wrapper).__name__} is not a ZeRO wrapper stratopt_ds supports")
        self.wrapper, self.kind = wrapper, kind
        self._check_settings()
        base_map = optimizer.base_layer_map

        def layer_of(p):
            try:
                return base_map.fragments_of(p)[0].layer
            except KeyError:
                raise UnsupportedZeroSetting("DeepSpeed holds a parameter the optimizer was not built "
                                             "with; build the optimizer from the same parameters") from None

        make = {"stage12": stage12_slots, "stage3": stage3_slots, "bf16": bf16_optimizer_slots}[kind]
        self.slots: list[Slot] = make(wrapper, layer_of)
        group = self._dp_group()
        check_topology(dist.get_world_size(group=group), dist.get_world_size(), type(wrapper).__name__)
        self.reducer = LayerSqAllReduce(group, enabled=reduce_enabled)
        self.layer_map = LayerMap(base_map.layout, {id(s.flat): s.fragments for s in self.slots})

    def _check_settings(self) -> None:
        w = self.wrapper
        if getattr(w, "has_moe_layers", False):
            raise UnsupportedZeroSetting("MoE expert parameter groups are not supported by stratopt_ds")
        groups = (w.round_robin_bit16_groups if self.kind == "stage12" else
                  w.fp16_groups if self.kind == "stage3" else w.bf16_groups)
        if any(p.dtype == torch.float16 for g in groups for p in g):
            raise UnsupportedZeroSetting("fp16.enabled=true (dynamic loss scaling) is not supported by "
                                         "stratopt_ds under ZeRO yet; use bf16 or fp32")
        if self.kind == "stage12" and len({id(g) for g in w.real_dp_process_group}) > 1:
            raise UnsupportedZeroSetting("parameter groups with different data-parallel groups are not supported")

    def _dp_group(self):
        w = self.wrapper
        if self.kind == "stage12":
            return w.real_dp_process_group[0]
        if self.kind == "bf16":
            groups = getattr(w, "real_dp_process_group", None)
            return groups[0] if groups else w.dp_process_group
        return w.dp_process_group

    # The sharding protocol LayerwiseAdam.step() uses (stratopt_ds.sharding) ------------------

    is_local = False

    def layer_sq(self, pairs, device: torch.device) -> torch.Tensor:
        """The step's per-layer sums of squares: the fragments in hand, the groups still waiting,
        then one all-reduce of the length-L vector over the data-parallel group."""
        pairs = list(pairs)
        layer_sq = local_layer_sq(self.layer_map, pairs, device)
        self.add_pending({id(p) for p, _ in pairs}, layer_sq)
        return self.reducer(layer_sq)

    def starts_step(self, current_ids: set[int]) -> bool:
        """True at the first inner call of an engine step (or when all slots come at once)."""
        return id(self.slots[0].flat) in current_ids

    def add_pending(self, current_ids: set[int], layer_sq: torch.Tensor) -> None:
        """Add the (scaled to what the optimizer will see) sums of the slots still waiting."""
        waiting = [s for s in self.slots if id(s.flat) not in current_ids]
        if not waiting:
            return
        pieces, rows = [], []
        for slot in waiting:
            mine = slot.pending_grad()
            if mine is None:
                raise UnsupportedZeroSetting(f"DeepSpeed holds no pending gradient for a {self.kind} "
                                             "group: unsupported gradient layout")
            mine = [piece.reshape(-1) for piece in mine]
            rows += pending_rows(mine, slot.fragments, first_piece=len(pieces))
            pieces += mine
        # the op's own per-layer sum of squares (native, deterministic), in one call for all slots
        waiting_sq = fragment_sumsq(pieces, rows, layer_sq.numel(), layer_sq.device)
        layer_sq.add_(waiting_sq / self._combined_scale(layer_sq.device) ** 2)

    def _combined_scale(self, device) -> torch.Tensor:
        w = self.wrapper
        one = torch.ones((), dtype=torch.float64, device=device)
        clip = float(getattr(w, "clip_grad", 0.0) or 0.0)
        norm = getattr(w, "_global_grad_norm", None)
        if clip <= 0.0 or norm is None:
            return one
        norm = torch.as_tensor(norm, dtype=torch.float64).to(device)
        return torch.clamp((norm + _CLIP_EPS) / clip, min=1.0)


def attach(optimizer, wrapper=None, reduce_enabled: bool = True) -> ZeroBinding:
    """Bind ``optimizer`` to the ZeRO ``wrapper`` that drives it (``optimizer.sharding``).

    Entry points pass the wrapper. Without one (a bare ``deepspeed.initialize``, at the first
    step) it is found by reference lookup, and the log says so."""
    if wrapper is None:
        wrapper = find_wrapper(optimizer)
        if wrapper is not None:
            logger.warning("stratopt_ds: %s is driven by DeepSpeed's %s but was not bound to it; bound it "
                           "by reference lookup. Bind explicitly: stratopt_ds.deepspeed.initialize, or "
                           "stratopt_ds.zero.attach(optimizer, engine.optimizer)",
                           type(optimizer).__name__, type(wrapper).__name__)
    if wrapper is None:
        raise UnsupportedZeroSetting("the optimizer is asked to step tensors it was not built with, and "
                                     "no DeepSpeed ZeRO wrapper drives it; build the optimizer from the "
                                     "parameters it steps")
    binding = ZeroBinding(wrapper, optimizer, reduce_enabled)
    optimizer.bind_sharding(binding)
    return binding
