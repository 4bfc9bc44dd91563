"""Per-layer optimizer statistics in the HF Trainer's own logs (``stratopt/...`` keys).

:class:`~stratopt_ds.integrations.hf.StratTrainer` installs :class:`LayerStatsCallback` itself; for a plain
``Trainer`` call :func:`install_layer_stats` (``trainer.add_callback`` would put it after the
reporting callbacks, which would then not see the keys)::

    from stratopt_ds.integrations.hf_callback import install_layer_stats
    install_layer_stats(trainer, per_layer_max=64)

On a StratTrainer it is ``trainer.layer_stats_callback`` (set its ``per_layer_max`` there;
``trainer.remove_callback(LayerStatsCallback)`` turns it off).

Every time the Trainer logs the training loss (every ``logging_steps``), the callback adds these
keys to that log record. They go wherever the Trainer's logs go: ``trainer.state.log_history``,
TensorBoard, W&B, MLflow, ... (as ``train/stratopt/...`` there), and the console line.

* ``stratopt/grad_norm``: the global norm of the gradient the optimizer measured at the last
  step, sqrt(sum_l n_l^2), before its own clipping (after the Trainer's/DeepSpeed's
  ``max_grad_norm`` clipping, if any);
* ``stratopt/layer_norm_min``, ``_median``, ``_max``: the per-layer gradient norms n_l of the
  last step, over the layers (the median of an even count is the mean of the middle two);
* ``stratopt/alpha_min``, ``_median``, ``_max``: the per-layer update scales alpha_l, likewise;
* ``stratopt/clipped_layers``: how many layers the optimizer clipped at the last step;
* ``stratopt/clip_count``: clip events (layer-steps clipped) since the optimizer's start, summed
  over the layers (it resumes with a checkpoint);
* ``stratopt/skipped_steps``: steps skipped because a layer norm was NaN/Inf, since the start
  (the norm summaries of such a step are NaN);
* ``stratopt/layer_norm/<layer>`` and ``stratopt/alpha/<layer>``: n_l and alpha_l of each layer
  (names from ``optimizer.layer_map.layout.layer_names``), only when the optimizer has at most
  ``per_layer_max`` layers (default 32).

Why this set: the summaries are 10 scalars whatever the model; min/median/max show both the
spread across layers and its extremes (a mean would hide one runaway layer). Per-layer curves
are what the layer-wise analysis needs, but a 1B model with one layer per weight tensor has ~200
layers (400 curves and a console line of several KB per log), so they appear only up to
``per_layer_max`` layers: block granularity (one layer per transformer block, ~23 for the 1B
preset) and the tiny presets get them, per-tensor layers of large models do not. Per-layer clip
counts stay on the optimizer (``optimizer.layer_clip_counts()``). "The last step" is the step
that ended just before the log, i.e. a sample, not an average over the logging interval;
the counters are cumulative, so their differences give the rates. A step that DeepSpeed's fp16
loss scaler skips never reaches the optimizer: the values are then those of the step before.

Costs. The optimizer's step never synchronises with the host; this callback reads its tensors
only while the Trainer logs, with one device-to-host copy of one concatenated tensor, and on
``is_world_process_zero`` only (under DeepSpeed ZeRO the statistics are already all-reduced,
identical on every rank). On other steps it does nothing at all.

If the Trainer's optimizer is not a stratopt_ds optimizer (``--optim adamw_torch``), nothing is
added. Under DeepSpeed the optimizer is found inside the engine (``basic_optimizer``) or through
the ``.optimizer`` chain of accelerate's and DeepSpeed's wrappers.
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Optional

import torch
from transformers import DefaultFlowCallback, TrainerCallback

from ..optim import LayerwiseAdam

PREFIX = "stratopt/"
DEFAULT_PER_LAYER_MAX = 32
_MAX_WRAPPERS = 8  # accelerate wrapper -> DeepSpeed ZeRO wrapper -> ours: 2 today


def unwrap_stratopt(optimizer: Any) -> Optional[LayerwiseAdam]:
    """The stratopt_ds optimizer inside ``optimizer`` (itself, or down its ``.optimizer`` chain:
    accelerate's ``AcceleratedOptimizer``, DeepSpeed's ZeRO/bf16 wrappers); None if there is none."""
    for _ in range(_MAX_WRAPPERS):
        if isinstance(optimizer, LayerwiseAdam):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
        if optimizer is None:
            return None
    return None


def find_stratopt_optimizer(trainer: Any) -> Optional[LayerwiseAdam]:
    """The stratopt_ds optimizer a Trainer steps: the DeepSpeed engine's client optimizer when
    there is an engine, else the Trainer's optimizer unwrapped; None for any other optimizer."""
    engine_inner = getattr(getattr(trainer, "model_wrapped", None), "basic_optimizer", None)
    return unwrap_stratopt(engine_inner) or unwrap_stratopt(getattr(trainer, "optimizer", None))


