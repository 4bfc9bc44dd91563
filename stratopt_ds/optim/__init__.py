"""The optimizer maths: presets, layer statistics and the update (docs/ALGORITHMS.md 1-7, 9, 10)."""
from .config import OPTIMIZER_PRESETS, preset_defaults
from .factory import available_optimizers, create_optimizer, named_param_groups
from .layer_stats import LayerStats, LayerStep
from .named import OPTIMIZER_CLASSES, class_name, register_torch_aliases
from .optimizer import LayerwiseAdam

__all__ = ["OPTIMIZER_PRESETS", "preset_defaults", "available_optimizers", "create_optimizer",
           "named_param_groups", "LayerStats", "LayerStep", "OPTIMIZER_CLASSES", "class_name",
           "register_torch_aliases", "LayerwiseAdam"]
