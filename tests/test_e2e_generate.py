"""End to end: `moespac generate` on the tiny offline model with draft_model speculative decoding,
through vLLM, with the plugin on (cache_ratio 0.5) and off. Two engines, started side by side in
subprocesses (each ~10-40 s on 2 cores): the module shares them across its tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from moespac_vllm.models.tiny import make_tiny_model

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[dict, str]]:
    root = tmp_path_factory.mktemp("e2e")
    paths = make_tiny_model(root / "tiny", "qwen3_moe", draft=True)
    trace_path = str(root / "generate_trace.npz")
    common = [sys.executable, "-m", "moespac_vllm.cli", "generate", "--model", str(paths.target),
              "--draft", str(paths.draft), "--num-speculative-tokens", "3",
              "--max-tokens", str(MAX_TOKENS), "--num-prompts", "4", "--json"]
    argv = {
        "on": [*common, "--moespac-config",
               json.dumps({"cache_ratio": 0.5, "record_trace": trace_path})],
        "off": [*common, "--no-plugin"],
    }
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MOESPAC_", "VLLM_PLUGINS"))}
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    procs = {k: subprocess.Popen(a, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for k, a in argv.items()}
    out = {}
    for k, p in procs.items():
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, f"{k}: rc={p.returncode}\n{stdout[-2000:]}\n{stderr[-3000:]}"
        record = json.loads(stdout.strip().splitlines()[-1])
        out[k] = (record, stdout)
    out["trace_path"] = trace_path
    return out


def test_prints_text_speed_acceptance_and_the_plugin_line(runs):
    record, stdout = runs["on"]
    assert "--- prompt 0:" in stdout and "    output: " in stdout
    assert record["output_tokens"] == 4 * MAX_TOKENS
    assert record["tokens_per_s"] > 0 and "tokens/s" in stdout
    assert record["k"] == 3 and record["acceptance_rate"] is not None
    assert "speculative decoding (draft_model, k=3): acceptance" in stdout
    # the tiny draft shares the target's embeddings: some draft tokens must be accepted
    assert record["acceptance_rate"] > 0.1
    assert record["mean_accepted_length"] > 1.0
    assert record["moespac"]["cache_ratio"] == 0.5
    assert record["plugin"] in stdout
    assert "plugin not loaded" not in record["plugin"]
    assert "moespac: plugin loaded (vLLM " in stdout  # the register() log line


def test_no_plugin_runs_stock_vllm(runs):
    record, stdout = runs["off"]
    assert record["plugin"] == "moespac: plugin not loaded (VLLM_PLUGINS excludes moespac)"
    assert "moespac: plugin loaded" not in stdout


def test_outputs_identical_with_and_without_the_plugin(runs):
    assert runs["on"][0]["output_sha256"] == runs["off"][0]["output_sha256"]


def test_record_trace_is_written_by_generate(runs):
    from moespac_vllm.trace import load_trace

    trace = load_trace(runs["trace_path"])
    assert trace.num_steps > 0
    assert trace.dims.num_experts == 16
