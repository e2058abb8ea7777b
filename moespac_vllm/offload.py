"""The framework-neutral offloaded MoE layer: every expert in host memory, a few slots on the device.

Shape legend: T tokens in a forward, K top-k, E experts per layer, H hidden, I expert intermediate
size, S device slots per layer.

Pieces (no vLLM here; the vLLM glue `patches/routed_experts.py` and the GPU harness both drive them,
so the same code runs with CPU tensors in CI and CUDA tensors on a GPU):

- `ExpertStore`: per MoE layer, all E experts' `w13 [E, 2I, H]` (gate rows then up rows, vLLM's
  layout) and `w2 [E, H, I]` in host memory, pinned when a CUDA device will read them.
- `SlotCache`: per MoE layer, the device slot buffers `w13 [S, 2I, H]`, `w2 [S, H, I]` the kernel
  reads; only the engine's mover writes them.
- `StoreCopyMover`: a synchronous `Mover` (mover.py protocol) copying store -> slot cache. The CUDA
  stream mover of the kernels issue replaces it on a GPU; on CPU runs a copy is what happens anyway.
- `OffloadedExperts`: one MoE layer's forward:

      plan = engine.plan_layer(layer, topk_ids)        # the target's ORIGINAL routing [T, K]
      mover.wait(...) for plan.fetches                 # on-demand copies issued by the engine
      cpu_future = cpu_experts(plan.cpu_mask pairs)    # host weights, overlapped with ...
      out = device_experts(plan.slot_ids pairs)        # ... the slot-cache kernel (-1 skipped)
      out += cpu_future.result()
      engine.finish_layer(layer, topk_ids)

Host-fused mode (a CPU-only engine, where the "device" is the host too): the slot buffers are the
spare rows E..E+S-1 of ONE host tensor per layer whose rows 0..E-1 are the store, and a
`HostFusedKernel` (in vLLM: the very CPU fused-MoE op stock vLLM runs, in its packed layout) computes
every pair in one call, CPU pairs reading store row `expert`, device pairs reading row `E + slot`.
The outputs then equal stock vLLM's bit for bit in every dtype (the op's per-pair arithmetic does
not depend on the row a pair reads, and its k-sum and final cast are the same), and a slot that held
the wrong expert would still show up as a wrong output.

A layer whose experts are all resident (`engine.resident_slots`, e.g. everything fits and
`engine.load_full_layers` ran) skips the plan: the kernel gets the router's ids over the slot
buffers, and the engine only stashes the routing for its books.

Invariant: every routed (token, k) pair is computed exactly once, on the device xor on the CPU, with
the same arithmetic on both sides: fp32 accumulation of `w * down(silu(gate(x)) * up(x))`, then one
cast to the activation dtype. So the placement changes where, never what, is computed; the outputs
match vLLM's CPU MoE op up to fp32 summation order (tests/test_offload.py measures the gap).
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from moespac_vllm.engine import LayerPlan
from moespac_vllm.mover import Mover, MoverFault
from moespac_vllm.staging import Event, ImmediateEvent, Staging
from moespac_vllm.streaming import PrefillStreamer
from moespac_vllm.kernels.fused_experts import fused_experts_pairs, sum_over_topk

logger = logging.getLogger(__name__)


# ---- the expert arithmetic (reference) ----------------------------------------------------------
# Above this many fp32 elements in the [T, K, H] per-pair buffer, tokens are processed in chunks.
PAIR_BUFFER_MAX_ELEMS = 1 << 24


# Per routed pair: weights[t,k] * w2[i] @ (silu(g) * u), (g, u) = w13[i] @ hidden[t], i = ids[t,k];
# fp32 [T,K,H], zero where ids < 0. hidden [T,H]; w13 [N,2I,H]; w2 [N,H,I]; ids index the first dim
# (slots or experts). An expert's pairs are computed in one batch whichever side runs it, so a
# pair's value does not depend on the placement: adding the device and CPU pair buffers (one of
# them holds an exact 0 at every pair) and then summing k = 0..K-1 in order (`sum_pairs`) gives
# bit-identical outputs for every plan.
pair_outputs = fused_experts_pairs
sum_pairs = sum_over_topk


def experts_reference(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                      ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum over k (in order) of `pair_outputs`: fp32 [T,H]. `kernels.fused_experts_reference`
    without its final cast: the caller casts once."""
    return sum_over_topk(fused_experts_pairs(hidden, w13, w2, ids, weights))


