"""``TrainConfig``: every option of a training run, in one table.

The command line of ``stratopt-train`` is generated from this table, a ``--config`` file (YAML or
JSON) fills the same fields, and a study plan builds one per run (``stratopt_ds.study.plan``
takes the fields marked ``plan=True`` from its ``train:`` sections). Each field says its type,
its default, its lower bound and what it does; a value of the wrong type or below its bound is
refused by :func:`check_option` (files, plans) or :meth:`TrainConfig.check` (every source), with a
message naming the option in the caller's terms.

Precedence on the command line: the defaults below < the ``--config`` file < flags given.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from .data import MIN_BPE_VOCAB


class ConfigError(ValueError):
    """A training option of the wrong type or out of range; the message names it."""


def option(default: Any = None, help: str = "", *, kind: str, minimum: Optional[float] = None,
           plan: bool = False, flags: tuple[str, ...] = (), factory: Optional[Callable] = None):
    """A field of :class:`TrainConfig`: ``kind`` is int, float, str, bool or dict; ``minimum`` a
    lower bound (floats: strictly above it); ``plan``: a study plan may set it; ``flags``: the
    command-line spellings when not ``--<name-with-dashes>``."""
    metadata = {"help": help, "kind": kind, "minimum": minimum, "plan": plan, "flags": flags}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """One training run (see the module doc). ``None`` means "the preset's" or "derived"."""

    optimizer: Optional[str] = option(None, kind="str", help=(
        "optimizer name, see stratopt_ds.available_optimizers() (default: the DeepSpeed config's "
        "optimizer, else stratopt)"))
    opt_args: dict = option(kind="dict", factory=dict, help=(
        "hyperparameter overrides: a JSON object or key=value pairs (values parsed as JSON)"))
    preset: str = option("tiny", kind="str", help="model preset (default: tiny)")
    steps: int = option(100, kind="int", minimum=1, plan=True, help="optimizer steps (default: 100)")
    batch_size: Optional[int] = option(None, kind="int", minimum=1, plan=True, help=(
        "sequences per step, the global batch (default: the preset's)"))
    seq_len: Optional[int] = option(None, kind="int", minimum=1, plan=True, help=(
        "tokens per sequence (default: the preset's)"))
    lr: Optional[float] = option(None, kind="float", minimum=0, plan=True, help=(
        "peak learning rate (default: the DeepSpeed config's optimizer lr, else the preset's)"))
    warmup_steps: Optional[int] = option(None, kind="int", minimum=0, plan=True, help=(
        "linear warm-up steps (default: 10%% of --steps)"))
    data: str = option("auto", kind="str", plan=True, help=(
        "a token store directory (python -m stratopt_ds.data build), or a source to build into the "
        "store cache first: 'fineweb' (streamed; by default as many tokens as the run trains on), "
        "'synthetic', a .txt/.jsonl/.parquet file, a directory or glob of them, or 'auto' "
        "(default): fineweb when the hub is reachable, else synthetic"))
    max_docs: Optional[int] = option(None, kind="int", minimum=1, plan=True, help=(
        "building from a source: read at most this many documents (default: all; 2000 for "
        "synthetic)"))
    tokenizer: Optional[str] = option(None, kind="str", plan=True, help=(
        "building from a source: 'byte' (default), 'bpe' (trained on the data), or a hub name or "
        "local directory. A store brings its own; naming another is an error"))
    bpe_vocab: Optional[int] = option(None, kind="int", minimum=MIN_BPE_VOCAB, plan=True, help=(
        "vocabulary size of --tokenizer bpe (default: 4096)"))
    cache_dir: Optional[str] = option(None, kind="str", help=(
        "where stores built from sources and trained tokenizers are cached (default: "
        "$STRATOPT_CACHE or ~/.cache/stratopt_ds)"))
    seed: int = option(0, kind="int", minimum=0, help="model initialisation seed (default: 0)")
    data_seed: int = option(0, kind="int", minimum=0, help="data order seed (default: 0)")
    val_windows: int = option(64, kind="int", minimum=1, plan=True, help=(
        "validation sequences: the first windows of the store's validation part, the same for "
        "every run (a source is built with exactly these) (default: 64)"))
    eval_every: int = option(100, kind="int", minimum=0, plan=True, help=(
        "validation every N steps; 0: only at the end (default: 100)"))
    eval_batches: int = option(4, kind="int", minimum=0, plan=True, help=(
        "validation batches per evaluation; 0: none (default: 4)"))
    out: Optional[str] = option(None, kind="str", help="directory for metrics.jsonl and summary.json")
    device: str = option("cpu", kind="str", plan=True, help="torch device, e.g. cpu or cuda (default: cpu)")
    deepspeed_config: Optional[str] = option(
        None, kind="str", flags=("--deepspeed_config", "--deepspeed-config"), help=(
            "train with DeepSpeed (run under the `deepspeed` launcher) using this JSON config; "
            "--batch-size is then the global batch: micro-batch x accumulation x ranks"))
    save_every: int = option(0, kind="int", minimum=0, plan=True, help=(
        "checkpoint to <out>/checkpoints every N steps and at the end; 0: never (default: 0)"))
    keep_checkpoints: int = option(2, kind="int", minimum=0, plan=True, help=(
        "keep the newest K checkpoints; 0: all (default: 2)"))
    resume: bool = option(False, kind="bool", help=(
        "continue the run from the newest complete checkpoint in <out>/checkpoints"))
    stop_signal: str = option("USR2", kind="str", help=(
        "on this signal (slurm's time-limit warning, a preemption notice) every rank saves a "
        "checkpoint after the step it is in and the run exits with code 75, to go on with "
        "--resume; needs --out. USR1, USR2 or none (the signal's default action) (default: USR2, "
        "the one submitit asks slurm for)"))
    diverge_after: int = option(20, kind="int", minimum=1, plan=True, help=(
        "stop as diverged (exit code 3) after K consecutive steps with a non-finite loss or a "
        "skipped update (non-finite gradients) (default: 20)"))
    tensorboard: bool = option(True, kind="bool", plan=True, help=(
        "write TensorBoard events to <out>/tensorboard (off saves ~2 s of start-up a run)"))
    time_norm_reduce: bool = option(False, kind="bool", help=(
        "on CUDA, synchronise around the per-layer norm all-reduce so its share of the step is "
        "exact (on CPU it is always exact)"))
    progress: bool = option(True, kind="bool", help="show the progress bar")

    # -- building ----------------------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, raw: Any, where: str = "config") -> "TrainConfig":
        """From a mapping of field names (a ``--config`` file); each value checked by type."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping of training options, got "
                              f"{type(raw).__name__}")
        return cls(**{key: check_option(key, value, f"{where}.{key}", where)
                      for key, value in raw.items()})

    @classmethod
    def read(cls, path: str | Path) -> "TrainConfig":
        """A YAML or JSON file of options (what ``--config`` reads, what the study writes)."""
        path = Path(path)
        try:
            raw = load_yaml(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"--config: file not found: {path}") from None
        except (ValueError, UnicodeDecodeError) as e:  # yaml.YAMLError is a ValueError below
            raise ConfigError(f"--config {path}: not valid YAML or JSON: {' '.join(str(e).split())}") from None
        return cls.from_mapping(raw or {}, where=str(path))

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    # -- checking ----------------------------------------------------------------------------------

    def check(self, name: Callable[[str], str] = None) -> None:
        """Every field within its bounds; ``name(field)`` words the option for the message
        (default: its command-line flag)."""
        name = name or flag
        for f in dataclasses.fields(self):
            value, low = getattr(self, f.name), f.metadata["minimum"]
            if value is None or low is None:
                continue
            if f.metadata["kind"] == "float":
                if not (math.isfinite(value) and value > low):
                    raise ConfigError(f"{name(f.name)} must be a finite number > {low}, got {value}")
            elif value < low:
                raise ConfigError(f"{name(f.name)} must be >= {low}, got {value}")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
