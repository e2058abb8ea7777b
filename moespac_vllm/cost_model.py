"""Hardware cost model: how long an expert takes on the device, on the CPU, and over PCIe.

OWNER: core issue (#3). `ExpertCosts` is the contract the balancer and engine consume; the rest
(named profiles `h100-pcie5`, `rtx4090-pcie4`, `jetson-orin`; calibrated JSON profiles written by
`moespac calibrate`; `CostProfile.expert_costs(dims)`) is filled in by that issue.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ExpertCosts:
    """Per-expert times of one model on one machine, in milliseconds.

    Device and CPU time are affine in the expert's token count n: fixed + per_token * n
    (the fixed part is streaming the expert's weights; per token is its FLOPs).
    `fetch_ms` is one expert's host->device copy (all of w13 and w2)."""

    gpu_fixed_ms: float
    gpu_per_token_ms: float
    cpu_fixed_ms: float
    cpu_per_token_ms: float
    fetch_ms: float

    def __post_init__(self) -> None:
        for name in ("gpu_fixed_ms", "gpu_per_token_ms", "cpu_fixed_ms", "cpu_per_token_ms",
                     "fetch_ms"):
            v = getattr(self, name)
            if not v >= 0.0:
                raise ValueError(f"{name}: must be >= 0, got {v}")

    def gpu_ms(self, tokens: int) -> float:
        return self.gpu_fixed_ms + self.gpu_per_token_ms * tokens

    def cpu_ms(self, tokens: int) -> float:
        return self.cpu_fixed_ms + self.cpu_per_token_ms * tokens
