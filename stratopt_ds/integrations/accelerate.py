"""accelerate with DeepSpeed and a stratopt_ds optimizer.

    from accelerate import Accelerator
    from stratopt_ds import create_optimizer
    from stratopt_ds.integrations.accelerate import deepspeed_plugin, distributed_state, bind_prepared

    distributed_state()                      # only does something on CPU-only DeepSpeed (see below)
    optimizer = create_optimizer("stratopt", model, lr=3e-3)
    accelerator = Accelerator(deepspeed_plugin=deepspeed_plugin("ds.json", optimizer))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    bind_prepared(model, optimizer)           # checks DeepSpeed steps *our* optimizer, binds it

:func:`deepspeed_plugin` prepares the DeepSpeed config for the optimizer you pass through the run
policy (:func:`stratopt_ds.run_policy.prepare`), because accelerate's DeepSpeed path has two
silent traps for a client optimizer:

* with optimizer offload, accelerate replaces any client optimizer by DeepSpeedCPUAdam unless
  the config says ``"zero_force_ds_cpu_optimizer": false``: the plugin's config says so;
* a config ``"optimizer"`` section next to a client optimizer is refused by accelerate, and with a
  ``DummyOptim`` DeepSpeed would build its own optimizer. A section that names the optimizer you
  pass (the shipped configs do) is checked against it, key by key, and removed; any other
  section is refused with an error naming the key.

Gradient clipping follows the one rule of the run policy: an optimizer that clips itself turns
DeepSpeed's default ``gradient_clipping=1.0`` off, and is refused with a config that sets one.

On a machine without an accelerator DeepSpeed runs on CPU with gloo, but accelerate's
``PartialState`` then finds no distributed backend and tells every rank it is the only process
(each would read the whole dataset and believe it is the main process).
:func:`distributed_state` creates the state with the gloo backend first; it does nothing on GPUs
or outside a launcher.
"""
from __future__ import annotations

import os
from typing import Any, Optional

from .. import run_policy
from .deepspeed import SETTINGS, load_config, log_notes, release_cpu_comm_shm
from ..optim import LayerwiseAdam
from ..run_policy import offloads_optimizer


# ------------------------------------------------------------------------------------------------
# The DeepSpeed config


def prepare_for_optimizer(config: dict, optimizer: Any) -> dict:
    """Make a DeepSpeed config (in place) keep ``optimizer`` as DeepSpeed's client optimizer: the
    run policy's preparation, and a section naming ours must describe ``optimizer``."""
    prepared = run_policy.prepare(run_policy.RunRequest(optimizer=optimizer, deepspeed=config, names=SETTINGS))
    log_notes(prepared)
    config.clear()  # in place: an existing plugin holds this dict
    config.update(prepared.deepspeed)
    return config


def deepspeed_plugin(config_or_plugin: Any, optimizer: Any, **plugin_kwargs):
    """An ``accelerate.utils.DeepSpeedPlugin`` whose config keeps ``optimizer`` (see module doc).

    ``config_or_plugin``: a dict, a JSON path, or an existing plugin (e.g. the one
    ``accelerate launch --deepspeed_config_file`` made), whose config is prepared in place.
    """
    from accelerate.utils import DeepSpeedPlugin

    if isinstance(config_or_plugin, DeepSpeedPlugin):
        prepare_for_optimizer(config_or_plugin.deepspeed_config, optimizer)
        return config_or_plugin
    config = prepare_for_optimizer(load_config(config_or_plugin), optimizer)
    return DeepSpeedPlugin(hf_ds_config=config, **plugin_kwargs)


# ------------------------------------------------------------------------------------------------
# After accelerator.prepare


def deepspeed_engine(model: Any):
    """The DeepSpeed engine behind what ``accelerator.prepare`` returned for the model."""
    from deepspeed import DeepSpeedEngine

    if isinstance(model, DeepSpeedEngine):
        return model
    raise TypeError(f"expected the DeepSpeed engine returned by accelerator.prepare, got "
                    f"{type(model).__name__}: was the Accelerator built with a DeepSpeedPlugin?")


def bind_prepared(model: Any, optimizer: Optional[LayerwiseAdam] = None):
    """Check DeepSpeed steps a stratopt_ds optimizer and bind it to the ZeRO wrapper now.

    It would bind itself at its first step; binding here reports an unsupported ZeRO setting
    before any training, and fails loudly if the optimizer was swapped (``optimizer`` is the
    instance passed to ``prepare``; leave it out to accept any stratopt_ds optimizer).
    Returns the binding, or None when DeepSpeed does not wrap the optimizer (ZeRO stage 0, fp32).
    """
    engine = deepspeed_engine(model)
    inner = engine.basic_optimizer
    if not isinstance(inner, LayerwiseAdam) or (optimizer is not None and inner is not optimizer):
        config = engine.config if isinstance(engine.config, dict) else {}
        hint = ""
        if offloads_optimizer(config) and config.get("zero_force_ds_cpu_optimizer", True):
            hint = ('; under optimizer offload accelerate swaps it unless "zero_force_ds_cpu_optimizer" '
                    "is false (stratopt_ds.integrations.accelerate.deepspeed_plugin sets it)")
        raise RuntimeError(f"DeepSpeed steps {type(inner).__name__}, not the stratopt_ds optimizer "
                           f"passed to accelerator.prepare{hint}")
    if not inner.sharding.is_local:
        return inner.sharding
    if engine.optimizer is inner:  # ZeRO stage 0: DeepSpeed steps our optimizer on whole tensors
        return None
    from ..zero import attach
    return attach(inner, engine.optimizer)


# ------------------------------------------------------------------------------------------------
# CPU-only DeepSpeed


def runs_deepspeed_on_cpu() -> bool:
    """Under a launcher (LOCAL_RANK set) on a machine where DeepSpeed picked its CPU accelerator."""
    if int(os.environ.get("LOCAL_RANK", -1)) < 0:
        return False
    from deepspeed.accelerator import get_accelerator
    return get_accelerator().device_name() == "cpu"


def distributed_state() -> bool:
    """Create accelerate's ``PartialState`` for DeepSpeed over gloo on CPU (see module doc).

    Call it before the ``Accelerator`` (``StratTrainingArguments`` calls it itself). Returns True
    when it did something. ``ACCELERATE_USE_DEEPSPEED`` is set only while the state is created,
    the way transformers' TrainingArguments does it.
    """
    if not runs_deepspeed_on_cpu():
        return False
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=False)  # a new run's plugin must apply
    if PartialState._shared_state:
        return True
    previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        if previous is None:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = previous
    release_cpu_comm_shm()  # DeepSpeed's CPU all-reduce would leave 66 MB per rank in /dev/shm
    return True


__all__ = ["deepspeed_plugin", "prepare_for_optimizer", "bind_prepared", "distributed_state"]
