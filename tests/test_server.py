"""`moespac serve` on loopback, with vLLM's default compilation (no `--enforce-eager`), draft_model
speculative decoding (k=3, the MoE draft) and cache_ratio 0.25: 50 greedy requests at concurrency 4
to /v1/completions and /v1/chat/completions all answer 200 with the same text as STOCK vLLM's
offline greedy generation (plugin not loaded, same engine settings), the engine processes offload
(the `moespac: offloading` line: the opt-in reached them from the API server), the server's
`/metrics` carries the plugin's `moespac_*` series equal to the stats file's latest totals (the
engine process's numbers crossed to the API process), and the server shuts down cleanly when its
PID gets SIGTERM.

The offline reference runs in a child process (tests/test_e2e_offload.py's pattern): stock vLLM,
`LLM.generate` for the completion prompts and `LLM.chat` for the chat ones."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import load_benchmark

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
MAX_TOKENS = 16
N_REQUESTS = 50
CONCURRENCY = 4
MOESPAC = {"cache_ratio": 0.25}
K_SPEC = 3
ENGINE_ARGS = ["--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "4",
               "--seed", "0"]


def _speculative(model: str) -> dict:
    return {"method": "draft_model", "model": str(Path(model) / "moe-draft"),
            "num_speculative_tokens": K_SPEC}


def _prompts() -> list[str]:
    words = ("import", "def", "value", "return", "list", "for", "print", "class", "self", "data")
    return [" ".join(words[(i + j * j) % len(words)] for j in range(2 + (i * 5) % 30))
            for i in range(N_REQUESTS // 2)]


# loopback helpers shared with benchmarks/bench_soak.py (one copy)
_soak = load_benchmark("bench_soak")
_free_port, _children_of, _alive = _soak.free_port, _soak.descendants, _soak.alive
wait_healthy = _soak.wait_healthy


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {"error": e.read().decode(errors="replace")}


# moespac_* series -> the stats file's key each equals (seconds series from the *_ms keys)
METRIC_OF_STATS = {"moespac_expert_hits_total": "hits", "moespac_expert_misses_total": "misses",
                   "moespac_experts_fetched_total": "fetched_experts",
                   "moespac_device_experts_total": "device_experts",
                   "moespac_cpu_experts_total": "cpu_experts",
                   "moespac_cpu_expert_pairs_total": "cpu_pairs",
                   "moespac_h2d_bytes_total": "h2d_bytes",
                   "moespac_prefetch_issued_total": "prefetch_issued",
                   "moespac_prefetch_used_total": "prefetch_used",
                   "moespac_prefetch_wasted_total": "prefetch_wasted",
                   "moespac_prefetch_late_total": "prefetch_late",
                   "moespac_steps_total": "steps"}


def scrape(base: str) -> dict[str, float]:
    """The server's /metrics: `moespac_*` sample name (labels dropped) -> value."""
    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("moespac_"):
            name_labels, value = line.rsplit(" ", 1)
            out[name_labels.split("{", 1)[0]] = float(value)
    return out


def assert_metrics_equal_stats_file(base: str, stats_file: Path) -> None:
    deadline = time.monotonic() + 30
    while True:  # the engine writes the step's line and the series from one snapshot
        metrics = scrape(base)
        last = json.loads(stats_file.read_text().splitlines()[-1])
        diff = {m: (metrics.get(m), last[k]) for m, k in METRIC_OF_STATS.items()
                if metrics.get(m) != float(last[k])}
        if not diff or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not diff, f"/metrics differs from the stats file's last line: {diff}"
    assert metrics["moespac_expert_hits_total"] > 0 and metrics["moespac_cpu_experts_total"] > 0
    assert metrics["moespac_cache_ratio"] == 0.25
    assert metrics["moespac_cost_profile_info"] == 1
    for series, key in (("moespac_stall_seconds_total", "stall_ms"),
                        ("moespac_host_fused_expert_seconds_total", "host_fused_ms")):
        assert abs(metrics[series] - last[key] / 1e3) < 1e-6, series


