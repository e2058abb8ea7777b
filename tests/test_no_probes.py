"""Seams are typed, never probed (STYLE.md). Our own objects meet through `Protocol`s checked where
they are built; a probe of our own code hides a broken contract (it is how a configured cost profile
came to be ignored: `default_costs` probed `cost_model` for functions that did not exist).

The rule this test enforces over moespac_vllm/, kernels/, patches/ and benchmarks/:
- A probe is a lookup that tolerates absence or hides the attribute's name: any `hasattr(...)`,
  any `getattr(obj, name, default)`, and any `getattr(obj, "literal")`.
- `getattr(obj, name)` with a computed name and no default is reflection, not a probe (a loop over
  a dataclass's `fields(self)`, argparse destinations, a descriptor's array name): it raises when
  the attribute is missing, so it hides nothing.
- The core (moespac_vllm/ outside patches, kernels/) holds no probe at all. The glue (patches/) and
  the benchmarks may probe only what is listed in ALLOWED: vLLM / torch / platform objects that
  differ by version or by kind, each with the reason. A new probe fails here until it is either
  replaced by a typed seam or added to ALLOWED with its reason.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("moespac_vllm/**/*.py", "kernels/*.py", "patches/*.py", "benchmarks/*.py")
PROBE_TOLERANT = ("patches/", "benchmarks/")

# (file, the call's source text) -> why this probe of a foreign object stays
ALLOWED: dict[tuple[str, str], str] = {
    ("patches/routed_experts.py", "hasattr(torch.ops.vllm, OP_NAME)"):
        "torch's op namespace vLLM registers into: register our op once per process",
    ("patches/routed_experts.py", "hasattr(torch.ops.vllm, DRAFT_OP_NAME)"):
        "torch's op namespace vLLM registers into: register our op once per process",
    ("patches/plugin.py", 'getattr(func, "_moespac_wrapped", False)'):
        "patch idempotence: the marker our wrapper sets on vLLM's function",
    ("patches/spec_hook.py", 'getattr(original, "_moespac_wrapped", False)'):
        "patch idempotence: the marker our wrapper sets on vLLM's function",
    ("patches/engine_config.py", 'getattr(original, "_moespac_wrapped", False)'):
        "patch idempotence: the marker our wrapper sets on vLLM's function",
    ("patches/plugin.py", 'getattr(vllm_config, "additional_config", None)'):
        "vLLM config objects (VllmConfig 0.32/0.33, or a partial one before post-init)",
    ("patches/plugin.py", 'getattr(current, "additional_config", None)'):
        "vLLM config objects (VllmConfig 0.32/0.33, or a partial one before post-init)",
    ("patches/engine_config.py", 'getattr(vllm_config, "additional_config", None)'):
        "vLLM config objects (VllmConfig 0.32/0.33, or a partial one before post-init)",
    ("patches/engine_config.py", 'getattr(vllm_config, "model_config", None)'):
        "vLLM config objects (VllmConfig 0.32/0.33, or a partial one before post-init)",
    ("patches/engine_config.py", 'getattr(model_config, "enforce_eager", False)'):
        "vLLM ModelConfig (0.32/0.33)",
    ("patches/engine_config.py", 'getattr(model_config, "is_moe", True)'):
        "vLLM ModelConfig (0.32/0.33)",
    ("patches/engine_config.py", 'getattr(mode, "name", mode)'):
        "vLLM's cudagraph_mode: a CUDAGraphMode member or the user's raw string",
    ("patches/engine_config.py", 'getattr(self, "compilation_config", None)'):
        "vLLM EngineArgs: compilation_config is a dict, a CompilationConfig or absent",
    ("patches/engine_config.py", 'getattr(user_cc, "cudagraph_mode", None)'):
        "vLLM EngineArgs: compilation_config is a dict, a CompilationConfig or absent",
    ("patches/spec_hook.py", 'getattr(out, "sampled_token_ids", None)'):
        "vLLM runner outputs: ModelRunnerOutput has sampled_token_ids, others (None, "
        "AsyncModelRunnerOutput) do not",
    ("patches/spec_hook.py", 'getattr(result, "sampled_token_ids", None)'):
        "vLLM runner outputs: ModelRunnerOutput has sampled_token_ids, others do not",
    ("patches/spec_hook.py", 'getattr(runner, "model", None)'):
        "vLLM model runners: `model` is set by load_model, absent before",
    ("patches/spec_hook.py", 'getattr(runner, "speculative_config", None)'):
        "vLLM model runners (V1 and V2 differ)",
    ("patches/spec_hook.py", 'getattr(runner, "speculator", None)'):
        "vLLM model runners: only the V2 runner has a speculator",
    ("benchmarks/bench_cpu_experts.py", 'hasattr(ops, "cpu_fused_moe")'):
        "vLLM's torch.ops._C: only vLLM's CPU builds register cpu_fused_moe",
    ("benchmarks/bench_cpu_experts.py", 'hasattr(os, "getloadavg")'):
        "platform: os.getloadavg is POSIX-only",
}


def _files() -> list[Path]:
    return sorted({p for pattern in SCANNED for p in REPO.glob(pattern)})


def probes(path: Path) -> list[tuple[int, str]]:
    """(line, source text) of every probe in one file (the rule in the module docstring)."""
    src = path.read_text()
    out = []
    for node in ast.walk(ast.parse(src)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr")):
            continue
        literal = len(node.args) > 1 and isinstance(node.args[1], ast.Constant)
        if node.func.id == "hasattr" or len(node.args) == 3 or literal:
            out.append((node.lineno, ast.get_source_segment(src, node) or ""))
    return out


def test_no_probe_outside_the_allow_list():
    files = _files()
    assert len(files) > 30 and any(f.name == "engine.py" for f in files)
    bad = []
    for path in files:
        rel = path.relative_to(REPO).as_posix()
        for line, text in probes(path):
            if not rel.startswith(PROBE_TOLERANT):
                bad.append(f"{rel}:{line} {text}  (the core probes nothing: use a Protocol)")
            elif (rel, text) not in ALLOWED:
                bad.append(f"{rel}:{line} {text}  (typed seam, or ALLOWED with its reason)")
    assert bad == []


def test_allowed_probes_are_all_vllm_facing():
    assert all(path.startswith(PROBE_TOLERANT) and reason for (path, _), reason in ALLOWED.items())


@pytest.mark.parametrize("code, found", [
    ('getattr(self.engine, "resident_slots", None)', True),
    ("getattr(x, 'value')", True),
    ("hasattr(bank, name)", True),
    ("getattr(self, name)", False),  # a field loop: raises when missing
    ("getattr(torch.ops.vllm, OP_NAME)(x)", False),
])
def test_the_rule_finds_probes_and_spares_reflection(tmp_path, code, found):
    f = tmp_path / "m.py"
    f.write_text(f"def f(self, x, bank, name, torch, OP_NAME):\n    return {code}\n")
    assert bool(probes(f)) is found
