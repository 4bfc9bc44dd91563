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
from typing import Any, Callable, Mapping, Optional

from .optim import config as optim_config
from .zero.support import check_config

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


def engine_clipping(engine_clip: Any, clip_mode: str, setting: str = "gradient_clipping",
                    where: str = "") -> tuple[float, list[str]]:
    """The global clip the engine must apply, and notes for the log (see the module doc).

    ``engine_clip``: the engine's setting as given (None or "auto" when absent); ``clip_mode``:
    the optimizer's (:func:`check_optimizer`, or 'none' for an optimizer not of ours);
    ``setting``: its name in the caller's terms (``gradient_clipping``, ``--max_grad_norm``);
    ``where``: the file it was read from, if any (named in messages).
    """
    clips = clip_mode != "none"
    at = f" in {where}" if where else ""
    if engine_clip is None or engine_clip == "auto":
        if clips:
            return 0.0, [f"the optimizer clips its own gradients (clip={clip_mode!r}), so the engine's "
                         f"{setting}{at} is set to 0 (DeepSpeed's default would be {DEEPSPEED_DEFAULT_CLIPPING})"]
        return DEEPSPEED_DEFAULT_CLIPPING, []
    try:
        value = float(engine_clip)
    except (TypeError, ValueError):
        raise PolicyError(f"{setting}={engine_clip!r}{at}: expected a number >= 0 (0 disables it)") from None
    if value < 0:
        raise PolicyError(f"{setting}={engine_clip!r}{at}: expected a number >= 0 (0 disables it)")
    if value > 0 and clips:
        raise PolicyError(f"conflicting clipping: {setting}={engine_clip}{at} (a global clip, applied first) "
                          f"and the optimizer's own clip={clip_mode!r} would clip twice; set {setting} "
                          f"to 0 or give the optimizer clip=none")
    return value, []


def optimizer_clip_mode(optimizer: Any) -> str:
    """The clip mode of an optimizer instance; 'none' for any optimizer not of ours."""
    from .optim.optimizer import LayerwiseAdam

    return optimizer.layer_options["clip"] if isinstance(optimizer, LayerwiseAdam) else "none"


def tensor_parallel_size(config: dict) -> int:
    """DeepSpeed AutoTP's ``tensor_parallel.autotp_size`` (1 without it)."""
    return int((config.get("tensor_parallel") or {}).get("autotp_size", 1) or 1)


