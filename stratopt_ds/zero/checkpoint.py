"""World-size-independent checkpoints of a ZeRO-sharded stratopt_ds optimizer.

DeepSpeed's own ``engine.save_checkpoint`` / ``load_checkpoint`` keep our whole state (the
per-layer statistics ride in the optimizer's ``state_dict``) but only load back at the same
data-parallel world size, and its universal-checkpoint converter knows only Adam's two moments.
So resharding is ours: every rank writes the fragments it holds, keyed by parameter name and
offset inside the parameter; on load every rank copies, from whichever saved fragments overlap,
its own new fragments of the fp32 master weights and of every moment. No collective is needed
beyond DeepSpeed's own re-broadcast of the low-precision weights. The files hold tensors and
plain containers only and are read without running code (:mod:`stratopt_ds.safe_load`); a
missing, truncated or corrupted one raises CheckpointError naming it.

    save_sharded(engine, "ckpt/step100")   # on every rank
    load_sharded(engine, "ckpt/step100")   # on every rank, any world size, any ZeRO stage

A pipeline (``PipelineModule``) saves under the names :func:`stratopt_ds.optim.named_param_groups`
gives its tensors (``layers.<i>.<name>``), so its checkpoint loads into any pipeline layout or
into the unsplit model named the same way. Under tensor parallelism (AutoTP) a fragment of a
split tensor also records its rank's slice (:class:`stratopt_ds.zero.tensor_parallel.Slice`), and
fragments are matched in the unsplit tensor's coordinates, so TP2 x DP2 loads into DP4 and back.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import os
from typing import Any, Optional

import torch
import torch.distributed as dist

from .. import safe_load
from ..safe_load import CheckpointError, check_file, unusable
from .tensor_parallel import Slice, is_tensor_parallel, slices

STATE_KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_slow")
FORMAT = "stratopt-sharded-1"


def _binding(engine, what: str):
    """The optimizer, its ZeRO binding, and the TP slices of its split tensors (by name)."""
    optimizer = engine.basic_optimizer
    sharding = optimizer.sharding
    if sharding.is_local:
        from .binding import attach
        sharding = attach(optimizer, engine.optimizer)
    return optimizer, sharding, slices(engine.module, optimizer.param_name, engine.optimizer, what)


def _rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def save_sharded(engine, path: str) -> None:
    """Write this rank's fragments (weights, moments) and, on rank 0, the shared scalars."""
    optimizer, sharding, tp_slices = _binding(engine, "save_sharded")
    rank, world = _rank_world()
    fragments = []
    for slot in sharding.slots:
        state = optimizer.state.get(slot.flat, {})
        for frag, (param, offset) in zip(slot.fragments, slot.sources):
            if sharding.tensor_parallel_rank > 0 and not is_tensor_parallel(param):
                continue  # whole on every TP rank: saved once, by TP rank 0 (as the norm counts it)
            name = optimizer.param_name[id(param)]
            piece = {"name": name, "offset": offset, "length": frag.length,
                     "param": slot.flat.detach().narrow(0, frag.start, frag.length).clone()}
            if name in tp_slices:  # offset and length are inside this TP rank's slice
                piece["slice"] = dataclasses.astuple(tp_slices[name])
            for key in STATE_KEYS:
                if key in state:
                    piece[key] = state[key].narrow(0, frag.start, frag.length).clone()
            fragments.append(piece)
    steps = {float(optimizer.state[s.flat]["step"]) for s in sharding.slots if s.flat in optimizer.state}
    if len(steps) > 1:
        raise RuntimeError(f"parameter groups are at different steps {sorted(steps)}; cannot save")
    payload: dict[str, Any] = {"format": FORMAT, "world": world, "rank": rank, "fragments": fragments,
                               "step": steps.pop() if steps else 0.0}
    if rank == 0:
        payload["layer_stats"] = optimizer.layer_stats.state_dict()
        payload["layer_names"] = list(optimizer.base_layer_map.layout.layer_names)
        payload["param_groups"] = [{k: v for k, v in g.items() if k not in ("params", "param_names")}
                                   for g in optimizer.param_groups]
        payload["global_steps"] = engine.global_steps
        scheduler = getattr(engine, "lr_scheduler", None)
        payload["lr_scheduler"] = scheduler.state_dict() if scheduler is not None else None
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, f".rank{rank:05d}.pt.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, os.path.join(path, f"rank{rank:05d}.pt"))  # never a half-written file
    if dist.is_initialized():
        dist.barrier()


def _load_all(path: str) -> list[dict]:
    """Every rank file of the checkpoint at ``path``, unpickled without running code
    (:func:`stratopt_ds.safe_load.load`: tensors and plain containers only)."""
    files = sorted(glob.glob(os.path.join(path, "rank*.pt")))
    if not files:
        raise FileNotFoundError(f"{path}: no stratopt sharded checkpoint here (expected rank*.pt "
                                "files written by save_sharded); check the path")
    for f in files:  # cheap checks of every file first: a bad one is named before GBs are read
        problem = check_file(f)
        if problem is not None:
            raise unusable(f, problem)
    # mapped, not read: a rank copies only its own fragments' share of every file, so its memory
    # stays its share of the checkpoint whatever the world size that saved it
    parts = [safe_load.load(f, mmap=True) for f in files]
    for f, part in zip(files, parts):
        if not isinstance(part, dict) or part.get("format") != FORMAT:
            raise CheckpointError(f"{f}: not a {FORMAT} file (written by save_sharded); "
                                  "load_sharded reads only those")
    worlds = {part["world"] for part in parts}
    if len(worlds) > 1:
        raise CheckpointError(f"{path}: rank files of saves at different world sizes {sorted(worlds)} "
                              "are mixed; save into an empty directory")
    world, ranks = worlds.pop(), [part["rank"] for part in parts]
    if sorted(ranks) != list(range(world)):
        missing = [f"rank{r:05d}.pt" for r in range(world) if r not in ranks]
        raise CheckpointError(f"{path}: incomplete checkpoint, saved by {world} ranks but "
                              f"{len(parts)} rank files found (missing: {', '.join(missing) or 'none'}); "
                              "restore the missing files or save again")
    return parts


