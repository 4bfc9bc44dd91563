"""``stratopt_ds.deepspeed.initialize``: ``deepspeed.initialize`` that understands our optimizers.

Use it exactly like ``deepspeed.initialize``. When the config's ``"optimizer"`` names one of
:func:`stratopt_ds.available_optimizers` (``"stratopt"``) or one of our class names
(``"StratOpt"``), or the optimizer passed is an instance of ours, the request goes through the
run policy (:func:`stratopt_ds.run_policy.prepare`), which

* validates the section's ``"params"`` as hyperparameters (``lr`` included, ``"auto"`` values
  left to the defaults), and :func:`initialize` builds the optimizer itself from the model's
  *named* parameters (decay / no-decay groups, layer ids and block depths from the names);
* sets what DeepSpeed needs for a client optimizer under ZeRO: ``zero_allow_untested_optimizer``
  and, with optimizer offload, ``zero_force_ds_cpu_optimizer: false`` (otherwise DeepSpeed
  would refuse it, and accelerate would silently swap in DeepSpeedCPUAdam);
* makes gradient clipping explicit, by the one rule of the run policy: DeepSpeed clips the
  global norm to 1.0 when the config says nothing; if our optimizer clips itself (``clip`` is not
  ``"none"``) that default is turned off and the log says so, and a config that sets
  ``gradient_clipping > 0`` for such an optimizer is refused (it would clip twice);
* removes the section (next to an instance of ours, it must name one of ours too);

and :func:`initialize` binds the optimizer to the ZeRO wrapper, so per-layer norms are exact
across partitions. :func:`prepare_config` is the config step alone, for an optimizer known by its
clip mode.

Any other config is passed to ``deepspeed.initialize`` unchanged, and an optimizer instance or
callable of ours given to plain ``deepspeed.initialize`` binds itself at its first step.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

from .. import run_policy
from ..optim import available_optimizers, create_optimizer
from ..optim.optimizer import LayerwiseAdam
from ..zero.support import check_model_parallel, stage_of
# offloads_optimizer and resolve_optimizer_name are also this module's API (accelerate, tests)
from ..run_policy import offloads_optimizer, resolve_optimizer_name

logger = logging.getLogger(__name__)

_OUR_PREFIXES = ("stratopt", "la-", "la_", "layerwise")  # a typo of ours, not a DeepSpeed name
# How the run policy names the settings of a DeepSpeed config (initialize, prepare_config, accelerate).
SETTINGS = run_policy.Settings(lr="optimizer.params.lr", config="the DeepSpeed config")


def load_config(config: Any, args: Any = None) -> dict:
    """A DeepSpeed config as a fresh dict, from a dict, a JSON path, or ``args.deepspeed_config``."""
    if config is None and args is not None:
        config = getattr(args, "deepspeed_config", None)
    if config is None:
        raise ValueError("no DeepSpeed config: pass config=<dict or path> or args.deepspeed_config")
    if isinstance(config, dict):
        return copy.deepcopy(config)
    try:
        with open(config) as fh:
            return json.load(fh)
    except OSError as err:
        raise ValueError(f"cannot read DeepSpeed config {config!r}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"DeepSpeed config {config!r} is not valid JSON: {err}") from None


def log_notes(prepared: run_policy.PreparedRun) -> None:
    """Warn of what the run policy changed from DeepSpeed's defaults (e.g. clipping turned off)."""
    for note in prepared.notes:
        logger.warning("stratopt_ds: %s", note)


def prepare_config(config: dict, clip_mode: str) -> dict:
    """Set the flags a client optimizer needs, and the gradient clipping of the run policy
    (``clip_mode``: the optimizer's, :func:`stratopt_ds.run_policy.optimizer_clip_mode`), in place.
    An ``"optimizer"`` section is the caller's: it is left as it is."""
    rest = {key: value for key, value in config.items() if key != "optimizer"}
    prepared = run_policy.prepare(run_policy.RunRequest(deepspeed=rest, clip_mode=clip_mode, names=SETTINGS))
    log_notes(prepared)
    config.update(prepared.deepspeed)
    return config


