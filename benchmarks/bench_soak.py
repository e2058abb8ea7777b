"""Soak `moespac serve` on loopback: sustained load, bad requests, cancels, a SIGKILL restart.

Starts `moespac serve` on 127.0.0.1 with the tiny pair (qwen3_moe target + MoE draft, draft_model
k=3), cache_ratio 0.25, stats_file and record_trace on; sends `--requests` (default 1,000) valid
requests at `--concurrency` (default 8), a mix of /v1/completions, /v1/chat/completions and
streaming completions, prompts of 1-400 tokens from the shared prompt sets (humaneval, spec-bench,
gsm8k); a few identical prompts repeat through the run and are compared with stock vLLM's
offline greedy output (plugin off, same engine settings, in a child process). Then (`--bad`)
malformed and invalid requests and 100 streams closed after their first chunk, each followed by a
valid request; then (`--restart`) the server is killed with SIGKILL mid-run and restarted on the
same port. Servers are stopped by their PID. Stdlib HTTP only.

    python benchmarks/bench_soak.py --json [--requests N] [--bad] [--restart]

JSON row: requests, errors (non-2xx on valid requests, connection errors, timeouts), p50_ms,
p99_ms, rss_mb_start / rss_mb_end (server + engine processes, after a 100-request warm-up),
rss_mb_by_process_start / _end ("pid:name" -> MB),
rss_growth, greedy_mismatches, stats_lines_valid, trace_valid, load (1-min load average at start
and end); with --bad: bad_inputs (name -> status), bad_ok; with --restart: restart_ok,
killed_stats_lines, killed_trace_steps.
"""
from __future__ import annotations

import argparse
import gzip
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_TOKENS = 16
K_SPEC = 3
MAX_MODEL_LEN = 512
WARMUP = 100
ENGINE_ARGS = ["--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "8",
               "--seed", "0", "--enforce-eager"]
REPEATED = 4  # distinct prompts sent again and again (greedy: same answer every time)


def speculative(model: str) -> dict:
    return {"method": "draft_model", "model": str(Path(model) / "moe-draft"),
            "num_speculative_tokens": K_SPEC}


