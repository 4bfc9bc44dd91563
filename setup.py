"""stratopt-ds (metadata in pyproject.toml). `pip install -e .` needs no compiler; native ops come
with STRATOPT_BUILD_OPS=1.

``STRATOPT_BUILD_OPS=1 pip install --no-build-isolation -e .`` prebuilds the CPU op
(``stratopt_ds.ops._stratopt_cpu``) and, when torch has CUDA and nvcc is found, the CUDA op
(``stratopt_ds.ops._stratopt_cuda``). Without it the ops are JIT-built at first use
(``python -m stratopt_ds.ops`` shows the state).
"""
import os
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

CSRC = Path(__file__).resolve().parent / "csrc"


class BuildPyWithSources(build_py):
    """Ship csrc/ inside the package (stratopt_ds/ops/csrc), so that a regular, non-editable
    install can still JIT-build the ops at first use; an editable install reads csrc/ in place."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "stratopt_ds" / "ops" / "csrc"
        for src in sorted(CSRC.rglob("*")):
            if src.is_file() and src.suffix in (".cpp", ".cu", ".h", ".inc"):
                dest = target / src.relative_to(CSRC)
                dest.parent.mkdir(parents=True, exist_ok=True)
                self.copy_file(str(src), str(dest))


cmdclass = {"build_py": BuildPyWithSources}
kwargs = {}
if os.environ.get("STRATOPT_BUILD_OPS", "0") == "1":
    import importlib.util

    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    # Sources and flags from the JIT builder itself (it imports only the standard library and
    # torch), so that a prebuilt op is compiled exactly like a JIT-built one.
    spec = importlib.util.spec_from_file_location("_builder", "stratopt_ds/ops/builder.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    ext = [CppExtension("stratopt_ds.ops._stratopt_cpu", [f"csrc/{s}" for s in builder.CPU_SOURCES],
                        include_dirs=["csrc/cpu"], extra_compile_args=builder.CPU_CFLAGS,
                        depends=[f"csrc/{s}" for s in builder.CPU_DEPENDS],
                        extra_link_args=builder.CPU_LDFLAGS)]
    if torch.version.cuda is not None and (CUDA_HOME is not None or shutil.which("nvcc")):
        ext.append(CUDAExtension(
            "stratopt_ds.ops._stratopt_cuda", [f"csrc/{s}" for s in builder.CUDA_SOURCES],
            include_dirs=["csrc/cuda"], depends=[f"csrc/{s}" for s in builder.CUDA_DEPENDS],
            extra_compile_args={"cxx": builder.CUDA_CFLAGS, "nvcc": builder.NVCC_FLAGS}))
    kwargs = dict(ext_modules=ext)
    cmdclass["build_ext"] = BuildExtension

# Metadata, dependencies, extras and console scripts are in pyproject.toml; here only what takes
# code: the package list, csrc/ shipped inside the package, and the optional native ops.
setup(
    packages=find_packages(include=["stratopt_ds", "stratopt_ds.*"]),
    package_data={"stratopt_ds.study": ["plans/*.yaml", "README.md"]},
    cmdclass=cmdclass,
    **kwargs,
)
