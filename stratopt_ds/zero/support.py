"""Which DeepSpeed settings stratopt_ds supports, decided from the config alone.

The per-layer norms are exact only where the binding (:mod:`stratopt_ds.zero.binding`) knows
how DeepSpeed lays the optimizer's tensors out and which group to all-reduce over. Every setting
that changes either, and that is not supported yet, is refused here, naming the key and what to
use instead. The run policy calls :func:`check_config` before any process group starts; the
binding checks the live wrapper again (a bare ``deepspeed.initialize`` never passes through the
policy).
"""
from __future__ import annotations

from typing import Any, Mapping

from .partition_map import UnsupportedZeroSetting

STAGES = (0, 1, 2, 3)


def zero_section(config: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    zero = config.get("zero_optimization") or {}
    if not isinstance(zero, Mapping):
        raise UnsupportedZeroSetting(f"{where}: zero_optimization must be a mapping, got {zero!r}")
    return zero


def stage_of(config: Mapping[str, Any], where: str = "the DeepSpeed config") -> int:
    """The ZeRO stage: 0, 1, 2 or 3 (an error naming the key otherwise)."""
    stage = zero_section(config, where).get("stage", 0)
    if isinstance(stage, bool) or stage not in STAGES:
        raise UnsupportedZeroSetting(f"{where}: zero_optimization.stage={stage!r}: expected one of "
                                     f"{', '.join(map(str, STAGES))} (an integer)")
    return stage


def check_config(config: Mapping[str, Any], where: str = "the DeepSpeed config") -> None:
    """Refuse every setting under which stratopt_ds's layer norms would not be exact."""
    stage = stage_of(config, where)
    zero = zero_section(config, where)

    def refuse(setting: str, why: str) -> None:
        raise UnsupportedZeroSetting(f"{where}: {setting} is not supported by stratopt_ds: {why}")

    if (config.get("fp16") or {}).get("enabled") is True:  # "auto" (HF): the live binding checks
        refuse("fp16.enabled=true", "dynamic loss scaling skips steps before the optimizer sees "
               "them and scales the gradients; use bf16 (ZeRO stage >= 1) or fp32")
    if (config.get("bf16") or {}).get("enabled") is True and stage == 0:
        refuse("bf16.enabled=true with zero_optimization.stage=0", "DeepSpeed then wraps the "
               "optimizer in its FP16_Optimizer; use ZeRO stage 1, 2 or 3 for bf16, or fp32 at stage 0")
    if zero.get("round_robin_gradients") is True:
        refuse("zero_optimization.round_robin_gradients=true", "the flat gradient order would not "
               "match the layer map; set it to false")
    for key in ("mics_shard_size", "mics_hierarchical_params_gather"):
        if key in zero:  # DeepSpeed refuses the key itself, whatever its value
            refuse(f"zero_optimization.{key}={zero[key]!r}", "DeepSpeed 0.19.8 has removed MiCS "
                   "(its own error: \"MiCS ZeRO-3 sharding has been removed\"); remove the key. To "
                   "keep parameter all-gathers within groups of ranks, ZeRO++ hpZ "
                   "(zero_optimization.zero_hpz_partition_size, stage 3) is supported")
    offload = zero.get("offload_optimizer") or {}
    if isinstance(offload, Mapping) and offload.get("device") == "nvme":
        refuse("zero_optimization.offload_optimizer.device='nvme'", "DeepSpeed swaps the optimizer "
               "state in and out of its own buffers (at stage 1/2 it silently trains without "
               "offload); use 'cpu' or 'none'")
    tp = (config.get("tensor_parallel") or {}).get("autotp_size", 1) or 1
    if tp > 1:
        refuse(f"tensor_parallel.autotp_size={tp}", "each rank would see only its tensor-parallel "
               "shard of a layer, and the norm all-reduce spans the data-parallel group only; "
               "remove it (use ZeRO stage 3 to shard a large model)")
    sp = config.get("sequence_parallel_size", 1) or 1
    if sp > 1:
        refuse(f"sequence_parallel_size={sp}", "Ulysses sequence parallelism splits the data-"
               "parallel group; remove it")
    pipeline = config.get("pipeline") or {}
    if isinstance(pipeline, Mapping) and (pipeline.get("stages", 1) or 1) not in (1, "auto"):
        refuse(f"pipeline.stages={pipeline['stages']}", "each stage would hold only its own "
               "layers' norms; remove it")


def check_topology(data_parallel_size: int, world_size: int, what: str) -> None:
    """After initialisation: the norm all-reduce must span every rank (no model parallelism)."""
    if data_parallel_size != world_size:
        raise UnsupportedZeroSetting(
            f"{what}: the data-parallel group holds {data_parallel_size} of {world_size} ranks, so "
            "the model is also split by tensor, pipeline or sequence parallelism, which stratopt_ds "
            "does not support yet (each rank's layer norms would cover only its part of a layer)")


def check_model_parallel(model: Any = None, mpu: Any = None, where: str = "deepspeed.initialize") -> None:
    """Refuse a pipeline model or a model-parallel unit (``mpu``): the layer norms would then
    cover each rank's part of the model only."""
    if mpu is not None:
        raise UnsupportedZeroSetting(
            f"{where}: mpu={type(mpu).__name__} (tensor, pipeline or sequence parallelism) is not "
            "supported by stratopt_ds yet: its norm all-reduce would miss the model-parallel "
            "ranks; leave mpu out (ZeRO stage 3 shards a large model across data-parallel ranks)")
    if any(cls.__name__ == "PipelineModule" for cls in type(model).__mro__):
        raise UnsupportedZeroSetting(
            f"{where}: a PipelineModule (pipeline parallelism) is not supported by stratopt_ds "
            "yet: each stage would see only its own layers' norms; pass a plain nn.Module")
