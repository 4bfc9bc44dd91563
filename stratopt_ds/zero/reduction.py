"""The one collective of a sharded step: all-reduce the per-layer partial sums of squares.

Each rank sums squares over the fragments it holds (a length-L float64 vector); one SUM
all-reduce over the data-parallel group (every rank under tensor or pipeline parallelism, where
each element is counted on exactly one rank) gives every rank the same, bit-identical vector.
No gathers, no per-layer collectives, no host synchronisation.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist


class LayerSqAllReduce:
    """Callable reducer for :class:`~stratopt_ds.layer_map.LayerMap`.

    Counts its collectives (``calls``) and the host seconds spent in them (``seconds``). With
    gloo the all-reduce is synchronous, so that is its true time; with NCCL it is only the launch
    unless ``sync_cuda`` is set, which synchronises before and after (a measurement mode: it
    costs two device syncs per step).
    """

    def __init__(self, group=None, enabled: bool = True):
        self.group = group
        self.enabled = enabled  # False only in tests that must see per-partition norms fail
        self.calls = 0
        self.seconds = 0.0
        self.sync_cuda = False

    def _world(self) -> int:
        return dist.get_world_size(group=self.group) if dist.is_initialized() else 1

    def __call__(self, layer_sq: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self._world() == 1:
            return layer_sq
        buffer = layer_sq
        if dist.get_backend(self.group) == "nccl" and buffer.device.type == "cpu":
            buffer = buffer.to(torch.device("cuda", torch.cuda.current_device()))  # offload: tiny copy
        sync = self.sync_cuda and buffer.is_cuda
        if sync:
            torch.cuda.synchronize(buffer.device)
        t0 = time.perf_counter()
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group)
        if sync:
            torch.cuda.synchronize(buffer.device)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return buffer.to(layer_sq.device)
