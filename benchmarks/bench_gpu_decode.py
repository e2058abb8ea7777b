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

Routing is REPLAYED from a trace, computed ON THE DEVICE (`DeviceRouter`: a router GEMM + top-k
biased to the trace's ids, so the layer reads device ids back as under vLLM) (`trace.load_trace`): the real Mixtral-8x7B decode routing of
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
from moespac_vllm.cost_model import ExpertCosts, StepTimes
from moespac_vllm.engine import AUTOREGRESSIVE_POLICIES
from moespac_vllm.offload import (ExpertStore, InlineCpuExperts, ThreadCpuExperts,
                                  experts_reference)
from moespac_vllm.runtime import OffloadRuntime
from moespac_vllm.simulate import (adaptive_governor, autoregressive_workload,
                                   speculative_workload)
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
    # The banks are allocated page-locked here; a store without its own pinning keeps them as
    # they are (no copy: the shared bank is one tensor seen by every layer).
    store = ExpertStore(pin_memory=False)
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
    router: DeviceRouter | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _decode_steps(work: Trace) -> list[int]:
    return [s for s in range(work.num_steps) if work.kind[s] != StepKind.PREFILL]


def harness_runtime(b: Bench, cfg: MoESpacConfig, cpu: Any) -> OffloadRuntime:
    """The runtime vLLM's glue builds, fed what the glue would hand it: every MoE layer in model
    order, then each layer's host weights. The harness's banks are page-locked already, so the
    runtime's store keeps them as they are (its own store would copy and register every layer:
    58 GB per case at Qwen3 dims with a shared bank)."""
    dims = b.dims
    rt = OffloadRuntime(cfg, b.device, costs=b.costs, costs_label=b.costs_label, cpu_experts=cpu,
                        device_kernel=b.layer_kernel, model_name=f"harness:{b.trace.label}")
    rt.store = ExpertStore(pin_memory=False)
    for layer in range(dims.num_layers):
        rt.add_target_layer(f"layers.{layer}.mlp.experts", num_experts=dims.num_experts,
                            top_k=dims.top_k, model_layer=layer)
    for layer in range(dims.num_layers):
        w13, w2 = rt.weights_loaded(layer, b.store.w13(layer), b.store.w2(layer))
        if w13.data_ptr() != b.store.w13(layer).data_ptr():
            raise RuntimeError("harness: the runtime copied a host bank")
    rt.build()  # everything that fits is loaded here, before the clock starts (load_full_layers)
    return rt


def run_policy(b: Bench, name: str, ratio: float) -> dict[str, Any]:
    resident = name == "all-resident"
    policy = Policy.SD_LRU if resident else Policy(name)
    speculative = policy not in AUTOREGRESSIVE_POLICIES
    work = b.sd_work if speculative else b.ar_work
    dims, device = b.dims, b.device
    cfg = MoESpacConfig().replace(policy=policy.value, cache_ratio=1.0 if resident else ratio)
    cpu = TimedCpuExperts(b.cpu_path)
    rt = harness_runtime(b, cfg, cpu)
    engine, mover, slots = rt.engine, rt.mover, rt.slots
    num_slots = slots.num_slots(0)
    if resident:
        _sync(device)
        assert all(engine.resident_slots(layer) is not None for layer in range(dims.num_layers))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bytes_before = mover.bytes_moved
    stall_before = engine.stats().stall_ms

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
        want = upload(st.topk_ids, device)  # routing computed on the device (DeviceRouter)
        for layer in range(dims.num_layers):
            x = F.rms_norm(x + b.stubs.attention(layer, x), (H,))
            wts, ids = b.router.route(layer, x, want[:, layer, :])
            y = rt.forward(layer, x, wts, ids)
            x = F.rms_norm(x + y, (H,))
        b.stubs.lm_head(x)
        rt.end_step(int(st.num_accepted) if speculative else 0)
        done_steps += 1
        if time.perf_counter() - t_start > b.args.run_seconds:
            break
    _sync(device)
    elapsed_s = time.perf_counter() - t_start
    # the layers' own waits on their copies (recorded per forward; the Mover protocol has none)
    stall_ms = engine.stats().stall_ms - stall_before
    engine.record_timing(cpu_ms=cpu.ms)
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


# ---- the suite's cases (benchmarks/gpu_check.py): device routing, any window source -----------
ROUTER_BIAS = 1e4  # added at the replayed ids: top-k then picks exactly them


class DeviceRouter:
    """Routing computed ON THE DEVICE, as in vLLM: per layer a router GEMM x [T,H] @ W [H,E] in
    fp32, plus a bias of ROUTER_BIAS scattered (on the device) at the ids the trace wants, top-k,
    and a softmax over the chosen logits without the bias. So the ids the layer gets are device
    tensors whose readback is as real as in vLLM, and they equal the trace's ids."""

    def __init__(self, dims: ModelDims, device: torch.device, seed: int = 0) -> None:
        g = torch.Generator(device=device).manual_seed(seed + 7)
        self.top_k = dims.top_k
        self.w = torch.randn(dims.num_layers, dims.hidden_size, dims.num_experts, generator=g,
                             device=device) / math.sqrt(dims.hidden_size)

    def route(self, layer: int, x: torch.Tensor, want: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights fp32 [T,K], ids int64 [T,K]) for `want` [T,K] (device ids of the trace)."""
        logits = x.float() @ self.w[layer]
        biased = logits.scatter_add(1, want, torch.full(want.shape, ROUTER_BIAS,
                                                        device=logits.device))
        top = torch.topk(biased, self.top_k, dim=-1)
        return torch.softmax(top.values - ROUTER_BIAS, dim=-1), top.indices


def upload(ids: np.ndarray, device: torch.device) -> torch.Tensor:
    """One step's wanted ids [T,L,K] to the device: one non-blocking copy from pinned memory
    (no host wait; ordered before the step's kernels)."""
    host = torch.from_numpy(np.ascontiguousarray(ids).astype(np.int64))
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


@dataclass(frozen=True)
class Case:
    """One row of the suite. mode: plain (1 token per step), sd (fixed k), adaptive (k chosen by
    engine.choose_draft_tokens before every step, up to k), prefill (one chunk of k tokens),
    graphed (all experts on the device, no runtime, the step captured in a CUDA graph on CUDA:
    the ceiling). policy: a harness policy name; threads: torch threads (None: all)."""

    name: str
    policy: str
    ratio: float
    mode: str
    k: int = 0
    threads: int | None = None


def plain_steps(work: Trace):
    for s in _decode_steps(work):
        st = work.step(s)
        yield st.topk_ids, 0, 0


def window_steps(work: Trace):
    for s in _decode_steps(work):
        st = work.step(s)
        yield st.topk_ids, int(st.num_accepted), st.num_tokens - 1


def adaptive_steps(engine: Any, ar: Trace, acceptance: float, k_max: int,
                   times: StepTimes, seed: int):
    """`simulate.run_adaptive`'s windows, cut on the fly from the plain stream by the same
    governor (`simulate.adaptive_governor`: k = 0 first, then the roofline's choice with its
    hysteresis); rejected drafts' routing MODELLED by resampling a token, as there."""
    rng = np.random.default_rng([seed, 17])
    governor = adaptive_governor(engine, times, acceptance, k_max)
    decode = ar.kind == StepKind.DECODE
    steps = 0
    for sid in dict.fromkeys(ar.seq_id[decode].tolist()):
        rows = ar.token_offsets[:-1][decode & (ar.seq_id == sid)]
        n = rows.shape[0]
        p = 0
        while p < n:
            k = 0 if steps == 0 else governor.choose(engine)
            steps += 1
            k_eff = min(k, n - 1 - p)
            a = 0
            while a < k_eff and rng.random() < acceptance:
                a += 1
            window = rows[p:p + k_eff + 1].copy()
            if a < k_eff:
                window[a + 1:] = rows[rng.integers(0, n, size=k_eff - a)]
            yield ar.topk_ids[window], a, k_eff
            p += a + 1


def prefill_ids(work: Trace, tokens: int) -> np.ndarray:
    """[tokens, L, K]: the first `tokens` routed tokens of the stream (cycled if shorter)."""
    ids = work.topk_ids
    reps = -(-tokens // ids.shape[0])
    return np.concatenate([ids] * reps)[:tokens]


class SyncCounter:
    """Synchronizing CUDA calls in a block (torch.cuda.set_sync_debug_mode('warn'), each warning
    recorded); 0 on a CPU (there the explicit waits, Staging.waits, are the count)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.count = 0

    def __enter__(self) -> "SyncCounter":
        import warnings

        if self.cuda:
            self._w = warnings.catch_warnings(record=True)
            self._log = self._w.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
            self.count = sum("synchroniz" in str(w.message).lower() for w in self._log)
            self._w.__exit__(*exc)


class StepTimer:
    """GPU time of each step (CUDA events on the current stream, read once after the run, then
    released); None on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._pairs: list[tuple[Any, Any]] = []

    def start(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._pairs.append((ev, None))

    def stop(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._pairs[-1] = (self._pairs[-1][0], ev)

    def total_ms(self) -> float | None:
        if not self.cuda:
            return None
        torch.cuda.synchronize()
        ms = sum(a.elapsed_time(b) for a, b in self._pairs)
        self._pairs.clear()
        return ms


def graphed_ceiling(b: Bench, case: Case) -> dict[str, Any]:
    """All experts on the device, no runtime: router + Triton kernel over the full banks per
    layer, plain decode; the whole step captured once in a CUDA graph and replayed (on CUDA;
    eager elsewhere, `graphed` says which)."""
    dims, device = b.dims, b.device
    H, L = dims.hidden_size, dims.num_layers
    banks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    dev_w13 = []
    dev_w2 = []
    for layer in range(L):
        key = b.store.w13(layer).data_ptr()
        if key not in banks:
            banks[key] = (b.store.w13(layer).to(device), b.store.w2(layer).to(device))
        dev_w13.append(banks[key][0])
        dev_w2.append(banks[key][1])
    kernel = b.kernel
    steps = list(plain_steps(b.ar_work))[: b.args.steps]
    x_in = torch.zeros(1, H, device=device, dtype=torch.bfloat16)
    want = torch.zeros(1, L, dims.top_k, device=device, dtype=torch.int64)

    def step() -> torch.Tensor:
        x = x_in
        for layer in range(L):
            x = F.rms_norm(x + b.stubs.attention(layer, x), (H,))
            wts, ids = b.router.route(layer, x, want[:, layer, :])
            x = F.rms_norm(x + kernel(x, dev_w13[layer], dev_w2[layer], ids, wts).to(x.dtype),
                           (H,))
        return b.stubs.lm_head(x)

    graphed, note = False, "eager (not a CUDA device)"
    run = step
    if device.type == "cuda":
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    step()
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            run, graphed, note = graph.replay, True, "CUDA graph of the whole step"
        except Exception as e:  # capture refused (a host sync inside): measure eager, say why
            note = f"eager: capture failed ({type(e).__name__}: {str(e)[:120]})"
    timer, sync = StepTimer(device), SyncCounter(device)
    g = torch.Generator(device=device).manual_seed(1)
    t0 = time.perf_counter()
    done = 0
    with sync:
        for ids, _, _ in steps:
            want.copy_(upload(ids, device))
            x_in.copy_(torch.randn(1, H, generator=g, device=device).to(torch.bfloat16))
            timer.start()
            run()
            timer.stop()
            done += 1
            if time.perf_counter() - t0 > b.args.run_seconds:
                break
        _sync(device)
    elapsed = time.perf_counter() - t0
    del banks, dev_w13, dev_w2
    return {"steps": done, "tokens": done, "time_s": elapsed, "hit_rate": 1.0, "gb_moved": 0.0,
            "syncs": sync.count, "waits": 0, "step_end_waits": 0, "layer_forwards": done * L,
            "planned_forwards": 0, "fetched_experts": 0, "cpu_experts": 0,
            "streamed_pairs": 0, "streamed_experts": 0,
            "gpu_ms": timer.total_ms(), "host_plan_ms": 0.0, "launch_ms": None,
            "cpu_wait_ms": 0.0, "readback_ms": 0.0, "stall_ms": 0.0, "cpu_ms": 0.0,
            "mean_draft_tokens": 0.0, "graphed": graphed, "graph_note": note,
            "slots_per_layer": dims.num_experts}


def run_case(b: Bench, case: Case) -> dict[str, Any]:
    """One case through the library runtime (what vLLM's glue drives), routing on the device."""
    old_threads = torch.get_num_threads()
    if case.threads is not None:
        torch.set_num_threads(case.threads)
    try:
        if case.mode == "graphed":
            r = graphed_ceiling(b, case)
        else:
            r = _run_runtime(b, case)
    finally:
        torch.set_num_threads(old_threads)
    L = b.dims.num_layers
    r["syncs_per_layer"] = (r["syncs"] + r["waits"]) / max(1, r["layer_forwards"])
    r["tokens_per_s"] = r["tokens"] / r["time_s"] if r["time_s"] > 0 else 0.0
    row = {"bench": "gpu_check", "case": case.name, "policy": case.policy, "mode": case.mode,
           "cache_ratio": case.ratio, "draft_tokens": case.k, "threads": case.threads or "all",
           "cpu_threads": case.threads or old_threads, "layers": L, **r,
           "sync_count_method": ("sync-debug warnings + Staging.wait" if b.device.type == "cuda"
                                 else "Staging.wait (the host round trips a GPU would make)")}
    row["sim_tokens_per_s"], row["sim_note"] = simulated_case(b, case, row["tokens"])
    return row


def _run_runtime(b: Bench, case: Case) -> dict[str, Any]:
    resident = case.policy == "all-resident"
    policy = Policy.SD_LRU if resident else Policy(case.policy)
    dims, device = b.dims, b.device
    ratio = 1.0 if resident else case.ratio
    cfg = MoESpacConfig().replace(policy=policy.value, cache_ratio=ratio)
    cpu = TimedCpuExperts(b.cpu_path)
    rt = harness_runtime(b, cfg, cpu)
    engine, mover = rt.engine, rt.mover
    if case.mode == "plain":
        source = plain_steps(b.ar_work)
    elif case.mode == "sd":
        source = window_steps(speculative_workload(b.trace, case.k, b.args.acceptance,
                                                   b.args.seed))
    elif case.mode == "adaptive":
        source = adaptive_steps(engine, b.ar_work, b.args.acceptance, case.k,
                                sim_times(b), b.args.seed)
    elif case.mode == "prefill":
        source = iter([(prefill_ids(b.ar_work, case.k), 0, 0)])
    else:
        raise ValueError(f"mode: unknown {case.mode!r}")
    speculative = case.mode in ("sd", "adaptive")
    H, L = dims.hidden_size, dims.num_layers
    g = torch.Generator(device=device).manual_seed(1)
    bytes0, stall0, waits0 = mover.bytes_moved, engine.stats().stall_ms, rt.staging.waits
    settles0 = rt.staging.settles
    timer, sync = StepTimer(device), SyncCounter(device)
    done = draft_total = 0
    ks: list[int] = []
    t0 = time.perf_counter()
    with sync:
        for i, (ids, accepted, k) in enumerate(source):
            if i >= b.args.steps:
                break
            T = ids.shape[0]
            want = upload(ids, device)
            timer.start()
            for _ in range(k):
                b.stubs.draft_token()
            draft_total += k
            ks.append(k)
            phase = (Phase.PREFILL if case.mode == "prefill"
                     else Phase.VERIFY if speculative else Phase.DECODE)
            rt.begin_step(StepContext(step=i, phase=phase, num_tokens=T, tokens_per_request=(T,),
                                      num_draft_tokens=k), explicit=True)
            x = torch.randn(T, H, generator=g, device=device).to(torch.bfloat16)
            for layer in range(L):
                x = F.rms_norm(x + b.stubs.attention(layer, x), (H,))
                wts, rids = b.router.route(layer, x, want[:, layer, :])
                x = F.rms_norm(x + rt.forward(layer, x, wts, rids), (H,))
            b.stubs.lm_head(x)
            rt.end_step(accepted if speculative else 0)
            timer.stop()
            done += 1
            if time.perf_counter() - t0 > b.args.run_seconds:
                break
        _sync(device)
    elapsed = time.perf_counter() - t0
    stall_ms = engine.stats().stall_ms - stall0  # the layers' waits on their copies
    engine.record_timing(cpu_ms=cpu.ms)
    stats = engine.stats().as_dict()
    counters = [m.counters for m in rt.experts.values()]
    tokens = stats["tokens"] if case.mode != "prefill" else case.k
    r = {"steps": done, "tokens": tokens, "time_s": elapsed, "hit_rate": stats["hit_rate"],
         "gb_moved": (mover.bytes_moved - bytes0) / 1e9, "syncs": sync.count,
         "waits": rt.staging.waits - waits0, "step_end_waits": rt.staging.settles - settles0,
         "layer_forwards": sum(c.forwards for c in counters),
         "planned_forwards": sum(c.planned for c in counters), "gpu_ms": timer.total_ms(),
         "host_plan_ms": sum(c.plan_ms for c in counters),
         "launch_ms": sum(c.launch_ms for c in counters),
         "cpu_wait_ms": sum(c.cpu_wait_ms for c in counters),
         "readback_ms": sum(c.readback_ms for c in counters),
         "stall_ms": stall_ms, "cpu_ms": cpu.ms,
         "mean_draft_tokens": float(np.mean(ks)) if ks else 0.0,
         "fetched_experts": stats["fetched_experts"], "cpu_experts": stats["cpu_experts"],
         "slots_per_layer": rt.slots.num_slots(0), "graphed": False, "graph_note": "eager",
         "streamed_pairs": sum(c.streamed_pairs for c in counters),
         "streamed_experts": rt.streamer.counters.experts if rt.streamer is not None else 0}
    rt.close()
    del rt, engine, mover
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return r


def sim_times(b: Bench) -> StepTimes:
    """The simulator's step times for this bench: the profile's (plan and launch per layer,
    shared compute) with the non-expert pieces measured here."""
    return replace(b.profile.step_times(b.dims), **b.step_times)


def simulated_case(b: Bench, case: Case, tokens: int) -> tuple[float | None, str]:
    """The simulator's tok/s for the case's policy, ratio and windows (calibrated profile,
    measured non-expert times), or None and why."""
    if b.profile is None or b.step_times is None:
        return None, "no profile"
    if case.mode in ("graphed", "prefill") or case.policy == "all-resident":
        return None, f"{case.mode}: the simulator replays decode steps from a cold cache"
    policy = Policy(case.policy)
    if case.mode == "plain" and policy not in AUTOREGRESSIVE_POLICIES:
        return None, f"{policy.value} in plain decode: the simulator runs it speculative only"
    from moespac_vllm.simulate import simulate

    r = simulate(b.trace, policy, case.ratio, b.profile, draft_tokens=max(case.k, 1),
                 acceptance=b.args.acceptance, seed=b.args.seed,
                 times=sim_times(b), max_tokens=max(1, tokens),
                 adaptive_draft=case.mode == "adaptive")
    return r.tokens_per_s, "simulate.simulate, same trace / windows / costs"


# ---- set-up --------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


class NativeDeviceKernel:
    """cpu-as-device: the native CPU expert kernel (its own pool) as the layer's fused device
    kernel, (x, w13, w2, ids, weights) -> fp32 [T,H] summed over k; ids -1 are skipped. The path
    `moespac calibrate` times as the device on a machine without CUDA, so the simulator's device
    costs are those of what runs (benchmarks/bench_fidelity.py)."""

    def __init__(self) -> None:
        from moespac_vllm.kernels.cpu_experts import CpuExpertPool

        self.pool = CpuExpertPool(backend="native")

    def __call__(self, hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                 ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.pool.wait(self.pool.submit(hidden, w13, w2, ids, weights))


def resolve_kernel(device: torch.device, choice: str) -> tuple[Any, Any, str]:
    """(fused-style kernel for warm-up, what the layer gets as `device_kernel`, name). On a CPU the
    layer's own per-pair reference runs (device_kernel None), as in the vLLM-cpu plugin."""
    if choice == "reference":  # on a CPU too: then the layer takes its device paths (resident)
        return (experts_reference, experts_reference,
                f"offload.experts_reference (torch, {device.type})")
    if choice == "native":
        if device.type == "cuda":
            raise ValueError("kernel: 'native' is the CPU kernel playing the device; this run "
                             "has a CUDA device")
        k = NativeDeviceKernel()
        return k, k, "kernels.cpu_experts.CpuExpertPool(native) as the device kernel"
    if device.type != "cuda":
        return experts_reference, None, "offload per-pair reference (torch, cpu)"
    from moespac_vllm.kernels.fused_experts import fused_experts

    # The layer's own default on CUDA (what vLLM runs): fused_experts, asked for its fp32 sum
    # where a CPU partial is added to it, so the layer output is rounded once.
    return fused_experts, None, "kernels.fused_experts (triton)"


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
    so that modelled and measured runs share everything but the expert path): one layer's dense
    part exactly as `_run_runtime` runs it (attention, norms, residual adds, the device router)
    and the LM head, at 1 token and at a verify window of 1 + draft_tokens tokens (their slope:
    what each more token costs), and one draft pass."""
    import statistics

    dims, device = b.dims, b.device
    H, K = dims.hidden_size, dims.top_k
    wide = 1 + b.args.draft_tokens

    def timed(fn: Any) -> float:
        out = []
        for _ in range(reps):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            out.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(out)

    def dense_and_head(T: int) -> tuple[float, float]:
        x = torch.randn(T, H, device=device, dtype=torch.bfloat16)
        want = torch.arange(K, device=device).repeat(T, 1)
        zero = torch.zeros_like(x)

        def dense() -> torch.Tensor:
            y = F.rms_norm(x + b.stubs.attention(0, x), (H,))
            b.router.route(0, y, want)
            return F.rms_norm(y + zero, (H,))

        return timed(dense), timed(lambda: b.stubs.lm_head(x))

    d1, h1 = dense_and_head(1)
    dw, hw = dense_and_head(wide)
    return {
        "draft_ms_per_token": timed(b.stubs.draft_token),
        "dense_ms_per_layer": d1, "lm_head_ms": h1,
        "dense_ms_per_token": max(0.0, (dw - d1) / (wide - 1)),
        "lm_head_ms_per_token": max(0.0, (hw - h1) / (wide - 1)),
    }


def simulated(b: Bench, name: str, ratio: float, tokens: int) -> float | None:
    """tok/s the trace-driven simulator predicts for the same trace, policy, ratio, windows and
    non-expert times, with the calibrated expert costs (None for all-resident: the simulator
    starts cold, this run preloads)."""
    if name == "all-resident" or b.profile is None or b.step_times is None:
        return None
    from moespac_vllm.simulate import simulate

    times = sim_times(b)
    r = simulate(b.trace, name, ratio, b.profile, draft_tokens=b.args.draft_tokens,
                 acceptance=b.args.acceptance, seed=b.args.seed, times=times,
                 max_tokens=max(1, tokens))
    return r.tokens_per_s


def make_bench(args: argparse.Namespace, path: str | Trace, device: torch.device
               ) -> tuple[Bench, dict[str, Any], Callable[[], None]]:
    """Everything the runs over one trace share (random store, stubs, costs, kernel, CPU path,
    device router), warmed up; the setup row; the CPU path's closer."""
    full = load_trace(path) if not isinstance(path, Trace) else path
    full_layers = full.dims.num_layers
    trace = cut_layers(full, args.layers)
    if args.tiny:
        trace = shrink_dims(trace, TINY_H, TINY_I)
    elif args.hidden is not None:
        trace = shrink_dims(trace, args.hidden, args.inter or max(1, args.hidden // 2))
    dims = trace.dims
    draft_gb = args.draft_gb if args.draft_gb is not None else (
        0.001 if args.tiny else DRAFT_GB_FULL * dims.num_layers / full_layers)
    t0 = time.perf_counter()
    store = random_store(dims, device, torch.bfloat16, args.distinct_layers, args.seed)
    t_store = time.perf_counter() - t0
    stubs = DenseStubs(dims, device, torch.bfloat16, int(draft_gb * 1e9), args.tiny, args.seed)
    costs, profile, cal = resolve_costs(args.profile, dims, device, args.tiny, args.cpu_path)
    kernel, layer_kernel, kernel_name = resolve_kernel(device, args.kernel)
    cpu_path, cpu_name, close_cpu_path = resolve_cpu_path(device, args.cpu_path)
    b = Bench(trace=trace, ar_work=autoregressive_workload(trace),
              sd_work=speculative_workload(trace, args.draft_tokens, args.acceptance, args.seed),
              dims=dims, device=device, store=store, stubs=stubs, costs=costs,
              costs_label=profile.name, kernel=kernel, layer_kernel=layer_kernel,
              kernel_name=kernel_name, cpu_path=cpu_path, profile=profile, cpu_name=cpu_name,
              args=args, router=DeviceRouter(dims, device, args.seed))
    warm_up(b)
    b.step_times = measure_step_times(b)
    setup = {"bench": "gpu_decode_setup", "trace": trace.label, "setup_s":
             time.perf_counter() - t0, "store_fill_s": t_store,
             "host_store_gb": store.total_bytes / 1e9,
             "host_bank": "distinct per layer" if args.distinct_layers else
             "one random bank of E experts shared by every layer (views)",
             "dense_stub_gb": stubs.bytes / 1e9, "calibration": cal,
             "step_times_ms": b.step_times, "kernel": kernel_name, "cpu_path": cpu_name,
             "device": device_name(device), "command": args.command}
    return b, setup, close_cpu_path


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
    p.add_argument("--kernel", default="auto", choices=("auto", "triton", "reference", "native"),
                   help="native (CPU only): the native CPU kernel plays the device kernel")
    p.add_argument("--profile", default="calibrate",
                   help="'calibrate' (measure here first) or a cost_model profile name/path")
    p.add_argument("--cpu-path", default="native", choices=("native", "torch", "exact", "layer"),
                   help="CPU experts: the layer's own path, or a CpuExpertPool backend")
    p.add_argument("--tiny", action="store_true", help=f"H={TINY_H}, I={TINY_I} (CPU / CI)")
    p.add_argument("--hidden", type=int, default=None,
                   help="expert hidden size H instead of the trace's (same routing)")
    p.add_argument("--inter", type=int, default=None,
                   help="expert intermediate size I with --hidden (default H/2)")
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
    for name in ("hidden", "inter"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"{name}: must be >= 1, got {v}")
    if args.inter is not None and args.hidden is None:
        raise ValueError("inter: give it with --hidden")
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
            b, setup, close_cpu_path = make_bench(args, path, device)
            store, stubs = b.store, b.stubs
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


def cell(v: Any, spec: str) -> str:
    """One markdown table cell: '-' for a missing value, else `format(v, spec)`."""
    return "-" if v is None else format(v, spec)


def markdown_table(head: list[str], body: list[list[str]]) -> str:
    """The stderr tables of this harness and the suites built on it (gpu_check, bench_fidelity)."""
    rows = [head, ["---"] * len(head), *body]
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def summary_table(rows: list[dict[str, Any]]) -> str:
    return markdown_table(
        ["trace", "policy", "ratio", "slots", "tok/s", "sim tok/s", "hit", "GB moved", "stall ms",
         "CPU ms", "steps"],
        [[r["trace"].split(":", 1)[-1][:28], r["policy"], f"{r['budget_ratio']:g}",
          str(r["slots_per_layer"]), f"{r['tokens_per_s']:.1f}",
          cell(r.get("sim_tokens_per_s"), ".1f"), f"{r['hit_rate']:.3f}",
          f"{r['gb_moved']:.2f}", f"{r['stall_ms']:.0f}", f"{r['cpu_ms']:.0f}", str(r["steps"])]
         for r in rows])


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as e:
        print(f"bench_gpu_decode: error: {e}", file=sys.stderr)
        sys.exit(2)
