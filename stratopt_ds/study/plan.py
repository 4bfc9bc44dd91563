"""Study plans: a YAML file that says which runs make up a study, checked before anything runs.

A plan is data, not code (see ``plans/*.yaml`` and the README next to this file)::

    name: cpu_small
    baseline: adamw                 # the arm every other arm is compared with
    seeds: {init: [0, 1, 2], data: [100, 101, 102]}   # or a plain list: data seed = init seed
    train: {steps: 600, data: "${STRATOPT_SHARED:-../shared}/data/wikitext-2/test.txt"}
    sizes: {tiny: {preset: tiny}}   # per size: a preset, train options, an optional launcher
    arms: [adamw, {name: stratopt, optimizer: stratopt, opt_args: {clip_tau: 2.0}}]
    analysis: {alpha: 0.01, equivalence_margin: 0.01}

A study is the product sizes x seeds x arms. Train options are merged plan < size < arm, so an
arm may override the learning rate and a size the batch. Every error names the offending key
(``arms[2].opt_args.clip_tau``), the bad value and what is allowed.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .. import data, models, run_policy, train
from ..data import NAMED_SOURCES
from ..optim import available_optimizers, preset_defaults
from ..train_config import (PLAN_OPTIONS, ConfigError, TrainConfig, check_option, is_int as _is_int,
                            is_real as _is_real, load_yaml)


class PlanError(ValueError):
    """A plan that cannot run; the message names the key, the value and what is allowed."""


# Train options a plan may set: the TrainConfig fields marked plan=True, and ``epochs``, which
# the runner turns into steps. Their types and bounds are TrainConfig's; a study compares
# validation losses, so it needs at least one validation batch.
TRAIN_OPTIONS = ("steps", "epochs", *(k for k in PLAN_OPTIONS if k != "steps"))
STUDY_MINIMUMS = {"eval_batches": 1}
TOP_KEYS = ("name", "description", "baseline", "seeds", "train", "sizes", "arms", "analysis",
            "cleanup_checkpoints", "slurm")
SIZE_KEYS = ("preset", "deepspeed")
ARM_KEYS = ("name", "optimizer", "opt_args")
DEEPSPEED_KEYS = ("config", "num_gpus")

# The pre-declared analysis (section 4 of the study anchors); a plan may change each value.
ANALYSIS_DEFAULTS: dict[str, float] = {
    "alpha": 0.01,                     # family-wise error rate per size (Holm)
    "ci_level": 0.99,                  # confidence level of the mean-difference interval
    "equivalence_margin": 0.01,        # TOST margin in nats: |delta| < margin counts as equal
    "welch_below_pairing_corr": 0.5,   # paired t-test unless the seed pairing correlates less
    "power": 0.8,                      # for the minimum detectable difference
}
ANALYSIS_RANGES = {  # key -> (low, high, closed interval?)
    "alpha": (0, 1, False), "ci_level": (0, 1, False), "equivalence_margin": (0, math.inf, False),
    "welch_below_pairing_corr": (-1, 1, True), "power": (0, 1, False)}

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # used as directory names
ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass(frozen=True)
class DeepSpeedLaunch:
    config: str      # absolute path of the shipped DeepSpeed JSON
    num_gpus: int


@dataclass(frozen=True)
class Arm:
    name: str
    optimizer: str
    opt_args: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Size:
    name: str
    preset: str
    train: dict[str, Any] = field(default_factory=dict)
    deepspeed: Optional[DeepSpeedLaunch] = None


@dataclass(frozen=True)
class Run:
    """One training job: an arm at a size with one seed pair."""
    size: str
    arm: str
    seed: int
    data_seed: int
    preset: str
    optimizer: str
    opt_args: dict[str, Any]
    train: dict[str, Any]            # merged plan < size < arm options
    deepspeed: Optional[DeepSpeedLaunch]

    @property
    def key(self) -> str:
        return f"{self.size}/{self.arm}/seed{self.seed}"

    def directory(self, out: Path) -> Path:
        return Path(out) / self.size / self.arm / f"seed{self.seed}"

    def train_config(self, steps: Optional[int] = None) -> TrainConfig:
        """The run as a :class:`TrainConfig` (``steps``: the plan's, or its epochs in steps;
        without out, resume or DeepSpeed config: the runner adds those)."""
        options = {k: v for k, v in self.train.items() if k not in ("steps", "epochs")}
        return TrainConfig(optimizer=self.optimizer, opt_args=dict(self.opt_args),
                           preset=self.preset, seed=self.seed, data_seed=self.data_seed,
                           steps=steps or self.train.get("steps") or 1, **options)


def data_request(run: Run, sized: bool = True) -> data.DataRequest:
    """The data a run asks for, exactly as the training entry will ask for it."""
    config = train.fill_defaults(run.train_config())
    return train.data_request(config.replace(data=data.resolve_source(config.data)), sized=sized)


def batch_size(run: Run) -> int:
    """The run's global batch: the plan's, else the preset's (as stratopt_ds.train fills it)."""
    return train.fill_defaults(run.train_config()).batch_size


