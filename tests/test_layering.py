"""The house rule: pure modules never import vLLM; only `moespac_vllm.patches` (the glue) may.

Each pure module is imported in a fresh interpreter where any `import vllm` raises, so a pure module
that reaches for vLLM (directly or through another module) fails here."""
from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import moespac_vllm

GLUE_PREFIXES = ("moespac_vllm.patches",)

_BLOCKER = """
import importlib.abc, sys
class _BlockVllm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError(f"layering: pure module imported {name}")
        return None
sys.meta_path.insert(0, _BlockVllm())
import importlib
for name in sys.argv[1:]:
    importlib.import_module(name)
print("ok", len(sys.argv) - 1)
"""


def _all_modules() -> list[str]:
    import importlib

    # kernels/ and patches/ are mapped into the namespace (setup.py package_dir), so an editable
    # install does not list them under moespac_vllm.__path__: walk each package on its own.
    names = set()
    for pkg in ("moespac_vllm", "moespac_vllm.kernels", "moespac_vllm.patches"):
        names.add(pkg)
        mod = importlib.import_module(pkg)
        for info in pkgutil.walk_packages(mod.__path__, prefix=pkg + "."):
            names.add(info.name)
    return sorted(names)


def pure_modules() -> list[str]:
    return [m for m in _all_modules() if not m.startswith(GLUE_PREFIXES)]


def test_glue_and_kernels_are_inside_the_package_namespace():
    import moespac_vllm.kernels
    import moespac_vllm.patches

    repo = Path(__file__).resolve().parents[1]
    assert Path(moespac_vllm.kernels.__file__).parent == repo / "kernels"
    assert Path(moespac_vllm.patches.__file__).parent == repo / "patches"


def test_pure_modules_import_without_vllm():
    mods = pure_modules()
    assert "moespac_vllm.config" in mods and "moespac_vllm.kernels" in mods
    out = subprocess.run(
        [sys.executable, "-c", _BLOCKER, *mods], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == f"ok {len(mods)}"


def test_blocker_really_blocks():
    out = subprocess.run(
        [sys.executable, "-c", _BLOCKER, "vllm"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode != 0
    assert "layering: pure module imported vllm" in out.stderr


@pytest.mark.parametrize("name", ["moespac_vllm"])
def test_importing_the_package_has_no_side_effects(name):
    out = subprocess.run(
        [sys.executable, "-c", f"import sys, {name}; print('vllm' in sys.modules, 'torch' in sys.modules)"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.stdout.split() == ["False", "False"], out.stderr
