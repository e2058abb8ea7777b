"""The CPU expert path: routed experts computed from host weights, off the caller's thread.

Shape legend: T tokens, K top-k, E experts in the host store, H hidden, I intermediate.

    pool = CpuExpertPool(num_threads=config.cpu_threads)    # backend "native" by default
    fut = pool.submit(hidden[T,H], w13[E,2I,H], w2[E,H,I], ids[T,K], weights[T,K])  # returns now
    ...launch the device experts...                        # overlaps: the GIL is free
    partial = pool.wait(fut)                                # fp32 [T,H]; fut.result(): [T,K,H]

`ids` are expert ids into the store's first dimension; ids < 0 are pairs some other device runs
(the complement of the slot-cache kernel's ids) and come back as exact zeros. The future's result
is the fp32 per-pair buffer [T,K,H] (offload.py's `CpuExperts` protocol: adding the device's and
the CPU's pair buffers, then summing k = 0..K-1 in order, makes the output independent of the
placement); `wait` returns that in-order sum, [T,H] fp32. This is ktransformers' submit_forward /
sync_forward split; jobs run in FIFO order.

Backends, i.e. how one layer's CPU pairs are computed (`CpuBackend`):
- NATIVE (default): `moespac_vllm._cpu_experts` (csrc/cpu_experts.cpp), one native call per
  submit for all the layer's CPU experts, on the module's own std::thread pool (not torch's), the
  weights read in the store's layout (bf16 via AVX512-BF16 where the CPU has it, else AVX-512 /
  AVX2 FMAs, else scalar; fp16 and fp32 too). It keeps the numerics contract of
  kernels/fused_experts.py: fp32 products and sums, the activation rounded to the dtype, so it
  differs from EXACT only by fp32 summation order (tests: <= 1e-5 relative per pair at fp32,
  <= 1e-4 at bf16/fp16, where an activation that lands on a rounding boundary may round the other
  way). If the module is not built, NATIVE falls back to TORCH with one log line.
- TORCH: torch GEMMs in the weights' dtype (oneDNN; bf16 uses AVX512-BF16 where the CPU has it),
  on one worker thread using torch's intra-op pool. Each GEMM accumulates in fp32 but rounds its
  output to the dtype: gate/up and the down output take one extra bf16 rounding each against the
  contract (~1e-2 relative at bf16, exact contract at fp32 up to GEMM summation order).
- EXACT: the reference arithmetic of `fused_experts_reference` (weights upcast to fp32 per call,
  fp32 GEMMs, activation rounded to the input dtype). Bit-identical pair values to the reference;
  slow for bf16, since it converts every touched expert's weights.
- HOOK: a caller-supplied function with `pair_outputs`' signature. `PrepackedMoeOpHook` adapts a
  fused CPU MoE op (vLLM's `torch.ops._C.cpu_fused_moe`, which the glue or a benchmark passes in;
  this module never imports vLLM): it prepacks each weight tensor once and runs every routed pair as
  a top-1 row, so per-pair outputs come back (rounded once to the dtype by the op).

The recipe for vLLM's op (vLLM CPU builds only; benchmarks/bench_cpu_experts.py times it):

    ops = torch.ops._C             # after vllm.platforms.cpu.CpuPlatform.import_kernels()
    def prepack(w):
        p = torch.empty_like(w); ops.prepack_moe_weight(w, p, "vec"); return p
    def moe_op(out, x, w13p, w2p, tw, ti):
        ops.cpu_fused_moe(out, x, w13p, w2p, None, None, tw, ti, False, "silu", "vec")
    pool = CpuExpertPool(cfg.cpu_threads, "hook", PrepackedMoeOpHook(prepack, moe_op))

The hook keeps one packed copy of every weight tensor it sees (host memory x2 for the layers the
CPU serves); the native backend reads the store as it is.

Threads: NATIVE runs `num_threads` threads of its own (default: every CPU this process may run
on) and leaves torch's settings alone; they sleep on a condition variable between jobs. TORCH /
EXACT / HOOK use PyTorch's one intra-op pool per process; `num_threads` sets it (process-wide,
torch.set_num_threads) and the single worker thread's GEMMs use it.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from enum import Enum

import torch
import torch.nn.functional as F

from moespac_vllm.kernels.fused_experts import fused_experts_pairs, sum_over_topk

log = logging.getLogger(__name__)

try:  # built from csrc/cpu_experts.cpp by the package install; absent in a bare checkout
    from moespac_vllm import _cpu_experts as _native
except ImportError:
    _native = None

# torch dtype -> the native module's dtype name
_NATIVE_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

# (hidden [T,H], w13 [E,2I,H], w2 [E,H,I], ids [T,K], weights [T,K]) -> fp32 [T,K,H]
PairFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                  torch.Tensor]


class CpuBackend(str, Enum):
    EXACT = "exact"
    TORCH = "torch"
    NATIVE = "native"
    HOOK = "hook"


def native_available() -> bool:
    """Whether `moespac_vllm._cpu_experts` was built and imports."""
    return _native is not None


def native_isas() -> tuple[str, ...]:
    """The instruction sets the native kernel can use on this CPU (empty if it is not built)."""
    return tuple(_native.supported_isas()) if _native is not None else ()


def check_cpu_inputs(
    hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, ids: torch.Tensor,
    weights: torch.Tensor, *, id_range: bool = True,
) -> None:
    """Shapes, dtypes, devices and (with id_range) the id range; ValueError naming the field.
    The native backend checks int32 ids itself while grouping the pairs (id_range=False saves
    the ~5 us reduction per call)."""
    for name, t in (("hidden", hidden), ("w13", w13), ("w2", w2), ("ids", ids),
                    ("weights", weights)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise ValueError(f"{name}: the CPU expert path takes CPU tensors, got {t.device}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden: expected [T, H], got shape {tuple(hidden.shape)}")
    T, H = hidden.shape
    if w13.dim() != 3 or w13.shape[2] != H or w13.shape[1] % 2:
        raise ValueError(f"w13: expected [E, 2I, H={H}], got shape {tuple(w13.shape)}")
    E, two_i, _ = w13.shape
    if tuple(w2.shape) != (E, H, two_i // 2):
        raise ValueError(f"w2: expected [E={E}, H={H}, I={two_i // 2}], got {tuple(w2.shape)}")
    for name, t in (("w13", w13), ("w2", w2)):
        if t.dtype != hidden.dtype:
            raise ValueError(f"{name}: dtype {t.dtype} differs from hidden's {hidden.dtype}")
    if ids.dim() != 2 or ids.shape[0] != T or ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"ids: expected integer [T={T}, K], got {ids.dtype} {tuple(ids.shape)}")
    if tuple(weights.shape) != tuple(ids.shape) or not weights.is_floating_point():
        raise ValueError(f"weights: expected float {tuple(ids.shape)}, got {weights.dtype} "
                         f"{tuple(weights.shape)}")
    if id_range and ids.numel() and int(ids.max()) >= E:
        raise ValueError(f"ids: expert id {int(ids.max())} out of range for E={E}")


def _groups(ids: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(expert, flat pair indices) for each expert with routed pairs, pairs in ascending order."""
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    sorted_ids = flat[order]
    experts, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    out = []
    start = 0
    for e, c in zip(experts.tolist(), counts.tolist()):
        if e >= 0:
            out.append((e, order[start:start + c]))
        start += c
    return out


