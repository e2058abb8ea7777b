"""GPU decode harness: a real-size MoE decode loop driving the SAME runtime the vLLM plugin drives
(`runtime.OffloadRuntime`: its store, slots, mover, `engine.ExpertEngine` and
`offload.OffloadedExperts` layers), without vLLM.

Shape legend: L MoE layers, E experts, K top-k, H hidden, I expert intermediate, T tokens per
forward (1 plain decoding, 1 + k when verifying k draft tokens), S slots per layer.

What runs per step (mirrors `simulate.run_engine`, with real kernels and copies instead of costs):

    [speculative policies] draft phase: k x one dense draft forward (a GEMV over `draft_gb` of
                           weights: the paper's dense Qwen3-4B-FP8 draft streams ~4 GB per token)
    rt.begin_step(StepContext)
    for each layer l:  x = rms_norm(x + attention_stub_l(x))   # GEMMs of the model's q/k/v/o sizes
                       x = rms_norm(x + rt.forward(l, x, weights[T,K], ids[T,K]))
    lm_head_stub(x); rt.end_step(accepted)                      # end_step issues prefetches

Routing is REPLAYED from a trace (`trace.load_trace`): the real Mixtral-8x7B decode routing of
shared/data (its dims: 32 x 8 experts, top-2, H 4096, I 14336) or a synthetic Qwen3-30B-A3B-scale
trace (48 x 128, top-8, H 2048, I 768; labelled synthetic). Speculative policies replay
verification windows built by `simulate.speculative_workload` (accepted drafts: recorded routing;
rejected drafts: MODELLED, the trace label says so); plain policies replay the token stream.
Weights are random bf16 (std 1/sqrt(fan_in)); by default one host bank of E experts is shared by
all layers (a copy or CPU pass costs the same whichever layer it serves; saves L x the host RAM;
`--distinct-layers` allocates one per layer). Attention/KV reads of a long context are not modelled.

Policies: all-resident (every expert preloaded into the device slots: the upper bound, verifying
windows like sd-lru), lru (plain decoding, on-demand fetch), static (plain decoding, hot experts on
the device, the rest on the CPU), sd-lru (speculative, on-demand fetch, no utility), spac (ours).

Output: one JSON line per (trace, policy, ratio) on stdout (tok/s, hit rate, GB moved, stall ms,
CPU ms, device, command...), the same lines in `<out>/gpu_decode.jsonl`, and a tok/s-vs-budget plot
`<out>/gpu_decode.png`. Runs on CPU at tiny dims too (`--tiny --device cpu`): CI proves it works.

    python benchmarks/bench_gpu_decode.py --trace .device/qwen3_synth.npz --layers 24 --out out/
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from moespac_vllm.config import MoESpacConfig, Policy
from moespac_vllm.cost_model import ExpertCosts
from moespac_vllm.engine import AUTOREGRESSIVE_POLICIES
from moespac_vllm.offload import (ExpertStore, InlineCpuExperts, ThreadCpuExperts,
                                  experts_reference)
from moespac_vllm.runtime import OffloadRuntime
from moespac_vllm.simulate import autoregressive_workload, speculative_workload
from moespac_vllm.step_context import Phase, StepContext
from moespac_vllm.trace import ModelDims, StepKind, Trace, load_trace

POLICIES = ("all-resident", "lru", "static", "sd-lru", "spac")  # the default set
EXTRA_POLICIES = ("spac-faithful", "lfu", "hybrimoe")  # on request (--policies)
RATIOS = (0.1, 0.25, 0.5)
TINY_H, TINY_I = 64, 32
# Non-expert shapes per model family ([I] for the generic case): q and o are H x q_dim, k and v
# are H x kv_dim (GQA), LM head H x vocab.
_DENSE = {  # (hidden, q_dim, kv_dim, vocab)
    2048: (4096, 512, 151_936),  # Qwen3-30B-A3B: 32 q heads x 128, 4 kv heads x 128
    4096: (4096, 1024, 32_000),  # Mixtral-8x7B: 32 q heads x 128, 8 kv heads x 128
}
DRAFT_GB_FULL = 4.0  # Qwen3-4B-FP8, the paper's draft, streamed once per draft token


# ---- trace preparation ------------------------------------------------------------------------
def cut_layers(trace: Trace, num_layers: int | None) -> Trace:
    """The first `num_layers` MoE layers of a trace (memory/time cut; the JSON says so)."""
    L = trace.dims.num_layers
    if num_layers is None or num_layers >= L:
        return trace
    if num_layers < 1:
        raise ValueError(f"layers: must be >= 1, got {num_layers}")

    def cut(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else np.ascontiguousarray(a[:, :num_layers])

    return replace(trace, dims=replace(trace.dims, num_layers=num_layers),
                   topk_ids=cut(trace.topk_ids), topk_weights=cut(trace.topk_weights),
                   router_logits=cut(trace.router_logits),
                   draft_topk_ids=cut(trace.draft_topk_ids), draft_logits=cut(trace.draft_logits))


def shrink_dims(trace: Trace, hidden: int, inter: int) -> Trace:
    """Same routing, tiny expert matrices (CPU runs and CI)."""
    return replace(trace, dims=replace(trace.dims, hidden_size=hidden, intermediate_size=inter))


# ---- the model around the experts ---------------------------------------------------------------
class DenseStubs:
    """Equivalent-cost stand-ins for what is not an expert: per layer one [H, q+2kv] and one
    [q, H] GEMM (attention projections; the score/softmax part at short context is negligible),
    an LM head [H, vocab], and the draft model as a GEMV over `draft_bytes` of weights."""

    def __init__(self, dims: ModelDims, device: torch.device, dtype: torch.dtype,
                 draft_bytes: int, tiny: bool, seed: int = 0) -> None:
        H = dims.hidden_size
        q, kv, vocab = _DENSE.get(H, (H, max(1, H // 4), 32_000))
        if tiny:
            q, kv, vocab = H, max(1, H // 4), 256
        self.q_dim = q
        g = torch.Generator(device=device).manual_seed(seed)

        def rand(*shape: int) -> torch.Tensor:
            return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32)
                    / math.sqrt(shape[0])).to(dtype)

        self.w_qkv = [rand(H, q + 2 * kv) for _ in range(dims.num_layers)]
        self.w_o = [rand(q, H) for _ in range(dims.num_layers)]
        self.w_lm = rand(H, vocab)
        draft_h = 4096 if not tiny else 64
        self.w_draft = rand(draft_h, max(1, draft_bytes // (2 * draft_h)))
        self.x_draft = torch.randn(1, draft_h, generator=g, device=device).to(dtype)
        self.bytes = sum(t.numel() * t.element_size()
                         for t in (*self.w_qkv, *self.w_o, self.w_lm, self.w_draft))

    def attention(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.w_qkv[layer])[:, : self.q_dim] @ self.w_o[layer]

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.w_lm).argmax(dim=-1)

    def draft_token(self) -> torch.Tensor:
        return self.x_draft @ self.w_draft


def random_store(dims: ModelDims, device: torch.device, dtype: torch.dtype, distinct: bool,
                 seed: int = 0) -> ExpertStore:
    """Host store of random experts (pinned when the device is CUDA). Generated on the device
    (fast) and copied down."""
    pin = device.type == "cuda"
    store = ExpertStore(pin_memory=pin)
    E, H, inter = dims.num_experts, dims.hidden_size, dims.intermediate_size
    g = torch.Generator(device=device).manual_seed(seed)

    def bank(*shape: int, fan_in: int) -> torch.Tensor:
        host = torch.empty(shape, dtype=dtype, pin_memory=pin)
        for e in range(shape[0]):  # one expert at a time: no device-sized temporaries
            host[e].copy_((torch.randn(shape[1:], generator=g, device=device)
                           / math.sqrt(fan_in)).to(dtype))
        return host

    shared = None
    for layer in range(dims.num_layers):
        if shared is None or distinct:
            shared = (bank(E, 2 * inter, H, fan_in=H), bank(E, H, inter, fan_in=inter))
        store.add_layer(layer, shared[0], shared[1])
    return store


# ---- one run --------------------------------------------------------------------------------------
class TimedCpuExperts:
    """Wraps the layer's CPU expert path; sums the wall time from submit to result."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.ms = 0.0
        self.calls = 0

    def submit(self, *args: Any) -> Future:
        t0 = time.perf_counter()
        fut = self.inner.submit(*args)

        def done(_: Future) -> None:
            self.ms += (time.perf_counter() - t0) * 1e3

        fut.add_done_callback(done)
        self.calls += 1
        return fut


