"""The rules for a valid run, in one place: :func:`prepare`.

Every entry point hands its request to :func:`prepare` and gets back validated optimizer
keywords, a prepared DeepSpeed config and notes for the log (:class:`PreparedRun`):
``stratopt-train`` (:mod:`stratopt_ds.train`), :func:`stratopt_ds.deepspeed.initialize` and
:func:`~stratopt_ds.deepspeed.prepare_config`, the HF Trainer integration
(:mod:`stratopt_ds.integrations.hf`), accelerate (:mod:`stratopt_ds.integrations.accelerate`) and
the study plans (:mod:`stratopt_ds.study.plan`, through the training config's own check). They
differ only in how they name their settings (:class:`Settings`) and how they report a refusal (a
parser error, a PlanError, a ValueError): a :class:`PolicyError` is a ``ValueError``.

**The optimizer** is the request's, else the one the DeepSpeed config's ``"optimizer"`` section
names, else ``stratopt``; naming two different ones is an error, and a section naming an
optimizer not of this package is refused (DeepSpeed would build that one over a flat parameter
list instead). The section's ``params`` are hyperparameters under the request's own.

**Optimizer keywords** are validated without building anything: the same resolution of preset
and keywords that the optimizer's constructor runs (:func:`stratopt_ds.optim.config.resolve_keywords`).

**The learning rate** is the entry point's own setting (``--lr``, ``--learning_rate``, the
study's train option ``lr``) or the DeepSpeed section's ``lr``, never an optimizer argument
(:func:`refuse_lr_in_args`).

**The global batch** splits evenly over ranks and gradient-accumulation steps
(:func:`check_batch_split`).

**Gradient clipping: one rule** (:func:`engine_clipping`). An optimizer that clips itself
(``clip`` is ``"global"`` or ``"layer"``) and a global clip by the engine (DeepSpeed's
``gradient_clipping``, the Trainer's ``max_grad_norm``) would clip twice, the engine's first:
that combination is an **error** everywhere. When the engine's setting is absent (or
``"auto"``), it becomes 0 for a self-clipping optimizer and DeepSpeed's default 1.0 otherwise,
and a note says so.

**A client optimizer under ZeRO** needs ``zero_allow_untested_optimizer``, and under optimizer
offload ``zero_force_ds_cpu_optimizer: false`` (else DeepSpeed, and accelerate, swap in
DeepSpeedCPUAdam): the prepared config says both, and a config asking for the swap is refused.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

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


# ------------------------------------------------------------------------------------------------
# The DeepSpeed config


def offloads_optimizer(config: dict) -> bool:
    zero = config.get("zero_optimization") or {}
    device = (zero.get("offload_optimizer") or {}).get("device", "none")
    return zero_stage(config) > 0 and device not in (None, "none")


def zero_stage(config: dict) -> int:
    return int((config.get("zero_optimization") or {}).get("stage", 0) or 0)


def accumulation_steps(config: Optional[dict], where: str) -> int:
    """The config's ``gradient_accumulation_steps`` (1 when absent); an integer >= 1."""
    gas = (config or {}).get("gradient_accumulation_steps", 1)
    if gas == "auto":
        return 1
    if isinstance(gas, bool) or not isinstance(gas, int) or gas < 1:
        raise PolicyError(f"{where}: gradient_accumulation_steps={gas!r}: expected an integer >= 1")
    return gas


def keep_client_optimizer(config: dict, what: str = "stratopt_ds optimizer") -> None:
    """Make DeepSpeed step a client optimizer under ZeRO (in place); see the module doc."""
    if zero_stage(config) == 0:
        return
    config["zero_allow_untested_optimizer"] = True
    if not offloads_optimizer(config):
        return
    if config.get("zero_force_ds_cpu_optimizer") is True:
        raise PolicyError(f"zero_force_ds_cpu_optimizer=true would replace the {what} by "
                          "DeepSpeedCPUAdam under offload; remove it or set it to false")
    config["zero_force_ds_cpu_optimizer"] = False


