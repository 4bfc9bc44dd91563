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

    fp16 = (config.get("fp16") or {}).get("enabled") is True  # "auto" (HF): the live binding checks
    for half in ("bf16", "fp16"):
        if (config.get(half) or {}).get("enabled") is True and stage == 0:
            refuse(f"{half}.enabled=true with zero_optimization.stage=0", "DeepSpeed then wraps the "
                   f"optimizer in its FP16_Optimizer; use ZeRO stage 1 or 2 for {half}"
                   f"{' (or 3)' if half == 'bf16' else ''}, or fp32 at stage 0")
    if fp16 and stage == 3:
        refuse("fp16.enabled=true with zero_optimization.stage=3", "fp16 loss scaling is supported "
               "at stages 1 and 2; use bf16 at stage 3")
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
    if tp > 1 and stage not in (1, 2):
        refuse(f"tensor_parallel.autotp_size={tp} with zero_optimization.stage={stage}", "tensor "
               "parallelism is supported with ZeRO stage 1 or 2; use one of them (or drop AutoTP "
               "and shard with stage 3)")
    offloaded = isinstance(offload, Mapping) and offload.get("device") in ("cpu", "nvme")
    if (tp > 1 and stage == 1 and not offloaded and (config.get("bf16") or {}).get("enabled") is True
            and (config.get("data_types") or {}).get("grad_accum_dtype") == "fp32"):
        refuse(f"tensor_parallel.autotp_size={tp} with bf16, zero_optimization.stage=1 and "
               "data_types.grad_accum_dtype='fp32'", "DeepSpeed then steps through its "
               "BF16_Optimizer, which stratopt_ds does not bind under tensor parallelism; drop "
               "grad_accum_dtype (ZeRO-1's own bf16 path) or use zero_optimization.stage=2")

    sp = config.get("sequence_parallel_size", 1) or 1
    if sp > 1:
        refuse(f"sequence_parallel_size={sp}", "Ulysses sequence parallelism splits the data-"
               "parallel group; remove it")
    pipeline = config.get("pipeline") or {}
    if isinstance(pipeline, Mapping) and (pipeline.get("stages", 1) or 1) not in (1, "auto") and stage != 1:
        refuse(f"pipeline.stages={pipeline['stages']} with zero_optimization.stage={stage}", pipeline_stage(stage))


def check_topology(data_parallel_size: int, world_size: int, what: str, pipeline_stages: int = 1,
                   tensor_parallel: int = 1) -> None:
    """After initialisation: data x pipeline x tensor parallelism must make up every rank (the
    norm all-reduce spans them); any other split (sequence parallelism) is not supported."""
    if data_parallel_size * pipeline_stages * tensor_parallel != world_size:
        raise UnsupportedZeroSetting(
            f"{what}: the data-parallel group holds {data_parallel_size} of {world_size} ranks "
            f"(pipeline stages: {pipeline_stages}, tensor-parallel size: {tensor_parallel}), so the "
            "model is also split another way (sequence parallelism), which stratopt_ds does not "
            "support (each rank's layer norms would cover only its part of a layer)")


def pipeline_stage(stage: int) -> str:
    """Why a pipeline runs at ZeRO stage 1 only, for a refusal at ``stage``."""
    return ("at stage 0 DeepSpeed's pipeline engine has no ZeRO wrapper for stratopt_ds to bind "
            "(each stage would number and clip only its own layers)" if stage == 0 else
            "DeepSpeed's pipeline engine runs ZeRO stage 0 or 1") + "; use zero_optimization.stage=1"


def check_model_parallel(model: Any = None, mpu: Any = None, stage: int = 1,
                         where: str = "deepspeed.initialize") -> None:
    """Refuse a model-parallel unit (``mpu``): its tensor-parallel splits are unknown to the
    layer map. A ``PipelineModule`` is supported at ZeRO stage 1 (its engine builds its own
    grid, which the binding reads)."""
    if any(cls.__name__ == "PipelineModule" for cls in type(model).__mro__) and stage != 1:
        raise UnsupportedZeroSetting(f"{where}: a PipelineModule with zero_optimization.stage={stage} "
                                     f"is not supported by stratopt_ds: {pipeline_stage(stage)}")
    if mpu is not None:
        raise UnsupportedZeroSetting(
            f"{where}: mpu={type(mpu).__name__} (tensor or sequence parallelism) is not supported "
            "by stratopt_ds yet: its norm all-reduce would miss the model-parallel ranks; leave "
            "mpu out (pipeline parallelism: pass a deepspeed.pipe.PipelineModule; ZeRO stage 3 "
            "shards a large model across data-parallel ranks)")