@dataclass
class Bench:
    """Everything shared by the runs over one trace."""

    trace: Trace
    ar_work: Trace
    sd_work: Trace
    dims: ModelDims
    device: torch.device
    store: ExpertStore
    stubs: DenseStubs
    costs: ExpertCosts
    costs_label: str
    kernel: Any
    layer_kernel: Any
    kernel_name: str
    cpu_path: Any
    cpu_name: str
    args: argparse.Namespace
    profile: Any = None
    step_times: dict[str, float] | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _decode_steps(work: Trace) -> list[int]:
    return [s for s in range(work.num_steps) if work.kind[s] != StepKind.PREFILL]


def run_policy(b: Bench, name: str, ratio: float) -> dict[str, Any]:
    resident = name == "all-resident"
    policy = Policy.SD_LRU if resident else Policy(name)
    speculative = policy not in AUTOREGRESSIVE_POLICIES
    work = b.sd_work if speculative else b.ar_work
    dims, device = b.dims, b.device
    cfg = MoESpacConfig().replace(policy=policy.value, cache_ratio=1.0 if resident else ratio)
    cpu = TimedCpuExperts(b.cpu_path)
    # The runtime vLLM's glue builds, fed what the glue would hand it: every MoE layer in model
    # order, then each layer's host weights (zero-copy: the bank is already host / pinned).
    rt = OffloadRuntime(cfg, device, costs=b.costs, costs_label=b.costs_label, cpu_experts=cpu,
                        device_kernel=b.layer_kernel, model_name=f"harness:{b.trace.label}")
    for layer in range(dims.num_layers):
        rt.add_target_layer(f"layers.{layer}.mlp.experts", num_experts=dims.num_experts,
                            top_k=dims.top_k, model_layer=layer)
    for layer in range(dims.num_layers):
        rt.weights_loaded(layer, b.store.w13(layer), b.store.w2(layer))
    rt.build()  # everything that fits is loaded here, before the clock starts (load_full_layers)
    engine, mover, slots = rt.engine, rt.mover, rt.slots
    num_slots = slots.num_slots(0)
    if resident:
        _sync(device)
        assert all(engine.resident_slots(layer) is not None for layer in range(dims.num_layers))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bytes_before = mover.bytes_moved
    stall_before = mover.stall_ms

    g = torch.Generator(device="cpu").manual_seed(1)
    steps = _decode_steps(work)[: b.args.steps]
    H = dims.hidden_size
    t_start = time.perf_counter()
    done_steps = 0
    draft_tokens = 0
    for i, s in enumerate(steps):
        st = work.step(s)
        T = st.num_tokens
        k = T - 1 if speculative else 0
        for _ in range(k):
            b.stubs.draft_token()
        draft_tokens += k
        rt.begin_step(StepContext(step=i, phase=Phase.VERIFY if speculative else Phase.DECODE,
                                  num_tokens=T, tokens_per_request=(T,), num_draft_tokens=k),
                      explicit=True)
        x = torch.randn(T, H, generator=g).to(device=device, dtype=torch.bfloat16)
        for layer in range(dims.num_layers):
            x = F.rms_norm(x + b.stubs.attention(layer, x), (H,))
            ids = torch.from_numpy(np.ascontiguousarray(st.topk_ids[:, layer, :]).astype(np.int64))
            if st.topk_weights is not None:
                wts = torch.from_numpy(np.ascontiguousarray(st.topk_weights[:, layer, :]))
            else:
                wts = torch.full(ids.shape, 1.0 / dims.top_k)
            y = rt.forward(layer, x, wts.to(device=device, dtype=torch.float32), ids)
            x = F.rms_norm(x + y, (H,))
        b.stubs.lm_head(x)
        rt.end_step(int(st.num_accepted) if speculative else 0)
        done_steps += 1
        if time.perf_counter() - t_start > b.args.run_seconds:
            break
    _sync(device)
    elapsed_s = time.perf_counter() - t_start
    stall_ms = mover.stall_ms - stall_before
    engine.record_timing(stall_ms=stall_ms, cpu_ms=cpu.ms)
    stats = engine.stats().as_dict()
    moved = mover.bytes_moved - bytes_before
    row = {
        "bench": "gpu_decode",
        "policy": name,
        "engine_policy": policy.value,
        "cache_ratio": 1.0 if resident else ratio,
        "budget_ratio": ratio,
        "slots_per_layer": num_slots,
        "speculative": speculative,
        "draft_tokens": b.args.draft_tokens if speculative else 0,
        "acceptance": b.args.acceptance if speculative else None,
        "trace": work.label,
        "synthetic": bool(work.meta.synthetic),
        "dims": {"layers": dims.num_layers, "experts": dims.num_experts, "top_k": dims.top_k,
                 "hidden": dims.hidden_size, "intermediate": dims.intermediate_size},
        "layers_of_model": b.trace.dims.num_layers if not b.args.layers else None,
        "steps": done_steps,
        "steps_planned": len(steps),
        "tokens": stats["tokens"],
        "time_s": elapsed_s,
        "tokens_per_s": stats["tokens"] / elapsed_s if elapsed_s > 0 else 0.0,
        "ms_per_step": 1e3 * elapsed_s / max(done_steps, 1),
        "hit_rate": stats["hit_rate"],
        "gb_moved": moved / 1e9,
        "stall_ms": stall_ms,
        "cpu_ms": cpu.ms,
        "cpu_expert_calls": cpu.calls,
        "fetched_experts": stats["fetched_experts"],
        "device_experts": stats["device_experts"],
        "cpu_experts": stats["cpu_experts"],
        "slot_gb": slots.total_bytes / 1e9,
        "peak_device_gb": (torch.cuda.max_memory_allocated(device) / 1e9
                           if device.type == "cuda" else None),
        "prefetch_precision": stats["prefetch_precision"],
        "prefetch_recall": stats["prefetch_recall"],
        "draft_gb_per_token": b.stubs.w_draft.numel() * 2 / 1e9,
        "draft_forwards": draft_tokens,
        "kernel": b.kernel_name,
        "cpu_path": b.cpu_name,
        "cpu_threads": torch.get_num_threads(),
        "host_bank": "distinct per layer" if b.args.distinct_layers else "shared across layers",
        "costs": {k: getattr(b.costs, k) for k in ("gpu_fixed_ms", "gpu_per_token_ms",
                                                    "cpu_fixed_ms", "cpu_per_token_ms",
                                                    "fetch_ms")},
        "device": device_name(device),
        "command": b.args.command,
    }
    rt.close()
    del rt, engine, mover, slots
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