def check_tensor_parallel(ranks: int, tp: int) -> None:
    if ranks % tp:
        raise PolicyError(f"tensor_parallel.autotp_size={tp} does not divide the {ranks} ranks; "
                          "use a divisor of the number of ranks")


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
    it). ``data``: a :class:`stratopt_ds.data.DataRequest` to check. ``deepspeed_checks``: also
    run DeepSpeed's own checks of the config (its config object, the scheduler) with the batch
    fields this run sets (the training entry and the study; the HF Trainer fills "auto" values
    itself, later). ``clip_mode``: for an
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
    deepspeed_checks: bool = False
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
        if section is not None:  # ignored next to an instance: it must describe that instance
            check_section_matches_optimizer(section, request.optimizer)
    notes: list[str] = []
    engine_clip, clip_in = request.engine_clip, ""
    if engine_clip == "unset":  # the engine is DeepSpeed's, or none (nothing clips but the optimizer)
        engine_clip = config.get("gradient_clipping") if config is not None else 0.0
        clip_in = names.config if config is not None else ""
    engine_clip, clip_notes = engine_clipping(engine_clip, clip_mode, names.clip, clip_in)
    notes += clip_notes
    if config is not None:
        check_config(config, names.config)  # what stratopt_ds supports (stratopt_ds.zero.support)
        if section is not None:
            del config["optimizer"]  # ours: the entry point builds it from the named parameters
        keep_client_optimizer(config)  # every entry point hands DeepSpeed a client optimizer
        config["gradient_clipping"] = engine_clip
    if request.batch_size is not None:  # split over the data-parallel ranks (a TP group shares)
        tp = tensor_parallel_size(config) if config is not None else 1
        check_tensor_parallel(request.ranks, tp)
        check_batch_split(request.batch_size, request.ranks // tp,
                          accumulation_steps(config, names.config), names.batch)
        if config is not None:
            notes += check_batch_fields(config, request.batch_size, request.ranks // tp, names)
    if config is not None and request.deepspeed_checks:
        check_with_deepspeed(config, names)
    tokenizer = check_data(request.data, names.data) if request.data is not None else None
    return PreparedRun(name, hyperparams, clip_mode, engine_clip, config, tokenizer, notes)


def optimizer_section(config: dict, names: Settings) -> Optional[dict]:
    """The config's ``"optimizer"`` section when it names one of ours; refused when it names another."""
    section = config.get("optimizer")
    if section is None or section == {}:
        config.pop("optimizer", None)  # nothing to build from: DeepSpeed must not see it either
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
    if name not in _presets():
        raise PolicyError(f"{names.optimizer}: unknown optimizer {name!r}; available: "
                          f"{', '.join(_presets())}")
    if from_section is not None and name != from_section:
        raise PolicyError(f"{names.optimizer} {name!r} conflicts with the DeepSpeed config's "
                          f"optimizer.type {section['type']!r}; give one of them")
    refuse_lr_in_args(request.opt_args, names.opt_args, names.lr)
    params = dict((section or {}).get("params") or {})
    section_lr = params.pop("lr", None)
    params = {k: v for k, v in params.items() if v != "auto"}
    lr, lr_setting = request.lr, names.lr
    if lr is None and section_lr not in (None, "auto"):
        lr, lr_setting = section_lr, f"{names.config}: optimizer.params.lr"
    if lr is None:
        lr = request.default_lr
    hyperparams = {**params, **request.opt_args}
    if lr is not None:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
            raise PolicyError(f"{lr_setting}: expected a finite number > 0, got {lr!r}")
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


def global_batch(config: dict, ranks: int, names: Settings) -> Optional[int]:
    """The global batch a DeepSpeed config gives: its train_batch_size, else micro-batch x
    accumulation x ranks; None when it gives neither."""
    batch, micro = config.get("train_batch_size"), config.get("train_micro_batch_size_per_gpu")
    if isinstance(batch, int) and not isinstance(batch, bool):
        return batch
    if isinstance(micro, int) and not isinstance(micro, bool):
        return micro * accumulation_steps(config, names.config) * ranks
    return None


def check_batch_fields(config: dict, batch_size: int, ranks: int, names: Settings) -> list[str]:
    """The config's ``train_batch_size`` must be the run's global batch (a contradiction would
    otherwise be silently replaced). Its micro-batch is written for one world size: on another,
    the run's split replaces it, and the returned note says so (one config, any world size)."""
    gas = accumulation_steps(config, names.config)
    given = config.get("train_batch_size")
    if given not in (None, "auto") and given != batch_size:
        raise PolicyError(f"{names.batch} {batch_size} contradicts train_batch_size={given!r} in "
                          f"{names.config}; remove train_batch_size from the config or make them agree")
    micro, given = batch_size // (ranks * gas), config.get("train_micro_batch_size_per_gpu")
    if given in (None, "auto") or given == micro:
        return []
    return [f"train_micro_batch_size_per_gpu={given!r} in {names.config} is for another world size: "
            f"{names.batch} {batch_size} on {ranks} rank(s) x {gas} accumulation step(s) gives {micro}"]


def check_with_deepspeed(config: dict, names: Settings) -> None:
    """DeepSpeed's own checks, without a process group: its config object (built for one rank,
    with batch fields that agree for one rank) and the scheduler's type and parameters."""
    import inspect

    from deepspeed.runtime import lr_schedules
    from deepspeed.runtime.config import DeepSpeedConfig

    one_rank = {**config, "train_batch_size": None, "train_micro_batch_size_per_gpu": 1,
                "gradient_accumulation_steps": accumulation_steps(config, names.config)}
    one_rank["train_batch_size"] = one_rank["gradient_accumulation_steps"]
    try:
        DeepSpeedConfig(one_rank)
    except Exception as e:  # pydantic ValidationError, AssertionError, ValueError, ...: DeepSpeed's words
        message = " ".join(str(e).split())
        raise PolicyError(f"{names.config}: DeepSpeed refuses the config: {message[:600]}") from None
    scheduler = config.get("scheduler")
    if not scheduler:
        return
    kind = scheduler.get("type") if isinstance(scheduler, dict) else None
    if kind not in lr_schedules.VALID_LR_SCHEDULES:
        raise PolicyError(f"{names.config}: scheduler.type {kind!r} is not a DeepSpeed scheduler; "
                          f"available: {', '.join(lr_schedules.VALID_LR_SCHEDULES)} (or remove "
                          f"\"scheduler\": the run then uses its own warm-up + cosine)")
    accepted = inspect.signature(getattr(lr_schedules, kind)).parameters
    unknown = sorted(set(scheduler.get("params") or {}) - set(accepted) - {"optimizer"})
    if unknown:
        allowed = [k for k in accepted if k not in ("self", "optimizer")]
        raise PolicyError(f"{names.config}: scheduler.params {unknown} are not parameters of "
                          f"{kind}; allowed: {', '.join(allowed)}")


# ------------------------------------------------------------------------------------------------
# A section next to an optimizer instance


def same_value(a: Any, b: Any) -> bool:
    """Config values compare equal: JSON lists match tuples, ints match floats."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    return a == b


def section_mismatches(section: Mapping[str, Any], settings: Mapping[str, Any],
                       source: Callable[[str], str]) -> list[str]:
    """``"optimizer.params.k=v vs <source(k)>=w"`` for every explicit section value that differs.

    ``"auto"`` values never mismatch; keys absent from ``settings`` are left to the caller."""
    out = []
    for key, value in (section.get("params") or {}).items():
        if value != "auto" and key in settings and not same_value(value, settings[key]):
            out.append(f"optimizer.params.{key}={value!r} vs {source(key)}={settings[key]!r}")
    return out


def optimizer_settings(optimizer: Any) -> dict[str, Any]:
    """Every hyperparameter the optimizer was built with (group defaults and layer options)."""
    return {**optimizer.defaults, **optimizer.layer_options}


def check_section_matches_optimizer(section: Mapping[str, Any], optimizer: Any) -> None:
    """A config section naming our optimizer must describe the instance actually passed."""
    from .optim.optimizer import LayerwiseAdam

    if not isinstance(optimizer, LayerwiseAdam):
        raise PolicyError(f'the DeepSpeed config names {section.get("type")!r} in its "optimizer" '
                          f"section but a {type(optimizer).__name__} is passed; remove the key")
    name = resolve_optimizer_name(str(section.get("type", "")))
    if name != optimizer.preset:
        raise PolicyError(f"the DeepSpeed config's optimizer.type {section.get('type')!r} is not the "
                         f"optimizer passed ({type(optimizer).__name__}, {optimizer.preset!r}); remove "
                         'the "optimizer" key or make them agree')
    settings = optimizer_settings(optimizer)
    unknown = [k for k in (section.get("params") or {}) if k not in settings]
    if unknown:
        raise PolicyError(f"optimizer.params has unknown hyperparameters {unknown}; allowed: "
                         f"{', '.join(settings)}")
    bad = section_mismatches(section, settings, lambda key: f"the optimizer's {key}")
    if bad:
        raise PolicyError("the DeepSpeed config's optimizer section disagrees with the optimizer "
                         "passed (it would be silently ignored):\n  " + "\n  ".join(bad) +
                         '\nset these to "auto", remove them, or remove the "optimizer" key')
