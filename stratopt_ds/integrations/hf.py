"""HF Trainer with stratopt_ds optimizers: ``--optim stratopt`` and DeepSpeed without silent traps.

    from stratopt_ds.integrations.hf import StratTrainer, StratTrainingArguments
    args = StratTrainingArguments(output_dir="out", optim="stratopt", optim_args="mix_alpha=8",
                                  learning_rate=3e-3, deepspeed="ds_configs/hf/zero2.json")
    StratTrainer(model=model, args=args, train_dataset=data).train()

or, on a command line parsed by ``HfArgumentParser(StratTrainingArguments)``:
``--optim stratopt --optim_args "clip=global,betas=[0.9,0.95]"`` (see ``examples/hf_train.py``).

**Names.** ``--optim`` accepts every transformers name and every
:func:`stratopt_ds.available_optimizers` name. Ours are handled by :class:`StratTrainer`; the
others go to the Trainer as usual. ``ademamix`` is both: here it means stratopt_ds's AdEMAMix.
No transformers internals are patched: the subclass re-declares ``optim`` as a string with
choices, and ``args.optim`` holds our name as a plain ``str``.

**Hyperparameters.** ``lr`` comes from ``--learning_rate``; ``betas``, ``eps`` and
``weight_decay`` from ``--adam_beta1/2``, ``--adam_epsilon``, ``--weight_decay`` unless
``--optim_args`` sets them; ``--optim_args "k=v,..."`` values are JSON (strings may be bare). The
Trainer's decay/no-decay groups are kept, with the parameter names that give layer ids. When the
optimizer mixes a slow momentum (``mix_alpha > 0``), its warm-ups ``t_alpha``/``t_beta3`` span the
run (``max_steps``) unless set, as in ``python -m stratopt_ds.train``.
``optimizer_cls_and_kwargs=(OurClass, kwargs)`` gets the same named groups.

**The run policy.** :class:`StratTrainingArguments` hands ``--optim``, the hyperparameters,
``--max_grad_norm`` and the DeepSpeed config to :func:`stratopt_ds.run_policy.prepare` (once, in
``__post_init__``; the Trainer resolves the hyperparameters again when it builds the optimizer,
from the arguments as they are then); the rules of transformers itself are checked here.

**Gradient clipping** follows the one rule of :mod:`stratopt_ds.run_policy`. ``max_grad_norm``
defaults to None: the DeepSpeed config's ``gradient_clipping`` when it sets one, else 0 (off) for
an optimizer that clips itself (``clip`` != ``"none"``), else 1.0 (the Trainer's default). It is
what the Trainer passes to DeepSpeed as ``gradient_clipping``. A global clip > 0 together with an
optimizer that clips itself is refused: it would clip twice.

**The three silent traps of Trainer + DeepSpeed, and what happens here:**

1. ``Trainer(optimizers=(opt, sched))``: transformers drops both under DeepSpeed.
   :class:`StratTrainer` honours them (they become DeepSpeed's client optimizer and the
   Trainer's scheduler); a scheduler next to a DeepSpeed ``"scheduler"`` section is refused.
2. A DeepSpeed ``"optimizer"`` section makes the Trainer ignore ``--optim`` and build DeepSpeed's
   optimizer over a flat parameter list. A section naming one of ours is translated: its type is
   the optimizer (``--optim`` may be left out, or must agree), its params are hyperparameters (an
   explicit value that disagrees with the Trainer's arguments is an error, as transformers does
   for its own keys; ``"auto"`` takes the Trainer's); the section is then removed. A section
   naming any other optimizer is refused.
3. Optimizer offload makes accelerate swap the optimizer for DeepSpeedCPUAdam unless
   ``zero_force_ds_cpu_optimizer`` is false; the prepared config says false whenever DeepSpeed is
   handed our optimizer or one passed by the user (a config saying true is refused).

After DeepSpeed wraps it, the optimizer is bound to the ZeRO wrapper at the start of training
(per-layer norms exact across partitions), or an error says why it cannot be. On CPU-only
DeepSpeed the arguments also create accelerate's process state over gloo
(:func:`stratopt_ds.integrations.accelerate.distributed_state`), without which every rank would see a world of 1.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import transformers
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.training_args import OptimizerNames

from .. import run_policy
from ..run_policy import section_mismatches
from .accelerate import bind_prepared, distributed_state
from ..data import WindowDataset, WindowSampler
from .hf_callback import install_layer_stats
from .deepspeed import load_config
from ..optim import LayerwiseAdam, available_optimizers, create_optimizer
from ..run_policy import DEFAULT_OPTIMIZER, parse_opt_args

logger = logging.getLogger(__name__)

OUR_NAMES = tuple(available_optimizers())
HF_NAMES = tuple(name.value for name in OptimizerNames)
OPTIM_CHOICES = OUR_NAMES + tuple(n for n in HF_NAMES if n not in OUR_NAMES)
# What transformers' own __post_init__ sees while args.optim names one of ours: its enum
# accepts no other names, and this one has no side effects there.
_ENUM_STAND_IN = "adamw_torch"
TESTED_TRANSFORMERS_MAJOR = 5
# How the run policy names the Trainer's settings (clip: --max_grad_norm or the config's gradient_clipping).
SETTINGS = run_policy.Settings(optimizer="--optim", opt_args="--optim_args/--adam_*/--weight_decay", lr="--learning_rate",
                               clip="--max_grad_norm", config="--deepspeed")
# A transformers optimizer in a run-policy request: not one of ours, so it does not clip itself.
_TRANSFORMERS_OPTIMIZER = object()
# The Trainer arguments that set an optimizer hyperparameter.
_TRAINER_FLAGS = {"lr": "--learning_rate", "betas": "--adam_beta1/--adam_beta2", "eps": "--adam_epsilon",
                  "weight_decay": "--weight_decay"}


# ------------------------------------------------------------------------------------------------
# What this module needs from transformers


def check_transformers(version: str = transformers.__version__) -> None:
    """Refuse a transformers without the extension points used here; warn on an untested major.

    Nothing private is patched, but the stand-in trick needs the enum value, and the subclasses
    override these fields and methods; a release that renamed them would fail obscurely later."""
    fields = TrainingArguments.__dataclass_fields__
    missing = [f"TrainingArguments.{name}" for name in
               ("optim", "optim_args", "max_grad_norm", "deepspeed", "accelerator_config") if name not in fields]
    missing += [f"Trainer.{name}" for name in
                ("create_optimizer", "create_scheduler", "get_decay_parameter_names") if not hasattr(Trainer, name)]
    if _ENUM_STAND_IN not in HF_NAMES:
        missing.append(f"OptimizerNames value {_ENUM_STAND_IN!r}")
    if missing:
        raise ImportError(f"stratopt_ds.integrations.hf cannot work with transformers {version}: no {', '.join(missing)} "
                          f"(tested with transformers {TESTED_TRANSFORMERS_MAJOR}.x)")
    if int(version.split(".")[0]) != TESTED_TRANSFORMERS_MAJOR:
        warnings.warn(f"stratopt_ds.integrations.hf was tested with transformers {TESTED_TRANSFORMERS_MAJOR}.x, this is "
                      f"{version}", stacklevel=2)


check_transformers()


# ------------------------------------------------------------------------------------------------
# --optim_args


def split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets and quotes: 'a=1,b=[2,3]' -> ['a=1', 'b=[2,3]']."""
    parts, depth, start, quote = [], 0, 0, None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def parse_optim_args(text: Optional[str]) -> dict[str, Any]:
    """``'mix_alpha=8,clip=global,betas=[0.9,0.95]'`` (or a JSON object) -> typed dict."""
    if not text:
        return {}
    try:
        return parse_opt_args(split_top_level(text))
    except ValueError as err:
        raise ValueError(f"--optim_args {text!r}: {err}") from None