# ---- set-up --------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def resolve_kernel(device: torch.device, choice: str) -> tuple[Any, Any, str]:
    """(fused-style kernel for warm-up, what the layer gets as `device_kernel`, name). On a CPU the
    layer's own per-pair reference runs (device_kernel None), as in the vLLM-cpu plugin."""
    if device.type != "cuda":
        return experts_reference, None, "offload per-pair reference (torch, cpu)"
    if choice == "reference":
        return experts_reference, experts_reference, "offload.experts_reference (torch, cuda)"
    from moespac_vllm.kernels.fused_experts import fused_experts

    return fused_experts, fused_experts, "kernels.fused_experts (triton)"


def resolve_cpu_path(device: torch.device, choice: str) -> tuple[Any, str, Callable[[], None]]:
    """`native` (default; what the vLLM plugin's runtime runs on a GPU) / `torch` / `exact`: the
    CpuExpertPool backends (csrc/cpu_experts.cpp / bf16 oneDNN GEMMs / reference arithmetic).
    `layer`: offload's own pair_outputs (weights upcast to fp32; on a worker thread when a GPU
    computes beside it). The third item releases the path's threads."""
    if choice == "layer":
        if device.type == "cuda":
            pool = ThreadCpuExperts()
            return pool, "offload.ThreadCpuExperts (torch pair_outputs, 1 thread)", pool.close
        return (InlineCpuExperts(), "offload.InlineCpuExperts (torch pair_outputs, caller thread)",
                lambda: None)
    from moespac_vllm.kernels.cpu_experts import CpuExpertPool

    cpu_pool = CpuExpertPool(backend=choice)
    return (cpu_pool, f"kernels.cpu_experts.CpuExpertPool({cpu_pool.backend.value})",
            cpu_pool.close)


