"""The house rules: pure modules never import vLLM; only `moespac_vllm.patches` (the glue) may. The
core (every module but the glue, the offline model builders `moespac_vllm.models` and the CLI)
imports nothing from the model builders, and no core module is above 800 lines. README's layout
block names the tree as it is.

Each pure module is imported in a fresh interpreter where any `import vllm` raises, so a pure module
that reaches for vLLM (directly or through another module) fails here; the core is imported the same
way with `moespac_vllm.models` blocked too, and its sources are read for lazy (in-function) imports
of the model builders, which an import-time check cannot see."""
from __future__ import annotations

import ast
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import moespac_vllm

GLUE_PREFIXES = ("moespac_vllm.patches",)
# Tools beside the core: the offline model builders and the CLI that drives them.
TOOL_MODULES = ("moespac_vllm.models", "moespac_vllm.cli")
MAX_CORE_LINES = 800

_BLOCKER = """
import importlib.abc, os, sys
BLOCKED = ["vllm"] + os.environ.get("LAYERING_BLOCK", "").split()
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        for b in BLOCKED:
            if name == b or name.startswith(b + "."):
                raise ImportError(f"layering: pure module imported {name}")
        return None
sys.meta_path.insert(0, _Block())
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


def _is_tool(name: str) -> bool:
    return any(name == t or name.startswith(t + ".") for t in TOOL_MODULES)


def core_modules() -> list[str]:
    return [m for m in pure_modules() if not _is_tool(m)]


def _source(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin, name
    return Path(spec.origin)


def core_sources() -> dict[str, Path]:
    """The core's Python sources (native extension modules `moespac_vllm._<stem>` have their
    own in csrc/)."""
    return {m: p for m in core_modules() if (p := _source(m)).suffix == ".py"}


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


def test_core_imports_nothing_from_the_model_builders():
    mods = core_modules()
    assert "moespac_vllm.engine" in mods and "moespac_vllm.trace.synthetic" in mods
    assert not any(m.startswith("moespac_vllm.models") for m in mods)
    env = {**os.environ, "LAYERING_BLOCK": "moespac_vllm.models"}
    out = subprocess.run(
        [sys.executable, "-c", _BLOCKER, *mods], capture_output=True, text=True, timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # lazy imports inside functions, which importing the module does not run
    offenders = []
    for name, path in core_sources().items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            targets = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if isinstance(node, ast.ImportFrom) and node.module == "moespac_vllm":
                targets = [f"moespac_vllm.{a.name}" for a in node.names]
            offenders += [f"{name}:{node.lineno} {t}" for t in targets
                          if t == "moespac_vllm.models" or t.startswith("moespac_vllm.models.")]
    assert offenders == []


def test_no_core_module_is_above_800_lines():
    sizes = {m: len(p.read_text().splitlines()) for m, p in core_sources().items()}
    assert len(sizes) > 10
    assert {m: n for m, n in sizes.items() if n > MAX_CORE_LINES} == {}


def test_model_builder_blocker_really_blocks():
    env = {**os.environ, "LAYERING_BLOCK": "moespac_vllm.models"}
    out = subprocess.run(
        [sys.executable, "-c", _BLOCKER, "moespac_vllm.models.tiny"], capture_output=True,
        text=True, timeout=120, env=env,
    )
    assert out.returncode != 0
    assert "layering: pure module imported moespac_vllm.models" in out.stderr


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


def _readme_layout() -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return text.split("## Layout", 1)[1].split("```")[1]


def test_readme_layout_matches_the_tree():
    """Every module and subpackage of moespac_vllm/, every glue module and every top-level folder
    is named in README's layout block, and every entry listed under moespac_vllm/ exists."""
    repo = Path(__file__).resolve().parents[1]
    block = _readme_layout()
    words = set(re.findall(r"[A-Za-z_][\w]*/?", block))
    pkg = repo / "moespac_vllm"
    want = {p.stem for p in pkg.glob("*.py") if p.stem != "__init__"}
    want |= {p.name + "/" for p in pkg.iterdir() if (p / "__init__.py").is_file()}
    want |= {p.stem for p in (repo / "patches").glob("*.py") if p.stem != "__init__"}
    want |= {d + "/" for d in ("moespac_vllm", "kernels", "csrc", "patches", "tests",
                               "benchmarks", "docs") if (repo / d).is_dir()}
    assert sorted(want - words) == [], "name these in README.md's Layout block"
    listed = re.findall(r"^  ([A-Za-z_]\w*/?)\s", block, flags=re.M)
    assert len(listed) > 10
    gone = [n for n in listed if not ((pkg / f"{n}.py").is_file()
                                      or (n.endswith("/") and (pkg / n / "__init__.py").is_file()))]
    assert gone == []