def section_optimizer(config: dict) -> Optional[str]:
    """Our optimizer's name when the config's ``"optimizer"`` section names one; None for
    DeepSpeed's own names (they pass through), an error for a misspelt one of ours."""
    section = config.get("optimizer")
    type_name = str(section.get("type", "")) if isinstance(section, dict) else ""
    name = resolve_optimizer_name(type_name)
    if name is None and type_name.lower().startswith(_OUR_PREFIXES):
        raise ValueError(f"unknown optimizer type {type_name!r} in the DeepSpeed config; available: "
                         f"{', '.join(available_optimizers())}")
    return name


def initialize(args=None, model=None, optimizer=None, model_parameters=None, training_data=None,
               lr_scheduler=None, config=None, **kwargs):
    """Drop-in for ``deepspeed.initialize``; returns ``(engine, optimizer, dataloader, scheduler)``."""
    import deepspeed

    config = load_config(config if config is not None else kwargs.pop("config_params", None), args)
    name = section_optimizer(config) if optimizer is None else None
    if name is not None and model is None:
        raise ValueError("the config names a stratopt_ds optimizer: pass model= so its named "
                         "parameter groups can be built")
    if name is not None or isinstance(optimizer, LayerwiseAdam):
        check_model_parallel(model, kwargs.get("mpu"), stage_of(config, "the DeepSpeed config"))
        prepared = run_policy.prepare(run_policy.RunRequest(
            optimizer=name or optimizer, deepspeed=config, names=SETTINGS))
        log_notes(prepared)
        config = prepared.deepspeed
        if name is not None:
            params = model if model_parameters is None else model_parameters
            optimizer = create_optimizer(name, params, **prepared.hyperparams)
            model_parameters = None
    if args is not None and getattr(args, "deepspeed_config", None) is not None:
        args = copy.copy(args)
        args.deepspeed_config = None  # the prepared dict is the config now
    engine, ds_optimizer, loader, scheduler = deepspeed.initialize(
        args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
        training_data=training_data, lr_scheduler=lr_scheduler, config=config, **kwargs)
    inner = getattr(engine, "basic_optimizer", None)
    if isinstance(inner, LayerwiseAdam) and ds_optimizer is not inner:
        from ..zero import attach
        attach(inner, ds_optimizer)
    release_cpu_comm_shm()
    return engine, ds_optimizer, loader, scheduler


CPU_COMM_SHM_DIR = Path("/dev/shm")
CPU_COMM_SHM_PREFIX = "deepspeed_allreduce_buffer"  # deepspeed/ops/csrc/cpu/comm/shm.cpp


def cpu_comm_shm_path(rank: int) -> Path:
    """Where DeepSpeed's CPU all-reduce keeps rank ``rank``'s shared buffer for this job."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return CPU_COMM_SHM_DIR / f"{CPU_COMM_SHM_PREFIX}_{os.getuid()}_{addr}_{port}_{rank}"


def release_cpu_comm_shm() -> Optional[Path]:
    """Unlink this rank's name of DeepSpeed's CPU shared-memory all-reduce buffer.

    On CPU, when all ranks are on one node, ``deepspeed.init_distributed`` creates one ~66 MB
    POSIX shared-memory file per rank (``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_
    <rank>``), maps every rank's file and never unlinks them: each job leaves world_size x 66 MB
    of RAM behind until reboot (measured here: 17 GB after a day of test runs). The names are
    only needed while the ranks open each other's buffers inside ``init_distributed``; after a
    barrier every rank has done so, the mappings stay valid, and the memory is freed when the
    processes exit, even when they crash. Collective: call it on every rank (the entry points of
    this package do). Returns the unlinked path, or None when there was none.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    path = cpu_comm_shm_path(dist.get_rank())
    if path in _released:  # every rank made the same calls: all skip the barrier together
        return None
    dist.barrier()  # every rank has returned from init, so every peer buffer is mapped
    _released.add(path)
    try:
        path.unlink()
    except FileNotFoundError:  # GPUs, several nodes
        return None
    return path


_released: set[Path] = set()  # names this process has released (one barrier per job)


__all__ = ["initialize", "load_config", "offloads_optimizer", "prepare_config", "release_cpu_comm_shm",
           "resolve_optimizer_name"]