def offline(model: str) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype="float32", max_model_len=512, seed=0,
              kv_cache_memory_bytes=64 << 20, max_num_seqs=4,
              speculative_config=_speculative(model))
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    comp = [o.outputs[0].text for o in llm.generate(_prompts(), sp, use_tqdm=False)]
    chat = [o.outputs[0].text for o in llm.chat([[{"role": "user", "content": p}]
                                                 for p in _prompts()], sp, use_tqdm=False)]
    return {"completions": comp, "chat": chat}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from moespac_vllm.models.tiny import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen3", "qwen3_moe",
                               draft=False, moe_draft=True).target)


def test_serve_answers_like_offline_and_stops_cleanly(tiny_model, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOESPAC_")}
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_PLUGINS="")  # stock vLLM
    ref_proc = subprocess.Popen([sys.executable, __file__, tiny_model], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    port = _free_port()
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115
    server_env = {k: v for k, v in os.environ.items() if not k.startswith("MOESPAC_")}
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moespac"), "serve", tiny_model, "--port", str(port),
         "--additional-config", json.dumps({"moespac": {
             **MOESPAC, "stats_file": str(tmp_path / "stats.jsonl"),
             "stats_interval_steps": 1}}),
         "--speculative-config", json.dumps(_speculative(tiny_model)), *ENGINE_ARGS],
        cwd=REPO, env=server_env, stdout=log, stderr=subprocess.STDOUT)
    stats_file = tmp_path / "stats.jsonl"
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(server, base, tmp_path / "server.log", 600)  # torch.compile, 2 cores

        prompts = _prompts()
        jobs = [("completions", i, {"model": tiny_model, "prompt": p, "max_tokens": MAX_TOKENS,
                                    "temperature": 0.0})
                for i, p in enumerate(prompts)]
        jobs += [("chat", i, {"model": tiny_model, "max_tokens": MAX_TOKENS, "temperature": 0.0,
                              "messages": [{"role": "user", "content": p}]})
                 for i, p in enumerate(prompts)]
        assert len(jobs) == N_REQUESTS

        def call(job):
            kind, i, body = job
            path = "/v1/completions" if kind == "completions" else "/v1/chat/completions"
            status, out = _post(base + path, body)
            if status != 200:
                return kind, i, status, out
            choice = out["choices"][0]
            text = choice["text"] if kind == "completions" else choice["message"]["content"]
            return kind, i, status, text

        with ThreadPoolExecutor(CONCURRENCY) as pool:
            answers = list(pool.map(call, jobs))
        bad = [(k, i, s, o) for k, i, s, o in answers if s != 200]
        assert not bad, bad[:3]
        # one request alone last: the engine's final step is a verify step, which reports
        assert call(jobs[0])[2] == 200
        assert_metrics_equal_stats_file(base, stats_file)

        stdout, stderr = ref_proc.communicate(timeout=600)
        assert ref_proc.returncode == 0, stderr[-4000:]
        ref = json.loads([ln for ln in stdout.splitlines() if ln.startswith("{")][-1])
        diff = [(k, i) for k, i, _, text in answers if text != ref[k][i]]
        assert not diff, f"{len(diff)} answers differ from stock offline greedy, e.g. {diff[:3]}"
        log_text = (tmp_path / "server.log").read_text()
        assert "moespac: offloading" in log_text and "cache_ratio 0.25" in log_text
        assert "'enforce_eager': True" not in log_text  # vLLM's compile path ran
    finally:
        kids = _children_of(server.pid)
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=60)
        finally:
            if server.poll() is None:
                server.kill()
            log.close()
            if ref_proc.poll() is None:
                ref_proc.kill()
    assert code in (0, -signal.SIGTERM), (tmp_path / "server.log").read_text()[-3000:]
    deadline = time.monotonic() + 30
    while any(_alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [k for k in kids if _alive(k)], "server children outlived it"


if __name__ == "__main__":
    print(json.dumps(offline(sys.argv[1])), flush=True)