def steps_of_epochs(run: Run, windows: int) -> int:
    """``train.epochs`` over ``windows`` training windows, in steps of the run's batch."""
    steps = int(run.train["epochs"] * windows // batch_size(run))
    if steps < 1:
        raise PlanError(f"run {run.key}: {run.train['epochs']} epoch(s) of the {windows:,} "
                        f"training windows at batch size {batch_size(run)} is less than one step")
    return steps


def make_run(size: Size, arm: Arm, seed: int, data_seed: int) -> Run:
    return Run(size.name, arm.name, seed, data_seed, size.preset, arm.optimizer,
               dict(arm.opt_args), {**size.train, **arm.train}, size.deepspeed)


@dataclass
class Plan:
    name: str
    description: str
    baseline: str
    seeds: list[tuple[int, int]]      # (init seed, data seed), paired across arms by position
    sizes: list[Size]
    arms: list[Arm]
    analysis: dict[str, float]
    cleanup_checkpoints: bool
    slurm: dict[str, Any] = field(default_factory=dict)  # SlurmOptions fields, and executor: slurm

    def runs(self) -> list[Run]:
        """Every run, size-major then seed then arm: a partial study holds whole seed blocks."""
        return [make_run(size, arm, seed, data_seed)
                for size in self.sizes for seed, data_seed in self.seeds for arm in self.arms]


# ------------------------------------------------------------------------------------------------
# Loading


def load_plan(path: str | Path, check_files: bool = True) -> Plan:
    """Read and validate a plan file; raise PlanError naming the first problem.

    ``check_files=False`` skips the checks of files the runs would read (data, DeepSpeed
    configs): the report of a finished study can be made where those files are not.
    """
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"plan file not found: {path}")
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"))
    except ValueError as e:  # YAML's own errors
        raise PlanError(f"{path}: not valid YAML: {e}") from None
    return parse_plan(raw, where=str(path), check_files=check_files)


def parse_plan(raw: Any, where: str = "plan", check_files: bool = True) -> Plan:
    if not isinstance(raw, dict):
        raise PlanError(f"{where}: expected a mapping of {', '.join(TOP_KEYS)}, got {_kind(raw)}")
    _check_keys(raw, TOP_KEYS, "", required=("name", "baseline", "seeds", "sizes", "arms"))
    name = _name(raw["name"], "name")
    common = _train_options(raw.get("train") or {}, "train")
    sizes = _sizes(raw["sizes"], check_files)
    arms = _arms(raw["arms"])
    baseline = raw["baseline"]
    if baseline not in [a.name for a in arms]:
        raise PlanError(f"baseline: {baseline!r} is not an arm; arms: "
                        f"{', '.join(a.name for a in arms)}")
    sizes = [Size(s.name, s.preset, {**common, **s.train}, s.deepspeed) for s in sizes]
    plan = Plan(name=name, description=str(raw.get("description") or "").strip(),
                baseline=baseline, seeds=_seeds(raw["seeds"]), sizes=sizes, arms=arms,
                analysis=_analysis(raw.get("analysis") or {}),
                cleanup_checkpoints=_bool(raw.get("cleanup_checkpoints", True),
                                          "cleanup_checkpoints"),
                slurm=_slurm(raw.get("slurm") or {}))
    seed, data_seed = plan.seeds[0]  # the checks do not depend on the seed
    for size in sizes:
        for arm in arms:
            _check_run(make_run(size, arm, seed, data_seed), check_files)
    return plan


