"""Copy engine: moves one expert's weights from host memory into a device slot.

OWNER: kernels/GPU issue (#5) for the implementations (`SyncMover` over CPU tensors for tests and
CPU runs, `CudaStreamMover`: pinned host buffers, a side CUDA stream, one event per slot fill).
The `Mover` protocol below is the CONTRACT the engine (`engine.py`), the offloaded layer
(`offload.py`) and the simulator's timing mover code against.

Slot states (owned by the engine's slot table): free -> loading -> ready -> in-use -> ready/free.
A load into a slot that a running kernel reads is never issued (the engine pins slots between
plan_layer and finish_layer); a superseded or cancelled load leaves the slot `free`, never half-
written-and-ready.
"""
from __future__ import annotations

from typing import Protocol


class Mover(Protocol):
    def load(self, layer: int, expert: int, slot: int) -> None:
        """Start copying expert `expert` of `layer` into `slot` of that layer (asynchronous)."""

    def is_ready(self, layer: int, slot: int) -> bool:
        """True once the last load into (layer, slot) has completed (never blocks)."""

    def wait(self, layer: int, slot: int) -> None:
        """Block (or make the compute stream wait) until the load into (layer, slot) completes."""

    def cancel(self, layer: int, slot: int) -> bool:
        """Abandon a pending load; True if it had not completed (the slot's data is then invalid)."""

    @property
    def bytes_moved(self) -> int:
        """Total host->device bytes copied so far."""
