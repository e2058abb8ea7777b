"""End to end through `vllm.LLM` on vLLM's default compile path (no `enforce_eager`), as a user's
first run would go (issue 10's done-when), on the tiny Qwen3-MoE with its MoE draft:

- plugin on (cache_ratio 0.25, draft_model k=3; record_trace into a directory that does not exist
  yet): greedy outputs identical to stock vLLM's, the trace written (its directory created);
- plugin installed but not enabled (`VLLM_PLUGINS=moespac`, no moespac setting): stock outputs and
  exactly one `moespac: installed, not enabled (...)` line, no offloading;
- `moespac generate` with `profile: /no/such.json` exits non-zero at start with a message naming
  `profile`.

Each engine is a child process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), two at a time (2 cores);
`python tests/test_e2e_compiled.py '<json>'` runs one child by hand."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
MAX_TOKENS = 16
K_SPEC = 3
PROMPTS = ("def fibonacci(n):", "import os\nclass Path:", "for item in range(10):",
           "The standard library module for", "return self.value if", "while True:\n    data")


def child(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    kw = dict(model=spec["model"], dtype="bfloat16", max_model_len=512, seed=0,
              kv_cache_memory_bytes=64 << 20, max_num_seqs=4,
              speculative_config={"method": "draft_model",
                                  "model": str(Path(spec["model"]) / "moe-draft"),
                                  "num_speculative_tokens": K_SPEC})
    if spec.get("moespac") is not None:
        kw["additional_config"] = {"moespac": spec["moespac"]}
    llm = LLM(**kw)
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate(list(PROMPTS), sp, use_tqdm=False)
    result = {"ids": [list(o.outputs[0].token_ids) for o in outs],
              "mode": str(llm.llm_engine.vllm_config.compilation_config.mode),
              "enforce_eager": llm.llm_engine.vllm_config.model_config.enforce_eager}
    if spec.get("moespac") is not None:
        from moespac_vllm.patches import routed_experts

        rt = routed_experts.latest_runtime()
        rt.close()
        result["stats"] = rt.summary()
    return result


def _spawn(spec: dict, plugins: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOESPAC_")}
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_PLUGINS=plugins, PYTHONFAULTHANDLER="1")
    return subprocess.Popen([sys.executable, __file__, json.dumps(spec)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen, name: str) -> tuple[dict, str]:
    stdout, stderr = proc.communicate(timeout=1200)
    assert proc.returncode == 0, f"{name}: rc={proc.returncode}\n{stderr[-4000:]}"
    line = [ln for ln in stdout.splitlines() if ln.startswith("{")][-1]
    return json.loads(line), stdout + stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    from moespac_vllm.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("compiled")
    model = str(make_tiny_model(root / "tiny", "qwen3_moe", moe_draft=True).target)
    trace = root / "no" / "such" / "dir" / "t.npz"
    on = {"model": model, "moespac": {"cache_ratio": 0.25, "record_trace": str(trace)}}
    out: dict = {"trace": trace}
    first = {"stock": _spawn({"model": model}, ""), "on": _spawn(on, "moespac")}
    for name, proc in first.items():
        out[name] = _result(proc, name)
    out["not_enabled"] = _result(_spawn({"model": model}, "moespac"), "not_enabled")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOESPAC_")}
    bad = subprocess.run(
        [sys.executable, "-m", "moespac_vllm.cli", "generate", "--model", model, "--no-spec",
         "--max-tokens", "2", "--num-prompts", "1",
         "--moespac-config", json.dumps({"profile": "/no/such.json"})],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out["bad_profile"] = (bad.returncode, bad.stdout + bad.stderr)
    return out


def test_compile_path_with_the_plugin_is_greedy_identical_to_stock(runs):
    stock, _ = runs["stock"]
    on, log = runs["on"]
    assert not stock["enforce_eager"] and not on["enforce_eager"]
    assert on["mode"] == stock["mode"]  # torch.compile kept
    assert on["ids"] == stock["ids"]
    s = on["stats"]
    assert s["slots_per_layer"] == 4 and s["num_experts"] == 16
    assert s["cpu_pairs"] > 0 and s["decode_steps"] > 0  # it really offloaded
    assert log.count("moespac: offloading") == 1 and "cache_ratio 0.25" in log


def test_record_trace_into_a_missing_directory_is_written(runs):
    from moespac_vllm.trace import load_trace

    assert runs["trace"].is_file()
    assert load_trace(str(runs["trace"])).num_steps > 0


def test_installed_but_not_enabled_is_stock_with_one_line(runs):
    stock, _ = runs["stock"]
    off, log = runs["not_enabled"]
    assert off["ids"] == stock["ids"]
    assert log.count("moespac: installed, not enabled (") == 1, log[-3000:]
    assert "moespac: offloading" not in log and "moespac: plugin loaded" not in log


def test_a_missing_profile_stops_generate_naming_profile(runs):
    code, log = runs["bad_profile"]
    assert code != 0
    assert "profile: " in log and "/no/such.json" in log


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))), flush=True)
