"""Host time of one offloaded MoE layer forward, per policy, cache_ratio and window.

    python benchmarks/bench_layer_host.py --dims qwen3-30b-a3b --json [--windows 1,4,9]
    python benchmarks/bench_layer_host.py --dims mixtral-8x7b --json [--steps 200] [--window 4]

`--dims qwen3-30b-a3b` (issue 11's target): the engine's own work per planned layer forward at
Qwen3-30B-A3B scale (48 layers, E=128, top-8; `--ratios` default 0.17 = 22 slots), i.e.
`ExpertEngine.plan_layer` + `finish_layer` (slot lookup, miss set, the exact balancer, pin/touch,
fetch admission, the commit after the layer), and per step `begin_step` + `end_step` (prefetch
scan, eviction order, books). Routing: the SYNTHETIC Qwen3-scale decode stream
(`trace.synthetic_trace(QWEN3_30B_A3B, k=0)`, calibrated on the shared OLMoE stats and Mixtral
traces; rows say `trace: synthetic`) cut into windows of 1, 4 and 9 tokens. The copies run on a
serial PCIe link model (`_LinkMover`, SimMover's timing) over a modelled clock: each layer advances
it by the layer's modelled time (the cost profile's device / CPU branch) and each step by a 2
ms-per-draft-token draft phase, so the engine sees the same copy timing whatever the host's speed;
host time is measured with `perf_counter` around the engine calls only (no weights move: a Qwen3
layer's experts do not fit this machine). `--path python` times the Python reference.

`--dims mixtral-8x7b` (the original run): `offload.OffloadedExperts.forward` driven by the real
engine and a `mover.SyncMover`, with the expert kernel replaced by a no-op, on the real Mixtral
decode trace (`mixtral-8x7b-routing/humaneval_2_routing.jsonl`, 32 layers, E=8, top-2) cut into
windows of `--window` tokens. What is left is the plugin's own host work per layer: the plan, slot
copies of tiny experts (H=64, I=32, so a copy costs microseconds), the fixed-table path of whole
layers, and the per-step books (added to the step's last forward). The balancer decides with a
real cost profile at Mixtral-8x7B's expert size (`--profile`, default rtx4090-pcie4), and a
modelled draft phase of 2 ms per draft token separates the steps (the clock skips it).

One JSON line per (policy, cache_ratio, window): median / p90 / mean microseconds per layer
forward (wall clock; Qwen3 rows also the median of the thread's CPU time, which a shared machine
does not inflate), median / p90 microseconds of per-step work, plan-free forwards, hit rate,
whether the native planner ran, the 1-minute load average; tagged with the device and command.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from moespac_vllm.calibrate import describe_device
from moespac_vllm.config import MoESpacConfig, Policy, shared_data_dir
from moespac_vllm.cost_model import ExpertCosts, get_profile
from moespac_vllm.engine import ExpertEngine
from moespac_vllm.mover import SyncMover
from moespac_vllm.offload import ExpertStore, OffloadedExperts, SlotCache
from moespac_vllm.simulate import SimClock
from moespac_vllm.step_context import Phase, StepContext
from moespac_vllm.trace import (MIXTRAL_8X7B, QWEN3_30B_A3B, ModelDims, read_mixtral_jsonl,
                                request_streams, synthetic_trace)

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
    return cut(request_streams(read_mixtral_jsonl(trace_path)), window, steps)


def cut(streams: list[np.ndarray], window: int, steps: int) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    for stream in streams:
        for s in range(0, stream.shape[0] - window + 1, window):
            out.append(stream[s:s + window])
            if len(out) == steps:
                return out
    return out


def _quantiles(xs: list[float]) -> tuple[float, float]:
    q = np.quantile(xs, [0.5, 0.9])
    return round(float(q[0]), 1), round(float(q[1]), 1)


def _future(steps: list[np.ndarray], E: int) -> np.ndarray:
    """[steps, L, E] token counts (the oracle's future routing)."""
    L = steps[0].shape[1]
    out = np.zeros((len(steps), L, E), dtype=np.int64)
    for i, w in enumerate(steps):
        for layer in range(L):
            out[i, layer] = np.bincount(w[:, layer].ravel(), minlength=E)
    return out


def run(policy: str, ratio: float, steps: list[np.ndarray], dims: ModelDims,
        profile: str, native: bool | None = None) -> dict:
    """The Mixtral run: whole `OffloadedExperts` forwards on tiny tensors (see the docstring)."""
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
    future = _future(steps, E) if Policy(policy) is Policy.ORACLE else None
    engine = ExpertEngine(cfg, dims, costs, mover, clock, num_slots=num_slots,
                          future_counts=future, native=native)
    engine.load_full_layers()
    layers = [OffloadedExperts(store, engine, layer, "cpu", slots, mover, host_fused=_noop_kernel)
              for layer in range(L)]
    W = steps[0].shape[0]
    x = torch.zeros(W, H)
    w = torch.full((W, dims.top_k), 1.0 / dims.top_k)
    per_forward_us: list[float] = []
    per_step_us: list[float] = []
    plan_free = 0
    for i, routing in enumerate(steps):
        t0 = time.perf_counter()
        engine.begin_step(StepContext(i, Phase.VERIFY, W, (W,), W - 1))
        step_us = (time.perf_counter() - t0) * 1e6
        for layer in range(L):
            ids = torch.from_numpy(np.ascontiguousarray(routing[:, layer]).astype(np.int32))
            t0 = time.perf_counter()
            layers[layer](x, ids, w)
            per_forward_us.append((time.perf_counter() - t0) * 1e6)
            plan_free += layers[layer].last_plan is None
        t0 = time.perf_counter()
        engine.end_step(W - 1)
        step_us += (time.perf_counter() - t0) * 1e6
        per_forward_us[-1] += step_us  # the step's books, once
        per_step_us.append(step_us)
        clock.skipped_ms += DRAFT_MS_PER_TOKEN * (W - 1)
    med, p90 = _quantiles(per_forward_us)
    smed, sp90 = _quantiles(per_step_us)
    s = engine.stats()
    return {"bench": "layer_host", "dims": "mixtral-8x7b", "trace": "real", "policy": policy,
            "cache_ratio": ratio, "slots_per_layer": num_slots, "window_tokens": W,
            "steps": len(steps), "native": engine._native is not None,
            "us_per_layer_forward_median": med, "us_per_layer_forward_p90": p90,
            "us_per_layer_forward_mean": round(statistics.fmean(per_forward_us), 1),
            "us_per_step_median": smed, "us_per_step_p90": sp90,
            "profile": profile, "plan_free_forwards": plan_free,
            "forwards": len(per_forward_us), "hit_rate": round(s.hit_rate, 3),
            "load_avg_1min": round(os.getloadavg()[0], 2)}


class _LinkMover:
    """`Mover` on one serial copy link of the modelled clock, with the least Python per call
    (one list store per load, one list read per query: each is a call from the engine, 30-60
    per Qwen3 layer forward at ratio 0.17, ~0.1 us apiece here), so the rows time the engine,
    not a mover: the same landing times as `simulate.SimMover`'s for copies that are never
    cancelled. `done[layer][slot]`: when the slot's last copy lands (+inf: none, or cancelled)."""

    __slots__ = ("clock", "fetch_ms", "done", "link_free", "loads", "expert_bytes")

    def __init__(self, clock: SimClock, fetch_ms: float, expert_bytes: int, num_layers: int,
                 num_slots: int) -> None:
        self.clock, self.fetch_ms, self.expert_bytes = clock, fetch_ms, expert_bytes
        self.done = [[math.inf] * num_slots for _ in range(num_layers)]
        self.link_free = 0.0
        self.loads = 0

    def load(self, layer: int, expert: int, slot: int) -> None:
        t, free = self.clock.t_ms, self.link_free
        self.link_free = self.done[layer][slot] = (t if t > free else free) + self.fetch_ms
        self.loads += 1

    def is_ready(self, layer: int, slot: int) -> bool:
        return self.clock.t_ms >= self.done[layer][slot]

    def ready_mask(self, layer: int, slots) -> list[bool]:
        t, done = self.clock.t_ms, self.done[layer]
        return [t >= done[s] for s in slots]

    def wait(self, layer: int, slot: int) -> None:
        pass

    def cancel(self, layer: int, slot: int) -> bool:
        done, self.done[layer][slot] = self.done[layer][slot], math.inf
        return math.inf > done > self.clock.t_ms

    @property
    def bytes_moved(self) -> int:
        return self.loads * self.expert_bytes


def _layer_ms(counts: np.ndarray, plan, costs: ExpertCosts) -> float:
    """Modelled time of one planned layer: the slower of the device branch (its experts plus the
    on-demand copies) and the CPU branch."""
    dev = np.asarray(plan.device_experts, dtype=np.int64)
    cpu = np.asarray(plan.cpu_experts, dtype=np.int64)
    gpu_ms = costs.gpu_fixed_ms * dev.size + costs.gpu_per_token_ms * float(counts[dev].sum()) \
        + costs.fetch_ms * len(plan.fetches)
    cpu_ms = costs.cpu_fixed_ms * cpu.size + costs.cpu_per_token_ms * float(counts[cpu].sum())
    return max(gpu_ms, cpu_ms)


def run_engine(policy: str, ratio: float, steps: list[np.ndarray], dims: ModelDims,
               profile: str, native: bool | None = None) -> dict:
    """The engine's own host work per planned layer forward and per step (see the docstring)."""
    L, E = dims.num_layers, dims.num_experts
    cfg = MoESpacConfig().replace(policy=policy, cache_ratio=ratio, stats_file=None)
    num_slots = cfg.cache.slots_per_layer(E, L, dims.expert_bytes)
    costs = get_profile(profile).expert_costs(dims)
    clock = SimClock()
    mover = _LinkMover(clock, costs.fetch_ms, dims.expert_bytes, L, num_slots)
    future = _future(steps, E) if Policy(policy) is Policy.ORACLE else None
    engine = ExpertEngine(cfg, dims, costs, mover, clock, num_slots=num_slots,
                          future_counts=future, native=native)
    engine.load_full_layers()
    W = steps[0].shape[0]
    phase = Phase.VERIFY if W > 1 else Phase.DECODE
    per_forward_us: list[float] = []
    cpu_us: list[float] = []  # this thread's CPU time: what a shared machine's wall time inflates
    per_step_us: list[float] = []
    plan_free = 0
    perf, cpu_clock = time.perf_counter, time.thread_time
    for i, routing in enumerate(steps):
        t0 = perf()
        engine.begin_step(StepContext(i, phase, W, (W,), W - 1))
        step_us = (perf() - t0) * 1e6
        for layer in range(L):
            ids = np.ascontiguousarray(routing[:, layer])
            if engine.resident_slots(layer) is not None:
                t0 = perf()
                engine.note_resident_forward(layer, ids)
                per_forward_us.append((perf() - t0) * 1e6)
                plan_free += 1
                continue
            c0 = cpu_clock()
            t0 = perf()
            plan = engine.plan_layer(layer, ids)
            engine.finish_layer(layer, ids)
            per_forward_us.append((perf() - t0) * 1e6)
            cpu_us.append((cpu_clock() - c0) * 1e6)
            counts = np.bincount(ids.ravel(), minlength=E)
            clock.t_ms += _layer_ms(counts, plan, costs)
        t0 = perf()
        engine.end_step(W - 1)
        per_step_us.append(step_us + (perf() - t0) * 1e6)
        clock.t_ms += DRAFT_MS_PER_TOKEN * (W - 1)
    med, p90 = _quantiles(per_forward_us)
    smed, sp90 = _quantiles(per_step_us)
    s = engine.stats()
    return {"bench": "layer_host", "dims": dims_name(dims), "trace": "synthetic",
            "policy": policy, "cache_ratio": ratio, "slots_per_layer": num_slots,
            "window_tokens": W, "steps": len(steps), "native": engine._native is not None,
            "us_per_layer_forward_median": med, "us_per_layer_forward_p90": p90,
            "us_per_layer_forward_mean": round(statistics.fmean(per_forward_us), 1),
            "cpu_us_per_layer_forward_median": _quantiles(cpu_us)[0] if cpu_us else None,
            "us_per_step_median": smed, "us_per_step_p90": sp90,
            "profile": profile, "plan_free_forwards": plan_free,
            "forwards": len(per_forward_us), "hit_rate": round(s.hit_rate, 3),
            "load_avg_1min": round(os.getloadavg()[0], 2)}


def dims_name(dims: ModelDims) -> str:
    return "qwen3-30b-a3b" if dims == QWEN3_30B_A3B else "mixtral-8x7b"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", default="mixtral-8x7b", choices=("mixtral-8x7b", "qwen3-30b-a3b"))
    p.add_argument("--steps", type=int, default=None,
                   help="steps per run (default 200 Mixtral, 100 Qwen3)")
    p.add_argument("--window", type=int, default=4, help="Mixtral: tokens per window")
    p.add_argument("--windows", default="1,4,9", help="Qwen3: tokens per window, one run each")
    p.add_argument("--ratios", default=None, help="default 1.0,0.5,0.25 Mixtral, 0.17 Qwen3")
    p.add_argument("--policies", default=None,
                   help="comma list or 'all' (default spac,lru Mixtral, all Qwen3)")
    p.add_argument("--path", default="auto", choices=("auto", "native", "python"),
                   help="the engine's planner: native (compiled), python (reference), auto")
    p.add_argument("--profile", default="rtx4090-pcie4", help="cost profile the balancer uses")
    p.add_argument("--seed", type=int, default=0, help="Qwen3: synthetic trace seed")
    p.add_argument("--data-dir", default=None, help="shared data folder (default: found)")
    p.add_argument("--json", action="store_true", help="JSON lines only (the only output mode)")
    a = p.parse_args(argv)
    qwen = a.dims == "qwen3-30b-a3b"
    n_steps = a.steps if a.steps is not None else (100 if qwen else 200)
    if n_steps < 1 or a.window < 1:
        raise ValueError("steps/window: must be >= 1")
    native = {"auto": None, "native": True, "python": False}[a.path]
    policies = a.policies or ("all" if qwen else "spac,lru")
    policies = [q.value for q in Policy] if policies == "all" else policies.split(",")
    ratios = [float(r) for r in (a.ratios or ("0.17" if qwen else "1.0,0.5,0.25")).split(",")]
    torch.set_num_threads(1)
    command = " ".join(["python", "benchmarks/bench_layer_host.py", *sys.argv[1:]])
    if qwen:
        wins = [int(w) for w in a.windows.split(",")]
        if min(wins) < 1:
            raise ValueError("windows: must be >= 1")
        trace = synthetic_trace(QWEN3_30B_A3B, num_steps=n_steps * max(wins) + 8, k=0,
                                seed=a.seed)
        streams = request_streams(trace)
        plans = [(w, cut(streams, w, n_steps)) for w in wins]
        runner, dims = run_engine, QWEN3_30B_A3B
    else:
        root = Path(a.data_dir) if a.data_dir else shared_data_dir()
        if root is None or not (root / MIXTRAL).is_file():
            raise SystemExit(f"bench_layer_host: {MIXTRAL} not found; set MOESPAC_DATA_DIR")
        plans = [(a.window, windows(root / MIXTRAL, a.window, n_steps))]
        dims = ModelDims(num_layers=32, num_experts=8, top_k=2, hidden_size=H,
                         intermediate_size=I, dtype_bytes=4)
        runner = run
    for policy in policies:
        for ratio in ratios:
            for _, steps in plans:
                row = runner(policy, ratio, steps, dims, a.profile, native)
                row.update(device=describe_device(), command=command)
                print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