def shared_prompts(n: int) -> list[str]:
    from moespac_vllm.config import shared_data_dir

    d = shared_data_dir()
    if d is None:
        raise SystemExit("shared data not found: set MOESPAC_DATA_DIR")
    rows: list[str] = []
    with gzip.open(d / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
        rows += [json.loads(line)["prompt"] for line in f]
    with open(d / "spec-bench" / "question.jsonl") as f:
        rows += [json.loads(line)["turns"][0] for line in f]
    with open(d / "gsm8k" / "test.jsonl") as f:
        rows += [json.loads(line)["question"] for line in f]
    random.Random(0).shuffle(rows)
    return rows[:n]


def clip_prompts(model: str, texts: list[str], seed: int = 0) -> list[str]:
    """Each text cut to a random length of 1-400 tokens of the model's tokenizer (repeated end
    to end when shorter), decoded back to text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    rng = random.Random(seed)
    out = []
    for t in texts:
        ids = tok.encode(t, add_special_tokens=False) or tok.encode("hello")
        n = rng.choice([rng.randint(1, 32), rng.randint(1, 400)])
        while len(ids) < n:
            ids = ids + ids
        out.append(tok.decode(ids[:n]))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> set[int]:
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                parent[int(d.name)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
    out, frontier = set(), {pid}
    while frontier:
        nxt = {c for c, p in parent.items() if p in frontier} - out
        out |= nxt
        frontier = nxt
    return out


def rss_by_process(pid: int) -> dict[str, float]:
    """VmRSS of pid and each descendant (the API server, the engine core), MB, keyed
    "<pid>:<name>" so growth can be put on the process that grew."""
    out: dict[str, float] = {}
    for p in sorted({pid} | descendants(pid)):
        try:
            status = Path(f"/proc/{p}/status").read_text().splitlines()
        except OSError:
            continue
        name = next((ln.split(None, 1)[1] for ln in status if ln.startswith("Name:")), "?")
        kb = next((int(ln.split()[1]) for ln in status if ln.startswith("VmRSS:")), 0)
        out[f"{p}:{name.strip()}"] = round(kb / 1024, 1)
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_healthy(proc: subprocess.Popen, base: str, log_path: Path, timeout_s: float) -> None:
    """Poll base/health once a second until 200; raises if proc exits (with its log's tail) or
    timeout_s passes. Shared by this soak and the server tests."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError("server exited:\n" + log_path.read_text()[-4000:])
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"server not healthy in {timeout_s:.0f} s")
        time.sleep(1)


class Server:
    """`moespac serve` on 127.0.0.1:port, logging to log_path; stopped by its PID."""

    def __init__(self, model: str, port: int, workdir: Path, tag: str = "") -> None:
        self.model, self.port, self.workdir = model, port, workdir
        self.stats_file = workdir / "stats.jsonl"
        self.trace = workdir / "trace.npz"
        self.log_path = workdir / f"server{tag}.log"
        self.base = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MOESPAC_")}
        self._log = open(self.log_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "moespac"), "serve", model, "--port", str(port),
             "--additional-config", json.dumps({"moespac": {
                 "cache_ratio": 0.25, "stats_file": str(self.stats_file),
                 "stats_interval_steps": 10, "record_trace": str(self.trace)}}),
             "--speculative-config", json.dumps(speculative(model)), *ENGINE_ARGS],
            cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout_s: float = 900) -> None:
        wait_healthy(self.proc, self.base, self.log_path, timeout_s)

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        kids = descendants(self.proc.pid)
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        try:
            code = self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            code = self.proc.wait(timeout=30)
        if sig == signal.SIGKILL:  # the engine core is a child: it goes with its parent's group?
            for k in kids:
                if alive(k):
                    os.kill(k, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while any(alive(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.5)
        self._log.close()
        return code


def post(base: str, path: str, body: bytes | dict, timeout: float = 300
         ) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def text_of(kind: str, status: int, raw: bytes) -> str | None:
    if status != 200:
        return None
    if kind == "stream":
        parts = []
        for line in raw.decode().splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                parts.append(json.loads(line[6:])["choices"][0].get("text", ""))
        return "".join(parts)
    choice = json.loads(raw)["choices"][0]
    return choice["text"] if kind == "completions" else choice["message"]["content"]


def request(base: str, model: str, kind: str, prompt: str) -> tuple[int, str | None, float]:
    body: dict = {"model": model, "max_tokens": MAX_TOKENS, "temperature": 0.0}
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = prompt
        body["stream"] = kind == "stream"
        path = "/v1/completions"
    t0 = time.perf_counter()
    try:
        status, raw = post(base, path, body)
        out = text_of(kind, status, raw)
    except (OSError, http.client.HTTPException, ValueError):
        status, out = -1, None
    return status, out, (time.perf_counter() - t0) * 1e3


def jobs_for(n: int, prompts: list[str], repeated: list[str], seed: int = 1
             ) -> list[tuple[str, str, int]]:
    """(kind, prompt, repeated-index or -1): every 10th request is a repeated prompt (as a
    completion, so it compares with offline `generate`)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 10 == 5:
            j = (i // 10) % len(repeated)
            out.append((rng.choice(["completions", "stream"]), repeated[j], j))
        else:
            out.append((rng.choice(["completions", "chat", "stream"]), rng.choice(prompts), -1))
    return out


def run_load(base: str, model: str, jobs, concurrency: int) -> list[tuple[int, str | None, float]]:
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda j: request(base, model, j[0], j[1]), jobs))


def stats_lines_valid(path: Path, allow_cut_last: bool = False) -> tuple[bool, int]:
    if not path.exists():
        return False, 0
    lines = path.read_text().split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    good = 0
    for i, line in enumerate(lines):
        try:
            json.loads(line)
            good += 1
        except json.JSONDecodeError:
            if not (allow_cut_last and i == len(lines) - 1):
                return False, good
    return good > 0, good


def trace_steps(path: Path) -> int:
    """Steps in the trace file; -1 when it does not load."""
    from moespac_vllm.trace import load_trace

    try:
        return load_trace(path).num_steps
    except (OSError, ValueError):
        return -1


# ---- bad requests -----------------------------------------------------------------------------
def bad_requests(base: str, model: str) -> dict[str, int]:
    """Each bad input, then a valid request; name -> the bad input's status (the valid one after
    it must be 200: key `<name>:after`)."""
    long_prompt = "hello " * (MAX_MODEL_LEN * 3)
    cases: list[tuple[str, str, bytes | dict]] = [
        ("malformed_json", "/v1/completions", b'{"model": "x", "prompt": "hi",'),
        ("not_an_object", "/v1/completions", b'[1, 2, 3]'),
        ("negative_max_tokens", "/v1/completions",
         {"model": model, "prompt": "hi", "max_tokens": -5}),
        ("huge_max_tokens", "/v1/completions",
         {"model": model, "prompt": "hi", "max_tokens": 10**12}),
        ("prompt_beyond_max_model_len", "/v1/completions",
         {"model": model, "prompt": long_prompt, "max_tokens": 4}),
        ("chat_beyond_max_model_len", "/v1/chat/completions",
         {"model": model, "messages": [{"role": "user", "content": long_prompt}],
          "max_tokens": 4}),
        ("unknown_field", "/v1/completions",
         {"model": model, "prompt": "hi", "max_tokens": 4, "moespac_bogus": 1}),
        ("wrong_type_prompt", "/v1/completions", {"model": model, "prompt": {"a": 1}}),
        ("unknown_model", "/v1/completions", {"model": "nope", "prompt": "hi"}),
        ("bad_temperature", "/v1/completions",
         {"model": model, "prompt": "hi", "temperature": -1.0}),
        ("empty_messages", "/v1/chat/completions", {"model": model, "messages": []}),
    ]
    out: dict[str, int] = {}
    for name, path, body in cases:
        try:
            out[name] = post(base, path, body, timeout=120)[0]
        except (OSError, http.client.HTTPException):
            out[name] = -1
        out[f"{name}:after"] = request(base, model, "completions", "def add(a, b):")[0]
    return out


def disconnects(base: str, model: str, n: int = 100, concurrency: int = 50) -> int:
    """n streaming requests, each closed by its client after the first chunk; returns how many
    got a first chunk."""
    host, port = base.split("//")[1].split(":")
    got = [0]
    lock = threading.Lock()

    def one(i: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        try:
            conn.request("POST", "/v1/completions", body=json.dumps(
                {"model": model, "prompt": f"count {i}:", "max_tokens": 64, "stream": True,
                 "temperature": 0.0}), headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            if r.status == 200 and r.fp.readline():
                with lock:
                    got[0] += 1
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.sock and conn.sock.close()
            conn.close()

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(n)))
    return got[0]


# ---- offline reference ------------------------------------------------------------------------
def offline(model: str, prompts: list[str]) -> list[str]:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype="float32", max_model_len=MAX_MODEL_LEN, seed=0,
              kv_cache_memory_bytes=64 << 20, max_num_seqs=8, enforce_eager=True,
              speculative_config=speculative(model))
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    return [o.outputs[0].text for o in llm.generate(prompts, sp, use_tqdm=False)]


def start_offline(model: str, prompts: list[str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOESPAC_")}
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_PLUGINS="")  # stock vLLM
    return subprocess.Popen([sys.executable, __file__, "--offline", model, json.dumps(prompts)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def load1() -> float:
    return os.getloadavg()[0]


def soak(model: str, workdir: Path, requests: int, concurrency: int, bad: bool = False,
         restart: bool = False) -> dict:
    texts = shared_prompts(400)
    prompts = clip_prompts(model, texts)
    repeated = prompts[:REPEATED]
    ref_proc = start_offline(model, repeated)
    row: dict = {"bench": "soak", "requests": requests, "concurrency": concurrency,
                 "max_tokens": MAX_TOKENS, "load_start": load1(),
                 # oneDNN keeps one primitive per GEMM shape (default 1,024 of them): on a CPU-only
                 # engine that cache, not the server, is what grows over a soak (README row)
                 "onednn_primitive_cache_capacity": os.environ.get(
                     "ONEDNN_PRIMITIVE_CACHE_CAPACITY", "default")}
    port = free_port()
    server = Server(model, port, workdir)
    try:
        server.wait_healthy()
        jobs = jobs_for(requests, prompts, repeated)
        warm = run_load(server.base, model, jobs[:WARMUP], concurrency)
        row["rss_mb_by_process_start"] = rss_by_process(server.proc.pid)
        row["rss_mb_start"] = round(sum(row["rss_mb_by_process_start"].values()), 1)
        rest = run_load(server.base, model, jobs[WARMUP:], concurrency)
        row["rss_mb_by_process_end"] = rss_by_process(server.proc.pid)
        row["rss_mb_end"] = round(sum(row["rss_mb_by_process_end"].values()), 1)
        answers = warm + rest
        row["errors"] = sum(1 for s, _, _ in answers if s != 200)
        lat = sorted(ms for s, _, ms in answers if s == 200)
        row["p50_ms"] = round(lat[len(lat) // 2], 1) if lat else None
        row["p99_ms"] = round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1) if lat else None
        row["rss_growth"] = round(row["rss_mb_end"] / row["rss_mb_start"] - 1.0, 4)
        stdout, stderr = ref_proc.communicate(timeout=900)
        if ref_proc.returncode != 0:
            raise RuntimeError("offline reference failed:\n" + stderr[-3000:])
        ref = json.loads([ln for ln in stdout.splitlines() if ln.startswith("[")][-1])
        row["repeated_requests"] = sum(1 for j in jobs if j[2] >= 0)
        row["greedy_mismatches"] = sum(1 for j, (s, text, _) in zip(jobs, answers)
                                       if j[2] >= 0 and text != ref[j[2]])
        if bad:
            row["bad_inputs"] = bad_requests(server.base, model)
            row["disconnects"] = 100
            row["disconnects_first_chunk"] = disconnects(server.base, model, 100)
            row["after_disconnects"] = request(server.base, model, "chat", "hello")[0]
            row["bad_ok"] = (all(v == 200 for k, v in row["bad_inputs"].items()
                                 if k.endswith(":after"))
                             and all(400 <= v < 500 for k, v in row["bad_inputs"].items()
                                     if not k.endswith(":after") and k != "unknown_field")
                             and row["after_disconnects"] == 200)
            row["log_tracebacks"] = server.log_path.read_text().count("Traceback")
    finally:
        code = server.stop()
        if ref_proc.poll() is None:
            ref_proc.kill()
    row["exit_code"] = code
    row["stats_lines_valid"], row["stats_lines"] = stats_lines_valid(server.stats_file)
    row["trace_steps"] = trace_steps(server.trace)
    row["trace_valid"] = row["trace_steps"] > 0
    if restart:
        row.update(kill_and_restart(model, workdir / "restart", port, prompts))
    row["load_end"] = load1()
    return row


def kill_and_restart(model: str, workdir: Path, port: int, prompts: list[str]) -> dict:
    """Serve under load past a trace checkpoint, SIGKILL the server (and its engine) mid-run,
    check what it left, restart on the same port and ask one request."""
    from moespac_vllm.runtime import TRACE_CHECKPOINT_S

    workdir.mkdir(parents=True, exist_ok=True)
    server = Server(model, port, workdir, tag="-killed")
    out: dict = {}
    try:
        server.wait_healthy()
        stop = threading.Event()

        def load() -> None:
            rng = random.Random(2)
            while not stop.is_set():
                request(server.base, model, "completions", rng.choice(prompts))

        threads = [threading.Thread(target=load, daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 6 * TRACE_CHECKPOINT_S
        while time.monotonic() < deadline and not (server.trace.exists() and
                                                     server.stats_file.exists()):
            time.sleep(1)
        time.sleep(2)  # mid-run: requests in flight
    finally:
        server.stop(signal.SIGKILL)
        stop.set()
    out["killed_stats_valid"], out["killed_stats_lines"] = stats_lines_valid(
        server.stats_file, allow_cut_last=True)
    out["killed_trace_steps"] = trace_steps(server.trace)
    again = Server(model, port, workdir, tag="-restarted")
    try:
        again.wait_healthy()
        out["restart_status"] = request(again.base, model, "completions", "def add(a, b):")[0]
    finally:
        again.stop()
    out["restart_ok"] = (out["restart_status"] == 200 and out["killed_stats_valid"]
                         and out["killed_trace_steps"] > 0)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--model", help="tiny model folder (default: built in a temporary dir)")
    ap.add_argument("--bad", action="store_true", help="also bad requests and 100 disconnects")
    ap.add_argument("--restart", action="store_true", help="also a SIGKILL + restart")
    ap.add_argument("--json", action="store_true", help="print the row as one JSON line")
    ap.add_argument("--offline", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.offline:
        print(json.dumps(offline(args.offline[0], json.loads(args.offline[1]))), flush=True)
        return 0
    if args.requests < WARMUP + 1:
        raise SystemExit(f"--requests: must be > {WARMUP} (the warm-up), got {args.requests}")
    with tempfile.TemporaryDirectory(prefix="moespac-soak-") as tmp:
        model = args.model
        if model is None:
            from moespac_vllm.models.tiny import make_tiny_model

            model = str(make_tiny_model(Path(tmp) / "qwen3", "qwen3_moe", draft=False,
                                        moe_draft=True).target)
        work = Path(tmp) / "run"
        work.mkdir()
        row = soak(model, work, args.requests, args.concurrency, args.bad, args.restart)
    print(json.dumps(row) if args.json else json.dumps(row, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