# ------------------------------------------------------------------------------------------------
# Resolving the optimizer, its hyperparameters and the DeepSpeed config


def resolve_optim(optim: Optional[str], section: Optional[dict]) -> Optional[str]:
    """``--optim`` as a plain name, or None (the run policy picks the section's, else its default).
    The run policy checks one of our names against a section naming ours; a transformers name
    next to such a section is refused here."""
    if optim is None:
        return None
    optim = getattr(optim, "value", optim)  # an OptimizerNames member
    if optim not in OPTIM_CHOICES:
        raise ValueError(f"--optim {optim!r} is not an optimizer name; available: stratopt_ds: "
                         f"{', '.join(OUR_NAMES)}; transformers: {', '.join(HF_NAMES)}")
    if section is not None and optim not in OUR_NAMES:  # the run policy checks our names against it
        raise ValueError(f"--optim {optim} disagrees with the DeepSpeed config's optimizer.type "
                         f"{section['type']!r}; leave --optim out or make them agree")
    return optim


def trainer_opt_args(args: "StratTrainingArguments") -> dict[str, Any]:
    """The hyperparameters besides the learning rate: --adam_*, --weight_decay, --optim_args."""
    return {"betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon,
            "weight_decay": args.weight_decay, **parse_optim_args(args.optim_args)}