@functools.lru_cache(maxsize=4096)
def _runs(offset: int, length: int, tp_slice: Optional[Slice]) -> tuple[tuple[int, int, int], ...]:
    """``(start in the unsplit tensor, start in the range, length)`` runs of a range of a tensor,
    or of a TP slice of one. Cached: a load asks for the same ranges once per state key and a
    row-parallel slice has one run per row."""
    return tuple(tp_slice.runs(offset, length)) if tp_slice is not None else ((offset, 0, length),)


def _fill(dest: torch.Tensor, name: str, offset: int, key: str, saved: dict[str, list],
          tp_slice: Optional[Slice] = None) -> None:
    """Copy the ``saved`` fragments of ``name`` that overlap ``[offset, offset+len(dest))`` (of
    this rank's TP slice of it, if ``tp_slice``) into ``dest``, matched in the coordinates of
    the unsplit tensor: any data-, tensor- or pipeline-parallel layout to any other."""
    if dest.numel() == 0:
        return
    wanted, covered = _runs(offset, dest.numel(), tp_slice), 0
    first, last = wanted[0][0], wanted[-1][0] + wanted[-1][2]
    for piece in saved.get(name, ()):
        if key not in piece:
            continue
        have = _runs(piece["offset"], piece["length"], Slice(*piece["slice"]) if "slice" in piece else None)
        if have[-1][0] + have[-1][2] <= first or have[0][0] >= last:
            continue  # no overlap anywhere: skip the merge
        i = j = 0  # both lists run in increasing unsplit order: one merge
        while i < len(wanted) and j < len(have):
            (w, w_at, w_len), (h, h_at, h_len) = wanted[i], have[j]
            lo, hi = max(w, h), min(w + w_len, h + h_len)
            if hi > lo:
                dest.narrow(0, w_at + lo - w, hi - lo).copy_(piece[key].narrow(0, h_at + lo - h, hi - lo))
                covered += hi - lo
            if w + w_len <= h + h_len:
                i += 1
            else:
                j += 1
    if covered != dest.numel():
        raise ValueError(f"checkpoint covers {covered} of {dest.numel()} elements of {name!r} ({key})")


def load_sharded(engine, path: str) -> None:
    """Load a :func:`save_sharded` checkpoint written at any world size into ``engine``."""
    optimizer, sharding, tp_slices = _binding(engine, "load_sharded")
    parts = _load_all(path)
    saved: dict[str, list] = {}
    for part in parts:
        for piece in part["fragments"]:
            saved.setdefault(piece["name"], []).append(piece)
    head = parts[0]
    with torch.no_grad():
        for slot in sharding.slots:
            group = optimizer.param_groups[slot.group_index]
            state = optimizer.init_state(slot.flat, group)
            state["step"].fill_(head["step"])
            for frag, (param, offset) in zip(slot.fragments, slot.sources):
                name = optimizer.param_name[id(param)]
                where = tp_slices.get(name)
                _fill(slot.flat.narrow(0, frag.start, frag.length), name, offset, "param", saved, where)
                for key in STATE_KEYS:
                    if key in state:
                        _fill(state[key].narrow(0, frag.start, frag.length), name, offset, key, saved, where)
    optimizer.layer_stats.load_state_dict(_in_layer_order(head, optimizer.base_layer_map.layout.layer_names, path))
    for group, saved_group in zip(optimizer.param_groups, head["param_groups"]):
        group.update(saved_group)
    engine.global_steps = head["global_steps"]
    if head.get("lr_scheduler") is not None and getattr(engine, "lr_scheduler", None) is not None:
        engine.lr_scheduler.load_state_dict(head["lr_scheduler"])
    _refresh_low_precision_weights(engine.optimizer, sharding)


def _in_layer_order(head: dict, mine: list[str], path: str) -> dict:
    """The saved per-layer statistics in this optimizer's layer order: layouts number the same
    layers differently (a pipeline stage by stage, one process group by group). Matched by
    layer name; a checkpoint without names (older) is taken in its own order."""
    stats, saved = head["layer_stats"], head.get("layer_names")
    if saved is None or list(saved) == list(mine):
        return stats
    if sorted(saved) != sorted(mine):
        extra, missing = sorted(set(saved) - set(mine)), sorted(set(mine) - set(saved))
        raise CheckpointError(f"{path}: the checkpoint's layers are not this model's (only in the "
                              f"checkpoint: {extra[:5]}; only here: {missing[:5]}); load it into the "
                              "model it was saved from")
    where = {name: i for i, name in enumerate(saved)}
    order = torch.tensor([where[name] for name in mine])
    return {key: value[order] if value.dim() == 1 else value for key, value in stats.items()}


def _refresh_low_precision_weights(wrapper, sharding) -> None:
    if sharding.kind == "stage3":
        for j in range(len(sharding.slots)):
            wrapper._reassign_or_swap_out_partitioned_parameters(j)
    else:
        wrapper.update_lp_params()
