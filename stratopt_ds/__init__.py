"""stratopt-ds: layer-adaptive optimizers (StratOpt and family) for DeepSpeed pretraining.

``import stratopt_ds`` registers every optimizer class as ``torch.optim.<ClassName>``.
"""
from .optim import (OPTIMIZER_CLASSES, LayerwiseAdam, available_optimizers, create_optimizer,
                    register_torch_aliases)

from . import zero  # noqa: E402  (the ZeRO binding; imports no deepspeed until used)

__version__ = "0.1.0"

register_torch_aliases()
globals().update({cls.__name__: cls for cls in OPTIMIZER_CLASSES.values()})

__all__ = ["available_optimizers", "create_optimizer", "LayerwiseAdam", "OPTIMIZER_CLASSES",
           *[cls.__name__ for cls in OPTIMIZER_CLASSES.values()]]
