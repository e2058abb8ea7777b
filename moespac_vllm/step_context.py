"""Per-step context: what kind of forward the MoE layers are in, published once per step.

The vLLM glue publishes one `StepContext` per model forward (from the scheduler output / spec-decode
metadata, never from private attention-metadata keys); the offloaded layer and the engine read it.
The board is a plain object passed explicitly: no module-level singleton.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Phase(str, Enum):
    PREFILL = "prefill"  # prompt tokens only
    DECODE = "decode"  # one token per request, no speculation
    VERIFY = "verify"  # target verifies 1 + k tokens per request
    DRAFT = "draft"  # a draft model's forward
    MIXED = "mixed"  # chunked prefill mixed with decode/verify


@dataclass(frozen=True, slots=True)
class StepContext:
    step: int
    phase: Phase
    num_tokens: int
    tokens_per_request: tuple[int, ...] = field(default=())
    num_draft_tokens: int = 0  # k: draft tokens per request being verified (0 without SD)

    def __post_init__(self) -> None:
        if self.step < 0:
            raise ValueError(f"step: must be >= 0, got {self.step}")
        if self.num_tokens < 0:
            raise ValueError(f"num_tokens: must be >= 0, got {self.num_tokens}")
        if self.num_draft_tokens < 0:
            raise ValueError(f"num_draft_tokens: must be >= 0, got {self.num_draft_tokens}")

    @property
    def is_speculative(self) -> bool:
        return self.phase is Phase.VERIFY


class StepBoard:
    """Holds the current step's context. The glue publishes; layers read."""

    __slots__ = ("_current", "_listeners")

    def __init__(self) -> None:
        self._current: StepContext | None = None
        self._listeners: list = []

    def publish(self, ctx: StepContext) -> None:
        previous = self._current
        self._current = ctx
        for listener in self._listeners:
            listener(previous, ctx)

    def current(self) -> StepContext | None:
        return self._current

    def subscribe(self, listener) -> None:
        """`listener(previous, current)` runs on every publish (e.g. the engine's end_step)."""
        self._listeners.append(listener)
