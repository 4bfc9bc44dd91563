#!/usr/bin/env python
"""Compile and link the CUDA op (kernels + torch glue) on a machine without a GPU.

The CPU torch wheel has no c10/ATen CUDA headers or CUDA libraries, so the JIT build of
``stratopt_ds.ops._stratopt_cuda`` cannot even be compiled against it. This script runs the
*same* JIT build (``torch.utils.cpp_extension.load`` with the flags of
``stratopt_ds/ops/builder.py``: torch's include paths, its nvcc defines, ``-std`` and arch
flags) against the headers and libraries of a CUDA build of the same torch version, and links
with ``-Wl,--no-undefined`` so that every symbol the op uses must exist in those libraries.
Nothing is loaded or run.

    python tools/check_cuda_glue.py --fetch ~/.cache/stratopt_ds/cuda_torch   # once, ~0.5 GB
    python tools/check_cuda_glue.py --torch-dir ~/.cache/stratopt_ds/cuda_torch/torch

``--fetch DIR`` downloads the CUDA torch wheel of the installed torch version from PyPI and
unpacks only ``torch/include`` and ``torch/lib``. ``tests/test_ops.py`` runs the check when
``STRATOPT_CUDA_TORCH_DIR`` names such a ``torch`` directory.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHS = "8.0;9.0"  # A100 and H100/H200


def cuda_home() -> Path:
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if candidate and (Path(candidate) / "include" / "cuda_runtime_api.h").is_file():
            return Path(candidate)
    nvcc = shutil.which("nvcc")
    if nvcc:  # nvcc may be a symlink or a wrapper outside the toolkit (e.g. /usr/local/bin)
        for base in (Path(nvcc).resolve().parents[1], Path("/usr/local/cuda")):
            if (base / "include" / "cuda_runtime_api.h").is_file():
                return base
    raise SystemExit("CUDA toolkit not found: set CUDA_HOME to a directory with "
                     "include/cuda_runtime_api.h")


def fetch(dest: Path) -> Path:
    """Download the CUDA wheel of the installed torch version; unpack include/ and lib/."""
    import torch

    version = torch.__version__.split("+")[0]
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # --isolated and an explicit index: a local find-links of CPU wheels must not answer
        cmd = [sys.executable, "-m", "pip", "download", "--isolated", "--no-deps", "--only-binary=:all:",
               "--index-url", "https://pypi.org/simple", f"torch=={version}", "-d", tmp]
        subprocess.run(cmd, check=True, env={**os.environ, "PIP_CONFIG_FILE": os.devnull})
        wheels = list(Path(tmp).glob("torch-*.whl"))
        if len(wheels) != 1:
            raise SystemExit(f"expected one torch wheel from {' '.join(cmd)}, got {wheels}")
        with zipfile.ZipFile(wheels[0]) as whl:
            names = [n for n in whl.namelist()
                     if n.startswith(("torch/include/", "torch/lib/")) or n == "torch/version.py"]
            whl.extractall(dest, members=names)
    torch_dir = dest / "torch"
    print(f"CUDA torch headers and libraries in {torch_dir}")
    return torch_dir


def check(torch_dir: Path, build_dir: Path) -> Path:
    """Build the CUDA op against ``torch_dir``; return the linked shared library."""
    torch_dir = torch_dir.resolve()
    if not (torch_dir / "include" / "c10" / "cuda" / "CUDAStream.h").is_file():
        raise SystemExit(f"{torch_dir} is not the torch directory of a CUDA build "
                         f"(no include/c10/cuda/CUDAStream.h); use --fetch")
    version_file = torch_dir / "version.py"
    version = re.search(r"__version__ = '([^']+)'", version_file.read_text()) if version_file.is_file() else None
    home = cuda_home()
    os.environ["TORCH_CUDA_ARCH_LIST"] = ARCHS
    from torch.utils import cpp_extension

    sys.path.insert(0, str(ROOT))
    from stratopt_ds.ops import builder

    # Point the JIT builder at the CUDA build's headers and libraries. These module attributes
    # are where cpp_extension reads them; fail loudly if a torch release renames them.
    for attr in ("_TORCH_PATH", "TORCH_LIB_PATH", "CUDA_HOME"):
        if not hasattr(cpp_extension, attr):
            raise SystemExit(f"torch.utils.cpp_extension has no {attr}: update this script")
    cpp_extension._TORCH_PATH = str(torch_dir)
    cpp_extension.TORCH_LIB_PATH = str(torch_dir / "lib")
    cpp_extension.CUDA_HOME = str(home)
    libdirs = [d for d in (home / "lib64", home / "lib") if d.is_dir()]
    py_libdir = sysconfig.get_config_var("LIBDIR")
    py_lib = f"python{sysconfig.get_config_var('LDVERSION')}"
    ldflags = [f"-L{d}" for d in libdirs] + [f"-L{py_libdir}", f"-l{py_lib}", "-Wl,--no-undefined"]
    build_dir.mkdir(parents=True, exist_ok=True)
    name = "stratopt_cuda_glue_check"
    kwargs = builder.jit_kwargs("cuda")  # the JIT build's sources and flags, plus the checks
    kwargs["extra_cflags"] = kwargs["extra_cflags"] + ["-Wall"]
    try:
        cpp_extension.load(name=name, build_directory=str(build_dir), extra_ldflags=ldflags,
                           verbose=True, **kwargs)
    except ImportError:
        pass  # built and linked; this (CPU) torch cannot load a CUDA op, and need not
    except OSError as exc:  # dlopen of the CUDA op from the CPU torch: likewise expected
        if "lib" not in str(exc):
            raise
    library = build_dir / f"{name}.so"
    if not library.is_file():
        raise SystemExit(f"the build produced no {library}")
    print(f"OK: {library} compiled and linked against {torch_dir} "
          f"(torch {version.group(1) if version else 'of unknown version'})")
    return library


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch-dir", type=Path, help="torch/ of a CUDA build (include/, lib/)")
    parser.add_argument("--fetch", type=Path, metavar="DIR",
                        help="download and unpack the CUDA torch wheel into DIR first")
    parser.add_argument("--build-dir", type=Path, help="where to build (default: a temp dir)")
    args = parser.parse_args()
    torch_dir = fetch(args.fetch) if args.fetch else args.torch_dir
    if torch_dir is None:
        parser.error("give --torch-dir or --fetch")
    if args.build_dir:
        check(torch_dir, args.build_dir)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            check(torch_dir, Path(tmp))


if __name__ == "__main__":
    main()
