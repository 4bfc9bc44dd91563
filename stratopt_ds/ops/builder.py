"""Build or load the native StratOpt ops (in the spirit of DeepSpeed's op_builder).

Order of attempts for each op (``cpu``, ``cuda``):

1. the prebuilt extension, if ``STRATOPT_BUILD_OPS=1 pip install -e .`` built it
   (``stratopt_ds.ops._stratopt_cpu`` / ``stratopt_ds.ops._stratopt_cuda``);
2. a JIT build with ``torch.utils.cpp_extension.load`` and ninja at first use, cached in
   ``$STRATOPT_OPS_CACHE`` (default ``$TORCH_EXTENSIONS_DIR/stratopt_ds`` or
   ``~/.cache/stratopt_ds/torch_extensions``), keyed by the source hash, torch version and
   Python version, so a rerun only loads the shared library;
3. nothing: :func:`load` returns None and remembers why (:func:`why_unavailable`); the
   dispatcher then falls back to the PyTorch reference with one warning per process.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Optional

import torch

PACKAGE_DIR = Path(__file__).resolve().parent
# A wheel install carries the sources in the package (setup.py copies them); a checkout or an
# editable install reads csrc/ at the repository root.
CSRC = PACKAGE_DIR / "csrc" if (PACKAGE_DIR / "csrc").is_dir() else PACKAGE_DIR.parents[1] / "csrc"

CPU_SOURCES = ["cpu/stratopt_cpu.cpp"]
CPU_DEPENDS = ["cpu/stratopt_cpu_kernels.inc", "common/update_scalars.h", "common/op_checks.h"]
CUDA_SOURCES = ["cuda/stratopt_cuda_binding.cpp", "cuda/stratopt_cuda.cu"]
CUDA_DEPENDS = ["cuda/stratopt_cuda.h", "common/update_scalars.h", "common/op_checks.h"]

# -ffp-contract=off: no variant may fuse a multiply and an add where the reference rounds twice.
CPU_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]
CPU_LDFLAGS = ["-fopenmp"]
CUDA_CFLAGS = ["-O3"]
# No --use_fast_math: sqrt and division must round like the reference.
NVCC_FLAGS = ["-O3", "--fmad=false", "-lineinfo"]

_lock = threading.Lock()
_cache: dict[str, object] = {}
_why: dict[str, str] = {}


def cache_dir() -> Path:
    if os.environ.get("STRATOPT_OPS_CACHE"):
        return Path(os.environ["STRATOPT_OPS_CACHE"])
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "stratopt_ds"
    return Path.home() / ".cache" / "stratopt_ds" / "torch_extensions"


def _source_hash(files: list[str], extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for rel in files:
        h.update(rel.encode())
        h.update((CSRC / rel).read_bytes())
    return h.hexdigest()[:12]


def cuda_toolchain_problem() -> Optional[str]:
    """Why a CUDA op cannot be built or run here, or None."""
    if torch.version.cuda is None:
        return "torch built without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device visible"
    from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return "nvcc not found (set CUDA_HOME)"
    return None


def jit_kwargs(kind: str) -> dict:
    """Sources, include path and flags of the ``cpp_extension.load`` build of ``kind``; also
    used by tools/check_cuda_glue.py, so that the link check builds exactly this."""
    sources = CPU_SOURCES if kind == "cpu" else CUDA_SOURCES
    kwargs = dict(sources=[str(CSRC / s) for s in sources], extra_include_paths=[str(CSRC / kind)])
    if kind == "cpu":
        kwargs.update(extra_cflags=CPU_CFLAGS, extra_ldflags=CPU_LDFLAGS)
    else:
        kwargs.update(extra_cflags=CUDA_CFLAGS, extra_cuda_cflags=NVCC_FLAGS, with_cuda=True)
    return kwargs


def _jit(kind: str):
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None and not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja)")
    sources = CPU_SOURCES if kind == "cpu" else CUDA_SOURCES
    depends = CPU_DEPENDS if kind == "cpu" else CUDA_DEPENDS
    missing = [s for s in sources + depends if not (CSRC / s).is_file()]
    if missing:
        raise RuntimeError(f"sources not found under {CSRC}: {missing}")
    tag = f"{torch.__version__}|{sys.version_info[:2]}|{kind}"
    name = f"stratopt_{kind}_{_source_hash(sources + depends, tag)}"
    build_dir = cache_dir() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(name=name, build_directory=str(build_dir),
                              verbose=os.environ.get("STRATOPT_OPS_VERBOSE") == "1", **jit_kwargs(kind))


def _load(kind: str):
    if kind == "cuda":
        problem = cuda_toolchain_problem()
        if problem:
            raise RuntimeError(problem)
    try:
        return importlib.import_module(f"stratopt_ds.ops._stratopt_{kind}")
    except ImportError:
        pass
    return _jit(kind)


def load(kind: str):
    """The native module for ``kind`` ('cpu' or 'cuda'), or None (see :func:`why_unavailable`)."""
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"unknown op kind {kind!r}; expected 'cpu' or 'cuda'")
    with _lock:
        if kind in _cache:
            return _cache[kind]
        if kind in _why:
            return None
        try:
            module = _load(kind)
        except Exception as exc:  # a missing compiler, a failed build: remember why
            _why[kind] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}"
            return None
        _cache[kind] = module
        return module


def why_unavailable(kind: str) -> Optional[str]:
    return _why.get(kind)


def prebuilt(kind: str) -> bool:
    return importlib.util.find_spec(f"stratopt_ds.ops._stratopt_{kind}") is not None