def _sizes(raw: Any, check_files: bool) -> list[Size]:
    if not isinstance(raw, dict) or not raw:
        raise PlanError(f"sizes: expected a non-empty mapping size-name -> {{preset: ...}}, "
                        f"got {_kind(raw)}")
    sizes = []
    for name, body in raw.items():
        where = f"sizes.{name}"
        _name(name, where)
        body = body or {}
        if not isinstance(body, dict):
            raise PlanError(f"{where}: expected a mapping, got {_kind(body)}")
        _check_keys(body, SIZE_KEYS + tuple(TRAIN_OPTIONS), where, required=("preset",))
        if body["preset"] not in models.MODEL_PRESETS:
            raise PlanError(f"{where}.preset: unknown preset {body['preset']!r}; available: "
                            f"{', '.join(models.MODEL_PRESETS)}")
        train = _train_options({k: v for k, v in body.items() if k in TRAIN_OPTIONS}, where)
        launch = (_deepspeed(body["deepspeed"], f"{where}.deepspeed", check_files)
                  if "deepspeed" in body else None)
        sizes.append(Size(str(name), body["preset"], train, launch))
    return sizes


def _arms(raw: Any) -> list[Arm]:
    if not isinstance(raw, list) or not raw:
        raise PlanError(f"arms: expected a non-empty list of optimizer names or "
                        f"{{name, optimizer, opt_args}} mappings, got {_kind(raw)}")
    arms: list[Arm] = []
    for i, body in enumerate(raw):
        where = f"arms[{i}]"
        if isinstance(body, str):
            body = {"name": body, "optimizer": body}
        if not isinstance(body, dict):
            raise PlanError(f"{where}: expected an optimizer name or a mapping, got {_kind(body)}")
        _check_keys(body, ARM_KEYS + tuple(TRAIN_OPTIONS), where, required=("name",))
        name = _name(body["name"], f"{where}.name")
        optimizer = body.get("optimizer", name)
        if optimizer not in available_optimizers():
            raise PlanError(f"{where}.optimizer: unknown optimizer {optimizer!r}; available: "
                            f"{', '.join(available_optimizers())}")
        if name in [a.name for a in arms]:
            raise PlanError(f"{where}.name: duplicate arm name {name!r}")
        opt_args = _opt_args(optimizer, body.get("opt_args") or {}, f"{where}.opt_args")
        train = _train_options({k: v for k, v in body.items() if k in TRAIN_OPTIONS}, where)
        arms.append(Arm(name, optimizer, opt_args, train))
    return arms