def resolve_costs(spec: str, dims: ModelDims, device: torch.device, quick: bool,
                  cpu_path: str) -> tuple[ExpertCosts, Any, dict[str, Any]]:
    """(costs the engine's balancer uses, the cost profile, what was measured). `calibrate`:
    measure here, now (moespac calibrate's code); else a cost_model profile name or path."""
    from moespac_vllm.cost_model import CostProfile, get_profile  # the core issue's profiles

    if spec == "calibrate":
        from moespac_vllm.calibrate import QUICK_TOKENS, calibrate

        # Few CPU points: at Mixtral dims one CPU expert pass takes ~0.1-1 s.
        cal = calibrate(dims, device="cuda" if device.type == "cuda" else "cpu",
                        tokens=QUICK_TOKENS, reps=3 if quick else 6,
                        cpu_experts=2 if quick else None,
                        cpu_path=cpu_path)
        return cal.expert_costs(), CostProfile.from_calibration("harness", cal), cal.summary()
    profile = get_profile(spec)
    return profile.expert_costs(dims), profile, {"profile": spec}


def measure_step_times(b: Bench, reps: int = 10) -> dict[str, float]:
    """Median ms of the non-expert pieces of a step on this device (what the simulator is given
    so that modelled and measured runs share everything but the expert path)."""
    import statistics

    dims, device = b.dims, b.device
    x = torch.randn(1, dims.hidden_size, device=device, dtype=torch.bfloat16)
    H = dims.hidden_size

    def timed(fn: Any) -> float:
        out = []
        for _ in range(reps):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            out.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(out)

    return {
        "draft_ms_per_token": timed(b.stubs.draft_token),
        "dense_ms_per_layer": timed(lambda: F.rms_norm(x + b.stubs.attention(0, x), (H,))),
        "lm_head_ms": timed(lambda: b.stubs.lm_head(x)),
    }