def resolve_optimizer_name(type_name: str) -> Optional[str]:
    """'stratopt' or 'StratOpt' -> 'stratopt'; None when it is not one of ours."""
    from .optim import OPTIMIZER_CLASSES

    if type_name in OPTIMIZER_CLASSES:
        return type_name
    for name, cls in OPTIMIZER_CLASSES.items():
        if cls.__name__ == type_name:
            return name
    return None


# ------------------------------------------------------------------------------------------------
# The request and its preparation


@dataclass(frozen=True)
class Settings:
    """How an entry point names its settings in messages (the defaults: ``stratopt-train``'s)."""
    optimizer: str = "--optimizer"
    opt_args: str = "--opt-args"
    lr: str = "--lr"
    clip: str = "gradient_clipping"
    batch: str = "--batch-size"
    data: str = "--data"
    config: str = "--deepspeed_config"


@dataclass
class RunRequest:
    """What an entry point asks for, in its own terms.

    ``optimizer``: one of our names, an optimizer instance (ours or another library's), or None
    (the DeepSpeed section's, else ``stratopt``). ``opt_args``: hyperparameters without ``lr``.
    ``lr``: the entry point's learning rate; None: the DeepSpeed section's, else ``default_lr``.
    ``deepspeed``: the DeepSpeed config (a copy is prepared; the caller's dict is not changed).
    ``engine_clip``: the engine's global clip as the entry point has it; when not given, the
    config's ``gradient_clipping``. ``batch_size`` / ``ranks``: the global batch and the number of
    data-parallel ranks it splits over. ``steps``: the run length (slow-momentum warm-ups span
    it). ``data``: a :class:`stratopt_ds.data.DataRequest` to check. ``clip_mode``: for an
    optimizer known by its clip mode alone (:func:`stratopt_ds.deepspeed.prepare_config`); it
    stands for ``optimizer``.
    """
    optimizer: Any = None
    opt_args: dict[str, Any] = field(default_factory=dict)
    lr: Optional[float] = None
    default_lr: Optional[float] = None
    deepspeed: Optional[dict] = None
    engine_clip: Any = "unset"
    batch_size: Optional[int] = None
    ranks: int = 1
    steps: Optional[int] = None
    data: Any = None
    names: Settings = field(default_factory=Settings)
    clip_mode: Optional[str] = None


@dataclass
class PreparedRun:
    """What :func:`prepare` returns.

    ``optimizer``: our optimizer's name (None when the request passed an instance);
    ``hyperparams``: its validated keywords, ``lr`` and run-length warm-ups included (empty for
    an instance); ``clip_mode``: 'none', 'global' or 'layer' ('none' for another library's
    optimizer); ``engine_clip``: the global clip the engine applies; ``deepspeed``: the prepared
    config, without an ``"optimizer"`` section naming ours (None without a config);
    ``tokenizer``: what the data request resolved to; ``notes``: lines for the log.
    """
    optimizer: Optional[str]
    hyperparams: dict[str, Any]
    clip_mode: str
    engine_clip: float
    deepspeed: Optional[dict]
    tokenizer: Optional[str] = None
    notes: list[str] = field(default_factory=list)

    @property
    def lr(self) -> Optional[float]:
        return self.hyperparams.get("lr")


DEFAULT_OPTIMIZER = "stratopt"


