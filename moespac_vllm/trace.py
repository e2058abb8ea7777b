"""Routing traces: per decoding step, per MoE layer, the experts every processed token routed to.

OWNER: core issue (#3). `ModelDims` is fixed here as a contract; the trace value types, the npz
reader/writer, the Mixtral JSONL reader, verification windows built from autoregressive traces and
the synthetic generator are filled in by that issue.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ModelDims:
    """The MoE dimensions that matter for offloading."""

    num_layers: int  # MoE layers (L)
    num_experts: int  # routed experts per layer (E)
    top_k: int  # K
    hidden_size: int  # H
    intermediate_size: int  # I (per expert)
    dtype_bytes: int = 2

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_experts", "top_k", "hidden_size", "intermediate_size",
                     "dtype_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: must be a positive integer, got {v!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k: {self.top_k} exceeds num_experts {self.num_experts}")

    @property
    def expert_bytes(self) -> int:
        """w13 [2I, H] + w2 [H, I] of one expert."""
        return 3 * self.hidden_size * self.intermediate_size * self.dtype_bytes

    @property
    def expert_flops_per_token(self) -> int:
        return 2 * 3 * self.hidden_size * self.intermediate_size
