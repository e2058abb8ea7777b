"""Host time of one offloaded MoE layer forward, per cache_ratio and policy, on REAL routing.

    python benchmarks/bench_layer_host.py --json [--steps 200] [--window 4]

What it measures: `offload.OffloadedExperts.forward` driven by the real `engine.ExpertEngine` and a
`mover.SyncMover`, with the expert kernel replaced by a no-op. What is left is the plugin's own
host work per layer: the plan (estimator, balancer, slot table, victim search), slot copies of tiny
experts (H=64, I=32, so a copy costs microseconds), the fixed-table path of whole layers, and the
per-step books. On a GPU this time sits between a layer's routing and its kernels; at
cache_ratio 1.0 it is what `bench_overhead.py` compares with stock vLLM.

The balancer decides with a real cost profile at Mixtral-8x7B's expert size (`--profile`,
default rtx4090-pcie4), and a modelled draft phase of 2 ms per draft token separates the steps
(the clock skips it), so prefetch has its idle window as in a deployment.

Routing: the shared Mixtral-8x7B decode trace (`mixtral-8x7b-routing/humaneval_2_routing.jsonl`,
32 layers, E=8, top-2), cut into verification-sized windows of `--window` consecutive tokens per
request. One JSON line per (policy, cache_ratio): median and p90 microseconds per layer forward,
plus how many forwards took the plan-free path. Tagged with the device and the command.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from moespac_vllm.calibrate import describe_device
from moespac_vllm.config import MoESpacConfig, shared_data_dir
from moespac_vllm.cost_model import get_profile
from moespac_vllm.engine import ExpertEngine
from moespac_vllm.mover import SyncMover
from moespac_vllm.offload import ExpertStore, OffloadedExperts, SlotCache
from moespac_vllm.step_context import Phase, StepContext
from moespac_vllm.trace import MIXTRAL_8X7B, ModelDims, read_mixtral_jsonl, request_streams

MIXTRAL = "mixtral-8x7b-routing/humaneval_2_routing.jsonl"
H, I = 64, 32  # the tensors' size: copies cost microseconds; the costs below are Mixtral's
DRAFT_MS_PER_TOKEN = 2.0  # the draft phase between steps, when prefetch copies may run


class _Clock:
    """Wall time plus the draft phases the harness does not run (skipped forward)."""

    def __init__(self) -> None:
        self.skipped_ms = 0.0

    def now_ms(self) -> float:
        return time.perf_counter() * 1e3 + self.skipped_ms


def _noop_kernel(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                 ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(hidden)


def windows(trace_path: Path, window: int, steps: int) -> list[np.ndarray]:
    """[steps] arrays [window, L, K]: consecutive windows of each request's decode stream."""
    out: list[np.ndarray] = []
    for stream in request_streams(read_mixtral_jsonl(trace_path)):
        for s in range(0, stream.shape[0] - window + 1, window):
            out.append(stream[s:s + window])
            if len(out) == steps:
                return out
    return out


def run(policy: str, ratio: float, steps: list[np.ndarray], dims: ModelDims,
        profile: str) -> dict:
    L, E = dims.num_layers, dims.num_experts
    cfg = MoESpacConfig().replace(policy=policy, cache_ratio=ratio, stats_file=None)
    num_slots = cfg.cache.slots_per_layer(E, L, dims.expert_bytes)
    g = torch.Generator().manual_seed(0)
    store, slots = ExpertStore(), SlotCache("cpu")
    for layer in range(L):
        store.add_layer(layer, torch.randn(E, 2 * I, H, generator=g),
                        torch.randn(E, H, I, generator=g), spare_rows=num_slots)
        slots.attach_layer(layer, *store.spare(layer))
    mover = SyncMover(store, slots)
    costs = get_profile(profile).expert_costs(MIXTRAL_8X7B)  # the balancer decides as on it
    clock = _Clock()
    engine = ExpertEngine(cfg, dims, costs, mover, clock, num_slots=num_slots)
    engine.load_full_layers()
    layers = [OffloadedExperts(store, engine, layer, "cpu", slots, mover, host_fused=_noop_kernel)
              for layer in range(L)]
    W = steps[0].shape[0]
    x = torch.zeros(W, H)
    w = torch.full((W, dims.top_k), 1.0 / dims.top_k)
    per_forward_us: list[float] = []
    plan_free = 0
    for i, routing in enumerate(steps):
        engine.begin_step(StepContext(i, Phase.VERIFY, W, (W,), W - 1))
        for layer in range(L):
            ids = torch.from_numpy(np.ascontiguousarray(routing[:, layer]).astype(np.int32))
            t0 = time.perf_counter()
            layers[layer](x, ids, w)
            per_forward_us.append((time.perf_counter() - t0) * 1e6)
            plan_free += layers[layer].last_plan is None
        t0 = time.perf_counter()
        engine.end_step(W - 1)
        per_forward_us[-1] += (time.perf_counter() - t0) * 1e6  # the step's books, once
        clock.skipped_ms += DRAFT_MS_PER_TOKEN * (W - 1)
    q = np.quantile(per_forward_us, [0.5, 0.9])
    s = engine.stats()
    return {"bench": "layer_host", "policy": policy, "cache_ratio": ratio,
            "slots_per_layer": num_slots, "window_tokens": W, "steps": len(steps),
            "us_per_layer_forward_median": round(float(q[0]), 1),
            "us_per_layer_forward_p90": round(float(q[1]), 1),
            "us_per_layer_forward_mean": round(statistics.fmean(per_forward_us), 1),
            "profile": profile, "plan_free_forwards": plan_free,
            "forwards": len(per_forward_us),
            "hit_rate": round(s.hit_rate, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--window", type=int, default=4, help="tokens per verification window")
    p.add_argument("--ratios", default="1.0,0.5,0.25")
    p.add_argument("--policies", default="spac,lru")
    p.add_argument("--profile", default="rtx4090-pcie4", help="cost profile the balancer uses")
    p.add_argument("--data-dir", default=None, help="shared data folder (default: found)")
    p.add_argument("--json", action="store_true", help="JSON lines only (the only output mode)")
    a = p.parse_args(argv)
    if a.steps < 1 or a.window < 1:
        raise ValueError("steps/window: must be >= 1")
    root = Path(a.data_dir) if a.data_dir else shared_data_dir()
    if root is None or not (root / MIXTRAL).is_file():
        raise SystemExit(f"bench_layer_host: {MIXTRAL} not found; set MOESPAC_DATA_DIR")
    steps = windows(root / MIXTRAL, a.window, a.steps)
    dims = ModelDims(num_layers=32, num_experts=8, top_k=2, hidden_size=H, intermediate_size=I,
                     dtype_bytes=4)
    torch.set_num_threads(1)
    for policy in a.policies.split(","):
        for ratio in (float(r) for r in a.ratios.split(",")):
            row = run(policy, ratio, steps, dims, a.profile)
            row.update(device=describe_device(),
                       command=" ".join(["python", "benchmarks/bench_layer_host.py",
                                         *sys.argv[1:]]))
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
