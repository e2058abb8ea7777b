"""Shared fixtures: where the real data lives, and clean skipping of what the machine cannot run."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

from moespac_vllm.config import shared_data_dir


def load_benchmark(name: str) -> ModuleType:
    """Import benchmarks/<name>.py (benchmarks are scripts, not a package) for a smoke test."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data. Missing data fails on CI (it must be there) and skips elsewhere."""
    d = shared_data_dir()
    if d is None:
        if os.environ.get("CI"):
            pytest.fail("../shared/data is missing on CI; set MOESPAC_DATA_DIR")
        pytest.skip("real data not found: set MOESPAC_DATA_DIR or put shared/data beside the repo")
    return d


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip_gpu = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