PLAN_OPTIONS = tuple(name for name, f in FIELDS.items() if f.metadata["plan"])


def flag(name: str) -> str:
    """The command-line flag of field ``name``."""
    flags = FIELDS[name].metadata["flags"]
    return flags[0] if flags else "--" + name.replace("_", "-")


def load_yaml(text: str) -> Any:
    """YAML (JSON included) with YAML 1.2's numbers: PyYAML alone reads ``1e-5`` (no dot) as the
    string '1e-05', which would turn a small lr or eps of a file or plan into a type error."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$|^[-+]?\d[\d_]*\.\d*$|"
                   r"^[-+]?\.\d+$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
        list("-+0123456789."))
    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        raise ValueError(str(e)) from None


def check_option(key: str, value: Any, where: str, scope: str = "config") -> Any:
    """``value`` of option ``key`` from a file or plan, type-checked; raise ConfigError naming
    ``where`` (the key in the caller's terms). Returns the value."""
    if key not in FIELDS:
        raise ConfigError(f"{scope}: unknown training option {key!r}; allowed: {', '.join(FIELDS)}")
    kind, low = FIELDS[key].metadata["kind"], FIELDS[key].metadata["minimum"]
    if value is None and FIELDS[key].default is None:
        return None
    if kind == "int" and not (is_int(value) and (low is None or value >= low)):
        raise ConfigError(f"{where}: expected an integer >= {low}, got {value!r}")
    if kind == "float" and not (is_real(value) and (low is None or value > low)):
        raise ConfigError(f"{where}: expected a finite number > {low}, got {value!r}")
    if kind == "bool" and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if kind == "str" and not (isinstance(value, str) and value):
        raise ConfigError(f"{where}: expected a non-empty string, got {value!r}")
    if kind == "dict" and not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return float(value) if kind == "float" else value


# ------------------------------------------------------------------------------------------------
# The command line


def build_parser(prog: str = "stratopt-train", description: str = "") -> argparse.ArgumentParser:
    """One flag per field (defaults suppressed, so :func:`from_args` knows which were given)."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--config", metavar="FILE", help=(
        "read options from a YAML or JSON file of these fields (e.g. a study run's "
        "train_config.json); flags given on the command line win"))
    for name, f in FIELDS.items():
        kind, help_ = f.metadata["kind"], f.metadata["help"]
        if kind == "bool":  # --x and --no-x: a flag can undo what a --config file set
            p.add_argument(flag(name), dest=name, action=argparse.BooleanOptionalAction,
                           help=f"{help_} (default: {'on' if f.default else 'off'})")
        elif kind == "dict":
            p.add_argument(flag(name), dest=name, action="extend", nargs="+", metavar="ARG",
                           help=help_)
        else:
            p.add_argument(*(f.metadata["flags"] or (flag(name),)), dest=name,
                           type={"int": int, "float": float, "str": str}[kind], help=help_)
    # the deepspeed launcher passes --local_rank; LOCAL_RANK in the environment says the same
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, help=argparse.SUPPRESS)
    return p


def from_args(parser: argparse.ArgumentParser, argv: Optional[list[str]]) -> TrainConfig:
    """Defaults < ``--config`` file < flags given; usage errors exit through ``parser.error``."""
    from .run_policy import parse_opt_args

    given = vars(parser.parse_args(argv))
    given.pop("local_rank", None)
    try:
        config = TrainConfig.read(given.pop("config")) if "config" in given else TrainConfig()
    except ConfigError as e:
        parser.error(str(e))
    if "opt_args" in given:
        try:
            given["opt_args"] = {**config.opt_args, **parse_opt_args(given["opt_args"])}
        except ValueError as e:  # json.JSONDecodeError is a ValueError too
            parser.error(f"--opt-args: {e}")
    return config.replace(**given)


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