def policy_request(args: "StratTrainingArguments", **request) -> run_policy.RunRequest:
    """Our optimizer as the Trainer's settings ask for it; ``request``: the rest of the request."""
    return run_policy.RunRequest(optimizer=args.optim, opt_args=trainer_opt_args(args),
                                 lr=args.learning_rate, **request)


def trainer_hyperparams(args: "StratTrainingArguments", steps: Optional[int] = None) -> dict[str, Any]:
    """The keywords of ``args.optim`` by the run policy, from the arguments as they are now (a
    hyperparameter search changes them): Trainer args and ``--optim_args`` over the config
    section's params; with ``steps``, the slow momentum warms up over the run."""
    section = args.deepspeed_optimizer_section  # the policy reads it from a config, as in __post_init__
    request = policy_request(args, deepspeed={"optimizer": section} if section else None, steps=steps,
                             names=SETTINGS)
    return run_policy.prepare(request).hyperparams


def check_section_agrees(section: dict, args: "StratTrainingArguments") -> None:
    """transformers' rule for its own keys: an explicit section value must match the Trainer args."""
    bad = section_mismatches(section, {"lr": args.learning_rate, **trainer_opt_args(args)},
                             lambda key: _TRAINER_FLAGS.get(key, f"--optim_args {key}"))
    if bad:
        raise ValueError("the DeepSpeed config's optimizer section disagrees with the Trainer's "
                         "arguments (transformers has the same rule for its own keys):\n  " + "\n  ".join(bad) +
                         '\nset these config values to "auto", or pass the same values')


def given_clip(value: Optional[float], config: Optional[dict]) -> tuple[Optional[float], str]:
    """The engine's global clip as given, and the setting that gives it: ``--max_grad_norm``, else
    the config's ``gradient_clipping`` (both given: they must agree, as transformers has it)."""
    in_config = (config or {}).get("gradient_clipping")
    in_config = None if in_config == "auto" else in_config
    if value is not None and in_config is not None and not math.isclose(float(in_config), value):
        raise ValueError(f"--max_grad_norm {value} disagrees with the DeepSpeed config's "
                         f"gradient_clipping={in_config}; leave one out or make them agree")
    return (value, "--max_grad_norm") if value is not None else (in_config, "gradient_clipping")


# ------------------------------------------------------------------------------------------------
# Arguments


