"""The rules for a valid run, in one place.

Every entry point asks here: ``stratopt-train`` (:mod:`stratopt_ds.train`),
:func:`stratopt_ds.deepspeed.initialize` and :func:`~stratopt_ds.deepspeed.prepare_config`, the
HF Trainer integration (:mod:`stratopt_ds.integrations.hf`), accelerate (:mod:`stratopt_ds.integrations.accelerate`) and
the study plans (:mod:`stratopt_ds.study.plan`). They differ only in how they word where a
setting came from (``where``) and how they report a refusal (a parser error, a PlanError, a
ValueError).

**Optimizer keywords** (:func:`check_optimizer`) are validated without building anything: the
same resolution of preset and keywords that the optimizer's constructor runs
(:func:`stratopt_ds.optim.config.resolve_keywords`).

**The global batch** splits evenly over ranks and gradient-accumulation steps
(:func:`check_batch_split`).

**The learning rate** is the entry point's own setting (``--lr``, ``--learning_rate``, the
study's train option ``lr``), never an optimizer argument (:func:`refuse_lr_in_args`).

**Gradient clipping: one rule** (:func:`engine_clipping`). An optimizer that clips itself
(``clip`` is ``"global"`` or ``"layer"``) and a global clip by the engine (DeepSpeed's
``gradient_clipping``, the Trainer's ``max_grad_norm``) would clip twice, the engine's first:
that combination is an **error** everywhere. When the engine's setting is absent (or
``"auto"``), it becomes 0 for a self-clipping optimizer and DeepSpeed's default 1.0 otherwise,
and the returned note says so.
"""
from __future__ import annotations

import json
from typing import Any

from .optim import config as optim_config

DEEPSPEED_DEFAULT_CLIPPING = 1.0  # deepspeed.runtime.constants.GRADIENT_CLIPPING_DEFAULT


class PolicyError(ValueError):
    """A request the run policy refuses; the message names the settings and what to change."""


def parse_opt_args(items: list[str]) -> dict[str, Any]:
    """['{"beta3": 0.99}'] or ['beta3=0.99', 'clip=global'] -> {'beta3': 0.99, 'clip': 'global'}."""
    out: dict[str, Any] = {}
    for item in items:
        if item.lstrip().startswith("{"):
            out.update(json.loads(item))
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value or a JSON object, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value  # a bare string such as clip=global
    return out


def refuse_lr_in_args(hyperparams: dict[str, Any], where: str, lr_setting: str) -> None:
    """The learning rate comes from the entry point's ``lr_setting``, not from ``where``."""
    if "lr" in hyperparams:
        raise PolicyError(f"{where}: set the learning rate with {lr_setting}, not lr=...")


def check_optimizer(name: str, hyperparams: dict[str, Any]) -> str:
    """Validate optimizer ``name`` with ``hyperparams`` (its keyword ranges and choices, as its
    constructor would); return its clip mode ('none', 'global' or 'layer')."""
    from .optim import OPTIMIZER_PRESETS  # the optimizer presets table

    if name not in OPTIMIZER_PRESETS:
        raise PolicyError(f"unknown optimizer {name!r}; available: {', '.join(OPTIMIZER_PRESETS)}")
    hyperparams = dict(hyperparams)
    capturable = hyperparams.pop("capturable", False)  # a constructor switch, not a hyperparameter
    if not isinstance(capturable, bool):
        raise PolicyError(f"capturable={capturable!r}: expected True or False")
    _, layer_options = optim_config.resolve_keywords(name, hyperparams)
    return layer_options["clip"]


def engine_clipping(engine_clip: Any, clip_mode: str, setting: str = "gradient_clipping") -> tuple[float, list[str]]:
    """The global clip the engine must apply, and notes for the log (see the module doc).

    ``engine_clip``: the engine's setting as given (None or "auto" when absent); ``clip_mode``:
    the optimizer's (:func:`check_optimizer`, or 'none' for an optimizer not of ours);
    ``setting``: its name in the caller's terms (``gradient_clipping``, ``--max_grad_norm``).
    """
    clips = clip_mode != "none"
    if engine_clip is None or engine_clip == "auto":
        if clips:
            return 0.0, [f"the optimizer clips its own gradients (clip={clip_mode!r}), so the engine's "
                         f"{setting} is set to 0 (DeepSpeed's default would be {DEEPSPEED_DEFAULT_CLIPPING})"]
        return DEEPSPEED_DEFAULT_CLIPPING, []
    try:
        value = float(engine_clip)
    except (TypeError, ValueError):
        raise PolicyError(f"{setting}={engine_clip!r}: expected a number >= 0 (0 disables it)") from None
    if value < 0:
        raise PolicyError(f"{setting}={engine_clip!r}: expected a number >= 0 (0 disables it)")
    if value > 0 and clips:
        raise PolicyError(f"conflicting clipping: {setting}={engine_clip} (a global clip, applied first) "
                          f"and the optimizer's own clip={clip_mode!r} would clip twice; set {setting} "
                          f"to 0 or give the optimizer clip=none")
    return value, []


def optimizer_clip_mode(optimizer: Any) -> str:
    """The clip mode of an optimizer instance; 'none' for any optimizer not of ours."""
    from .optim.optimizer import LayerwiseAdam

    return optimizer.layer_options["clip"] if isinstance(optimizer, LayerwiseAdam) else "none"


def check_batch_split(batch_size: int, ranks: int, gas: int, setting: str = "--batch-size") -> None:
    """The global batch must split into ``ranks x gas`` equal micro-batches."""
    if batch_size % (ranks * gas):
        raise PolicyError(f"{setting} {batch_size} is not divisible by ranks x gradient_accumulation_steps = "
                          f"{ranks} x {gas}")
