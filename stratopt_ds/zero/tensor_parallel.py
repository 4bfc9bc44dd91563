"""How DeepSpeed AutoTP splits a model's tensors across the tensor-parallel (TP) ranks.

AutoTP replaces a ``Linear`` by a column-parallel ``LinearLayer`` (weight and bias split along
dim 0, the output features) or a row-parallel ``LinearAllreduce`` (weight split along dim 1, the
input features; the bias whole), and marks every split tensor ``tensor_model_parallel``. The
binding counts a split tensor's squares on every TP rank and a whole one on TP rank 0 only; the
reshard (:mod:`stratopt_ds.zero.checkpoint`) places a slice's elements in the unsplit tensor
with :class:`Slice`. Layer classes whose split is not one contiguous range along one dimension
(fused or packed projections, ``SubParam*``) are refused by name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch.distributed as dist

from .partition_map import UnsupportedZeroSetting

# DeepSpeed's AutoTP layer classes (deepspeed/module_inject/layers.py) -> the dimension their
# 2-D weight is split along (1-D split tensors, the column-parallel biases, along dim 0)
SPLIT_DIM = {"LinearLayer": 0, "VocabParallelLinear": 0, "VocabParallelEmbedding": 0,
             "LinearAllreduce": 1, "LinearAllreduceWithReplicatedInput": 1}


def tensor_parallel(wrapper) -> tuple[int, int]:
    """(size, rank) of the tensor-parallel group (DeepSpeed AutoTP hands the engine's ``mpu``,
    ``deepspeed.utils.groups``, to its ZeRO wrapper; a pipeline grid has the same calls)."""
    mpu = getattr(wrapper, "mpu", None)
    if mpu is None or not hasattr(mpu, "get_tensor_model_parallel_world_size"):
        return 1, 0
    return int(mpu.get_tensor_model_parallel_world_size()), int(mpu.get_tensor_model_parallel_rank())


def is_tensor_parallel(param) -> bool:
    """A tensor AutoTP split across the tensor-parallel ranks (each holds a different slice);
    the others (norm weights, row-parallel biases, embeddings) are whole on every TP rank.
    DeepSpeed's own marks (``deepspeed.runtime.utils.is_model_parallel_parameter``)."""
    return bool(getattr(param, "tensor_model_parallel", False) or getattr(param, "model_parallel", False))


@dataclass(frozen=True)
class Slice:
    """This rank's slice of a split tensor: ``local`` of the ``whole`` indices of the split
    dimension, from ``start``; ``inner`` elements per index (the product of the later dims)."""

    local: int
    whole: int
    start: int
    inner: int

    def runs(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """Where elements ``[offset, offset+length)`` of the flattened slice sit in the flattened
        unsplit tensor: ``(unsplit start, start within the range, length)`` runs, in order (one
        run per row of the dimensions before the split one)."""
        row, whole_row, shift = self.local * self.inner, self.whole * self.inner, self.start * self.inner
        runs, i, end = [], offset, offset + length
        while i < end:
            r, c = divmod(i, row)
            n = min(row - c, end - i)
            runs.append((r * whole_row + shift + c, i - offset, n))
            i += n
        return runs


def slices(model, param_name: dict[int, str], wrapper, what: str) -> dict[str, Slice]:
    """The :class:`Slice` of every split tensor of ``model`` on this rank, by parameter name.
    A collective over the TP group (the slice sizes of every TP rank), once per save or load."""
    size, rank = tensor_parallel(wrapper)
    if size == 1:
        return {}
    split: dict[str, tuple[int, tuple[int, ...]]] = {}
    for module in model.modules():
        kind = type(module).__name__
        for p in module.parameters(recurse=False):
            if not is_tensor_parallel(p) or id(p) not in param_name:
                continue
            name = param_name[id(p)]
            if kind not in SPLIT_DIM:
                raise UnsupportedZeroSetting(
                    f"{what}: {name} is split by DeepSpeed's {kind}, whose layout the reshard "
                    f"does not know (it places {', '.join(sorted(SPLIT_DIM))}); resume at the same "
                    "tensor-parallel size with engine.save_checkpoint / load_checkpoint")
            split[name] = (SPLIT_DIM[kind] if p.dim() > 1 else 0, tuple(p.shape))
    everyone: list = [None] * size
    dist.all_gather_object(everyone, {name: shape[dim] for name, (dim, shape) in split.items()},
                           group=wrapper.mpu.get_tensor_model_parallel_group())
    out = {}
    for name, (dim, shape) in split.items():
        sizes = [sizes_of[name] for sizes_of in everyone]
        out[name] = Slice(sizes[rank], sum(sizes), sum(sizes[:rank]), math.prod(shape[dim + 1:]))
    return out
