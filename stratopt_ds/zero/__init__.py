"""The ZeRO partition map and the per-layer norm reduction (docs/ALGORITHMS.md section 8)."""
from .binding import ZeroBinding, attach, find_wrapper
from .partition_map import UnsupportedZeroSetting
from .reduction import LayerSqAllReduce

__all__ = ["ZeroBinding", "attach", "find_wrapper", "UnsupportedZeroSetting", "LayerSqAllReduce"]
