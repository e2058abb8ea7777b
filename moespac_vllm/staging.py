"""The offloaded layer's host <-> device crossings on its hot path, behind one small protocol so
that CPU tests cover their order: `Staging` (non-blocking copies through page-locked memory, each
readback paired with an `Event` the host waits on at one counted place) and `ImmediateEvent`, the
CPU's event (every copy already done). `offload.OffloadedExperts` and `runtime.OffloadRuntime`
use it; tests/test_async_path.py logs its order on a CPU and proves the absence of syncs on a GPU
(`torch.cuda.set_sync_debug_mode("error")`)."""
from __future__ import annotations

import time
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Event(Protocol):
    """A point in the compute stream's work (torch.cuda.Event; `ImmediateEvent` on a CPU)."""

    def record(self) -> None: ...

    def synchronize(self) -> None: ...


class ImmediateEvent:
    """The CPU's event: every copy already happened when it returns."""

    def record(self) -> None:
        return None

    def synchronize(self) -> None:
        return None


class Staging:
    """The only ways the layer's hot path crosses host <-> device (no `.cpu()`, `.item()` or
    blocking `.to()`): `to_host(*tensors)` issues non-blocking copies into page-locked host
    buffers and returns them with an `Event` recorded after them on the current stream; the
    host reads them only after `wait(event)`, the one place the host waits on the device (counted
    in `waits`). `to_device(host)` is one non-blocking copy from page-locked memory, ordered on the
    stream before any later kernel (the caching host allocator keeps the buffer alive until the
    copy has run). On a CPU device no copy is needed and `wait` returns at once (still counted:
    the count is the number of host round trips the same code makes on a GPU)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.waits = 0  # host waits inside layer forwards (one per planned forward)
        self.settles = 0  # waits at step ends (`settle`)
        self.wait_ms = 0.0
        self.pending: Event | None = None  # the latest readback nobody has waited for yet

    def settle(self) -> None:
        """Wait once for the latest pending readback (stream order: all earlier ones are done
        then too); the runtime calls it when a step ends, before the engine reads its books."""
        if self.pending is not None:
            ev, self.pending = self.pending, None
            t0 = time.perf_counter()
            ev.synchronize()
            self.wait_ms += (time.perf_counter() - t0) * 1e3
            self.settles += 1

    def event(self) -> Event:
        return torch.cuda.Event() if self.cuda else ImmediateEvent()

    def to_host(self, *tensors: torch.Tensor) -> tuple[list[torch.Tensor], Event]:
        if not self.cuda:
            out = [t.detach() for t in tensors]
        else:
            out = []
            for t in tensors:
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t.detach(), non_blocking=True)
                out.append(host)
        ev = self.event()
        ev.record()
        return out, ev

    def wait(self, event: Event) -> None:
        t0 = time.perf_counter()
        event.synchronize()
        self.wait_ms += (time.perf_counter() - t0) * 1e3
        self.waits += 1

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        if not self.cuda:
            return host
        pinned = host if host.is_pinned() else host.pin_memory()
        return pinned.to(self.device, non_blocking=True)


__all__ = ["Event", "ImmediateEvent", "Staging"]
