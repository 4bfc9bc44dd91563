"""One class per optimizer name, so frameworks that resolve optimizers by class name find them.

``import stratopt_ds`` also makes each class reachable as ``torch.optim.<ClassName>``, which is
how a DeepSpeed JSON ``"optimizer": {"type": "StratOpt"}`` is resolved. Our AdamW is called
``LayerwiseAdamW`` so it never shadows ``torch.optim.AdamW``.
"""
from __future__ import annotations

import torch

from .config import PRESETS
from .optimizer import LayerwiseAdam

_SPECIAL = {"adamw": "LayerwiseAdamW", "ademamix": "AdEMAMix", "stratopt": "StratOpt",
            "stratopt-noscale": "StratOptNoScale", "stratopt-nomix": "StratOptNoMix",
            "stratopt-noclip": "StratOptNoClip"}


def class_name(name: str) -> str:
    """'la-sqrt-b1depth-cliplayer' -> 'LASqrtB1DepthClipLayer'."""
    if name in _SPECIAL:
        return _SPECIAL[name]
    _, scaling, b1, clip = name.split("-")
    return "LA" + scaling.capitalize() + "B1" + b1[2:].capitalize() + "Clip" + clip[4:].capitalize()


def _make(name: str) -> type[LayerwiseAdam]:
    doc = f"The {name!r} optimizer: :class:`LayerwiseAdam` with the preset {PRESETS[name] or 'AdamW'}."
    return type(class_name(name), (LayerwiseAdam,), {"preset": name, "__doc__": doc,
                                                     "__module__": __name__})


OPTIMIZER_CLASSES: dict[str, type[LayerwiseAdam]] = {name: _make(name) for name in PRESETS}
globals().update({cls.__name__: cls for cls in OPTIMIZER_CLASSES.values()})


def register_torch_aliases() -> None:
    """Expose every class as ``torch.optim.<ClassName>`` (never replacing a torch class)."""
    for cls in OPTIMIZER_CLASSES.values():
        existing = getattr(torch.optim, cls.__name__, None)
        if existing is None or getattr(existing, "preset", None) is not None:
            setattr(torch.optim, cls.__name__, cls)
