"""Host time of the draft-length governor's per-step decision (`governor.DraftGovernor.choose`).

    python benchmarks/bench_governor.py --json [--windows 1,4,9] [--calls 50]

The governor runs once per decode/verify step on the engine's thread, between the last step's
books and the next draft, so its time is per-step host work (the same budget as bench_layer_host's
`us_per_step`). Setting: the real engine at Qwen3-30B-A3B scale (48 layers, E=128, top-8), spac
at cache ratio 0.17 on the rtx4090-pcie4 costs, after one step of `--windows` tokens of random
routing; the governor prices k = 0..8 (`k_max` 8) with the acceptance fixed at 0.8. One JSON line
per (window, hit model): median / p90 ms of `choose` and of `window_layer_ms` alone, with
`measured_hits` on (the default: per-layer measured hit fractions) and off (residency now).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

from moespac_vllm import governor as gv
from moespac_vllm.calibrate import describe_device
from moespac_vllm.config import MoESpacConfig
from moespac_vllm.cost_model import get_profile
from moespac_vllm.engine import ExpertEngine
from moespac_vllm.simulate import SimClock, SimMover
from moespac_vllm.step_context import Phase, StepContext
from moespac_vllm.trace import ModelDims

QWEN3 = ModelDims(num_layers=48, num_experts=128, top_k=8, hidden_size=2048,
                  intermediate_size=768)


def _engine(window: int, seed: int) -> ExpertEngine:
    costs = get_profile("rtx4090-pcie4").expert_costs(QWEN3)
    clock = SimClock()
    cfg = MoESpacConfig().replace(policy="spac", cache_ratio=0.17, stats_file=None)
    engine = ExpertEngine(cfg, QWEN3, costs, SimMover(clock, costs.fetch_ms, QWEN3.expert_bytes),
                          clock)
    rng = np.random.default_rng(seed)
    engine.begin_step(StepContext(step=0, phase=Phase.VERIFY, num_tokens=window,
                                  num_draft_tokens=window - 1))
    for layer in range(QWEN3.num_layers):
        ids = np.stack([rng.choice(QWEN3.num_experts, QWEN3.top_k, replace=False)
                        for _ in range(window)])
        engine.plan_layer(layer, ids)
        engine.finish_layer(layer, ids)
    engine.end_step(window - 1)
    return engine


def _ms(fn, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", default="1,4,9", help="tokens of the last window, one run each")
    ap.add_argument("--calls", type=int, default=50, help="timed calls per row")
    ap.add_argument("--json", action="store_true", help="JSON lines only (the only output mode)")
    args = ap.parse_args(argv)
    try:
        windows = [int(w) for w in args.windows.split(",")]
    except ValueError:
        ap.error(f"--windows: expected comma-separated integers, got {args.windows!r}")
    if not all(w >= 1 for w in windows) or args.calls < 1:
        ap.error("--windows and --calls: must be >= 1")
    device = describe_device()
    command = "python benchmarks/bench_governor.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    ns = np.arange(1.0, 10.0)
    for window in windows:
        engine = _engine(window, seed=window)
        for measured in (True, False):
            g = gv.DraftGovernor(k_max=8, draft_ms_per_token=1.0, step_overhead_ms=5.0,
                                 fixed_acceptance=0.8, measured_hits=measured)
            g.choose(engine)  # the first call keeps the residency the next one measures from
            choose = _ms(lambda: g.choose(engine), args.calls)
            hits = g.hit_fraction if measured else None
            price = _ms(lambda: gv.window_layer_ms(engine, ns, hits), args.calls)
            print(json.dumps({
                "bench": "governor", "dims": "qwen3-30b-a3b", "window_tokens": window,
                "k_max": 8, "measured_hits": measured, "calls": args.calls,
                "choose_ms_median": statistics.median(choose),
                "choose_ms_p90": float(np.percentile(choose, 90)),
                "window_layer_ms_ms_median": statistics.median(price),
                "load_avg_1min": os.getloadavg()[0], "device": device, "command": command,
            }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