def pair_outputs_exact(hidden, w13, w2, ids, weights) -> torch.Tensor:
    """The reference's arithmetic per pair: fp32 [T,K,H], zeros where ids < 0 (it is
    `fused_experts_pairs`, the reference itself)."""
    return fused_experts_pairs(hidden, w13, w2, ids, weights)


def pair_outputs_torch(hidden, w13, w2, ids, weights) -> torch.Tensor:
    """GEMMs in the weights' dtype (oneDNN); SiLU*up and the weighting in fp32: fp32 [T,K,H]."""
    T, H = hidden.shape
    K = ids.shape[1]
    I = w13.shape[1] // 2
    out = torch.zeros(T * K, H, dtype=torch.float32)
    w_flat = weights.reshape(-1).float()
    for e, pairs in _groups(ids):
        gu = F.linear(hidden[pairs // K], w13[e]).float()
        act = (F.silu(gu[:, :I]) * gu[:, I:]).to(hidden.dtype)
        out[pairs] = F.linear(act, w2[e]).float() * w_flat[pairs, None]
    return out.view(T, K, H)


class PrepackedMoeOpHook:
    """Adapts a fused CPU MoE op with prepacked weights into a `PairFn`.

    prepack(weight [E,r,c]) -> packed tensor (called once per weight tensor, cached by identity);
    moe_op(out [P,H], x [P,H], w13_packed, w2_packed, topk_weights [P,1] fp32, topk_ids [P,1] int32)
    fills `out` in the activation dtype. Every routed pair runs as a top-1 row (an op like vLLM's
    segfaults on negative ids, and per-pair outputs keep the placement-independent sum)."""

    def __init__(self, prepack: Callable[[torch.Tensor], torch.Tensor],
                 moe_op: Callable[..., None]) -> None:
        self._prepack = prepack
        self._moe_op = moe_op
        self._packed: dict[tuple[int, tuple[int, ...]], tuple[torch.Tensor, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def packed(self, w: torch.Tensor) -> torch.Tensor:
        key = (w.data_ptr(), tuple(w.shape))
        with self._lock:
            hit = self._packed.get(key)
            if hit is None or hit[0] is not w:
                hit = (w, self._prepack(w))
                self._packed[key] = hit
            return hit[1]

    def __call__(self, hidden, w13, w2, ids, weights) -> torch.Tensor:
        T, H = hidden.shape
        K = ids.shape[1]
        out = torch.zeros(T * K, H, dtype=torch.float32)
        flat = ids.reshape(-1)
        pairs = torch.nonzero(flat >= 0).squeeze(1)
        if pairs.numel() == 0:
            return out.view(T, K, H)
        x = hidden[pairs // K].contiguous()
        y = torch.empty(pairs.numel(), H, dtype=hidden.dtype)
        self._moe_op(y, x, self.packed(w13), self.packed(w2),
                     weights.reshape(-1)[pairs].float().reshape(-1, 1).contiguous(),
                     flat[pairs].to(torch.int32).reshape(-1, 1).contiguous())
        out[pairs] = y.float()
        return out.view(T, K, H)


class _NativeJob(Future):
    """A Future over one native job. The native pool never calls into Python, so completion is
    observed by `result()` / `done()` / `exception()` (callbacks run then); `result` waits with the
    GIL released. Holds the job's tensors until it is done: the kernel reads them by address."""

    def __init__(self, job, out: torch.Tensor, keep: tuple[torch.Tensor, ...]) -> None:
        super().__init__()
        self._job = job
        self._out = out
        self._keep: tuple[torch.Tensor, ...] | None = keep
        self._settle_lock = threading.Lock()

    def _settle(self, timeout: float | None) -> None:
        with self._settle_lock:
            if Future.done(self):
                return
            try:
                if not self._job.wait(-1.0 if timeout is None else max(0.0, float(timeout))):
                    return  # still running; result() raises TimeoutError
            except RuntimeError as e:
                self.set_exception(e)
            else:
                self.set_result(self._out)
            self._keep = None

    def done(self) -> bool:
        if not Future.done(self) and self._job.done():
            self._settle(0.0)
        return Future.done(self)

    def result(self, timeout: float | None = None) -> torch.Tensor:
        self._settle(timeout)
        return super().result(timeout=0)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._settle(timeout)
        return super().exception(timeout=0)


def _rows_contiguous(w: torch.Tensor) -> torch.Tensor:
    """w [E, r, c] with each expert's rows contiguous (the store's layout); a copy otherwise."""
    if w.stride(2) == 1 and w.stride(1) == w.shape[2]:
        return w
    return w.contiguous()


class CpuExpertPool:
    """CPU expert work off the caller's thread: `submit` returns a Future at once, `wait` blocks
    for it. Jobs run in submission order (NATIVE: on its own thread pool; the others: on one
    Python worker thread)."""

    def __init__(
        self,
        num_threads: int | None = None,
        backend: CpuBackend | str = CpuBackend.NATIVE,
        hook: PairFn | None = None,
        isa: str = "auto",
    ) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._native = None
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise ValueError(f"num_threads: must be an int >= 1, got {num_threads!r}")
        try:
            self.backend = CpuBackend(backend)
        except ValueError:
            raise ValueError(
                f"backend: expected one of {[b.value for b in CpuBackend]}, got {backend!r}"
            ) from None
        if (self.backend is CpuBackend.HOOK) != (hook is not None):
            raise ValueError("hook: give a hook exactly when backend is 'hook'")
        if self.backend is CpuBackend.NATIVE and _native is None:
            log.warning("CpuExpertPool: moespac_vllm._cpu_experts is not built (reinstall the "
                        "package to build csrc/); the CPU experts use the torch backend")
            self.backend = CpuBackend.TORCH
        if self.backend is not CpuBackend.NATIVE and isa != "auto":
            raise ValueError(f"isa: only the native backend takes an isa, got {isa!r}")
        self.isa = isa
        self._inflight: deque[_NativeJob] = deque()
        if self.backend is CpuBackend.NATIVE:
            if isa != "auto" and isa not in _native.supported_isas():
                raise ValueError(f"isa: expected auto or one of {_native.supported_isas()}, "
                                 f"got {isa!r}")
            self.num_threads = num_threads or len(os.sched_getaffinity(0))
            self._native = _native.Pool(self.num_threads)
        else:
            if num_threads is not None:
                torch.set_num_threads(num_threads)  # process-wide: one intra-op pool
            self.num_threads = torch.get_num_threads()
            self._fn: PairFn = {CpuBackend.EXACT: pair_outputs_exact,
                                CpuBackend.TORCH: pair_outputs_torch}.get(self.backend, hook)
            self._pool = ThreadPoolExecutor(max_workers=1,
                                            thread_name_prefix="moespac-cpu-experts")
        log.debug("CpuExpertPool: backend %s, %d threads", self.backend.value, self.num_threads)

    @property
    def closed(self) -> bool:
        return self._pool is None and self._native is None

    def submit(self, hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
               ids: torch.Tensor, weights: torch.Tensor) -> Future:
        """Validate now (errors surface in the caller), compute on the pool. The tensors must
        not be written until the future is done."""
        if self.closed:
            raise RuntimeError("CpuExpertPool: submit after close()")
        # the native kernel checks int32 ids itself; wider ones are checked before narrowing
        check_cpu_inputs(hidden, w13, w2, ids, weights,
                         id_range=self._native is None or ids.dtype != torch.int32)
        if self._native is None:
            return self._pool.submit(self._fn, hidden, w13, w2, ids, weights)
        return self._submit_native(hidden, w13, w2, ids, weights)

    def _submit_native(self, hidden, w13, w2, ids, weights) -> Future:
        dtype = _NATIVE_DTYPES.get(hidden.dtype)
        if dtype is None:
            raise ValueError(f"hidden: the native backend takes float32, bfloat16 or float16, "
                             f"got {hidden.dtype}")
        T, H = hidden.shape
        E, two_i, _ = w13.shape
        K = ids.shape[1]
        while self._inflight and self._inflight[0].done():  # drop finished jobs' references
            self._inflight.popleft()
        x = hidden.contiguous()
        w13 = _rows_contiguous(w13)
        w2 = _rows_contiguous(w2)
        ids32 = ids.to(torch.int32).contiguous()
        wts = weights.to(torch.float32).contiguous()
        out = torch.empty(T, K, H, dtype=torch.float32)
        job = self._native.submit(
            dtype, self.isa, x.data_ptr(), T, H, two_i // 2, K, E,
            w13.data_ptr(), w13.stride(0), w2.data_ptr(), w2.stride(0),
            ids32.data_ptr(), wts.data_ptr(), out.data_ptr())
        fut = _NativeJob(job, out, (x, w13, w2, ids32, wts))
        self._inflight.append(fut)
        return fut

    def pairs(self, hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Submit and wait: the fp32 [T,K,H] per-pair outputs (a `PairFn`)."""
        return self.submit(hidden, w13, w2, ids, weights).result()

    def wait(self, handle: Future) -> torch.Tensor:
        """The partial output, fp32 [T,H] (k summed in order). Re-raises the worker's error."""
        return sum_over_topk(handle.result())

    def close(self) -> None:
        """Finish every submitted job, then stop the threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._native is not None:
            self._native.close()  # runs the queued jobs first; their tensors are still held
            self._native = None
            self._inflight.clear()

    def __del__(self) -> None:  # the native threads read tensors this object keeps alive
        if self._native is not None:
            self.close()

    def __enter__(self) -> CpuExpertPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