def simulated(b: Bench, name: str, ratio: float, tokens: int) -> float | None:
    """tok/s the trace-driven simulator predicts for the same trace, policy, ratio, windows and
    non-expert times, with the calibrated expert costs (None for all-resident: the simulator
    starts cold, this run preloads)."""
    if name == "all-resident" or b.profile is None or b.step_times is None:
        return None
    from moespac_vllm.simulate import StepTimes, simulate

    times = StepTimes(**b.step_times)
    r = simulate(b.trace, name, ratio, b.profile, draft_tokens=b.args.draft_tokens,
                 acceptance=b.args.acceptance, seed=b.args.seed, times=times,
                 max_tokens=max(1, tokens))
    return r.tokens_per_s


def warm_up(b: Bench) -> None:
    """Compile/autotune every shape the runs will meet before any clock starts."""
    dims, device = b.dims, b.device
    w13 = b.store.w13(0)[: dims.top_k].to(device)
    w2 = b.store.w2(0)[: dims.top_k].to(device)
    for T in range(1, b.args.draft_tokens + 2):
        x = torch.randn(T, dims.hidden_size, device=device, dtype=torch.bfloat16)
        ids = torch.arange(dims.top_k, device=device).repeat(T, 1)
        wts = torch.full((T, dims.top_k), 1.0 / dims.top_k, device=device)
        b.kernel(x, w13, w2, ids, wts)
        b.stubs.attention(0, x)
        b.stubs.lm_head(x)
        b.cpu_path.submit(x.cpu(), b.store.w13(0), b.store.w2(0), ids.cpu(), wts.cpu()).result()
    b.stubs.draft_token()
    _sync(device)


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = sorted({r["trace"].split(":", 1)[-1] for r in rows})
    fig, axes = plt.subplots(1, len(traces), figsize=(6.5 * len(traces), 4.5), squeeze=False)
    for ax, tr in zip(axes[0], traces):
        latest = {(r["policy"], r["budget_ratio"]): r for r in rows
                  if r["trace"].split(":", 1)[-1] == tr}  # a re-run replaces its point
        mine = list(latest.values())
        for name in POLICIES + EXTRA_POLICIES:
            pts = sorted((r["budget_ratio"], r["tokens_per_s"]) for r in mine
                         if r["policy"] == name)
            if not pts:
                continue
            if name == "all-resident":
                ax.axhline(pts[0][1], ls="--", color="k", label="all-resident (bound)")
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        first = mine[0]
        d = first["dims"]
        ax.set_title(f"{first['trace'][:60]}\n{d['layers']}L x {d['experts']}E top-{d['top_k']} "
                     f"H{d['hidden']} I{d['intermediate']} - {first['device']}", fontsize=8)
        ax.set_xlabel("expert cache ratio (slots / experts per layer)")
        ax.set_ylabel("decode tokens/s (measured, log scale)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace", action="append", required=True,
                   help="trace file (npz or Mixtral routing JSONL); repeatable")
    p.add_argument("--layers", type=int, default=None, help="keep the first N MoE layers")
    p.add_argument("--steps", type=int, default=64, help="decode steps per run (at most)")
    p.add_argument("--run-seconds", type=float, default=15.0,
                   help="stop a run after this many seconds (the JSON gives steps done)")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--ratios", default=",".join(str(r) for r in RATIOS))
    p.add_argument("--draft-tokens", type=int, default=8, help="k: draft tokens per window")
    p.add_argument("--acceptance", type=float, default=0.8,
                   help="per-draft-token acceptance probability (windows' acceptance model)")
    p.add_argument("--draft-gb", type=float, default=None,
                   help="bytes one draft forward streams (default 4 GB x layers kept / L)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--kernel", default="auto", choices=("auto", "triton", "reference"))
    p.add_argument("--profile", default="calibrate",
                   help="'calibrate' (measure here first) or a cost_model profile name/path")
    p.add_argument("--cpu-path", default="native", choices=("native", "torch", "exact", "layer"),
                   help="CPU experts: the layer's own path, or a CpuExpertPool backend")
    p.add_argument("--tiny", action="store_true", help=f"H={TINY_H}, I={TINY_I} (CPU / CI)")
    p.add_argument("--distinct-layers", action="store_true",
                   help="one random host bank per layer instead of one shared bank")
    p.add_argument("--out", default="out/gpu_decode", help="folder for jsonl + plot")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.command = "python benchmarks/bench_gpu_decode.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    for name in ("steps", "draft_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name.replace('_', '-')}: must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for p in policies:
        if p not in POLICIES + EXTRA_POLICIES:
            raise ValueError(f"policies: unknown {p!r}; expected some of "
                             f"{', '.join(POLICIES + EXTRA_POLICIES)}")
    ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    has_cuda = torch.cuda.is_available()
    if args.device == "cuda" and not has_cuda:
        raise ValueError("device: cuda asked for but no CUDA device is present")
    device = torch.device("cuda" if (args.device != "cpu" and has_cuda) else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "gpu_decode.jsonl"
    rows: list[dict[str, Any]] = []
    with jsonl.open("a") as sink:
        for path in args.trace:
            full = load_trace(path)
            full_layers = full.dims.num_layers
            trace = cut_layers(full, args.layers)
            if args.tiny:
                trace = shrink_dims(trace, TINY_H, TINY_I)
            dims = trace.dims
            draft_gb = args.draft_gb if args.draft_gb is not None else (
                0.001 if args.tiny else DRAFT_GB_FULL * dims.num_layers / full_layers)
            t0 = time.perf_counter()
            store = random_store(dims, device, torch.bfloat16, args.distinct_layers, args.seed)
            stubs = DenseStubs(dims, device, torch.bfloat16, int(draft_gb * 1e9), args.tiny,
                               args.seed)
            costs, profile, cal = resolve_costs(args.profile, dims, device, args.tiny,
                                                args.cpu_path)
            kernel, layer_kernel, kernel_name = resolve_kernel(device, args.kernel)
            cpu_path, cpu_name, close_cpu_path = resolve_cpu_path(device, args.cpu_path)
            b = Bench(trace=trace, ar_work=autoregressive_workload(trace),
                      sd_work=speculative_workload(trace, args.draft_tokens, args.acceptance,
                                                   args.seed),
                      dims=dims, device=device, store=store, stubs=stubs, costs=costs,
                      costs_label=profile.name,
                      kernel=kernel, layer_kernel=layer_kernel, kernel_name=kernel_name,
                      cpu_path=cpu_path, profile=profile,
                      cpu_name=cpu_name, args=args)
            warm_up(b)
            b.step_times = measure_step_times(b)
            setup = {"bench": "gpu_decode_setup", "trace": trace.label, "setup_s":
                     time.perf_counter() - t0, "host_store_gb": store.total_bytes / 1e9,
                     "dense_stub_gb": stubs.bytes / 1e9, "calibration": cal,
                     "step_times_ms": b.step_times,
                     "device": device_name(device), "command": args.command}
            print(json.dumps(setup), flush=True)
            sink.write(json.dumps(setup) + "\n")
            plan = [("all-resident", 1.0)] if "all-resident" in policies else []
            plan += [(p, r) for r in ratios for p in policies if p != "all-resident"]
            for name, ratio in plan:
                row = run_policy(b, name, ratio)
                row["sim_tokens_per_s"] = simulated(b, name, ratio, row["tokens"])
                rows.append(row)
                print(json.dumps(row), flush=True)
                sink.write(json.dumps(row) + "\n")
                sink.flush()
            close_cpu_path()
            del b, store, stubs
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if rows:
        # the plot covers every run in the jsonl (earlier invocations with other traces too)
        every = [r for r in map(json.loads, jsonl.read_text().splitlines())
                 if r.get("bench") == "gpu_decode"]
        plot(every, out / "gpu_decode.png")
        print(summary_table(rows), file=sys.stderr)
    return 0


def summary_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| trace | policy | ratio | slots | tok/s | sim tok/s | hit | GB moved | stall ms | "
             "CPU ms | steps |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['trace'].split(':', 1)[-1][:28]} | {r['policy']} | {r['budget_ratio']:g} | "
            f"{r['slots_per_layer']} | {r['tokens_per_s']:.1f} | "
            f"{'-' if r.get('sim_tokens_per_s') is None else format(r['sim_tokens_per_s'], '.1f')}"
            f" | {r['hit_rate']:.3f} | "
            f"{r['gb_moved']:.2f} | {r['stall_ms']:.0f} | {r['cpu_ms']:.0f} | {r['steps']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as e:
        print(f"bench_gpu_decode: error: {e}", file=sys.stderr)
        sys.exit(2)
