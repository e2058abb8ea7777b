"""bench_balancer: is `ExactBalancer` exact, and is it fast enough for the hot path?

Prints JSON lines (one per measurement), each tagged with the device and the command:

* `exact_vs_highs`: N random instances (E up to 256, top-k up to 8, tokens up to 32, skewed
  routing, random residency and slots; 3/4 realistic costs, 1/4 adversarial families — see
  `balancer.random_problem`), exact vs HiGHS: worst relative makespan gap, mismatches (> 1e-9).
* `exact_vs_highs_real_routing`: the same check on instances whose routing is real: 16-token
  windows of Mixtral-8x7B decode routing (E=8, top-2, /work/shared/data/mixtral-8x7b-routing),
  residency = the previous window's experts that fit a 25 % cache; costs drawn as above.
* `exact_latency`: exact p50/p99 µs per decision at E=128, top-8, 16 tokens (realistic costs),
  solve() only and with `BalanceProblem` construction; plus the same for the real-routing set.
* `highs_latency`, `cvxpy_latency`: ms p50 for the same E=128 instances (cvxpy on fewer).
* `greedy_gap`: a natural greedy (fetch the most CPU-expensive non-resident while the makespan
  drops) against the exact optimum: how often and how much it loses. Why greedy is not enough.
* `resident_to_cpu`: the wider model (`BalanceProblem(allow_resident_cpu=True)`: residents may
  run on the CPU too): exact vs HiGHS on it, exact latency on it, and how often / by how much it
  beats the model with residents fixed — on the random-cost instances and with the named cost
  profiles of cost_model.py at Qwen3-30B-A3B dims (E=128 top-8, 16 tokens).

Usage: python benchmarks/bench_balancer.py --json [--instances 10000] [--seed 0] [--plot PATH]
The machine is shared: the load average is printed with the latencies; run under `nice`.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from moespac_vllm.calibrate import describe_device
from moespac_vllm.balancer import (
    BalanceProblem,
    CvxpyBalancer,
    ExactBalancer,
    MilpBalancer,
    branch_times,
    evaluate,
    random_problem,
)
from moespac_vllm.cost_model import PROFILES
from moespac_vllm.trace import ModelDims

REL_TOL = 1e-9


def rel_gap(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300) if a != b else 0.0


def compare(problems: list[BalanceProblem], exact: ExactBalancer, milp: MilpBalancer) -> dict:
    worst, mismatches, worst_i = 0.0, 0, -1
    fetched = []
    for i, p in enumerate(problems):
        a, b = exact.solve(p), milp.solve(p)
        evaluate(p, a.fetch)  # raises if infeasible
        g = rel_gap(a.makespan_ms, b.makespan_ms)
        if g > worst:
            worst, worst_i = g, i
        mismatches += g > REL_TOL
        fetched.append(a.num_fetched)
    f = np.array(fetched)
    return {"instances": len(problems), "worst_rel_gap": worst, "worst_instance": worst_i,
            "mismatches": int(mismatches), "share_fetching_none": float(np.mean(f == 0)),
            "mean_fetched": float(f.mean())}


def latencies_us(fn, items, repeat: int = 1) -> np.ndarray:
    gc.collect()
    gc.disable()
    try:
        out = []
        for _ in range(repeat):
            for x in items:
                t0 = time.perf_counter_ns()
                fn(x)
                out.append(time.perf_counter_ns() - t0)
    finally:
        gc.enable()
    return np.array(out) / 1e3


def greedy(p: BalanceProblem):
    """Fetch non-residents in decreasing CPU cost while the makespan strictly drops."""
    order = np.flatnonzero(~p.resident)
    order = order[np.argsort(-p.tokens[order], kind="stable")]
    fetch = np.zeros(p.num_experts, dtype=bool)
    best = max(branch_times(p, fetch))
    for i in order[: p.free_slots]:
        fetch[i] = True
        mk = max(branch_times(p, fetch))
        if mk < best:
            best = mk
        else:
            fetch[i] = False
            break
    return evaluate(p, fetch)


def mixtral_real_problems(data_dir: Path, rng: np.random.Generator, window: int = 16,
                          cache_ratio: float = 0.25) -> list[BalanceProblem]:
    path = data_dir / "mixtral-8x7b-routing" / "humaneval_2_routing.jsonl"
    by: dict[tuple[int, int], list[tuple[int, list[int]]]] = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            by.setdefault((r["problem_id"], r["layer"]), []).append((r["token_idx"], r["experts"]))
    e, slots = 8, max(1, round(cache_ratio * 8))
    out = []
    for (_, _), rows in sorted(by.items()):
        ids = np.array([x for _, x in sorted(rows)])
        prev: list[int] = []
        for s in range(0, len(ids) - window + 1, window):
            counts = np.bincount(ids[s:s + window].ravel(), minlength=e)
            routed = np.flatnonzero(counts)
            cached = set(prev[:slots])
            resident = np.array([x in cached for x in routed])
            free = slots - int(resident.sum())
            q = random_problem(rng)  # only its (realistic) costs and hidden window are used
            out.append(BalanceProblem(counts[routed], resident, free, q.costs, q.hidden_fetch_ms))
            prev = list(np.argsort(-counts, kind="stable")[: slots])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print JSON lines (the only output mode)")
    ap.add_argument("--instances", type=int, default=10_000)
    ap.add_argument("--timing-instances", type=int, default=2_000)
    ap.add_argument("--highs-timing-instances", type=int, default=300)
    ap.add_argument("--cvxpy-instances", type=int, default=30)
    ap.add_argument("--wide-instances", type=int, default=2_000,
                    help="instances for exact vs HiGHS on the wider (residents-on-CPU) model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", type=Path,
                    default=Path(os.environ.get("MOESPAC_DATA_DIR",
                                                Path(__file__).resolve().parents[2] / "shared"
                                                / "data")))
    ap.add_argument("--plot", type=Path, default=None, help="write a latency histogram (png)")
    args = ap.parse_args()
    if args.instances < 1:
        raise SystemExit("--instances: must be >= 1")

    base = {"device": describe_device(), "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "python": platform.python_version()}

    def emit(kind: str, **fields) -> None:
        fields.update(base)
        fields["loadavg_1m"] = os.getloadavg()[0]
        print(json.dumps({"bench": "balancer", "kind": kind, **fields}), flush=True)

    rng = np.random.default_rng(args.seed)
    exact, milp = ExactBalancer(), MilpBalancer()

    # 1. exactness on random instances
    problems = [random_problem(rng, adversarial=i % 4 == 3) for i in range(args.instances)]
    t0 = time.perf_counter()
    res = compare(problems, exact, milp)
    emit("exact_vs_highs", **res, adversarial_share=0.25, wall_s=round(time.perf_counter() - t0, 1))

    # 2. exactness on real routing
    real: list[BalanceProblem] = []
    if (args.data_dir / "mixtral-8x7b-routing").is_dir():
        real = mixtral_real_problems(args.data_dir, rng)
        emit("exact_vs_highs_real_routing", **compare(real, exact, milp),
             routing="mixtral-8x7b humaneval_2 decode, 16-token windows, E=8 top-2, 25% cache")

    # 3. latency at E=128, top-8, 16 tokens
    timing = [random_problem(rng, num_experts=128, top_k=8, num_tokens=16)
              for _ in range(args.timing_instances)]
    for p in timing[:50]:  # warm-up
        exact.solve(p)
    solve_us = latencies_us(exact.solve, timing)
    build_us = latencies_us(lambda p: exact.solve(BalanceProblem(
        p.tokens, p.resident, p.free_slots, p.costs, p.hidden_fetch_ms)), timing)
    m = np.array([p.num_experts for p in timing])
    emit("exact_latency", shape="E=128 top-8 16 tokens", instances=len(timing),
         routed_experts_mean=float(m.mean()),
         p50_us=float(np.percentile(solve_us, 50)), p99_us=float(np.percentile(solve_us, 99)),
         with_problem_construction_p50_us=float(np.percentile(build_us, 50)),
         with_problem_construction_p99_us=float(np.percentile(build_us, 99)))
    if real:
        real_us = latencies_us(exact.solve, real)
        emit("exact_latency_real_routing", shape="Mixtral E=8 top-2 16 tokens",
             instances=len(real), p50_us=float(np.percentile(real_us, 50)),
             p99_us=float(np.percentile(real_us, 99)))
    highs_ms = latencies_us(milp.solve, timing[: args.highs_timing_instances]) / 1e3
    emit("highs_latency", shape="E=128 top-8 16 tokens", instances=len(highs_ms),
         p50_ms=float(np.percentile(highs_ms, 50)), p99_ms=float(np.percentile(highs_ms, 99)))
    try:
        cv = CvxpyBalancer()
    except ImportError:
        cv = None
    if cv is not None:
        sub = timing[: args.cvxpy_instances]
        cv_ms = latencies_us(cv.solve, sub) / 1e3
        agree = sum(rel_gap(cv.solve(p).makespan_ms, milp.solve(p).makespan_ms) <= REL_TOL
                    for p in sub)
        emit("cvxpy_latency", shape="E=128 top-8 16 tokens", instances=len(sub),
             p50_ms=float(np.percentile(cv_ms, 50)), agrees_with_highs=int(agree))

    # 4. greedy is not enough
    gaps = np.array([rel_gap(greedy(p).makespan_ms, exact.solve(p).makespan_ms)
                     for p in timing])
    emit("greedy_gap", shape="E=128 top-8 16 tokens", instances=len(timing),
         share_worse=float(np.mean(gaps > REL_TOL)), mean_gap=float(gaps.mean()),
         worst_gap=float(gaps.max()))

    # 5. residents on the CPU: the wider model
    def widen(p: BalanceProblem, costs=None) -> BalanceProblem:
        return BalanceProblem(p.tokens, p.resident, p.free_slots, costs or p.costs,
                              p.hidden_fetch_ms, allow_resident_cpu=True)

    wide_set = [widen(p) for p in problems[: args.wide_instances]]
    emit("exact_vs_highs_wide", **compare(wide_set, exact, milp),
         model="residents may run on the CPU", adversarial_share=0.25)
    wide_timing = [widen(p) for p in timing]
    wide_us = latencies_us(exact.solve, wide_timing)
    emit("exact_latency_wide", shape="E=128 top-8 16 tokens", instances=len(wide_timing),
         p50_us=float(np.percentile(wide_us, 50)), p99_us=float(np.percentile(wide_us, 99)))
    dims = ModelDims(num_layers=48, num_experts=128, top_k=8, hidden_size=2048,
                     intermediate_size=768)  # Qwen3-30B-A3B
    cost_sets = [("random costs", None)] + [(f"profile {name}", prof.expert_costs(dims))
                                            for name, prof in PROFILES.items()]
    for label, costs in cost_sets:
        gains = []
        for p in timing:
            fixed_p = p if costs is None else BalanceProblem(
                p.tokens, p.resident, p.free_slots, costs, p.hidden_fetch_ms)
            a, b = exact.solve(fixed_p), exact.solve(widen(fixed_p))
            bound = branch_times(fixed_p, np.zeros(p.num_experts, bool))[0]
            gains.append((a.makespan_ms - b.makespan_ms, (a.makespan_ms - b.makespan_ms)
                          / a.makespan_ms, bound))
        g = np.array(gains)
        emit("resident_to_cpu", shape="E=128 top-8 16 tokens", costs=label, instances=len(g),
             share_improved=float(np.mean(g[:, 1] > REL_TOL)), max_gain_ms=float(g[:, 0].max()),
             max_rel_gain=float(g[:, 1].max()), mean_rel_gain=float(g[:, 1].mean()),
             bound_held=bool(np.all(g[:, 0] <= g[:, 2] * (1 + 1e-9) + 1e-12)))

    if args.plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        bins = np.logspace(np.log10(max(solve_us.min(), 1)), np.log10(highs_ms.max() * 1e3), 60)
        ax.hist(solve_us, bins=bins, alpha=0.7, label="exact (µs)")
        ax.hist(highs_ms * 1e3, bins=bins, alpha=0.7, label="HiGHS MILP (µs)")
        ax.set_xscale("log")
        ax.set_xlabel("time per layer decision (µs), E=128 top-8 16 tokens")
        ax.set_ylabel("instances")
        ax.set_title(f"balancer latency on {base['device']}", fontsize=8)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