@dataclass
class StratTrainingArguments(TrainingArguments):
    """``TrainingArguments`` that accept our optimizer names and prepare the DeepSpeed config."""

    optim: Optional[str] = field(default=None, metadata={
        "choices": OPTIM_CHOICES, "metavar": "NAME",
        "help": f"optimizer: a stratopt_ds name ({', '.join(OUR_NAMES)}) or a transformers one. Default: "
                f"the DeepSpeed config's optimizer.type if it names ours, else {DEFAULT_OPTIMIZER}. "
                "'ademamix' is stratopt_ds's."})
    max_grad_norm: Optional[float] = field(default=None, metadata={
        "help": "global gradient clipping (also DeepSpeed's gradient_clipping). Default: the DeepSpeed "
                "config's, else 0 (off) for an optimizer that clips itself, else 1.0"})

    def __post_init__(self):
        config = load_config(self.deepspeed) if self.deepspeed else None
        prepared = self._prepare(config)
        self.max_grad_norm = prepared.engine_clip
        if config is not None:
            self.deepspeed = prepared.deepspeed  # what the Trainer's plugin gets
            self._use_cpu_distributed_state()
        if not self.uses_stratopt:
            super().__post_init__()
            return
        name, self.optim = self.optim, _ENUM_STAND_IN
        try:
            super().__post_init__()
        finally:
            self.optim = name

    def _prepare(self, config: Optional[dict]) -> run_policy.PreparedRun:
        """Resolve ``optim`` and the engine's clip by the run policy, and prepare the config."""
        section = run_policy.optimizer_section(config, SETTINGS) if config else None  # trap 2
        self.optim = resolve_optim(self.optim, section)
        self.deepspeed_optimizer_section = section  # translated: the Trainer builds ours from it
        clip, clip_setting = given_clip(self.max_grad_norm, config)
        names = dataclasses.replace(SETTINGS, clip=clip_setting)
        if self.optim is not None and self.optim not in OUR_NAMES:
            # transformers' optimizer: the clipping rule only; the Trainer prepares the config
            prepared = run_policy.prepare(run_policy.RunRequest(
                optimizer=_TRANSFORMERS_OPTIMIZER, engine_clip=clip, names=names))
            if config is not None:
                prepared.deepspeed = {**config, "gradient_clipping": prepared.engine_clip}
        else:
            if section is not None:
                check_section_agrees(section, self)
            # ZeRO flags, the offload flag (trap 3), the section translated (trap 2)
            prepared = run_policy.prepare(policy_request(self, deepspeed=config, engine_clip=clip, names=names))
            self.optim = prepared.optimizer
            if self.optim in HF_NAMES:
                logger.info("--optim %s: stratopt_ds's optimizer of that name, not transformers'", self.optim)
        for note in prepared.notes:
            logger.info("stratopt_ds: %s", note)
        return prepared

    @property
    def uses_stratopt(self) -> bool:
        return self.optim in OUR_NAMES

    def _use_cpu_distributed_state(self) -> None:
        """Make transformers reuse the gloo state on CPU-only DeepSpeed (stratopt_ds.integrations.accelerate)."""
        if not distributed_state():
            return
        cfg = self.accelerator_config
        if isinstance(cfg, str):
            with open(cfg) as fh:
                cfg = json.load(fh)
        if cfg is None or isinstance(cfg, dict):
            self.accelerator_config = {**(cfg or {}), "use_configured_state": True}
        else:
            cfg.use_configured_state = True


# ------------------------------------------------------------------------------------------------
# Trainer


def named_decay_groups(trainer: Trainer, model: nn.Module, weight_decay: float) -> list[dict]:
    """The Trainer's decay/no-decay split, with ``param_names`` (layer ids come from names)."""
    decay = set(trainer.get_decay_parameter_names(model))
    groups = []
    for wants_decay, wd in ((True, weight_decay), (False, 0.0)):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and (n in decay) == wants_decay]
        if named:
            groups.append({"params": [p for _, p in named], "param_names": [n for n, _ in named],
                           "weight_decay": wd})
    return groups


