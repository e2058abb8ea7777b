"""Policy sweep in the trace-driven simulator, and the issue #3 targets checked against it.

    .venv/bin/python benchmarks/bench_simulate.py --out bench-out/simulate \
        [--trace PATH_OR_synthetic[:N] ...] [--profile NAME ...] [--max-tokens N]

Default: the real Mixtral-8x7B decode routing (shared/data/mixtral-8x7b-routing/
humaneval_2_routing.jsonl, windows with MODELLED rejected drafts) and the SYNTHETIC Qwen3-30B-A3B
-scale stream, each on `rtx4090-pcie4` and `h100-pcie5`. Per (trace, profile): every policy at
cache ratios 0.1 / 0.17 / 0.25 / 0.5, plus spac with the adaptive draft length and the oracle at
its best fixed k. Prints JSON lines (one per run, then one `target` line per checked target) tagged
with the machine the simulation ran on; the times themselves are MODELLED by the cost profile.
Writes the markdown table, the plot and the JSON lines per (trace, profile) under --out.

Targets (issue #3): rtx4090-pcie4 at 0.17 and h100-pcie5 at 0.25: spac >= 1.42x sd-lru tok/s,
>= 1.2x spac-faithful, ms/token <= 1.15x the oracle's.

    .venv/bin/python benchmarks/bench_simulate.py --compare --out bench-out/compare [--max-tokens N]

`--compare` (issue #13): per trace (default: both real Mixtral routing files and the synthetic
Qwen3 stream) and (rtx4090-pcie4, 0.17) / (h100-pcie5, 0.25): `simulate.compare` (the product
mode against every baseline at its best draft length, the oracle at its best k); JSON rows, one
`target` line per case (product >= 1.2x the best baseline, >= 0.9x the oracle) and compare.md.
`--prefetch-anytime`: the A/B of spac's prefetch window. By default (engine.PREFETCH_IDLE_ONLY)
spac issues a prefetch only if it lands while the link is idle (during the draft phase), so at
k = 0 it issues none; with the flag it may also use the time before the layer's turn in the next
step, as hybrimoe and the oracle do (their copies then compete with that step's on-demand ones).
`--roofline-hits-now`: the A/B of the governor's hit model (governor.MEASURED_HITS): the default
prices a window's hits by each layer's measured hit fraction; the flag, by the last window's
experts resident now (which that window itself just fetched). `--ratios R,...`: every profile at
each of these cache ratios instead of its target ratio (its `target` lines say `target_case`).
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path

from moespac_vllm import simulate as sim
from moespac_vllm.config import shared_data_dir
from moespac_vllm.config import Policy

REPO = Path(__file__).resolve().parents[1]
MIXTRAL = "mixtral-8x7b-routing/humaneval_2_routing.jsonl"
MIXTRAL_RAW = "mixtral-8x7b-routing/humaneval0_prefill_decode_routing_raw.jsonl"
TARGET_RATIO = {"rtx4090-pcie4": 0.17, "h100-pcie5": 0.25}


def _data_dir() -> Path:
    d = shared_data_dir()
    if d is None:
        raise SystemExit("bench_simulate: shared data not found; set MOESPAC_DATA_DIR")
    return d


def _targets(results: list[sim.SimResult], profile: str) -> list[dict]:
    ratio = TARGET_RATIO.get(profile)
    if ratio is None:
        return []
    at = {r.policy: r for r in results if abs(r.cache_ratio - ratio) < 1e-9}
    sd, fa = at[Policy.SD_LRU.value], at[Policy.SPAC_FAITHFUL.value]
    orc = at.get(sim.ORACLE_BEST_LABEL, at[Policy.ORACLE.value])
    out = []
    for name in (Policy.SPAC.value, sim.ADAPTIVE_LABEL):
        r = at[name]
        ms_tok = r.time_ms / r.tokens
        orc_ms = orc.time_ms / orc.tokens
        out.append({
            "target": f"{name} @ {profile} ratio {ratio}",
            "vs_sd_lru": r.tokens_per_s / sd.tokens_per_s, "vs_sd_lru_goal": 1.42,
            "vs_spac_faithful": r.tokens_per_s / fa.tokens_per_s, "vs_spac_faithful_goal": 1.2,
            "ms_per_token_vs_oracle": ms_tok / orc_ms, "vs_oracle_goal": 1.15,
            "oracle_k": orc.draft_tokens,
            "met": bool(r.tokens_per_s >= 1.42 * sd.tokens_per_s
                        and r.tokens_per_s >= 1.2 * fa.tokens_per_s and ms_tok <= 1.15 * orc_ms),
        })
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", action="append", default=None)
    ap.add_argument("--profile", action="append", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--draft-tokens", type=int, default=sim.DEFAULT_DRAFT_TOKENS)
    ap.add_argument("--acceptance", type=float, default=sim.DEFAULT_ACCEPTANCE)
    ap.add_argument("--compare", action="store_true", help="issue #13's compare table")
    ap.add_argument("--prefetch-anytime", action="store_true",
                    help="--compare: spac's prefetches not limited to the idle link (A/B)")
    ap.add_argument("--roofline-hits-now", action="store_true",
                    help="--compare: the governor prices hits by residency now (A/B)")
    ap.add_argument("--ratios", default=None,
                    help="--compare: comma-separated cache ratios for every profile")
    args = ap.parse_args()
    if (args.roofline_hits_now or args.ratios) and not args.compare:
        ap.error("--roofline-hits-now / --ratios: only with --compare")
    if args.roofline_hits_now:
        from moespac_vllm import governor

        governor.MEASURED_HITS = False  # read by every governor built from here on
    if args.ratios:
        try:
            args.ratios = [float(r) for r in args.ratios.split(",")]
        except ValueError:
            ap.error(f"--ratios: expected comma-separated numbers, got {args.ratios!r}")
        if not all(0.0 < r <= 1.0 for r in args.ratios):
            ap.error(f"--ratios: every ratio must be in (0, 1], got {args.ratios}")
    if args.prefetch_anytime:
        if not args.compare:
            ap.error("--prefetch-anytime: only with --compare")
        from moespac_vllm import engine

        engine.PREFETCH_IDLE_ONLY = False  # read by every engine built from here on
    if args.compare:
        return _compare(args)
    traces = args.trace or [str(_data_dir() / MIXTRAL), "synthetic"]
    profiles = args.profile or ["rtx4090-pcie4", "h100-pcie5"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    host = {"device": "simulated (cost model)", "host": platform.node() or "unknown",
            "cpu": platform.processor() or platform.machine(),
            "command": "benchmarks/bench_simulate.py " + " ".join(sys.argv[1:])}
    for spec in traces:
        trace = sim.load_workload_trace(spec)
        for profile in profiles:
            t0 = time.perf_counter()
            results = sim.sweep(trace, profile, draft_tokens=args.draft_tokens,
                                acceptance=args.acceptance, max_tokens=args.max_tokens)
            wall_s = time.perf_counter() - t0
            stem = re.sub(r"[^A-Za-z0-9.]+", "-", f"{trace.meta.source}-{profile}").strip("-")
            (out / f"{stem}.md").write_text(sim.sweep_table(results))
            sim.sweep_plot(results, out / f"{stem}.png")
            with open(out / f"{stem}.jsonl", "w") as f:
                for r in results:
                    line = json.dumps({**host, **r.as_dict()}, sort_keys=True)
                    f.write(line + "\n")
                    print(line)
            for t in _targets(results, profile):
                print(json.dumps({**host, "trace": trace.label, "profile": profile,
                                  "sweep_wall_s": wall_s, **t}, sort_keys=True))
            sys.stdout.flush()
    return 0


def _compare(args: argparse.Namespace) -> int:
    traces = args.trace or [str(_data_dir() / MIXTRAL), str(_data_dir() / MIXTRAL_RAW),
                            "synthetic"]
    profiles = args.profile or list(TARGET_RATIO)
    untargeted = [p for p in profiles if p not in TARGET_RATIO]
    if untargeted and not args.ratios:
        raise SystemExit(f"--profile: {untargeted} have no target cache ratio (targets: "
                         f"{TARGET_RATIO}); give the ratios with --ratios")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    host = {"device": "simulated (cost model)", "host": platform.node() or "unknown",
            "cpu": platform.processor() or platform.machine(),
            "command": "benchmarks/bench_simulate.py " + " ".join(sys.argv[1:])}
    comparisons = []
    for spec in traces:
        trace = sim.load_workload_trace(spec)
        for profile in profiles:
            for ratio in args.ratios or [TARGET_RATIO[profile]]:
                t0 = time.perf_counter()
                c = sim.compare(trace, profile, ratio, k_max=args.draft_tokens,
                                acceptance=args.acceptance, max_tokens=args.max_tokens)
                wall_s = time.perf_counter() - t0
                comparisons.append(c)
                for row in c.rows():
                    print(json.dumps({**host, **row}, sort_keys=True))
                vb, vo = c.ratio(c.best_baseline), c.ratio(c.oracle)
                print(json.dumps({**host, "target": f"product @ {profile} ratio "
                                  f"{ratio} on {trace.label}", "cache_ratio": ratio,
                                  "target_case": ratio == TARGET_RATIO.get(profile),
                                  "product_vs_best_baseline": vb, "goal_vs_best_baseline": 1.2,
                                  "product_vs_oracle": vo, "goal_vs_oracle": 0.9,
                                  "best_baseline": c.best_baseline.policy, "wall_s": wall_s,
                                  "met": bool(vb >= 1.2 and vo >= 0.9)}, sort_keys=True))
                sys.stdout.flush()
    (out / "compare.md").write_text(sim.compare_table(comparisons))
    return 0


if __name__ == "__main__":
    sys.exit(main())
