"""Asynchronous Execution Engine, policy side: which experts sit in the device slots, what each
MoE layer computes where, and what to prefetch between steps.

OWNER: core issue (#3). This file fixes the CONTRACT that the simulator (`simulate.py`), the vLLM
layer (`patches/routed_experts.py` via `offload.py`) and the GPU harness (`benchmarks/
bench_gpu_decode.py`) all drive, so that the simulator measures exactly the policy the real layer
runs. Implementations may add methods and fields; they must not change these meanings.

Per step (one target forward; with SD a verification window of 1 + k tokens per request):

    engine.begin_step(ctx)                      # StepContext: phase, tokens, k
    for each MoE layer l, in order:
        plan = engine.plan_layer(l, topk_ids)   # topk_ids: np.int [T, K], the target's routing
        # the caller: waits for plan.fetches (mover), runs device experts on plan.slot_ids
        #             (ids < 0 skipped), runs CPU experts for plan.cpu_mask, sums outputs
        engine.finish_layer(l, topk_ids)        # estimator update, unpin, enqueue prefetch
    engine.end_step(num_accepted)               # issues prefetches for the next window (mover)
    # draft phase of the next step: engine.observe_draft(l, draft_router_logits) per draft layer

Invariants (property-tested): a layer never holds more than its slot budget; every routed
(token, k) pair is computed exactly once (device xor CPU); a slot is never overwritten while a
plan that reads it is in flight (pinned between plan_layer and finish_layer).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


class Clock(Protocol):
    def now_ms(self) -> float: ...


@dataclass(frozen=True, slots=True)
class LayerPlan:
    """What one MoE layer computes where, for one forward.

    slot_ids:  [T, K] int32, the device slot of each routed (token, k) pair, or -1 when that pair is
               computed on the CPU. This is what the kernel gets (it never knows about offloading).
    cpu_mask:  [T, K] bool, exactly the complement of slot_ids >= 0.
    fetches:   experts copied on demand before the device compute: ((expert, slot), ...).
    cpu_experts / device_experts: the routed experts on each side.
    """

    layer: int
    slot_ids: np.ndarray
    cpu_mask: np.ndarray
    fetches: tuple[tuple[int, int], ...]
    cpu_experts: tuple[int, ...]
    device_experts: tuple[int, ...]