def _summary(values: list[float]) -> tuple[float, float, float]:
    """(min, median, max); all NaN when a value is NaN (a skipped step's norms)."""
    if any(math.isnan(v) for v in values):
        return (math.nan,) * 3
    return min(values), float(statistics.median(values)), max(values)


def read_layer_stats(optimizer: LayerwiseAdam) -> Optional[dict[str, Any]]:
    """The last step's layer statistics and the running counters, read with one host copy.

    Returns ``{"names", "norms", "alpha", "clipped_layers", "clip_count", "skipped_steps"}``
    (host values), or None before the optimizer's first step."""
    last, counters = optimizer.last_step, optimizer.layer_stats
    if last is None:
        return None
    n = last.norms.numel()
    # One concatenated float64 vector, one copy: a .item() per value would stall a GPU each time.
    # Counts are exact in float64 (far below 2**53).
    f64 = torch.float64
    host = torch.cat([last.norms.to(f64), last.alpha.to(f64),
                      (last.clip_coef < 1.0).sum().to(f64).reshape(1),
                      counters.clip_count.sum().to(f64).reshape(1),
                      counters.skipped_steps.to(f64).reshape(1)]).tolist()
    return {"names": list(optimizer.layer_map.layout.layer_names), "norms": host[:n],
            "alpha": host[n:2 * n], "clipped_layers": int(host[2 * n]), "clip_count": int(host[2 * n + 1]),
            "skipped_steps": int(host[2 * n + 2])}


def layer_stats_logs(stats: dict[str, Any], per_layer_max: Optional[int] = DEFAULT_PER_LAYER_MAX
                     ) -> dict[str, float]:
    """The ``stratopt/...`` log entries of :func:`read_layer_stats`'s values (see the module doc).
    ``per_layer_max=None`` logs every layer, 0 none."""
    norms, alpha = stats["norms"], stats["alpha"]
    logs: dict[str, float] = {f"{PREFIX}grad_norm": math.hypot(*norms)}
    for key, values in (("layer_norm", norms), ("alpha", alpha)):
        for stat, value in zip(("min", "median", "max"), _summary(values)):
            logs[f"{PREFIX}{key}_{stat}"] = value
    logs[f"{PREFIX}clipped_layers"] = stats["clipped_layers"]
    logs[f"{PREFIX}clip_count"] = stats["clip_count"]
    logs[f"{PREFIX}skipped_steps"] = stats["skipped_steps"]
    if per_layer_max is None or len(norms) <= per_layer_max:
        for key, values in (("layer_norm", norms), ("alpha", alpha)):
            logs.update((f"{PREFIX}{key}/{name}", value) for name, value in zip(stats["names"], values))
    return logs


class LayerStatsCallback(TrainerCallback):
    """Adds the ``stratopt/...`` entries (module doc) to each training log of ``trainer``.

    It must run before the reporting callbacks: install it with :func:`install_layer_stats`.
    ``per_layer_max``: log per-layer values up to this many layers (None: always, 0: never).
    """

    def __init__(self, trainer: Any, per_layer_max: Optional[int] = DEFAULT_PER_LAYER_MAX):
        if per_layer_max is not None and per_layer_max < 0:
            raise ValueError(f"per_layer_max={per_layer_max}: expected None or an integer >= 0")
        self.trainer = trainer
        self.per_layer_max = per_layer_max

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Only the Trainer's periodic training log carries "loss"; evaluation logs carry
        # "eval_loss", the end-of-training summary "train_loss".
        if logs is None or "loss" not in logs or not state.is_world_process_zero:
            return
        optimizer = find_stratopt_optimizer(self.trainer)
        stats = read_layer_stats(optimizer) if optimizer is not None else None
        if stats is None:
            return
        extra = layer_stats_logs(stats, self.per_layer_max)
        # Trainer.log appended a copy of `logs` to log_history just before calling on_log.
        history = state.log_history
        if history and all(history[-1].get(k) is v for k, v in logs.items()):
            history[-1].update(extra)
        logs.update(extra)


def install_layer_stats(trainer: Any, per_layer_max: Optional[int] = DEFAULT_PER_LAYER_MAX
                        ) -> LayerStatsCallback:
    """Install a :class:`LayerStatsCallback` on ``trainer`` ahead of its reporting callbacks
    (right after ``DefaultFlowCallback``), so that they log its entries; returns it."""
    callback = LayerStatsCallback(trainer, per_layer_max)
    callbacks = trainer.callback_handler.callbacks
    flow = [i for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)]
    callbacks.insert(flow[-1] + 1 if flow else 0, callback)
    return callback


__all__ = ["LayerStatsCallback", "install_layer_stats", "find_stratopt_optimizer", "read_layer_stats",
           "layer_stats_logs"]
