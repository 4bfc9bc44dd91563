"""``stratopt_ds.deepspeed.initialize``: ``deepspeed.initialize`` that understands our optimizers.

Use it exactly like ``deepspeed.initialize``. When the config's ``"optimizer"`` names one of
:func:`stratopt_ds.available_optimizers` (``"stratopt"``) or one of our class names
(``"StratOpt"``), it

* builds the optimizer itself from the model's *named* parameters (decay / no-decay groups,
  layer ids and block depths from the names), with ``"params"`` as hyperparameters;
* sets what DeepSpeed needs for a client optimizer under ZeRO: ``zero_allow_untested_optimizer``
  and, with optimizer offload, ``zero_force_ds_cpu_optimizer: false`` (otherwise DeepSpeed
  would refuse it, and accelerate would silently swap in DeepSpeedCPUAdam);
* makes gradient clipping explicit, by the one rule of :mod:`stratopt_ds.run_policy`: DeepSpeed
  clips the global norm to 1.0 when the config says nothing; if our optimizer clips itself
  (``clip`` is not ``"none"``) that default is turned off and the log says so, and a config that
  sets ``gradient_clipping > 0`` for such an optimizer is refused (it would clip twice);
* binds the optimizer to the ZeRO wrapper, so per-layer norms are exact across partitions.

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

from ..optim import OPTIMIZER_CLASSES, available_optimizers, create_optimizer
from ..optim.optimizer import LayerwiseAdam
from ..run_policy import engine_clipping, optimizer_clip_mode

logger = logging.getLogger(__name__)

_OUR_PREFIXES = ("stratopt", "la-", "la_", "layerwise")  # a typo of ours, not a DeepSpeed name


def resolve_optimizer_name(type_name: str) -> Optional[str]:
    """'stratopt' or 'StratOpt' -> 'stratopt'; None when it is not one of ours."""
    if type_name in OPTIMIZER_CLASSES:
        return type_name
    for name, cls in OPTIMIZER_CLASSES.items():
        if cls.__name__ == type_name:
            return name
    return None


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


def offloads_optimizer(config: dict) -> bool:
    zero = config.get("zero_optimization") or {}
    device = (zero.get("offload_optimizer") or {}).get("device", "none")
    return zero.get("stage", 0) > 0 and device not in (None, "none")


def keep_client_optimizer_under_offload(config: dict, what: str = "stratopt_ds optimizer") -> None:
    """Under optimizer offload DeepSpeed swaps a client optimizer for DeepSpeedCPUAdam unless
    ``zero_force_ds_cpu_optimizer`` is false: set it (in place), and refuse a config saying true."""
    if not offloads_optimizer(config):
        return
    if config.get("zero_force_ds_cpu_optimizer") is True:
        raise ValueError(f"zero_force_ds_cpu_optimizer=true would replace the {what} by "
                         "DeepSpeedCPUAdam under offload; remove it or set it to false")
    config["zero_force_ds_cpu_optimizer"] = False


def prepare_config(config: dict, clip_mode: str) -> dict:
    """Set the flags a client optimizer needs, and the gradient clipping of the run policy
    (``clip_mode``: the optimizer's, :func:`stratopt_ds.run_policy.optimizer_clip_mode`), in place."""
    if config.get("zero_optimization", {}).get("stage", 0) > 0:
        config["zero_allow_untested_optimizer"] = True
        keep_client_optimizer_under_offload(config)
    config["gradient_clipping"], notes = engine_clipping(config.get("gradient_clipping"), clip_mode)
    for note in notes:
        logger.warning("stratopt_ds: %s", note)
    return config


def initialize(args=None, model=None, optimizer=None, model_parameters=None, training_data=None,
               lr_scheduler=None, config=None, **kwargs):
    """Drop-in for ``deepspeed.initialize``; returns ``(engine, optimizer, dataloader, scheduler)``."""
    import deepspeed

    config = load_config(config if config is not None else kwargs.pop("config_params", None), args)
    section = config.get("optimizer") or {}
    type_name = str(section.get("type", ""))
    name = resolve_optimizer_name(type_name) if optimizer is None else None
    if optimizer is None and name is None and type_name.lower().startswith(_OUR_PREFIXES):
        raise ValueError(f"unknown optimizer type {type_name!r} in the DeepSpeed config; available: "
                         f"{', '.join(available_optimizers())}")
    if name is not None:
        if model is None:
            raise ValueError("the config names a stratopt_ds optimizer: pass model= so its named "
                             "parameter groups can be built")
        params = dict(section.get("params") or {})
        if model_parameters is not None:
            optimizer = create_optimizer(name, model_parameters, **params)
        else:
            optimizer = create_optimizer(name, model, **params)
        del config["optimizer"]
        model_parameters = None
    if isinstance(optimizer, LayerwiseAdam) or name is not None:
        prepare_config(config, optimizer_clip_mode(optimizer))
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


__all__ = ["initialize", "load_config", "prepare_config", "release_cpu_comm_shm",
           "resolve_optimizer_name"]
