"""Greedy output equality, plugin on vs off, per prompt: the "outputs identical to stock vLLM" check
at the model's own dtype (the e2e tests check it in fp32 on random tiny models).

One process per setting (stock: `VLLM_PLUGINS=""`; moespac: `VLLM_PLUGINS=moespac` with each
`--ratios` value as cache_ratio), draft_model speculative decoding, greedy; the token ids of every
prompt are compared with stock's. Prints JSON lines tagged with the device and the command.

    python benchmarks/bench_equality.py .models/trained-qwen3-moe --dataset humaneval --json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from moespac_vllm.calibrate import describe_device


def _child(args: argparse.Namespace) -> None:
    from moespac_vllm.patches import generate as gen

    cfg = json.loads(args.child_config)
    req = gen.GenerateRequest(
        model=args.model, prompts=gen.load_prompts(dataset=args.dataset, limit=args.num_prompts),
        draft=str(Path(args.model) / args.draft), num_speculative_tokens=args.k,
        max_tokens=args.max_tokens, moespac=cfg)
    res = gen.run_generate(req)
    Path(args.child_out).write_text(json.dumps([list(t) for t in res.output_token_ids]))


def _run(args: argparse.Namespace, plugin: bool, cfg: dict, out: Path) -> list[list[int]]:
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0",
               VLLM_PLUGINS="moespac" if plugin else "")
    cmd = [sys.executable, __file__, args.model, "--dataset", args.dataset, "--draft", args.draft,
           "--num-prompts", str(args.num_prompts), "--max-tokens", str(args.max_tokens),
           "--k", str(args.k), "--child-config", json.dumps(cfg), "--child-out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed (plugin={plugin}, {cfg}):\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--draft", default="draft", help="draft folder inside the model folder")
    p.add_argument("--dataset", default="humaneval")
    p.add_argument("--num-prompts", type=int, default=24)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--ratios", default="1.0,0.25")
    p.add_argument("--json", action="store_true")
    p.add_argument("--child-config", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_out:
        _child(args)
        return
    ratios = [float(r) for r in args.ratios.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        stock = _run(args, False, {}, Path(tmp) / "stock.json")
        for r in ratios:
            on = _run(args, True, {"cache_ratio": r}, Path(tmp) / f"on_{r}.json")
            first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y),
                               None if len(a) == len(b) else min(len(a), len(b)))
                          for a, b in zip(on, stock)]
            print(json.dumps({
                "bench": "equality", "model": args.model, "dataset": args.dataset,
                "cache_ratio": r, "prompts": len(stock),
                "identical": sum(d is None for d in first_diff),
                "first_differing_token": [d for d in first_diff if d is not None],
                "device": describe_device(),
                "command": " ".join(["python", *sys.argv]),
            }))


if __name__ == "__main__":
    main()