def _device_kernel(hidden: torch.Tensor, fp32_out: bool = False
                   ) -> Callable[..., torch.Tensor] | None:
    """The kernels issue's Triton slot-cache kernel on CUDA tensors; None elsewhere (then the
    per-pair reference runs, which is also what makes CPU results placement-invariant).
    `fp32_out`: it returns its fp32 sum unrounded, for a layer that adds the CPU partial and
    rounds once (numerics contract rule 4)."""
    if not hidden.is_cuda:
        return None
    try:
        from moespac_vllm.kernels.fused_experts import fused_experts
    except ImportError:
        return None
    return partial(fused_experts, out_dtype=torch.float32) if fp32_out else fused_experts


# ---- host store and device slots ----------------------------------------------------------------
HOST_PAGE_BYTES = 4096
_PART_ALIGN_BYTES = 256  # w2 starts this aligned inside a layer's buffer


def cuda_host_register(t: torch.Tensor) -> None:
    """Page-lock `t`'s memory in place (cudaHostRegister): exactly its bytes, unlike
    `pin_memory=True`, whose caching host allocator rounds every block up to a power of two
    (~77 GB locked for Qwen3-30B-A3B's 58 GB of experts). Unregistered when `t` is collected."""
    import weakref

    cudart = torch.cuda.cudart()
    ptr, nbytes = t.data_ptr(), t.numel() * t.element_size()
    err = cudart.cudaHostRegister(ptr, nbytes, 0)
    if int(err) != 0:
        raise RuntimeError(f"moespac: cudaHostRegister of {nbytes / 1e6:.1f} MB failed ({err}); "
                           "is the memlock limit (ulimit -l) too low?")
    weakref.finalize(t, cudart.cudaHostUnregister, ptr)


