"""stratopt-ds. `pip install -e .` needs no compiler; native ops come with STRATOPT_BUILD_OPS=1."""
from setuptools import find_packages, setup

setup(
    name="stratopt-ds",
    version="0.1.0",
    description="Layer-adaptive optimizers (StratOpt and family) for DeepSpeed LLM pretraining",
    packages=find_packages(include=["stratopt_ds", "stratopt_ds.*"]),
    python_requires=">=3.10",
    # torch is deliberately a floor, not a pin: an installed torch must never be upgraded.
    install_requires=["torch>=2.1", "numpy", "tqdm"],
    extras_require={
        "train": ["transformers>=4.40", "tokenizers", "datasets", "deepspeed>=0.14", "accelerate"],
        "test": ["pytest"],
    },
    entry_points={"console_scripts": ["stratopt-train=stratopt_ds.train:main"]},
)
