"""One class per optimizer name, so frameworks that resolve optimizers by class name find them.

``import stratopt_ds`` also makes each class reachable as ``torch.optim.<ClassName>``, which is
how a DeepSpeed JSON ``"optimizer": {"type": "StratOpt"}`` is resolved. Our AdamW is called
``LayerwiseAdamW`` so it never shadows ``torch.optim.AdamW``.
"""
from __future__ import annotations

import torch

from .config import OPTIMIZER_PRESETS
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


# One class statement per name (grep finds ``class StratOpt``); ``preset`` names the keyword preset
# in config.OPTIMIZER_PRESETS, which is where the hyperparameters live.

class LayerwiseAdamW(LayerwiseAdam):
    """AdamW (docs/ALGORITHMS.md section 1), on the layer-map engine; named so it never shadows
    torch.optim.AdamW.
    """

    preset = "adamw"


class AdEMAMix(LayerwiseAdam):
    """AdEMAMix: AdamW plus a slow momentum mixed in with weight mix_alpha=8 (section 2)."""

    preset = "ademamix"


class StratOpt(LayerwiseAdam):
    """StratOpt: per-layer scale alpha_l = ||g_l|| / (gbar_l + eps), slow momentum (mix_alpha=5),
    per-layer clipping (sections 3-5).
    """

    preset = "stratopt"


class StratOptNoScale(LayerwiseAdam):
    """StratOpt without the per-layer scale (alpha_l = 1): an ablation (section 4)."""

    preset = "stratopt-noscale"


class StratOptNoMix(LayerwiseAdam):
    """StratOpt without the slow momentum (mix_alpha=0): an ablation (section 4)."""

    preset = "stratopt-nomix"


class StratOptNoClip(LayerwiseAdam):
    """StratOpt without per-layer clipping: an ablation (section 4)."""

    preset = "stratopt-noclip"


class LALinearB1ConstClipGlobal(LayerwiseAdam):
    """LA variant 'la-linear-b1const-clipglobal': linear per-layer scaling, beta1 const, global
    clipping (sections 5, 6).
    """

    preset = "la-linear-b1const-clipglobal"


class LALinearB1ConstClipLayer(LayerwiseAdam):
    """LA variant 'la-linear-b1const-cliplayer': linear per-layer scaling, beta1 const, layer
    clipping (sections 5, 6).
    """

    preset = "la-linear-b1const-cliplayer"


class LALinearB1DepthClipGlobal(LayerwiseAdam):
    """LA variant 'la-linear-b1depth-clipglobal': linear per-layer scaling, beta1 depth, global
    clipping (sections 5, 6).
    """

    preset = "la-linear-b1depth-clipglobal"


class LALinearB1DepthClipLayer(LayerwiseAdam):
    """LA variant 'la-linear-b1depth-cliplayer': linear per-layer scaling, beta1 depth, layer
    clipping (sections 5, 6).
    """

    preset = "la-linear-b1depth-cliplayer"


class LASqrtB1ConstClipGlobal(LayerwiseAdam):
    """LA variant 'la-sqrt-b1const-clipglobal': sqrt per-layer scaling, beta1 const, global
    clipping (sections 5, 6).
    """

    preset = "la-sqrt-b1const-clipglobal"


class LASqrtB1ConstClipLayer(LayerwiseAdam):
    """LA variant 'la-sqrt-b1const-cliplayer': sqrt per-layer scaling, beta1 const, layer clipping
    (sections 5, 6).
    """

    preset = "la-sqrt-b1const-cliplayer"


class LASqrtB1DepthClipGlobal(LayerwiseAdam):
    """LA variant 'la-sqrt-b1depth-clipglobal': sqrt per-layer scaling, beta1 depth, global
    clipping (sections 5, 6).
    """

    preset = "la-sqrt-b1depth-clipglobal"


class LASqrtB1DepthClipLayer(LayerwiseAdam):
    """LA variant 'la-sqrt-b1depth-cliplayer': sqrt per-layer scaling, beta1 depth, layer clipping
    (sections 5, 6).
    """

    preset = "la-sqrt-b1depth-cliplayer"


class LAInverseB1ConstClipGlobal(LayerwiseAdam):
    """LA variant 'la-inverse-b1const-clipglobal': inverse per-layer scaling, beta1 const, global
    clipping (sections 5, 6).
    """

    preset = "la-inverse-b1const-clipglobal"


class LAInverseB1ConstClipLayer(LayerwiseAdam):
    """LA variant 'la-inverse-b1const-cliplayer': inverse per-layer scaling, beta1 const, layer
    clipping (sections 5, 6).
    """

    preset = "la-inverse-b1const-cliplayer"


class LAInverseB1DepthClipGlobal(LayerwiseAdam):
    """LA variant 'la-inverse-b1depth-clipglobal': inverse per-layer scaling, beta1 depth, global
    clipping (sections 5, 6).
    """

    preset = "la-inverse-b1depth-clipglobal"


class LAInverseB1DepthClipLayer(LayerwiseAdam):
    """LA variant 'la-inverse-b1depth-cliplayer': inverse per-layer scaling, beta1 depth, layer
    clipping (sections 5, 6).
    """

    preset = "la-inverse-b1depth-cliplayer"


OPTIMIZER_CLASSES: dict[str, type[LayerwiseAdam]] = {
    cls.preset: cls for cls in LayerwiseAdam.__subclasses__() if cls.__module__ == __name__}
_missing = set(OPTIMIZER_PRESETS) ^ set(OPTIMIZER_CLASSES)
assert not _missing, f"optimizer presets without a class (or classes without a preset): {_missing}"
assert all(cls.__name__ == class_name(name) for name, cls in OPTIMIZER_CLASSES.items())
OPTIMIZER_CLASSES = {name: OPTIMIZER_CLASSES[name] for name in OPTIMIZER_PRESETS}  # the presets' order


def register_torch_aliases() -> None:
    """Expose every class as ``torch.optim.<ClassName>`` (never replacing a torch class)."""
    for cls in OPTIMIZER_CLASSES.values():
        existing = getattr(torch.optim, cls.__name__, None)
        if existing is None or getattr(existing, "preset", None) is not None:
            setattr(torch.optim, cls.__name__, cls)