def _opt_args(optimizer: str, raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise PlanError(f"{where}: expected a mapping of hyperparameters, got {_kind(raw)}")
    allowed = sorted(k for k in preset_defaults(optimizer) if k != "lr")
    for key in raw:
        if key == "lr":
            try:
                run_policy.refuse_lr_in_args(raw, where, "the train option 'lr'")
            except ValueError as e:
                raise PlanError(str(e)) from None
        if key not in allowed:
            raise PlanError(f"{where}: unknown hyperparameter {key!r} for {optimizer}; "
                            f"allowed: {', '.join(allowed)}")
    return dict(raw)


def _deepspeed(raw: Any, where: str, check_files: bool) -> DeepSpeedLaunch:
    if not isinstance(raw, dict):
        raise PlanError(f"{where}: expected {{config: FILE.json, num_gpus: N}}, got {_kind(raw)}")
    _check_keys(raw, DEEPSPEED_KEYS, where, required=DEEPSPEED_KEYS)
    num_gpus = raw["num_gpus"]
    if not _is_int(num_gpus) or num_gpus < 1:
        raise PlanError(f"{where}.num_gpus: expected an integer >= 1, got {num_gpus!r}")
    config = resolve_path(raw["config"], f"{where}.config", must_exist=check_files)
    if check_files:
        try:
            json.loads(config.read_text())
        except json.JSONDecodeError as e:
            raise PlanError(f"{where}.config: {config} is not valid JSON: {e}") from None
    return DeepSpeedLaunch(str(config), int(num_gpus))


def _train_options(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise PlanError(f"{where}: expected a mapping of train options, got {_kind(raw)}")
    out = {}
    for key, value in raw.items():
        if key not in TRAIN_OPTIONS:
            raise PlanError(f"{where}: unknown train option {key!r}; allowed: "
                            f"{', '.join(TRAIN_OPTIONS)}")
        name = f"{where}.{key}"
        if key == "epochs":
            if not (_is_real(value) and value > 0):
                raise PlanError(f"{name}: expected a finite number > 0, got {value!r}")
        elif value is None:
            raise PlanError(f"{name}: expected a value, got null (leave the key out for the default)")
        elif key in STUDY_MINIMUMS and _is_int(value) and value < STUDY_MINIMUMS[key]:
            raise PlanError(f"{name}: expected an integer >= {STUDY_MINIMUMS[key]}, got {value!r}")
        try:
            value = value if key == "epochs" else check_option(key, value, name)
        except ConfigError as e:
            raise PlanError(str(e)) from None
        out[key] = expand_env(value, name) if isinstance(value, str) else value
        if key == "data" and out[key] not in NAMED_SOURCES:
            out[key] = str(Path(out[key]).resolve())  # runs may be resumed from elsewhere
    return out


def _slurm(raw: Any) -> dict[str, Any]:
    """The plan's slurm defaults: SlurmOptions fields (and ``executor: slurm``), type-checked."""
    import dataclasses

    from .slurm import SlurmOptions

    if not isinstance(raw, dict):
        raise PlanError(f"slurm: expected a mapping of slurm options, got {_kind(raw)}")
    fields = {f.name: f for f in dataclasses.fields(SlurmOptions)}
    _check_keys(raw, ("executor", *fields), "slurm")
    if raw.get("executor", "slurm") not in ("slurm", "local"):
        raise PlanError(f"slurm.executor: expected slurm or local, got {raw['executor']!r}")
    for key, value in raw.items():
        kind = {"int": int, "float": (int, float), "str": str, "Optional[int]": int,
                "Optional[float]": (int, float), "Optional[str]": str,
                "list[str]": list}.get(str(fields[key].type)) if key in fields else None
        if kind is not None and (isinstance(value, bool) or not isinstance(value, kind)):
            raise PlanError(f"slurm.{key}: expected {str(fields[key].type)}, got {value!r}")
    return dict(raw)


def _seeds(raw: Any) -> list[tuple[int, int]]:
    if isinstance(raw, list):
        raw = {"init": raw}
    if not isinstance(raw, dict):
        raise PlanError(f"seeds: expected a list of integers or {{init: [...], data: [...]}}, "
                        f"got {_kind(raw)}")
    _check_keys(raw, ("init", "data"), "seeds", required=("init",))
    init, data_seeds = raw["init"], raw.get("data", raw["init"])
    for key, values in (("init", init), ("data", data_seeds)):
        where = f"seeds.{key}"
        if not isinstance(values, list) or not values:
            raise PlanError(f"{where}: expected a non-empty list of integers >= 0, got {values!r}")
        bad = [v for v in values if not (_is_int(v) and v >= 0)]
        if bad:
            raise PlanError(f"{where}: seeds must be integers >= 0; bad: {bad!r}")
        if len(set(values)) != len(values):
            raise PlanError(f"{where}: seeds must be distinct, got {values!r}")
    if len(init) != len(data_seeds):
        raise PlanError(f"seeds: init has {len(init)} seeds and data {len(data_seeds)}; they "
                        f"pair up by position, so give the same number")
    return list(zip(init, data_seeds))


def _analysis(raw: Any) -> dict[str, float]:
    if not isinstance(raw, dict):
        raise PlanError(f"analysis: expected a mapping, got {_kind(raw)}")
    _check_keys(raw, tuple(ANALYSIS_DEFAULTS), "analysis")
    out = {**ANALYSIS_DEFAULTS, **raw}
    for key, (lo, hi, closed) in ANALYSIS_RANGES.items():
        value = out[key]
        inside = _is_real(value) and ((lo <= value <= hi) if closed else (lo < value < hi))
        if not inside:
            interval = f"[{lo}, {hi}]" if closed else f"({lo}, {hi})"
            raise PlanError(f"analysis.{key}: expected a number in {interval}, got {value!r}")
    return out


def _check_run(run: Run, check_files: bool) -> None:
    """Checks that need the merged options of a size and an arm: the training entry's own
    (:func:`stratopt_ds.train.resolve`, the run policy), then the study's data rules."""
    where = f"run {run.size}/{run.arm}"
    opts = run.train
    if ("steps" in opts) == ("epochs" in opts):
        raise PlanError(f"{where}: give exactly one of train.steps and train.epochs "
                        f"(got {'both' if 'steps' in opts else 'neither'})")
    launch = run.deepspeed if check_files else None  # the config file is read only with files
    names = run_policy.Settings(
        optimizer=f"arms '{run.arm}'.optimizer", opt_args=f"arms '{run.arm}'.opt_args",
        lr="train option 'lr'", batch="batch_size", data="train.data",
        config=launch.config if launch else "deepspeed.config")
    if launch is not None and "batch_size" not in opts:
        raise PlanError(f"{where}: a deepspeed size needs train option batch_size (the global "
                        f"batch = micro-batch x accumulation x GPUs)")
    try:
        train.resolve(run.train_config().replace(save_every=0), ranks=launch.num_gpus if launch else 1,
                      deepspeed=deepspeed_config(launch) if launch else None, names=names,
                      check_data=False, check_device=False)
    except ValueError as e:
        raise PlanError(f"{where}: {e}") from None
    if check_files:
        _check_data(run, where)


def deepspeed_config(launch: DeepSpeedLaunch) -> dict:
    """The shipped config as a run gets it: without its "optimizer" section (the arm's optimizer
    and lr apply; the training entry refuses an --optimizer that the section contradicts)."""
    config = json.loads(Path(launch.config).read_text())
    config.pop("optimizer", None)
    return config


def _check_data(run: Run, where: str) -> None:
    """The source can be read (its files' first bytes are text, or Parquet), its tokenizer can
    be had, and it holds the validation windows and a training window of ``seq_len``; or the
    store exists and fits the run: its tokenizer, its validation part, and enough training
    windows that the planned steps see no window twice (``DataRequest.check``)."""
    steps = run.train.get("steps")
    request = data_request(run, sized=steps is not None)
    source = run.train.get("data", "auto")
    try:
        request.check()
    except (data.DataError, FileNotFoundError) as e:
        hint = (f" (relative paths are read from the current directory {Path.cwd()}; where "
                f"the plan writes ${{NAME:-default}}, set NAME, e.g. STRATOPT_SHARED or "
                f"STRATOPT_STORES)" if isinstance(e, FileNotFoundError) else "")
        message = str(e).removeprefix(f"--data {request.data}: ")  # named here as train.data
        raise PlanError(f"{where}: train.data {source!r}: {message}{hint}") from None
    if not request.from_store:
        if steps is None and request.max_docs is None and \
                data.describe_source(request.data).kind == "fineweb":
            raise PlanError(f"{where}: train.epochs of {source!r} (FineWeb) needs a corpus of a "
                            f"fixed size: build a store (python -m stratopt_ds.data build fineweb "
                            f"--max-docs N ...) and name it in train.data, or give train.max_docs")
        return
    windows = len(data.Windows(data.open_store(request.data).part("train"), request.seq_len))
    if steps is None:
        steps_of_epochs(run, windows)
    elif steps * batch_size(run) > windows:
        batch = batch_size(run)
        raise PlanError(f"{where}: {steps:,} steps x batch_size {batch} = {steps * batch:,} "
                        f"windows of {request.seq_len} tokens, but the store {request.data} holds "
                        f"{windows:,} training windows: the run would see data twice; build a "
                        f"larger store (--max-tokens) or give train.epochs")


# ------------------------------------------------------------------------------------------------
# Small helpers


def expand_env(value: str, where: str) -> str:
    """``${NAME}`` and ``${NAME:-default}`` from the environment (as in a POSIX shell)."""
    def replace(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if os.environ.get(name):
            return os.environ[name]
        if default is None:
            raise PlanError(f"{where}: environment variable {name} is not set and {value!r} "
                            f"gives no default (write ${{{name}:-default}})")
        return default
    return ENV_RE.sub(replace, value)


def resolve_path(value: Any, where: str, must_exist: bool = True) -> Path:
    if not isinstance(value, str) or not value:
        raise PlanError(f"{where}: expected a file path, got {value!r}")
    path = Path(expand_env(value, where))
    if must_exist and not path.is_file():
        raise PlanError(f"{where}: file not found: {path.resolve()} (relative paths are read "
                        f"from the current directory {Path.cwd()})")
    return path.resolve()


def _check_keys(body: dict, allowed: tuple, where: str, required: tuple = ()) -> None:
    prefix = f"{where}: " if where else ""
    for key in body:
        if key not in allowed:
            raise PlanError(f"{prefix}unknown key {key!r}; allowed: {', '.join(allowed)}")
    for key in required:
        if key not in body:
            raise PlanError(f"{prefix}missing required key {key!r}")


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise PlanError(f"{where}: {value!r} is not a valid name (letters, digits, '.', '_', "
                        f"'-'; it becomes a directory name)")
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise PlanError(f"{where}: expected true or false, got {value!r}")
    return value


def _kind(x: Any) -> str:
    return f"{type(x).__name__} {x!r}"[:80]
