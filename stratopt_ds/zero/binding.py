"""Bind a stratopt_ds optimizer to the DeepSpeed wrapper that drives it.

A ZeRO wrapper calls the inner ``step()`` once per parameter group (stage 1/2) or sub-group
(stage 3), but a layer's norm needs every group: a block's weights and its norm weights sit in
different weight-decay groups, and global clipping needs all layers. So at the first inner call
of each engine step the optimizer sums squares over the group in hand *and* over the groups
still waiting (their gradients sit in DeepSpeed's buffers), all-reduces that one vector, and
keeps the resulting per-layer scalars for the remaining calls of the same step.

Waiting gradients have not yet been through DeepSpeed's ``unscale_and_clip_grads``; their sums
are divided by the square of the same combined scale DeepSpeed will apply (computed from the
same attributes: ``loss_scale``, ``clip_grad`` and ``_global_grad_norm``), so every norm is of
the gradient the optimizer actually steps with: with fp16, of the unscaled gradient.

fp16 dynamic loss scaling (ZeRO 1/2): a step whose gradients overflow is skipped by DeepSpeed
before any inner ``step()``, so it never reaches gbar or the counters. DeepSpeed updates the scale
*before* it unscales, so on a step where the scale grows it divides by the new scale (and its
clip coefficient compares ``norm * old / new`` with the threshold); :func:`_loss_scales` gives
both, and the waiting groups are divided by exactly what the group in hand was divided by.
"""
from __future__ import annotations

import collections
import gc
import logging
from typing import Optional

import torch
import torch.distributed as dist

from ..layer_map import Fragment, LayerMap
from ..ops import fragment_sumsq
from .partition_map import (Slot, UnsupportedZeroSetting, bf16_optimizer_slots, pending_rows,
                            stage12_slots, stage3_slots)
from .reduction import LayerSqAllReduce
from .support import check_topology
from .tensor_parallel import is_tensor_parallel, tensor_parallel

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


def pipeline_grid(wrapper):
    """The pipeline grid DeepSpeed's ``PipelineEngine`` hands its ZeRO wrapper as ``mpu``, when
    the model has more than one stage (else None)."""
    grid = getattr(wrapper, "mpu", None)
    if grid is None or not hasattr(grid, "get_pipe_parallel_world_size"):
        return None
    return grid if grid.get_pipe_parallel_world_size() > 1 else None


def model_names(optimizer, grid) -> list[str]:
    """The parameter names of the whole pipeline, stage by stage: gathered once, at bind time,
    within this rank's pipe group (one rank of each stage; every pipe group holds the same
    model, so every rank gets the same list, hence the same layer ids)."""
    everyone = [None] * grid.get_pipe_parallel_world_size()
    dist.all_gather_object(everyone, (grid.get_stage_id(), list(optimizer.param_name.values())),
                           group=grid.get_pipe_parallel_group())
    by_stage = {}
    for stage, names in everyone:
        by_stage.setdefault(stage, names)
    names = [name for stage in sorted(by_stage) for name in by_stage[stage]]
    shared = sorted(name for name, n in collections.Counter(names).items() if n > 1)
    if shared:  # a TiedLayerSpec: the same tensor on two stages, its gradient summed by DeepSpeed
        raise UnsupportedZeroSetting(f"tied layers across pipeline stages (deepspeed.pipe.TiedLayerSpec: "
                                     f"{shared[:3]}) are not supported by stratopt_ds yet (the norm "
                                     "would count the shared tensor once per stage); untie them "
                                     "or keep them on one stage")
    return names