class ExpertStore:
    """All experts of every MoE layer in host memory. Layers are added one at a time (vLLM builds
    them one by one); a layer's tensors never move once added.

    Host memory is allocated exactly. Without pinning (CPU-only engines) a contiguous CPU weight
    is kept as it is (no copy). With pinning (CUDA), each layer's w13 and w2 are copied into ONE
    page-aligned buffer of their exact size (rounded up to a page, w2 aligned to 256 bytes inside)
    which is then registered as page-locked (`host_register`, default `cuda_host_register`): the
    pages are the layer's own, so no registration overlaps another allocation's.
    `allocated_bytes` counts what the store allocated; `allocations` how many buffers."""

    def __init__(self, pin_memory: bool = False,
                 host_register: Callable[[torch.Tensor], None] | None = None) -> None:
        self._w13: dict[int, torch.Tensor] = {}
        self._w2: dict[int, torch.Tensor] = {}
        self._rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layers with spare rows
        self.pin_memory = pin_memory
        self._register = host_register if host_register is not None else cuda_host_register
        self.allocated_bytes = 0
        self.allocations = 0

    def add_layer(self, layer: int, w13: torch.Tensor, w2: torch.Tensor,
                  spare_rows: int = 0) -> None:
        """w13 [E,2I,H], w2 [E,H,I], any device: kept, or copied to (page-locked) host memory.
        With `spare_rows` S > 0 the layer lives in one [E+S, ...] tensor per weight whose rows E..
        start zeroed: `spare(layer)` hands them out (as host-fused slot buffers), `rows(layer)` the
        whole tensor; `w13(layer)` stays rows 0..E-1."""
        if layer in self._w13:
            raise ValueError(f"layer: {layer} already in the expert store")
        if w13.dim() != 3 or w2.dim() != 3:
            raise ValueError(f"w13/w2: expected 3-d [E,2I,H] / [E,H,I], got {tuple(w13.shape)} / "
                             f"{tuple(w2.shape)}")
        E, two_i, H = w13.shape
        if w2.shape != (E, H, two_i // 2) or two_i % 2:
            raise ValueError(f"w2: shape {tuple(w2.shape)} does not match w13 {tuple(w13.shape)}")
        if spare_rows < 0:
            raise ValueError(f"spare_rows: must be >= 0, got {spare_rows}")
        rows = E + spare_rows
        if not self.pin_memory:
            if spare_rows == 0:
                self._w13[layer], self._w2[layer] = self._keep(w13), self._keep(w2)
                return
            full = [self._alloc((rows, *t.shape[1:]), t.dtype) for t in (w13, w2)]
        else:
            full = self._pinned_layer((rows, *w13.shape[1:]), w13.dtype,
                                      (rows, *w2.shape[1:]), w2.dtype)
        for dst, src in zip(full, (w13, w2)):
            dst[:E].copy_(src.detach())
            if spare_rows:
                dst[E:].zero_()
        if spare_rows:
            self._rows[layer] = (full[0], full[1])
        self._w13[layer], self._w2[layer] = full[0][:E], full[1][:E]

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if t.device.type == "cpu" and t.is_contiguous():
            return t
        host = self._alloc(tuple(t.shape), t.dtype)
        host.copy_(t)
        return host

    def _alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device="cpu")
        self.allocated_bytes += t.numel() * t.element_size()
        self.allocations += 1
        return t

    def _pinned_layer(self, shape13: tuple[int, ...], dtype13: torch.dtype,
                      shape2: tuple[int, ...], dtype2: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        n13 = math.prod(shape13) * torch.empty((), dtype=dtype13).element_size()
        n2 = math.prod(shape2) * torch.empty((), dtype=dtype2).element_size()
        off2 = -(-n13 // _PART_ALIGN_BYTES) * _PART_ALIGN_BYTES
        size = -(-(off2 + n2) // HOST_PAGE_BYTES) * HOST_PAGE_BYTES
        raw = torch.empty(size + HOST_PAGE_BYTES, dtype=torch.uint8, device="cpu")
        start = (-raw.data_ptr()) % HOST_PAGE_BYTES
        buf = raw[start:start + size]
        self._register(buf)
        self.allocated_bytes += size
        self.allocations += 1
        w13 = buf[:n13].view(dtype13).view(shape13)
        w2 = buf[off2:off2 + n2].view(dtype2).view(shape2)
        return w13, w2

    def rows(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 [E+S,2I,H], w2 [E+S,H,I]) of a layer added with spare rows."""
        if layer not in self._rows:
            raise ValueError(f"layer: {layer} was added without spare rows")
        return self._rows[layer]

    def spare(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The spare rows E.. of `rows(layer)`: (w13 [S,2I,H], w2 [S,H,I]) views."""
        w13, w2 = self.rows(layer)
        E = self.num_experts(layer)
        return w13[E:], w2[E:]

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self._w13))

    def w13(self, layer: int) -> torch.Tensor:
        return self._w13[layer]

    def w2(self, layer: int) -> torch.Tensor:
        return self._w2[layer]

    def num_experts(self, layer: int) -> int:
        return self._w13[layer].shape[0]

    def expert_bytes(self, layer: int) -> int:
        """Bytes of one expert (w13 + w2) of `layer`."""
        w13, w2 = self._w13[layer], self._w2[layer]
        return (w13[0].numel() * w13.element_size()) + (w2[0].numel() * w2.element_size())

    @property
    def total_bytes(self) -> int:
        """Bytes of the experts (spare rows, counted as slots, not included)."""
        return sum(t.numel() * t.element_size() for d in (self._w13, self._w2) for t in d.values())


class SlotCache:
    """The device slot buffers of every MoE layer: w13 [S,2I,H], w2 [S,H,I] per layer."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._w13: dict[int, torch.Tensor] = {}
        self._w2: dict[int, torch.Tensor] = {}

    def add_layer(self, layer: int, num_slots: int, like_w13: torch.Tensor,
                  like_w2: torch.Tensor) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots: must be >= 1, got {num_slots}")
        # zeros, not empty: a slot read before its first fill must not hold NaN garbage that a
        # masked-out lane of a kernel could still touch.
        self._w13[layer] = torch.zeros((num_slots, *like_w13.shape[1:]), dtype=like_w13.dtype,
                                       device=self.device)
        self._w2[layer] = torch.zeros((num_slots, *like_w2.shape[1:]), dtype=like_w2.dtype,
                                      device=self.device)

    def attach_layer(self, layer: int, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """Use existing buffers as the layer's slots (host-fused mode: the store's spare rows)."""
        if w13.shape[0] < 1 or w13.shape[0] != w2.shape[0]:
            raise ValueError(f"w13/w2: need the same number (>= 1) of slots, got "
                             f"{tuple(w13.shape)} / {tuple(w2.shape)}")
        if w13.device != self.device or w2.device != self.device:
            raise ValueError(f"w13/w2: slot buffers must be on {self.device}, got {w13.device}")
        self._w13[layer], self._w2[layer] = w13, w2

    def num_slots(self, layer: int) -> int:
        return self._w13[layer].shape[0]

    def w13(self, layer: int) -> torch.Tensor:
        return self._w13[layer]

    def w2(self, layer: int) -> torch.Tensor:
        return self._w2[layer]

    @property
    def total_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self._w13, self._w2) for t in d.values())


class StoreCopyMover:
    """`Mover` (see mover.py) that copies an expert from the `ExpertStore` into a `SlotCache` slot
    synchronously (a blocking `copy_`, also correct for CUDA slots: the copy is stream-ordered
    before any later kernel on the current stream). `wait` is then a no-op."""

    def __init__(self, store: ExpertStore, slots: SlotCache) -> None:
        self.store = store
        self.slots = slots
        self._bytes_moved = 0
        self._loaded: dict[tuple[int, int], int] = {}  # (layer, slot) -> expert, for tests/stats

    def load(self, layer: int, expert: int, slot: int) -> None:
        self.slots.w13(layer)[slot].copy_(self.store.w13(layer)[expert])
        self.slots.w2(layer)[slot].copy_(self.store.w2(layer)[expert])
        self._bytes_moved += self.store.expert_bytes(layer)
        self._loaded[(layer, slot)] = expert

    def is_ready(self, layer: int, slot: int) -> bool:
        return True

    def ready_mask(self, layer: int, slots: Sequence[int]) -> list[bool]:
        return [True] * len(slots)

    def wait(self, layer: int, slot: int) -> None:
        return None

    def cancel(self, layer: int, slot: int) -> bool:
        return False

    def expert_in(self, layer: int, slot: int) -> int | None:
        return self._loaded.get((layer, slot))

    @property
    def bytes_moved(self) -> int:
        return self._bytes_moved


# Starts every CPU-expert step failure; patches/engine_errors.py fails that step's requests on it.
FAILED_LAYER_MARKER = "moespac: the CPU experts of MoE layer"


# ---- the layer ----------------------------------------------------------------------------------
@runtime_checkable
class LayerEngine(Protocol):
    """The part of `ExpertEngine` (engine.py) that one layer's forward drives; `OffloadedExperts`
    refuses an engine without all of it."""

    def plan_layer(self, layer: int, topk_ids: np.ndarray) -> LayerPlan: ...

    def finish_layer(self, layer: int, topk_ids: np.ndarray) -> None: ...

    def resident_slots(self, layer: int) -> np.ndarray | None:
        """[E] slot of every expert once the whole layer is resident (plan-free path), else None."""

    def note_resident_forward(self, layer: int, topk_ids: Any) -> None:
        """Books of a plan-free forward (the router's ids, [T, K] integer array-like)."""

    def note_streamed(self, layer: int, experts: int) -> None:
        """Books: `experts` CPU-planned experts ran on the device from streamed weights."""

    def record_timing(self, stall_ms: float = 0.0, cpu_ms: float = 0.0,
                      gpu_ms: float = 0.0) -> None: ...


class CpuExperts(Protocol):
    """The CPU expert path: `submit(...)` starts the work and returns a Future of the fp32
    [T,K,H] per-pair outputs (`pair_outputs`), so it overlaps the device kernel."""

    def submit(self, hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
               ids: torch.Tensor, weights: torch.Tensor) -> Future: ...


class HostFusedKernel(Protocol):
    """Every routed pair of a layer in one call over ONE host weight tensor (host-fused mode):
    hidden [T,H]; w13 [N,2I,H], w2 [N,H,I] (any layout the kernel's owner packed them in, the same
    for every row); rows [T,K] int32 in [0, N); weights [T,K] fp32. Returns [T,H] in hidden's dtype:
    sum over k of weights[t,k] * expert(rows[t,k])(hidden[t]). `kernels.fused_experts_reference`
    is the pure-torch one (unpacked layout)."""

    def __call__(self, hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                 rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor: ...


class ThreadCpuExperts:
    """CPU experts on one background thread running `pair_outputs` over host weights. torch's own
    intra-op threads do the math; the thread only buys overlap with a device kernel (a GPU)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moespac-cpu-experts")

    def submit(self, hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
               ids: torch.Tensor, weights: torch.Tensor) -> Future:
        return self._pool.submit(pair_outputs, hidden, w13, w2, ids, weights)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class InlineCpuExperts:
    """CPU experts computed in the caller's thread (an already-completed Future). When the
    "device" is the CPU itself, a second thread buys nothing and only adds contention."""

    def submit(self, hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
               ids: torch.Tensor, weights: torch.Tensor) -> Future:
        fut: Future = Future()
        fut.set_result(pair_outputs(hidden, w13, w2, ids, weights))
        return fut


@dataclass(slots=True)
class LayerCounters:
    """What one layer computed where, summed over its forwards (the engine keeps the policy stats;
    these count what really ran)."""

    forwards: int = 0
    device_pairs: int = 0
    cpu_pairs: int = 0
    fetches: int = 0
    planned: int = 0  # forwards that went through engine.plan_layer (the rest: resident path)
    plan_ms: float = 0.0  # host time in engine.plan_layer + the plan check
    launch_ms: float = 0.0  # host time issuing the device branch (kernel launches / CPU compute)
    cpu_wait_ms: float = 0.0  # host time waiting for the CPU branch's result
    readback_ms: float = 0.0  # host time waiting for the staged ids / hidden (Staging.wait)
    streamed_pairs: int = 0  # CPU-planned pairs computed from streamed experts (prefill)
    fetch_faults: int = 0  # copies waited for that had failed: fetched again, else CPU pairs


class OffloadedExperts:
    """One MoE layer computed from an `ExpertStore` (host) and a `SlotCache` (device), as the
    engine plans it. `forward(hidden [T,H], topk_ids [T,K], topk_weights [T,K]) -> [T,H]` in the
    dtype of `hidden`."""

    def __init__(
        self,
        store: ExpertStore,
        engine: LayerEngine,
        layer: int,
        device: torch.device | str,
        slots: SlotCache,
        mover: Mover,
        cpu_experts: CpuExperts | None = None,
        device_kernel: Callable[..., torch.Tensor] | None = None,
        host_fused: HostFusedKernel | None = None,
        staging: Staging | None = None,
        streamer: PrefillStreamer | None = None,
    ) -> None:
        if layer not in store.layers:
            raise ValueError(f"layer: {layer} is not in the expert store")
        if host_fused is not None:
            spare_w13, _ = store.spare(layer)
            if slots.w13(layer).data_ptr() != spare_w13.data_ptr() or \
                    slots.num_slots(layer) != spare_w13.shape[0]:
                raise ValueError(f"host_fused: layer {layer}'s slots must be the store's spare "
                                 "rows (SlotCache.attach_layer(layer, *store.spare(layer)))")
        if not isinstance(engine, LayerEngine):
            raise ValueError(f"engine: {type(engine).__name__} does not implement LayerEngine "
                             "(plan_layer, finish_layer, resident_slots, note_resident_forward, "
                             "record_timing)")
        if not isinstance(mover, Mover):
            raise ValueError(f"mover: {type(mover).__name__} does not implement mover.Mover "
                             "(load, is_ready, ready_mask, wait, cancel, bytes_moved)")
        self.store = store
        self.engine = engine
        self.layer = layer
        self.device = torch.device(device)
        self.slots = slots
        self.mover = mover
        self.cpu_experts = cpu_experts if cpu_experts is not None else InlineCpuExperts()
        self.device_kernel = device_kernel  # None: per-pair reference / Triton on CUDA
        self.host_fused = host_fused
        # every host <-> device crossing of the hot path (shared by a runtime's layers)
        self.staging = staging if staging is not None else Staging(self.device)
        self._slot_map: torch.Tensor | None = None  # [E] expert -> slot on the device
        self.streamer = streamer  # prefill / large steps: CPU-planned experts streamed instead
        self._identity_of: np.ndarray | None = None  # the resident table _identity describes
        self._identity = False
        self.counters = LayerCounters()
        self.last_plan: LayerPlan | None = None
        self._cpu_ms = 0.0
        self._gpu_ms = 0.0

    def forward(self, hidden: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor) -> torch.Tensor:
        if hidden.dim() != 2 or topk_ids.dim() != 2 or topk_ids.shape != topk_weights.shape:
            raise ValueError(
                f"hidden/topk_ids/topk_weights: expected [T,H], [T,K], [T,K]; got "
                f"{tuple(hidden.shape)}, {tuple(topk_ids.shape)}, {tuple(topk_weights.shape)}")
        if topk_ids.shape[0] != hidden.shape[0]:
            raise ValueError(f"topk_ids: {topk_ids.shape[0]} rows for {hidden.shape[0]} tokens")
        if topk_ids.is_floating_point() or topk_ids.is_complex():
            raise ValueError(f"topk_ids: expected integer expert ids, got {topk_ids.dtype}")
        full = self.engine.resident_slots(self.layer)
        if full is not None and (self.host_fused is not None
                                 or self._kernel_for(hidden) is not None):
            return self._forward_resident(hidden, topk_ids, topk_weights, full)
        c = self.counters
        streamed0 = c.streamed_pairs
        # ONE readback per planned forward: the router's ORIGINAL ids (the engine's input, before
        # any slot remap), the hidden rows and the weights (what CPU pairs need), non-blocking
        # into page-locked memory; the host waits on their event once.
        (ids_host, hidden_host, weights_host), ev = self.staging.to_host(
            topk_ids, hidden, topk_weights)
        t0 = time.perf_counter()
        self.staging.wait(ev)
        t1 = time.perf_counter()
        c.readback_ms += (t1 - t0) * 1e3
        ids_np = ids_host.numpy()
        plan = self.engine.plan_layer(self.layer, ids_np)
        self._check_plan(plan, ids_np)
        self.last_plan = plan
        t2 = time.perf_counter()
        c.plan_ms += (t2 - t1) * 1e3
        try:
            plan = self._wait_fetches(plan)
            stall_ms = (time.perf_counter() - t2) * 1e3
            self._cpu_ms = self._gpu_ms = 0.0

            T, K = ids_np.shape
            step = max(1, PAIR_BUFFER_MAX_ELEMS // max(1, K * hidden.shape[1]))
            if self.host_fused is not None:
                out = self._compute_host_fused(hidden, topk_weights, ids_np, plan)
            elif self._streams(T, ids_np, plan):
                out = self._compute_streamed(hidden, topk_weights, ids_np, plan, step)
            elif T <= step:
                out = self._compute(hidden, topk_weights, hidden_host, weights_host, ids_np, plan)
            else:  # bound the [T,K,H] pair buffers; both placements chunk alike
                out = torch.cat([self._compute(hidden[i:i + step], topk_weights[i:i + step],
                                               hidden_host[i:i + step], weights_host[i:i + step],
                                               ids_np[i:i + step], plan, rows=slice(i, i + step))
                                 for i in range(0, T, step)])
        except BaseException:
            # the layer's experts are unpinned, so the engine can plan this layer again at the
            # next step (the error itself goes to the caller)
            self.engine.finish_layer(self.layer, ids_np)
            raise
        self.engine.finish_layer(self.layer, ids_np)
        self.engine.record_timing(stall_ms=stall_ms, cpu_ms=self._cpu_ms, gpu_ms=self._gpu_ms)

        c.forwards += 1
        c.planned += 1
        n_cpu = int(plan.cpu_mask.sum()) - (c.streamed_pairs - streamed0)
        c.cpu_pairs += n_cpu
        c.device_pairs += ids_np.size - n_cpu
        c.fetches += len(plan.fetches)
        return out.to(hidden.dtype)

    __call__ = forward

    def _wait_fetches(self, plan: LayerPlan) -> LayerPlan:
        """Wait for the plan's copies. A copy that failed (the mover raises: failed, cancelled,
        evicted while loading) is fetched once more; if that fails too, its slot's pairs are
        computed on the CPU instead (same per-pair arithmetic, so the same output)."""
        failed: list[int] = []
        for expert, slot in plan.fetches:
            try:
                self.mover.wait(self.layer, slot)
                continue
            except Exception:  # noqa: BLE001 - a failed copy: fetch afresh, else CPU
                self.counters.fetch_faults += 1
            try:
                self.mover.load(self.layer, expert, slot)
                self.mover.wait(self.layer, slot)
            except Exception:  # noqa: BLE001
                failed.append(slot)
        if not failed:
            return plan
        to_cpu = np.isin(plan.slot_ids, np.asarray(failed, dtype=plan.slot_ids.dtype))
        slot_ids = np.where(to_cpu, np.int32(-1), plan.slot_ids).astype(np.int32)
        lost = {e for e, s in plan.fetches if s in failed}
        return replace(plan, slot_ids=slot_ids, cpu_mask=slot_ids < 0,
                       cpu_experts=tuple(sorted(set(plan.cpu_experts) | lost)),
                       device_experts=tuple(e for e in plan.device_experts if e not in lost))

    def _kernel_for(self, hidden: torch.Tensor, fp32_out: bool = False
                    ) -> Callable[..., torch.Tensor] | None:
        return (self.device_kernel if self.device_kernel is not None
                else _device_kernel(hidden, fp32_out))

    def _forward_resident(self, hidden: torch.Tensor, topk_ids: torch.Tensor,
                          topk_weights: torch.Tensor, full: np.ndarray) -> torch.Tensor:
        """The layer holds all its experts (`engine.resident_slots`): no plan, no fetch, no CPU
        pair, and no host wait. When slot s holds expert s (always after
        `engine.load_full_layers`) the router's ids go to the kernel as they are, over the slot
        buffers, exactly as stock vLLM hands them to its experts; otherwise they are remapped by a
        device gather through the engine's table, uploaded once per table (the device slot map).
        The ids for the engine's books are copied to the host non-blocking (`Staging.to_host`);
        the engine reads them when the step ends, after the runtime's one `settle()` (and checks
        them there: ids outside [0, E) raise then; on a CPU device a negative id raises here).
        This is the whole host-side cost of a forward at cache_ratio 1.0
        (benchmarks/bench_overhead.py)."""
        if self._identity_of is not full:
            self._identity = bool((full == np.arange(full.shape[0])).all())
            self._identity_of = full
            self._slot_map = None if self._identity else self.staging.to_device(
                torch.from_numpy(np.ascontiguousarray(full, dtype=np.int64)))
        ids = topk_ids.detach()
        t0 = time.perf_counter()
        weights = topk_weights.detach()
        w13, w2 = self.slots.w13(self.layer), self.slots.w2(self.layer)
        if self._identity:
            slot_ids = ids
        else:
            if not self.staging.cuda and ids.numel() and int(ids.min()) < 0:
                raise ValueError(f"topk_ids: expert ids must be in [0, {full.shape[0]})")
            slot_ids = self._slot_map[ids.long()]
        if self.host_fused is not None:  # the slots are the store's spare rows (checked at init)
            try:  # the host kernel is this engine's CPU expert worker
                out = self.host_fused(hidden, w13, w2, slot_ids.to(torch.int32).contiguous(),
                                      weights.float().contiguous())
            except Exception as e:
                raise self._cpu_error(e, ids.numpy()) from e
        else:
            out = self._kernel_for(hidden)(hidden, w13, w2, slot_ids.long(), weights)
        (ids_host,), ev = self.staging.to_host(ids)
        self.staging.pending = ev  # settled once per step, before the engine reads the books
        self.engine.note_resident_forward(self.layer, ids_host)
        launch_ms = (time.perf_counter() - t0) * 1e3
        self.engine.record_timing(stall_ms=0.0, cpu_ms=0.0, gpu_ms=launch_ms)
        self.last_plan = None
        c = self.counters
        c.forwards += 1
        c.device_pairs += ids.numel()
        c.launch_ms += launch_ms
        return out.to(hidden.dtype)

    def _streams(self, T: int, ids_np: np.ndarray, plan: LayerPlan) -> bool:
        if self.streamer is None or T < self.streamer.min_tokens or not plan.cpu_mask.any():
            return False
        counts = np.bincount(ids_np[plan.cpu_mask].ravel(),
                             minlength=self.store.num_experts(self.layer))
        return self.streamer.should_stream(T, counts[counts > 0])

    def _compute_streamed(self, hidden: torch.Tensor, topk_weights: torch.Tensor,
                          ids_np: np.ndarray, plan: LayerPlan, step: int) -> torch.Tensor:
        """Prefill / large step (`PrefillStreamer.should_stream`): the slot-cache pairs as usual,
        the CPU-planned pairs on the device from experts streamed through two buffers."""
        t0 = time.perf_counter()
        kernel = self._kernel_for(hidden, fp32_out=True)
        w13, w2 = self.slots.w13(self.layer), self.slots.w2(self.layer)
        parts = []
        for i in range(0, ids_np.shape[0], step):
            dev_ids = self.staging.to_device(
                torch.from_numpy(plan.slot_ids[i:i + step].astype(np.int64)))
            h, w = hidden[i:i + step], topk_weights[i:i + step]
            parts.append(kernel(h, w13, w2, dev_ids, w).float() if kernel is not None
                         else sum_pairs(pair_outputs(h, w13, w2, dev_ids, w)))
        out = torch.cat(parts) + self.streamer.run(
            hidden, topk_weights, ids_np, plan.cpu_mask, self.store.w13(self.layer),
            self.store.w2(self.layer))
        ms = (time.perf_counter() - t0) * 1e3
        self._gpu_ms += ms
        self.counters.launch_ms += ms
        self.counters.streamed_pairs += int(plan.cpu_mask.sum())
        self.engine.note_streamed(self.layer, len(plan.cpu_experts))
        return out

    def _compute_host_fused(self, hidden: torch.Tensor, topk_weights: torch.Tensor,
                            ids_np: np.ndarray, plan: LayerPlan) -> torch.Tensor:
        """One call: CPU pairs read store row `expert`, device pairs slot row `E + slot`. Its wall
        time counts as device time (on a CPU-only engine the device is the host)."""
        t0 = time.perf_counter()
        E = self.store.num_experts(self.layer)
        rows = np.where(plan.cpu_mask, ids_np, plan.slot_ids + E).astype(np.int32)
        w13, w2 = self.store.rows(self.layer)
        try:
            out = self.host_fused(hidden, w13, w2, torch.from_numpy(rows),
                                  topk_weights.detach().float().contiguous())
        except Exception as e:  # the host kernel is this engine's CPU expert worker
            raise self._cpu_error(e, ids_np) from e
        ms = (time.perf_counter() - t0) * 1e3
        self._gpu_ms += ms
        self.counters.launch_ms += ms
        return out

    def _compute(self, hidden: torch.Tensor, topk_weights: torch.Tensor,
                 hidden_host: torch.Tensor, weights_host: torch.Tensor, ids_np: np.ndarray,
                 plan: LayerPlan, rows: slice = slice(None)) -> torch.Tensor:
        """fp32 [T,H] for one block of tokens: CPU pairs submitted first over the staged host
        rows (they overlap the device branch), device pairs from the slot cache (slot ids: one
        non-blocking upload), then the CPU partial's one non-blocking upload, added in fp32."""
        cpu_mask = plan.cpu_mask[rows]
        slot_ids = plan.slot_ids[rows]
        cpu_future: Future | None = None
        t0 = time.perf_counter()
        if cpu_mask.any():
            cpu_ids = torch.from_numpy(np.where(cpu_mask, ids_np, -1))
            try:
                cpu_future = self.cpu_experts.submit(
                    hidden_host, self.store.w13(self.layer), self.store.w2(self.layer),
                    cpu_ids, weights_host)
            except Exception as e:
                raise self._cpu_error(e, ids_np[cpu_mask]) from e
        t1 = time.perf_counter()
        dev_ids = self.staging.to_device(torch.from_numpy(slot_ids.astype(np.int64)))
        kernel = self._kernel_for(hidden, fp32_out=True)
        w13, w2 = self.slots.w13(self.layer), self.slots.w2(self.layer)
        if kernel is not None:  # a fused kernel returns the k-summed [T,H]
            out = kernel(hidden, w13, w2, dev_ids, topk_weights).float()
        else:
            out = pair_outputs(hidden, w13, w2, dev_ids, topk_weights)
        t2 = time.perf_counter()
        # host wall times: the CPU branch from submit to result (inline: its compute), the device
        # branch from launch to return (on CUDA: launch time; on CPU: its compute)
        try:
            cpu_part = cpu_future.result() if cpu_future is not None else None
        except Exception as e:
            raise self._cpu_error(e, ids_np[cpu_mask]) from e
        t3 = time.perf_counter()
        self._gpu_ms += (t2 - t1) * 1e3
        self._cpu_ms += ((t1 - t0) + (t3 - t2)) * 1e3
        c = self.counters
        c.launch_ms += (t2 - t1) * 1e3
        c.cpu_wait_ms += (t3 - t2) * 1e3
        if kernel is not None:
            return out if cpu_part is None else out + self.staging.to_device(sum_pairs(cpu_part))
        if cpu_part is not None:
            out = out + self.staging.to_device(cpu_part)
        return sum_pairs(out)

    def _cpu_error(self, err: Exception, cpu_ids: np.ndarray) -> RuntimeError:
        """One clear error for a CPU expert worker that raised: the layer, its experts, why."""
        experts = sorted({int(v) for v in cpu_ids.ravel()})
        return RuntimeError(f"{FAILED_LAYER_MARKER} {self.layer} failed "
                            f"(experts {experts}): {type(err).__name__}: {err}")

    def _check_plan(self, plan: LayerPlan, ids: np.ndarray) -> None:
        """The engine contract, checked cheaply on every forward: a broken plan would silently
        compute a wrong token, so it fails loudly instead."""
        if plan.slot_ids.shape != ids.shape or plan.cpu_mask.shape != ids.shape:
            raise RuntimeError(
                f"engine plan for layer {self.layer}: slot_ids {plan.slot_ids.shape} / cpu_mask "
                f"{plan.cpu_mask.shape} do not match topk_ids {ids.shape}")
        if not np.array_equal(plan.cpu_mask, plan.slot_ids < 0):
            raise RuntimeError(f"engine plan for layer {self.layer}: cpu_mask is not the "
                               "complement of slot_ids >= 0")
        if plan.slot_ids.size and plan.slot_ids.max() >= self.slots.num_slots(self.layer):
            raise RuntimeError(f"engine plan for layer {self.layer}: slot id "
                               f"{int(plan.slot_ids.max())} >= {self.slots.num_slots(self.layer)}")


def slots_for(num_experts: int, ratio: float) -> int:
    """ceil(ratio * E), at least 1, at most E (the config's rule, for callers without a config)."""
    return max(1, min(num_experts, math.ceil(ratio * num_experts - 1e-9)))


__all__ = [
    "CpuExperts", "FAILED_LAYER_MARKER", "Event", "ExpertStore",
    "ImmediateEvent", "HostFusedKernel", "InlineCpuExperts", "LayerCounters", "LayerEngine",
    "OffloadedExperts", "SlotCache", "Staging", "StoreCopyMover",
    "ThreadCpuExperts", "experts_reference", "pair_outputs", "sum_pairs", "slots_for",
]
