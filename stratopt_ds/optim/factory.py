"""``create_optimizer``: build any named optimizer from a model or from ready parameter groups."""
from __future__ import annotations

from typing import Any, Iterable, Union

import torch
from torch import nn

from .config import OPTIMIZER_PRESETS, preset_defaults
from .named import OPTIMIZER_CLASSES
from .optimizer import LayerwiseAdam


def available_optimizers() -> list[str]:
    """Every optimizer name ``create_optimizer`` accepts."""
    return list(OPTIMIZER_PRESETS)


def is_pipeline_module(model: Any) -> bool:
    """A DeepSpeed ``PipelineModule`` (found by class name: no deepspeed import here)."""
    return any(cls.__name__ == "PipelineModule" for cls in type(model).__mro__)


def named_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay on tensors with >= 2 dims, none on biases and norm weights; frozen tensors left out.

    Each group carries ``param_names``, from which the optimizer derives layer ids and depths.
    A DeepSpeed ``PipelineModule`` names its tensors ``<pipeline layer index>.<name>``; they are
    named ``layers.<index>.<name>`` here, so that each pipeline layer is a block (its depth is
    its place among all the pipeline's layers, whichever stage holds it).
    """
    prefix = "layers." if is_pipeline_module(model) else ""
    decay, no_decay = ([], []), ([], [])
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        params, names = decay if p.ndim >= 2 else no_decay
        params.append(p)
        names.append(prefix + name)
    groups = [{"params": ps, "param_names": ns, "weight_decay": wd}
              for (ps, ns), wd in ((decay, weight_decay), (no_decay, 0.0)) if ps]
    if not groups:
        raise ValueError("the model has no trainable parameters (all requires_grad=False)")
    return groups


def create_optimizer(name: str, model_or_params: Union[nn.Module, Iterable[Any]],
                     **hyperparams: Any) -> LayerwiseAdam:
    """Build optimizer ``name`` (see :func:`available_optimizers`).

    Given an ``nn.Module`` it builds the decay/no-decay groups itself, with parameter names;
    given parameters or groups it takes them as they are.
    """
    if name not in OPTIMIZER_CLASSES:
        raise ValueError(f"unknown optimizer {name!r}; available: {', '.join(OPTIMIZER_PRESETS)}")
    if isinstance(model_or_params, nn.Module):
        wd = hyperparams.get("weight_decay", preset_defaults(name)["weight_decay"])
        params: Any = named_param_groups(model_or_params, wd)
    elif isinstance(model_or_params, torch.Tensor):
        params = [model_or_params]
    else:
        params = list(model_or_params)
    return OPTIMIZER_CLASSES[name](params, **hyperparams)
