"""Simulator fidelity (issue #13 item 4): the real runtime against the simulator, per policy.

The decode harness (benchmarks/bench_gpu_decode.py: the library runtime vLLM's glue drives, the
routing computed by a router GEMM on the device) runs each case on this machine; the trace-driven
simulator (`simulate.simulate`) replays the same trace, windows, policy and ratio with the profile
`moespac calibrate` measured here a moment before (on a machine without CUDA: cpu-as-device, the
native CPU kernel playing the device, `shared_compute`) and the non-expert times measured in the
same process. Per case: measured and simulated tok/s, their ratio, whether it is within the 20 %
goal, both hit rates (the same engine decides in both, so these agree unless the windows differ),
and the measured host pieces per layer forward (plan, launch, CPU wait) next to the ones the model
charges.

    .venv/bin/python benchmarks/bench_fidelity.py --json [--hidden 512 --inter 256 --layers 8
        --steps 40 --ratio 0.17 --trace synthetic:400]

JSON lines: one `setup` row, one row per case, one `summary` row (worst |ratio - 1|). Nothing is
written to disk; the README row quotes the output. Speed claims: none (fidelity only).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu_decode as gd  # noqa: E402  (a script beside this one)

from moespac_vllm.calibrate import describe_device  # noqa: E402
from moespac_vllm.simulate import load_workload_trace  # noqa: E402

GOAL_REL_ERROR = 0.2


def cases(ratio: float, k: int) -> list[gd.Case]:
    C = gd.Case
    return [C("lru", "lru", ratio, "plain"), C("static", "static", ratio, "plain"),
            C("hybrimoe", "hybrimoe", ratio, "plain"),
            C(f"sd-lru-k{k}", "sd-lru", ratio, "sd", k),
            C(f"spac-k{k}", "spac", ratio, "sd", k),
            C("spac-adaptive", "spac", ratio, "adaptive", 8)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace", default="synthetic:400")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--inter", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--ratio", type=float, default=0.17)
    p.add_argument("--draft-tokens", type=int, default=3, help="k of the fixed-k SD cases")
    p.add_argument("--acceptance", type=float, default=0.8)
    p.add_argument("--run-seconds", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="JSON lines only (no table on stderr)")
    a = p.parse_args(argv)
    if not 0.0 < a.ratio < 1.0:
        raise ValueError(f"ratio: must be in (0, 1) (an offloading case), got {a.ratio}")
    for name in ("hidden", "inter", "layers", "steps", "draft_tokens"):
        if getattr(a, name) < 1:
            raise ValueError(f"{name.replace('_', '-')}: must be >= 1")
    a.command = "python benchmarks/bench_fidelity.py " + " ".join(
        shlex.quote(x) for x in (sys.argv[1:] if argv is None else argv))
    return a


def harness_args(a: argparse.Namespace, device: torch.device) -> argparse.Namespace:
    kernel = "native" if device.type == "cpu" else "auto"
    h = gd.parse_args(["--trace", "unused", "--layers", str(a.layers), "--steps", str(a.steps),
                       "--run-seconds", str(a.run_seconds), "--draft-tokens", "8",
                       "--acceptance", str(a.acceptance), "--profile", "calibrate",
                       "--cpu-path", "native", "--kernel", kernel, "--seed", str(a.seed),
                       "--hidden", str(a.hidden), "--inter", str(a.inter),
                       "--draft-gb", "0.004"])
    h.command = a.command
    return h


def row_for(b: gd.Bench, r: dict[str, Any]) -> dict[str, Any]:
    """The fidelity view of one harness row: ratio, hit rates, host pieces per planned forward."""
    n = max(1, r["planned_forwards"])
    sim = r["sim_tokens_per_s"]
    ratio = r["tokens_per_s"] / sim if sim else None
    times = gd.sim_times(b)
    return {
        "bench": "fidelity", "case": r["case"], "policy": r["policy"], "mode": r["mode"],
        "cache_ratio": r["cache_ratio"], "draft_tokens": r["draft_tokens"],
        "mean_draft_tokens": r["mean_draft_tokens"], "steps": r["steps"], "tokens": r["tokens"],
        "measured_tokens_per_s": r["tokens_per_s"], "sim_tokens_per_s": sim,
        "measured_over_sim": ratio,
        "within_goal": None if ratio is None else abs(ratio - 1.0) <= GOAL_REL_ERROR,
        "measured_hit_rate": r["hit_rate"], "sim_note": r["sim_note"],
        "measured_ms_per_step": 1e3 * r["time_s"] / max(1, r["steps"]),
        "measured_plan_us_per_forward": 1e3 * r["host_plan_ms"] / n,
        "measured_launch_us_per_forward": 1e3 * r["launch_ms"] / n,
        "measured_cpu_wait_us_per_forward": 1e3 * r["cpu_wait_ms"] / n,
        "model_plan_us_per_forward": 1e3 * times.plan_ms_per_layer,
        "model_launch_us_per_forward": 1e3 * times.launch_ms_per_layer,
        "cpu_experts": r["cpu_experts"], "fetched_experts": r["fetched_experts"],
        "device": r["device"],
    }


def sim_hit_rate(b: gd.Bench, case: gd.Case, tokens: int) -> float | None:
    """The simulator's hit rate for the same case (None where it has no such mode)."""
    from moespac_vllm.config import Policy
    from moespac_vllm.simulate import simulate

    if case.mode == "plain" and Policy(case.policy) not in gd.AUTOREGRESSIVE_POLICIES:
        return None
    r = simulate(b.trace, Policy(case.policy), case.ratio, b.profile,
                 draft_tokens=max(case.k, 1), acceptance=b.args.acceptance, seed=b.args.seed,
                 times=gd.sim_times(b), max_tokens=max(1, tokens),
                 adaptive_draft=case.mode == "adaptive")
    return r.stats.hit_rate


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    trace = load_workload_trace(a.trace, seed=a.seed)
    t0 = time.perf_counter()
    b, setup, close = gd.make_bench(harness_args(a, device), trace, device)
    setup = {**setup, "bench": "fidelity_setup", "device": describe_device(),
             "sim_times": gd.sim_times(b).__repr__()}
    print(json.dumps(setup), flush=True)
    rows = []
    try:
        for case in cases(a.ratio, a.draft_tokens):
            r = gd.run_case(b, case)
            r["device"] = setup["device"]
            row = row_for(b, r)
            row["sim_hit_rate"] = sim_hit_rate(b, case, r["tokens"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        close()
    errs = [abs(r["measured_over_sim"] - 1.0) for r in rows if r["measured_over_sim"]]
    summary = {"bench": "fidelity_summary", "command": a.command, "device": setup["device"],
               "cases": len(rows), "worst_rel_error": max(errs) if errs else None,
               "within_goal": sum(bool(r["within_goal"]) for r in rows),
               "goal_rel_error": GOAL_REL_ERROR, "wall_s": time.perf_counter() - t0}
    print(json.dumps(summary), flush=True)
    if not a.json:
        print(table(rows), file=sys.stderr)
    return 0


def table(rows: list[dict[str, Any]]) -> str:
    f = gd.cell
    return gd.markdown_table(
        ["case", "tok/s measured", "tok/s simulated", "measured / sim", "hit measured", "hit sim",
         "plan us", "launch us", "CPU wait us"],
        [[r["case"], f"{r['measured_tokens_per_s']:.1f}", f(r["sim_tokens_per_s"], ".1f"),
          f(r["measured_over_sim"], ".2f"), f"{r['measured_hit_rate']:.3f}",
          f(r["sim_hit_rate"], ".3f"), f"{r['measured_plan_us_per_forward']:.0f}",
          f"{r['measured_launch_us_per_forward']:.0f}",
          f"{r['measured_cpu_wait_us_per_forward']:.0f}"] for r in rows])


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as e:
        print(f"bench_fidelity: error: {e}", file=sys.stderr)
        sys.exit(2)
