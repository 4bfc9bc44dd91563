"""``python -m stratopt_ds.ops``: which native backends are available, and why not."""
from __future__ import annotations

import time

import torch

from . import builder
from .dispatch import backend_setting


def main() -> None:
    print(f"STRATOPT_OPS={backend_setting()}  torch {torch.__version__}  cache {builder.cache_dir()}")
    print("reference: available (PyTorch, every device)")
    for kind in ("cpu", "cuda"):
        if kind == "cuda" and builder.cuda_toolchain_problem():
            print(f"cuda: unavailable ({builder.cuda_toolchain_problem()})")
            continue
        start = time.perf_counter()
        module = builder.load(kind)
        took = time.perf_counter() - start
        if module is None:
            print(f"{kind}: unavailable ({builder.why_unavailable(kind)})")
        else:
            how = "prebuilt" if builder.prebuilt(kind) else "JIT build, cached"
            extra = f", isa {module.isa()}" if kind == "cpu" else ""
            print(f"{kind}: available ({how}{extra}; loaded in {took:.1f} s from {module.__file__})")


if __name__ == "__main__":
    main()
