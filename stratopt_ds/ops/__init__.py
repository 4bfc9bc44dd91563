"""Native StratOpt ops (C++ CPU, CUDA) behind one dispatch seam, with a PyTorch reference.

``python -m stratopt_ds.ops`` reports which backends are available and why not.
"""
from .dispatch import backend_setting, fragment_sumsq, fragment_update, use_backend

__all__ = ["backend_setting", "fragment_sumsq", "fragment_update", "use_backend"]