class _BindAtTrainBegin(TrainerCallback):
    """Binds our optimizer to the ZeRO wrapper once the engine exists, before the first step."""

    def __init__(self, trainer: "StratTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer.is_deepspeed_enabled and isinstance(trainer.built_optimizer, LayerwiseAdam):
            bind_prepared(trainer.model_wrapped, trainer.built_optimizer)


class StratTrainer(Trainer):
    """A ``Trainer`` that builds stratopt_ds optimizers and honours ``optimizers=`` under DeepSpeed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, StratTrainingArguments):
            raise TypeError("StratTrainer needs StratTrainingArguments (they resolve --optim and prepare "
                            f"the DeepSpeed config), got {type(self.args).__name__}")
        # transformers' deepspeed_init resets trainer.optimizer and the scheduler (trap 1): keep them.
        self.client_optimizer = self.optimizer if self.is_deepspeed_enabled else None
        self.client_scheduler = self.lr_scheduler if self.is_deepspeed_enabled else None
        self.built_optimizer = None  # the optimizer handed to DeepSpeed (before wrapping)
        if self.is_deepspeed_enabled:
            self._check_live_deepspeed_config()
        self.add_callback(_BindAtTrainBegin(self))
        self.layer_stats_callback = install_layer_stats(self)  # stratopt/* keys in the logs

    @property
    def deepspeed_config(self) -> dict:
        """The config accelerate will hand to ``deepspeed.initialize``."""
        return self.accelerator.state.deepspeed_plugin.deepspeed_config

    def _check_live_deepspeed_config(self) -> None:
        config = self.deepspeed_config
        if "optimizer" in config:
            # Only a config that bypassed StratTrainingArguments (accelerate launch's own) gets here.
            raise ValueError(f'the DeepSpeed config has an "optimizer" section (type '
                             f"{config['optimizer'].get('type')!r}): the Trainer would ignore --optim and "
                             "build DeepSpeed's optimizer over a flat parameter list. Pass the config with "
                             '--deepspeed (a section naming a stratopt_ds optimizer is translated) or remove '
                             'the "optimizer" key')
        if self.client_scheduler is not None and "scheduler" in config:
            raise ValueError('a scheduler was passed in optimizers=(optimizer, scheduler) and the DeepSpeed '
                             'config has a "scheduler" section (the Trainer would drop the one passed); '
                             'remove one of them')

    def _get_train_sampler(self, train_dataset=None):
        """Store windows are visited in the data path's seeded epoch order (``data_seed``, else
        ``seed``) instead of ``RandomSampler``'s ``torch.randperm`` of every window on every
        rank; accelerate still splits each batch across the ranks."""
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if isinstance(dataset, WindowDataset) and self.args.train_sampling_strategy == "random":
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return WindowSampler(len(dataset), seed)
        return super()._get_train_sampler(train_dataset)

    def create_optimizer(self, model: Optional[nn.Module] = None):
        model = self.model if model is None else model
        cls, kwargs = self.optimizer_cls_and_kwargs or (None, None)
        if self.optimizer is None and self.client_optimizer is not None:
            self.optimizer = self.client_optimizer
        elif self.optimizer is None and cls is None and self.args.uses_stratopt:
            self.optimizer = self._build_stratopt(model)
        elif self.optimizer is None and isinstance(cls, type) and issubclass(cls, LayerwiseAdam):
            # transformers would build it from groups without parameter names (no layer ids)
            self.optimizer = cls(named_decay_groups(self, model, self.args.weight_decay), **kwargs)
        else:
            super().create_optimizer(model)
        self.built_optimizer = self.optimizer
        if self.is_deepspeed_enabled:
            self._keep_under_offload(self.optimizer)
        return self.optimizer

    def _build_stratopt(self, model: nn.Module) -> LayerwiseAdam:
        steps = getattr(self.state, "max_steps", 0) or self.args.max_steps
        hp = trainer_hyperparams(self.args, steps)
        groups = named_decay_groups(self, model, hp["weight_decay"])
        return create_optimizer(self.args.optim, groups, **hp)

    def _keep_under_offload(self, optimizer) -> None:
        """Trap 3: keep our (or the user's) optimizer when DeepSpeed offloads it."""
        if isinstance(optimizer, LayerwiseAdam) or optimizer is self.client_optimizer:
            run_policy.keep_client_optimizer(self.deepspeed_config, type(optimizer).__name__)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None and self.client_scheduler is not None:
            self.lr_scheduler = self.client_scheduler
        return super().create_scheduler(num_training_steps, optimizer)


__all__ = ["StratTrainer", "StratTrainingArguments", "parse_optim_args", "OPTIM_CHOICES"]
