"""Hyperparameter keywords, the named presets, and their validation (docs/ALGORITHMS.md sections 4, 6, 10).

Every optimizer in the family is one engine (:class:`~stratopt_ds.optim.optimizer.LayerwiseAdam`)
configured by the keywords below. A *named* optimizer is only a preset of these keywords; any
keyword may be overridden by the caller.

Keywords split in two kinds:

* **group keywords** may differ between parameter groups (like torch's ``lr``);
* **layer keywords** describe how layers are measured, scaled and clipped. A layer may hold
  tensors from several groups (``granularity="block"`` puts a block's weights and its norm
  weights, which sit in different weight-decay groups, into one layer), so these are
  optimizer-wide. A group that sets one is rejected.
"""
from __future__ import annotations

import difflib
import math
import numbers
from typing import Any, Mapping

import torch

GROUP_DEFAULTS: dict[str, Any] = {
    "lr": 3e-4,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "weight_decay": 0.1,
    "beta3": 0.999,
    "mix_alpha": 0.0,
    "t_alpha": 0,
    "t_beta3": 0,
}

LAYER_DEFAULTS: dict[str, Any] = {
    "scaling": "none",
    "beta1_mode": "const",
    "clip": "none",
    "clip_threshold": 1.0,
    "clip_tau": 2.0,
    "norm_beta": 0.99,
    "norm_eps": 1e-12,
    "alpha_min": 0.1,
    "alpha_max": 10.0,
    "granularity": "tensor",
}

# What else a parameter group may hold: its tensors and their names; keys that torch's LR
# schedulers, SWALR and DeepSpeed's MoE groups write into groups (kept as given, never read by
# the step); and torch.optim's own switches (a group taken from a torch optimizer), at the values
# that ask for what this optimizer does anyway. Any other key is a typo or a setting that would
# be silently ignored: refused.
GROUP_TENSOR_KEYS = ("params", "param_names")
GROUP_FOREIGN_KEYS = ("initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum", "swa_lr",
                      "name", "moe")
TORCH_SWITCHES: dict[str, tuple] = {
    "maximize": (False,), "amsgrad": (False,), "differentiable": (False,),
    "decoupled_weight_decay": (True,), "foreach": (None, False, True),
    "fused": (None, False, True), "capturable": (None, False, True)}

CHOICES: dict[str, tuple[str, ...]] = {
    "scaling": ("none", "linear", "sqrt", "inverse"),
    "beta1_mode": ("const", "depth"),
    "clip": ("none", "global", "layer"),
    "granularity": ("tensor", "block"),
}

# b1-depth momentum: b1_l = DEPTH_B1_BASE + DEPTH_B1_SPAN * u_l (docs/ALGORITHMS.md section 6).
DEPTH_B1_BASE = 0.85
DEPTH_B1_SPAN = 0.10


def _la_presets() -> dict[str, dict[str, Any]]:
    presets = {}
    for scaling in ("linear", "sqrt", "inverse"):
        for b1 in ("const", "depth"):
            for clip in ("global", "layer"):
                name = f"la-{scaling}-b1{b1}-clip{clip}"
                presets[name] = {"scaling": scaling, "beta1_mode": b1, "clip": clip,
                                 "mix_alpha": 0.0}
    return presets


_STRATOPT = {"scaling": "linear", "clip": "layer", "mix_alpha": 5.0}

# name -> keyword overrides on top of GROUP_DEFAULTS | LAYER_DEFAULTS.
OPTIMIZER_PRESETS: dict[str, dict[str, Any]] = {
    "adamw": {},
    "ademamix": {"mix_alpha": 8.0},
    "stratopt": dict(_STRATOPT),
    "stratopt-noscale": {**_STRATOPT, "scaling": "none"},
    "stratopt-nomix": {**_STRATOPT, "mix_alpha": 0.0},
    "stratopt-noclip": {**_STRATOPT, "clip": "none"},
    **_la_presets(),
}


def with_run_length_warmups(name: str, hyperparams: dict[str, Any], steps: int) -> dict[str, Any]:
    """When the optimizer mixes in a slow momentum (mix_alpha > 0), its warm-ups ``t_alpha``
    and ``t_beta3`` span the whole run of ``steps`` unless ``hyperparams`` set them."""
    mix = hyperparams.get("mix_alpha", preset_defaults(name)["mix_alpha"])
    if isinstance(mix, (int, float)) and mix > 0 and steps > 0:
        hyperparams.setdefault("t_alpha", steps)
        hyperparams.setdefault("t_beta3", steps)
    return hyperparams


def preset_defaults(name: str) -> dict[str, Any]:
    """All keyword defaults of a named optimizer."""
    if name not in OPTIMIZER_PRESETS:
        raise ValueError(f"unknown optimizer {name!r}; available: {', '.join(OPTIMIZER_PRESETS)}")
    return {**GROUP_DEFAULTS, **LAYER_DEFAULTS, **OPTIMIZER_PRESETS[name]}


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ValueError(f"invalid {key}={value!r}: expected {allowed}")