def prepare(request: RunRequest) -> PreparedRun:
    """Validate ``request`` and prepare what the run needs (see the module doc); raise
    :class:`PolicyError` naming the setting, the bad value and what is allowed."""
    names = request.names
    config = copy.deepcopy(request.deepspeed) if request.deepspeed is not None else None
    section = optimizer_section(config, names) if config is not None else None
    if request.clip_mode is not None:
        name, hyperparams, clip_mode = None, {}, request.clip_mode
    elif request.optimizer is None or isinstance(request.optimizer, str):
        name, hyperparams = resolve_named(request, section)
        try:
            clip_mode = check_optimizer(name, hyperparams)
        except ValueError as e:  # a keyword's range or choice: name where the keywords came from
            where = names.opt_args if not (section or {}).get("params") else \
                f"the DeepSpeed config's optimizer.params or {names.opt_args}"
            raise PolicyError(f"{where}: {e}") from None
    else:
        name, hyperparams, clip_mode = None, {}, optimizer_clip_mode(request.optimizer)
    notes: list[str] = []
    engine_clip = request.engine_clip
    if engine_clip == "unset":  # the engine is DeepSpeed's, or none (nothing clips but the optimizer)
        engine_clip = config.get("gradient_clipping") if config is not None else 0.0
    engine_clip, clip_notes = engine_clipping(engine_clip, clip_mode, names.clip)
    notes += clip_notes
    if config is not None:
        if section is not None:
            del config["optimizer"]  # ours: the entry point builds it from the named parameters
        keep_client_optimizer(config)  # every entry point hands DeepSpeed a client optimizer
        config["gradient_clipping"] = engine_clip
    if request.batch_size is not None:
        check_batch_split(request.batch_size, request.ranks,
                          accumulation_steps(config, names.config), names.batch)
    tokenizer = check_data(request.data, names.data) if request.data is not None else None
    return PreparedRun(name, hyperparams, clip_mode, engine_clip, config, tokenizer, notes)


def optimizer_section(config: dict, names: Settings) -> Optional[dict]:
    """The config's ``"optimizer"`` section when it names one of ours; refused when it names another."""
    section = config.get("optimizer")
    if section is None:
        return None
    if not isinstance(section, dict):
        raise PolicyError(f"{names.config}: \"optimizer\" must be a mapping with \"type\" and "
                          f"\"params\", got {section!r}")
    type_name = str(section.get("type", ""))
    if resolve_optimizer_name(type_name) is None:
        from .optim import available_optimizers
        raise PolicyError(
            f"{names.config}: optimizer.type {type_name!r} is not a stratopt_ds optimizer: "
            "DeepSpeed would build that one itself over one flat parameter list (the "
            "decay/no-decay groups and parameter names are lost). Remove the \"optimizer\" key, or "
            f"name an optimizer of stratopt_ds; available: {', '.join(available_optimizers())}")
    return section


def resolve_named(request: RunRequest, section: Optional[dict]) -> tuple[str, dict[str, Any]]:
    """Our optimizer's name and keywords: request < section < defaults (see the module doc)."""
    names = request.names
    from_section = resolve_optimizer_name(str(section.get("type"))) if section else None
    name = request.optimizer or from_section or DEFAULT_OPTIMIZER
    if from_section is not None and name != from_section:
        raise PolicyError(f"{names.optimizer} {name!r} conflicts with the DeepSpeed config's "
                          f"optimizer.type {section['type']!r}; give one of them")
    refuse_lr_in_args(request.opt_args, names.opt_args, names.lr)
    params = dict((section or {}).get("params") or {})
    section_lr = params.pop("lr", None)
    params = {k: v for k, v in params.items() if v != "auto"}
    lr = request.lr if request.lr is not None else section_lr
    if lr is None or lr == "auto":
        lr = request.default_lr
    hyperparams = {**params, **request.opt_args}
    if lr is not None:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
            raise PolicyError(f"{names.lr}: expected a finite number > 0, got {lr!r}")
        hyperparams["lr"] = float(lr)
    if request.steps is not None and name in _presets():
        optim_config.with_run_length_warmups(name, hyperparams, request.steps)
    return name, hyperparams


def check_data(data_request: Any, setting: str) -> Optional[str]:
    """The data can be read, or the store exists and fits the request; returns the tokenizer."""
    from . import data

    try:
        return data_request.check()
    except (data.DataError, FileNotFoundError) as e:
        message = str(e)
        raise PolicyError(message if message.startswith("--") else
                          f"{setting} {data_request.data}: {message}") from None


def _presets() -> dict:
    from .optim import OPTIMIZER_PRESETS
    return OPTIMIZER_PRESETS