class ZeroBinding:
    """Slots, the sharded layer map and the reducer for one DeepSpeed wrapper.

    Under tensor parallelism (AutoTP with ZeRO 1/2) a split tensor's slices live on the TP
    ranks and each is sharded over its data-parallel group; a replicated tensor is whole on every
    TP rank. The norm counts a split tensor's fragments on every rank and a replicated tensor's
    on TP rank 0 only (its owner: never TP-size times, never divided by it); the others sum
    into a discarded bin. Then the one all-reduce spans every rank (tensor x data parallel).

    Under pipeline parallelism (``PipelineEngine``, ZeRO-1) each stage holds its own layers,
    sharded over its data-parallel group. The layers are numbered over the whole pipeline (the
    names of every stage, gathered once), so the length-L vector is the same on every rank, and
    the one all-reduce spans every rank: each element of every layer lives on exactly one rank,
    so one SUM over all ranks (pipeline x data) gives every layer's exact norm, and global
    clipping and the skip-all rule see every layer. ``span_model_parallel=False`` reduces over
    the data-parallel group only (tests that must see per-stage norms fail).
    """

    def __init__(self, wrapper, optimizer, reduce_enabled: bool = True, span_model_parallel: bool = True):
        kind = _wrapper_kind(wrapper)
        if kind is None:
            raise UnsupportedZeroSetting(f"{type(wrapper).__name__} is not a ZeRO wrapper stratopt_ds supports")
        self.wrapper, self.kind = wrapper, kind
        self._check_settings()
        grid = pipeline_grid(wrapper)
        if grid is not None:
            optimizer.number_layers_globally(model_names(optimizer, grid))
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
        stages = 1 if grid is None else grid.get_pipe_parallel_world_size()
        tp_size, tp_rank = tensor_parallel(wrapper)
        if tp_size > 1 and kind != "stage12":
            raise UnsupportedZeroSetting(
                f"tensor parallelism (AutoTP) with DeepSpeed's {type(wrapper).__name__} is not supported "
                "by stratopt_ds yet (ZeRO-3, or bf16 at stage 1 with data_types.grad_accum_dtype='fp32'); "
                "use ZeRO stage 1 or 2, without grad_accum_dtype='fp32' at stage 1")
        check_topology(dist.get_world_size(group=group), dist.get_world_size(), type(wrapper).__name__,
                       pipeline_stages=stages, tensor_parallel=tp_size)
        self.tensor_parallel, self.tensor_parallel_rank, self.pipeline_stages = tp_size, tp_rank, stages
        if (grid is not None or tp_size > 1) and span_model_parallel:
            group = None  # every rank: pipeline x tensor x data parallel
        self.reducer = LayerSqAllReduce(group, enabled=reduce_enabled)
        self.layer_map = LayerMap(base_map.layout, {id(s.flat): s.fragments for s in self.slots})
        # the fragments as the norm counts them: a replicated tensor's on TP rank 0 only, the
        # others in bin L, which is dropped before the all-reduce
        dropped = base_map.num_layers

        def counted(frag, source):
            return frag if tp_rank == 0 or is_tensor_parallel(source) else Fragment(frag.start, frag.length, dropped)

        self.norm_fragments = {id(s.flat): [counted(f, src) for f, (src, _) in zip(s.fragments, s.sources)]
                               for s in self.slots}
        self.norm_map = LayerMap(base_map.layout, self.norm_fragments)

    def _check_settings(self) -> None:
        w = self.wrapper
        if getattr(w, "has_moe_layers", False):
            raise UnsupportedZeroSetting("MoE expert parameter groups are not supported by stratopt_ds")
        groups = (w.round_robin_bit16_groups if self.kind == "stage12" else
                  w.fp16_groups if self.kind == "stage3" else w.bf16_groups)
        if self.kind == "stage3" and any(p.dtype == torch.float16 for g in groups for p in g):
            raise UnsupportedZeroSetting("fp16.enabled=true with zero_optimization.stage=3 is not "
                                         "supported by stratopt_ds yet (stages 1 and 2 are); use bf16 "
                                         "at stage 3, or fp16 at stage 1 or 2")
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
        then one all-reduce of the length-L vector (over the data-parallel group; over every
        rank under tensor or pipeline parallelism)."""
        pairs = list(pairs)
        rows = self.norm_map.rows_of([tensor for tensor, _ in pairs])
        with_dropped = fragment_sumsq([grad for _, grad in pairs], rows, self.norm_map.num_layers + 1, device)
        self.add_pending({id(p) for p, _ in pairs}, with_dropped)
        return self.reducer(with_dropped[:-1])

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
            rows += pending_rows(mine, self.norm_fragments[id(slot.flat)], first_piece=len(pieces))
            pieces += mine
        # the op's own per-layer sum of squares (native, deterministic), in one call for all slots
        waiting_sq = fragment_sumsq(pieces, rows, layer_sq.numel(), layer_sq.device)
        layer_sq.add_(waiting_sq / self._combined_scale(layer_sq.device) ** 2)

    def _combined_scale(self, device) -> torch.Tensor:
        """What DeepSpeed divides this step's gradients by: loss scale x clip coefficient."""
        w = self.wrapper
        before, now = _loss_scales(w)
        scale = torch.full((), now, dtype=torch.float64, device=device)
        clip = float(getattr(w, "clip_grad", 0.0) or 0.0)
        norm = getattr(w, "_global_grad_norm", None)  # DeepSpeed's: scaled norm / scale before
        if clip <= 0.0 or norm is None:
            return scale
        norm = torch.as_tensor(norm, dtype=torch.float64).to(device)
        return scale * torch.clamp((norm * (before / now) + _CLIP_EPS) / clip, min=1.0)


def _loss_scales(wrapper) -> tuple[float, float]:
    """(scale the gradients were computed with, scale DeepSpeed unscales them by) this step.

    Only a dynamic scaler that grew the scale in this step's update makes them differ; the
    growth rule is DeepSpeed's ``DynamicLossScaler.update_scale`` (the update has already run,
    so ``cur_iter`` is one past the step)."""
    now = float(getattr(wrapper, "loss_scale", 1.0) or 1.0)
    scaler = getattr(wrapper, "loss_scaler", None)
    if not getattr(scaler, "dynamic", False) or getattr(wrapper, "custom_loss_scaler", False):
        return now, now
    stable = (scaler.cur_iter - 1 - scaler.last_overflow_iter) - 1
    grew = stable > 0 and stable % scaler.scale_window == 0
    return (now / scaler.scale_factor if grew else now), now


def attach(optimizer, wrapper=None, reduce_enabled: bool = True, span_model_parallel: bool = True) -> ZeroBinding:
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
    binding = ZeroBinding(wrapper, optimizer, reduce_enabled, span_model_parallel)
    optimizer.bind_sharding(binding)
    return binding