def _is_real(x: Any) -> bool:
    # numbers.Real: a scheduler may write a NumPy float (np.float32 * a Python float stays one)
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _check_range(key: str, value: Any, lo: float, hi: float, lo_open: bool, hi_open: bool) -> None:
    ok = _is_real(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        left, right = ("(" if lo_open else "["), (")" if hi_open else "]")
        _fail(key, value, f"a finite number in {left}{lo}, {hi}{right}")


def check_group_keys(group: Mapping[str, Any], index: int) -> None:
    """Refuse a key that no one reads (``wieght_decay``), naming it and what is allowed."""
    for key, value in group.items():
        if key in GROUP_DEFAULTS or key in GROUP_TENSOR_KEYS or key in GROUP_FOREIGN_KEYS:
            continue
        if key in TORCH_SWITCHES:
            if any(value is v for v in TORCH_SWITCHES[key]):
                continue
            raise ValueError(f"parameter group {index}: {key}={value!r} is not supported (a "
                             f"torch.optim switch; allowed here: "
                             f"{' or '.join(map(repr, TORCH_SWITCHES[key]))})")
        known = [*GROUP_TENSOR_KEYS, *GROUP_DEFAULTS, *LAYER_DEFAULTS]
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"parameter group {index}: unknown key {key!r}{hint}; allowed: "
                         f"{', '.join([*GROUP_TENSOR_KEYS, *GROUP_DEFAULTS])} (and, kept as "
                         f"given, {', '.join(GROUP_FOREIGN_KEYS)})")


def validate_group(group: Mapping[str, Any], read_tensors: bool = True) -> None:
    """Check the group keywords of one parameter group (the defaults included).
    ``read_tensors=False``: a tensor lr's value is not read (no host-device sync); the step
    checks it on its device."""
    inf = math.inf
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        # A tensor lr (as in torch.optim's capturable optimizers) is read on the device inside the
        # step, so a CUDA graph replays with the value a scheduler last wrote into it (fill_).
        if lr.numel() != 1 or lr.dim() != 0 or not lr.is_floating_point():
            _fail("lr", lr, "a float or a 0-dim floating-point tensor")
        if not read_tensors:
            lr = 0.0  # its value is the step's to check, on the device
        else:
            lr = lr.item()  # checked once here; the step never reads it on the host
    _check_range("lr", lr, 0.0, inf, False, True)
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        _fail("betas", betas, "a pair (beta1, beta2)")
    _check_range("betas[0]", betas[0], 0.0, 1.0, False, True)
    _check_range("betas[1]", betas[1], 0.0, 1.0, False, True)
    _check_range("eps", group["eps"], 0.0, inf, True, True)
    _check_range("weight_decay", group["weight_decay"], 0.0, inf, False, True)
    _check_range("beta3", group["beta3"], 0.0, 1.0, False, True)
    _check_range("mix_alpha", group["mix_alpha"], 0.0, inf, False, True)
    for key in ("t_alpha", "t_beta3"):
        value = group[key]
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            _fail(key, value, "an integer >= 0 (0 disables the warm-up)")
    if group["mix_alpha"] > 0 and group["t_beta3"] > 0 and group["beta3"] < group["betas"][0]:
        _fail("beta3", group["beta3"], f">= betas[0]={group['betas'][0]} when t_beta3 > 0 "
              "(the warm-up goes from beta1 up to beta3)")


def validate_layer_options(opts: Mapping[str, Any]) -> None:
    """Check the optimizer-wide layer keywords."""
    for key, allowed in CHOICES.items():
        if opts[key] not in allowed:
            _fail(key, opts[key], "one of " + ", ".join(repr(a) for a in allowed))
    inf = math.inf
    _check_range("clip_threshold", opts["clip_threshold"], 0.0, inf, True, True)
    _check_range("clip_tau", opts["clip_tau"], 0.0, inf, True, True)
    _check_range("norm_beta", opts["norm_beta"], 0.0, 1.0, False, True)
    _check_range("norm_eps", opts["norm_eps"], 0.0, inf, True, True)
    _check_range("alpha_min", opts["alpha_min"], 0.0, inf, True, True)
    _check_range("alpha_max", opts["alpha_max"], 0.0, inf, True, True)
    if opts["alpha_min"] > opts["alpha_max"]:
        _fail("alpha_min", opts["alpha_min"], f"<= alpha_max={opts['alpha_max']}")


def resolve_keywords(name: str, hyperparams: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(group defaults, layer options) of optimizer ``name`` given ``hyperparams``, validated:
    what the optimizer's constructor uses, and what the run policy checks without building one."""
    preset = preset_defaults(name)
    group_kw, layer_kw = split_keywords(hyperparams)
    defaults = {k: preset[k] for k in GROUP_DEFAULTS} | group_kw
    layer_options = {k: preset[k] for k in LAYER_DEFAULTS} | layer_kw
    validate_layer_options(layer_options)
    validate_group(defaults)
    return defaults, layer_options


def split_keywords(kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split constructor keywords into (group, layer) dicts; unknown keys raise ValueError."""
    group, layer = {}, {}
    for key, value in kwargs.items():
        if key in GROUP_DEFAULTS:
            group[key] = tuple(value) if key == "betas" and isinstance(value, list) else value
        elif key in LAYER_DEFAULTS:
            layer[key] = value
        else:
            allowed = ", ".join([*GROUP_DEFAULTS, *LAYER_DEFAULTS])
            raise ValueError(f"unknown hyperparameter {key!r}; allowed: {allowed}")
    return group, layer
