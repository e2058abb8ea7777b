"""Copy engine: moves one expert's weights from host memory into a device slot.

OWNER: kernels/GPU issue (#5). The `Mover` protocol below is the CONTRACT the engine (`engine.py`),
the offloaded layer (`offload.py`) and the simulator's timing mover code against. Two
implementations:

- `SyncMover`: plain tensor copies (CPU tensors, or any device) for tests and CPU runs. With
  `deferred=True` a load is only queued and lands at `wait`/`flush`, which makes the asynchronous
  ordering (not ready yet, cancelled, superseded) testable on a CPU.
- `CudaStreamMover`: pinned host weights, one side CUDA stream for all copies, one CUDA event per
  slot fill; `wait` makes the *compute* stream wait on that event (the host never blocks).

And around them: `FaultTolerantMover` (any mover's failed copy becomes a slot that is not ready;
`MoverFault`), which the runtime always wraps the mover in; `InOrderCompletion`, the CUDA mover's
books of which copies finished.

Shapes (per MoE layer l): host w13[l] [E, 2I, H], w2[l] [E, H, I]; slot w13[l] [S, 2I, H],
w2[l] [S, H, I]. Both are given as `ExpertWeights` (per-layer sequences) or as the layer's
`offload.ExpertStore` / `offload.SlotCache` (per-layer accessor methods; the store's `layers`
name the layers).

Slot states (owned by the engine's slot table): free -> loading -> ready -> in-use -> ready/free.
The mover's guarantees, which the engine's states rely on:
1. A load never overwrites data that device work queued *before* the load still reads: the side
   stream first waits for everything queued on the compute stream so far (so a slot the engine
   just unpinned may be refilled at once, even while the kernel that read it is still running).
2. Loads run in issue order on one stream, so a later load into a slot always lands after an
   earlier one (supersede = just load again).
3. `cancel` makes a pending load invisible: `is_ready` turns False and `wait` refuses until the
   slot is loaded again. The bytes of a cancelled CUDA copy still cross PCIe (a DMA in flight
   cannot be recalled), and are counted in `bytes_moved`.
4. `ready_mask(layer, slots)` answers exactly what `is_ready` would for each slot. The CUDA mover
   answers it with at most ~log2(n) + 1 event queries for n copies in flight: copies complete in
   issue order on its one stream, so a finished copy proves every earlier one finished
   (`InOrderCompletion`).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

logger = logging.getLogger(__name__)


@runtime_checkable
class Mover(Protocol):
    """The copy engine's contract (module docstring); `OffloadedExperts` refuses a mover without
    all of it."""

    def load(self, layer: int, expert: int, slot: int) -> None:
        """Start copying expert `expert` of `layer` into `slot` of that layer (asynchronous)."""

    def is_ready(self, layer: int, slot: int) -> bool:
        """True once the last load into (layer, slot) has completed (never blocks)."""

    def ready_mask(self, layer: int, slots: Sequence[int]) -> list[bool]:
        """`is_ready(layer, s)` for every s of `slots`, in order, in one call (never blocks):
        the engine polls all of a layer's loading slots together, so a plan pays one call into
        the mover, not one per copy in flight (24 per layer forward at Qwen3 scale, lru, ratio
        0.17, 9 tokens: bench_layer_host under cProfile)."""

    def wait(self, layer: int, slot: int) -> None:
        """Block (or make the compute stream wait) until the load into (layer, slot) completes."""

    def cancel(self, layer: int, slot: int) -> bool:
        """Abandon a pending load; True if it had not completed (the slot's data is then invalid)."""

    @property
    def bytes_moved(self) -> int:
        """Total host->device bytes copied so far."""


@dataclass(frozen=True)
class ExpertWeights:
    """Per-layer expert weight banks: w13[l] [N, 2I, H], w2[l] [N, H, I] (N = E on the host,
    N = S slots on the device)."""

    w13: Sequence[torch.Tensor]
    w2: Sequence[torch.Tensor]

    @classmethod
    def allocate(cls, num_layers: int, rows: int, hidden_size: int, intermediate_size: int,
                 dtype: torch.dtype, device: torch.device | str) -> ExpertWeights:
        """Empty banks: one [rows, 2I, H] and one [rows, H, I] tensor per layer."""
        for name, v in (("num_layers", num_layers), ("rows", rows), ("hidden_size", hidden_size),
                        ("intermediate_size", intermediate_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: must be a positive integer, got {v!r}")
        w13 = tuple(torch.empty(rows, 2 * intermediate_size, hidden_size, dtype=dtype,
                                device=device) for _ in range(num_layers))
        w2 = tuple(torch.empty(rows, hidden_size, intermediate_size, dtype=dtype, device=device)
                   for _ in range(num_layers))
        return cls(w13, w2)


@runtime_checkable
class LayerBanks(Protocol):
    """A bank given by per-layer accessors (`offload.ExpertStore`, `offload.SlotCache`)."""

    def w13(self, layer: int) -> torch.Tensor: ...

    def w2(self, layer: int) -> torch.Tensor: ...


@runtime_checkable
class HostBanks(LayerBanks, Protocol):
    """A host bank by accessors that also names its layers (`offload.ExpertStore`)."""

    @property
    def layers(self) -> tuple[int, ...]: ...


Banks = ExpertWeights | LayerBanks


def _layer_tensors(bank: Banks, layers: Sequence[int] | None, name: str
                   ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """layer -> (w13, w2) of a bank given either as per-layer sequences (`ExpertWeights`) or as
    per-layer accessor methods (`LayerBanks`: `offload.ExpertStore` / `offload.SlotCache`)."""
    if isinstance(bank, ExpertWeights):
        if len(bank.w13) != len(bank.w2):
            raise ValueError(f"{name}: w13 and w2 list different numbers of layers")
        return {layer: (bank.w13[layer], bank.w2[layer]) for layer in range(len(bank.w13))}
    if layers is None:
        if not isinstance(bank, HostBanks):
            raise ValueError(f"{name}: needs ExpertWeights or per-layer `w13(layer)`, "
                             f"`w2(layer)` and `layers` (got {type(bank).__name__})")
        layers = tuple(bank.layers)
    elif not isinstance(bank, LayerBanks):
        raise ValueError(f"{name}: needs ExpertWeights or per-layer `w13(layer)` and "
                         f"`w2(layer)` (got {type(bank).__name__})")
    try:
        return {layer: (bank.w13(layer), bank.w2(layer)) for layer in layers}
    except KeyError as e:
        raise ValueError(f"{name}: has no layer {e.args[0]}") from None


def _check_banks(host: Banks, slots: Banks) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]],
                                                 dict[int, tuple[torch.Tensor, torch.Tensor]],
                                                 int, int]:
    """Validate host/slot banks; returns (host layers, slot layers, num_experts, bytes per
    expert)."""
    host_l = _layer_tensors(host, None, "host")
    if not host_l:
        raise ValueError("host: holds no layer")
    slot_l = _layer_tensors(slots, tuple(host_l), "slots")
    if set(slot_l) != set(host_l):
        raise ValueError(f"slots: {len(slot_l)} layers, but host has {len(host_l)}")
    h13, h2 = next(iter(host_l.values()))
    if h13.dim() != 3 or h2.dim() != 3:
        raise ValueError("host: w13[l] must be [E, 2I, H] and w2[l] [E, H, I]")
    num_experts, two_i, hidden = h13.shape
    inter = h2.shape[2]
    if two_i != 2 * inter or tuple(h2.shape[:2]) != (num_experts, hidden):
        raise ValueError(f"host: w13 {tuple(h13.shape)} and w2 {tuple(h2.shape)} disagree")
    for layer in host_l:
        num_slots = slot_l[layer][0].shape[0]  # may differ per layer (a byte budget's split)
        for name, bank, rows in (("host", host_l, num_experts), ("slots", slot_l, num_slots)):
            a, b = bank[layer]
            if tuple(a.shape) != (rows, two_i, hidden) or tuple(b.shape) != (rows, hidden, inter):
                raise ValueError(
                    f"{name}: layer {layer} has w13 {tuple(a.shape)}, w2 {tuple(b.shape)}; "
                    f"expected [{rows}, {two_i}, {hidden}] and [{rows}, {hidden}, {inter}]")
            if a.dtype != h13.dtype or b.dtype != h13.dtype:
                raise ValueError(f"{name}: layer {layer} dtype differs from host dtype {h13.dtype}")
    expert_bytes = (two_i * hidden + hidden * inter) * h13.element_size()
    return host_l, slot_l, num_experts, expert_bytes


class _MoverBase:
    """What both movers share: the checked host/slot banks, bounds checks (bad indices are caller
    bugs: ValueError naming them), and the books of what landed where."""

    def __init__(self, host: Banks, slots: Banks) -> None:
        (self._host_l, self._slot_l, self._num_experts,
         self._expert_bytes) = _check_banks(host, slots)
        self._cancelled: set[tuple[int, int]] = set()
        self._resident: dict[tuple[int, int], int] = {}  # (layer, slot) -> expert last loaded
        self._bytes = 0
        self._stall_ms = 0.0

    def expert_in(self, layer: int, slot: int) -> int | None:
        """The expert last loaded (not cancelled) into (layer, slot), or None; a deferred
        SyncMover counts a load once its copy has landed."""
        self._check(layer, slot)
        return self._resident.get((layer, slot))

    @property
    def bytes_moved(self) -> int:
        return self._bytes

    def _check(self, layer: int, slot: int, expert: int | None = None) -> None:
        if layer not in self._host_l:
            raise ValueError(f"layer: {layer} is not one of the mover's layers "
                             f"({min(self._host_l)}..{max(self._host_l)})")
        num_slots = self._slot_l[layer][0].shape[0]
        if not 0 <= slot < num_slots:
            raise ValueError(f"slot: {slot} out of range [0, {num_slots}) of layer {layer}")
        if expert is not None and not 0 <= expert < self._num_experts:
            raise ValueError(f"expert: {expert} out of range [0, {self._num_experts})")

    def num_slots(self, layer: int) -> int:
        if layer not in self._slot_l:
            raise ValueError(f"layer: {layer} is not one of the mover's layers")
        return self._slot_l[layer][0].shape[0]

    def is_ready(self, layer: int, slot: int) -> bool:
        raise NotImplementedError

    def ready_mask(self, layer: int, slots: Sequence[int]) -> list[bool]:
        return [self.is_ready(layer, s) for s in slots]


class InOrderCompletion:
    """Which of a stream's copies have completed, by as few event queries as the order allows.

    Copies on one stream complete in issue order, so the event recorded after copy n completing
    proves copies 1..n complete. `issue(event) -> n` numbers a copy; `done(n)` and
    `done_many(ns)` answer from `upto` (the highest number known complete) where they can and
    otherwise query events: `done_many` first the newest asked-for copy (one query when all have
    landed), then a binary search over the others. An event is anything with a non-blocking
    `query() -> bool` (`torch.cuda.Event`; a fake in tests)."""

    __slots__ = ("_events", "_next", "upto", "queries")

    def __init__(self) -> None:
        self._events: dict[int, Any] = {}  # copy number -> its event, while not known complete
        self._next = 0
        self.upto = 0  # copies 1..upto are known complete
        self.queries = 0

    def issue(self, event: Any) -> int:
        self._next += 1
        self._events[self._next] = event
        return self._next

    def _query(self, n: int) -> bool:
        self.queries += 1
        if not self._events[n].query():
            return False
        for k in range(self.upto + 1, n + 1):  # every earlier copy landed too
            self._events.pop(k, None)
        self.upto = n
        return True

    def done(self, n: int) -> bool:
        return n <= self.upto or self._query(n)

    def event(self, n: int) -> Any:
        """Copy n's event (n not known complete)."""
        return self._events[n]

    def done_many(self, ns: Sequence[int]) -> list[bool]:
        pending = sorted({n for n in ns if n > self.upto})
        if pending and not self._query(pending[-1]):
            lo, hi = 0, len(pending) - 1  # pending[hi] is not complete; find the last that is
            while lo < hi:
                mid = (lo + hi) // 2
                if self._query(pending[mid]):
                    lo = mid + 1
                else:
                    hi = mid
        return [n <= self.upto for n in ns]


class SyncMover(_MoverBase):
    """Copies with plain `Tensor.copy_`, on the caller's thread.

    deferred=False: `load` copies at once (is_ready is True right after; cancel returns False).
    deferred=True:  `load` queues; the copy happens in `wait(layer, slot)` or `flush()`. A queued
                    load superseded by another load into the same slot, or cancelled, never
                    touches the slot. This is the CPU stand-in for an in-flight DMA.
    `stall_ms`: host time spent copying (all of it blocks the caller)."""

    def __init__(self, host: Banks, slots: Banks, *, deferred: bool = False) -> None:
        super().__init__(host, slots)
        self._deferred = bool(deferred)
        self._pending: dict[tuple[int, int], int] = {}  # (layer, slot) -> expert, deferred only

    def _copy(self, layer: int, expert: int, slot: int) -> None:
        t0 = time.perf_counter()
        (h13, h2), (s13, s2) = self._host_l[layer], self._slot_l[layer]
        s13[slot].copy_(h13[expert])
        s2[slot].copy_(h2[expert])
        self._stall_ms += (time.perf_counter() - t0) * 1e3
        self._bytes += self._expert_bytes
        self._resident[(layer, slot)] = expert

    def load(self, layer: int, expert: int, slot: int) -> None:
        self._check(layer, slot, expert)
        key = (layer, slot)
        self._cancelled.discard(key)
        if self._deferred:
            self._pending[key] = expert  # supersedes a queued load into the same slot
        else:
            self._copy(layer, expert, slot)

    def is_ready(self, layer: int, slot: int) -> bool:
        self._check(layer, slot)
        key = (layer, slot)
        return key not in self._pending and key not in self._cancelled

    def wait(self, layer: int, slot: int) -> None:
        self._check(layer, slot)
        key = (layer, slot)
        if key in self._cancelled:
            raise ValueError(f"slot: load into layer {layer} slot {slot} was cancelled; "
                             "load it again before waiting")
        expert = self._pending.pop(key, None)
        if expert is not None:
            self._copy(layer, expert, slot)

    def cancel(self, layer: int, slot: int) -> bool:
        self._check(layer, slot)
        key = (layer, slot)
        if self._pending.pop(key, None) is None:
            return False
        self._cancelled.add(key)
        return True

    def flush(self) -> None:
        """Land every queued load (deferred mode); a no-op otherwise."""
        for (layer, slot), expert in list(self._pending.items()):
            del self._pending[(layer, slot)]
            self._copy(layer, expert, slot)

    @property
    def stall_ms(self) -> float:
        return self._stall_ms


class CudaStreamMover(_MoverBase):
    """Host->device copies on one side CUDA stream, one event per slot fill.

    host: pinned CPU banks (pageable memory would make every `non_blocking` copy synchronous, so it
          is refused). slots: CUDA banks on one device.
    `wait` never blocks the host: the current (compute) stream waits on the slot's event. With
    `measure_stall=True`, each wait that finds its copy unfinished is bracketed by two timing
    events on the compute stream; `stall_ms` resolves them (it synchronises on those events)."""

    def __init__(self, host: Banks, slots: Banks, *, stream: torch.cuda.Stream | None = None,
                 measure_stall: bool = True) -> None:
        if not torch.cuda.is_available():
            raise ValueError("slots: CudaStreamMover needs CUDA; use SyncMover on a CPU")
        super().__init__(host, slots)
        for layer in self._host_l:
            for name, t in zip(("host.w13", "host.w2"), self._host_l[layer]):
                if t.device.type != "cpu" or not t.is_pinned():
                    raise ValueError(f"{name}: layer {layer} must be pinned CPU memory "
                                     "(tensor.pin_memory(), or ExpertStore(pin_memory=True))")
            for name, t in zip(("slots.w13", "slots.w2"), self._slot_l[layer]):
                if t.device.type != "cuda":
                    raise ValueError(f"{name}: layer {layer} must be on a CUDA device")
        self._device = next(iter(self._slot_l.values()))[0].device
        self._stream = stream if stream is not None else torch.cuda.Stream(self._device)
        self._copy_no: dict[tuple[int, int], int] = {}  # (layer, slot) -> its last copy's number
        self._completion = InOrderCompletion()
        self._measure_stall = measure_stall
        self._stall_pairs: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._stalls = 0

    @property
    def stream(self) -> torch.cuda.Stream:
        return self._stream

    def load(self, layer: int, expert: int, slot: int) -> None:
        self._check(layer, slot, expert)
        compute = torch.cuda.current_stream(self._device)
        # Guarantee 1: kernels already queued may still read this slot's previous occupant.
        self._stream.wait_stream(compute)
        (h13, h2), (s13, s2) = self._host_l[layer], self._slot_l[layer]
        with torch.cuda.stream(self._stream):
            s13[slot].copy_(h13[expert], non_blocking=True)
            s2[slot].copy_(h2[expert], non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        key = (layer, slot)
        self._copy_no[key] = self._completion.issue(done)
        self._cancelled.discard(key)
        self._resident[key] = expert
        self._bytes += self._expert_bytes

    def is_ready(self, layer: int, slot: int) -> bool:
        self._check(layer, slot)
        key = (layer, slot)
        if key in self._cancelled:
            return False
        n = self._copy_no.get(key)
        return n is None or self._completion.done(n)

    def ready_mask(self, layer: int, slots: Sequence[int]) -> list[bool]:
        out: list[bool | None] = []
        ask: list[int] = []
        for s in slots:
            self._check(layer, s)
            key = (layer, s)
            n = self._copy_no.get(key)
            if key in self._cancelled:
                out.append(False)
            elif n is None:
                out.append(True)
            else:
                out.append(None)
                ask.append(n)
        if ask:
            answers = iter(self._completion.done_many(ask))
            out = [next(answers) if v is None else v for v in out]
        return out  # type: ignore[return-value]

    @property
    def event_queries(self) -> int:
        """CUDA event queries made so far to answer readiness (in-order completion saves most)."""
        return self._completion.queries

    def wait(self, layer: int, slot: int) -> None:
        self._check(layer, slot)
        key = (layer, slot)
        if key in self._cancelled:
            raise ValueError(f"slot: load into layer {layer} slot {slot} was cancelled; "
                             "load it again before waiting")
        n = self._copy_no.get(key)
        if n is None or self._completion.done(n):
            return
        done = self._completion.event(n)
        compute = torch.cuda.current_stream(self._device)
        if self._measure_stall:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(compute)
            compute.wait_event(done)
            end.record(compute)
            self._stall_pairs.append((start, end))
        else:
            compute.wait_event(done)
        self._stalls += 1

    def cancel(self, layer: int, slot: int) -> bool:
        self._check(layer, slot)
        key = (layer, slot)
        n = self._copy_no.get(key)
        if n is None or key in self._cancelled or self._completion.done(n):
            return False
        self._cancelled.add(key)
        self._resident.pop(key, None)
        return True

    def synchronize(self) -> None:
        """Block the host until every issued copy has landed."""
        self._stream.synchronize()

    @property
    def stalls(self) -> int:
        """How many waits found their copy unfinished (the compute stream had to wait)."""
        return self._stalls

    @property
    def stall_ms(self) -> float:
        """Device time the compute stream spent waiting on copies (resolves pending timings)."""
        for start, end in self._stall_pairs:
            end.synchronize()
            self._stall_ms += start.elapsed_time(end)
        self._stall_pairs.clear()
        return self._stall_ms


class MoverFault(RuntimeError):
    """A copy into (layer, slot) failed or was abandoned: the slot's data is not the expert's."""


class FaultTolerantMover:
    """A `Mover` around another one that turns its faults into a slot that is not ready: a `load`
    that raises is remembered (`is_ready` is then False and `wait` raises `MoverFault` until a
    later load into that slot succeeds), and so is a `wait` that raises. The engine never raises
    out of a step for a failed copy (a failed prefetch is a slot still loading), and
    `OffloadedExperts` fetches a slot it waits for afresh once, then computes its pairs on the
    CPU (same arithmetic, same output). One warning, then a count (`faults`)."""

    def __init__(self, inner: Mover) -> None:
        if not isinstance(inner, Mover):
            raise ValueError(f"inner: {type(inner).__name__} does not implement mover.Mover")
        self.inner = inner
        self._failed: set[tuple[int, int]] = set()
        self.faults = 0

    def _fault(self, what: str, layer: int, slot: int, err: BaseException) -> None:
        self._failed.add((layer, slot))
        self.faults += 1
        if self.faults == 1:
            logger.warning("moespac: %s into layer %d slot %d failed (%s: %s); its pairs run on "
                           "the CPU until a copy succeeds (further faults are only counted)",
                           what, layer, slot, type(err).__name__, err)

    def load(self, layer: int, expert: int, slot: int) -> None:
        try:
            self.inner.load(layer, expert, slot)
        except Exception as e:  # noqa: BLE001 - any copy failure: the slot is just not ready
            self._fault(f"copy of expert {expert}", layer, slot, e)
            return
        self._failed.discard((layer, slot))

    def is_ready(self, layer: int, slot: int) -> bool:
        if (layer, slot) in self._failed:
            return False
        try:
            return bool(self.inner.is_ready(layer, slot))
        except Exception as e:  # noqa: BLE001
            self._fault("a copy", layer, slot, e)
            return False

    def ready_mask(self, layer: int, slots: Sequence[int]) -> list[bool]:
        """One call into the inner mover for the slots not known failed; if it raises, each of
        them is asked alone, so the fault lands on its own slot as `is_ready` would put it."""
        ask = [s for s in slots if (layer, s) not in self._failed]
        try:
            got = iter([bool(v) for v in self.inner.ready_mask(layer, ask)])
        except Exception:  # noqa: BLE001 - which slot failed: `is_ready` finds and records it
            return [self.is_ready(layer, s) for s in slots]
        return [False if (layer, s) in self._failed else next(got) for s in slots]

    def wait(self, layer: int, slot: int) -> None:
        if (layer, slot) in self._failed:
            raise MoverFault(f"layer {layer} slot {slot}: the last copy failed")
        try:
            self.inner.wait(layer, slot)
        except Exception as e:  # noqa: BLE001
            self._fault("a copy", layer, slot, e)
            raise MoverFault(f"layer {layer} slot {slot}: {e}") from e

    def cancel(self, layer: int, slot: int) -> bool:
        return bool(self.inner.cancel(layer, slot))

    @property
    def bytes_moved(self) -> int:
        return int(self.inner.bytes_moved)


__all__ = ["Banks", "CudaStreamMover", "ExpertWeights", "FaultTolerantMover", "HostBanks",
           "InOrderCompletion", "LayerBanks", "Mover", "MoverFault", "SyncMover"]
