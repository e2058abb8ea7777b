"""The native planner: `ExpertEngine`'s per-forward hot path in C++ (`csrc/plan.cpp`, module
`moespac_vllm._plan`), a drop-in for `plan_layer` / `finish_layer` and the spac / hybrimoe /
spac-faithful prefetch.

`attach(engine)` builds a `NativePlanner` over the engine's own state: the slot tables' arrays
(cache.py), the engine's masks, books, timeline and scores (engine_state.py) and the estimator's
levels. The C++ code changes those arrays in place and calls the engine's mover and clock back in
the order the Python engine does, so plans, books and tables are identical to the Python
reference's (tests/test_plan_native.py: hypothesis problems and the real Mixtral traces, every
policy). What the native planner does not cover stays in Python on the same state: the oracle's
and `static`'s end-of-step placement, the whole-layer path, the draft signal, statistics.

Used by default whenever the module imports and the configuration is covered (balanced policies
need the exact balancer; another balancer keeps the Python path); otherwise the engine stays on
the Python path and says so in one log line.

Measured (benchmarks/README.md, bench_layer_host.py --dims qwen3-30b-a3b): the Python plan costs
180-530 us per planned layer forward at Qwen3-30B-A3B scale; this path a few microseconds.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from moespac_vllm.config import Policy, ThetaScale

if TYPE_CHECKING:
    from moespac_vllm.engine import ExpertEngine, LayerPlan

logger = logging.getLogger(__name__)

# csrc/plan.cpp's enums
POLICY_CODES = {Policy.SPAC: 0, Policy.SPAC_FAITHFUL: 1, Policy.LRU: 2, Policy.SD_LRU: 3,
                Policy.LFU: 4, Policy.STATIC: 5, Policy.HYBRIMOE: 6, Policy.ORACLE: 7}
ORDER_CODES = {"lru": 0, "lfu": 1, "utility": 2, "belady": 3}

try:
    from moespac_vllm import _plan
except ImportError as exc:  # not built (MOESPAC_NO_NATIVE=1, or no compiler at install time)
    _plan = None
    _IMPORT_ERROR: str | None = str(exc)
else:
    _IMPORT_ERROR = None

_logged: set[str] = set()


def available() -> bool:
    """True when the compiled module imports."""
    return _plan is not None


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        logger.info(msg)


def unsupported(engine: ExpertEngine) -> str | None:
    """Why the native planner cannot run this engine, or None when it can."""
    from moespac_vllm.balancer import ExactBalancer

    if _plan is None:
        return f"moespac_vllm._plan is not built ({_IMPORT_ERROR})"
    if engine.balancer is not None and type(engine.balancer) is not ExactBalancer:
        return f"the balancer is {type(engine.balancer).__name__}, not ExactBalancer"
    return None


def attach(engine: ExpertEngine, required: bool = False) -> NativePlanner | None:
    """A `NativePlanner` for `engine`, or None (one log line says why) when it is not built or
    does not cover the configuration; `required` raises ValueError instead."""
    why = unsupported(engine)
    if why is not None:
        if required:
            raise ValueError(f"native: the native planner cannot run this engine: {why}")
        _log_once(f"moespac: per-layer plan on the Python path: {why}")
        return None
    return NativePlanner(engine)


class NativePlanner:
    """`plan_layer` / `finish_layer` / prefetch of one engine, in C++ on the engine's arrays."""

    def __init__(self, engine: ExpertEngine) -> None:
        from moespac_vllm.engine import (FAITHFUL_THRESHOLD, HYBRIMOE_DECAY, PREFETCH_IDLE_ONLY,
                                         RECENCY_DECAY, SPAC_PREFETCH_MIN_LEVEL, LayerPlan)

        self.engine = engine
        dims, costs = engine.dims, engine.costs
        est = engine.estimator
        cfg: dict[str, Any] = dict(
            num_layers=dims.num_layers, num_experts=dims.num_experts,
            num_slots=engine.num_slots, policy=POLICY_CODES[engine.policy],
            order=ORDER_CODES[engine.tables[0].order.value], prefetch=bool(engine.config.prefetch),
            gpu_fixed_ms=float(costs.gpu_fixed_ms), gpu_per_token_ms=float(costs.gpu_per_token_ms),
            cpu_fixed_ms=float(costs.cpu_fixed_ms), cpu_per_token_ms=float(costs.cpu_per_token_ms),
            fetch_ms=float(costs.fetch_ms), recency_a=1.0 - RECENCY_DECAY, recency_b=0.999,
            decay=RECENCY_DECAY if engine.policy is Policy.SPAC else HYBRIMOE_DECAY,
            prefetch_floor=float(SPAC_PREFETCH_MIN_LEVEL if engine.policy is Policy.SPAC
                                 else 0.0),
            idle_only=bool(PREFETCH_IDLE_ONLY), faithful_threshold=float(FAITHFUL_THRESHOLD),
            estimator=est is not None)
        arrays: dict[str, np.ndarray] = dict(
            masks=engine._masks, score=engine._score, last_counts=engine._last_counts,
            counters=engine._c.values, times=engine._times, clock=engine._clock,
            layer_offset_ms=engine._layer_offset_ms, open=engine._open)
        if est is not None:
            e = est.cfg
            cfg.update(theta_fixed=e.theta_scale is ThetaScale.FIXED, theta_up=int(e.theta_up),
                       theta_down=int(e.theta_down), utility_cap=int(e.utility_cap),
                       reference_window_tokens=int(e.reference_window_tokens))
            arrays["levels"] = est._levels
        tables = [(t._slot_of, t._expert_in, t._state, t._pins, t._last_use, t._uses, t._ready,
                   t._meta) for t in engine.tables]
        mover, clock = engine.mover, engine.clock
        self._planner = _plan.Planner(cfg, tables, arrays, mover.load, mover.is_ready,
                                      clock.now_ms, LayerPlan, self._ids)
        if engine._next_use is not None:
            self.set_future(engine._next_use)

    def set_future(self, next_use: np.ndarray) -> None:
        self._planner.set_future(np.ascontiguousarray(next_use, dtype=np.int64))

    @staticmethod
    def _ids(topk_ids: Any) -> np.ndarray:
        """Any integer [T, K] array-like -> C-contiguous int32/int64 (the native code reads
        those in place and sends everything else here)."""
        ids = np.asarray(topk_ids)
        if ids.ndim != 2 or ids.dtype.kind not in "iu":
            raise ValueError(f"topk_ids: expected an integer [T, K] array, got {ids.dtype} "
                             f"{ids.shape}")
        if ids.dtype not in (np.int64, np.int32) or not ids.flags.c_contiguous:
            ids = np.ascontiguousarray(ids, dtype=np.int64)
        return ids

    def plan_layer(self, layer: int, topk_ids: Any) -> LayerPlan:
        eng = self.engine
        decoding = eng._decoding()
        plan = self._planner.plan(layer, topk_ids, decoding)
        if decoding:
            eng._window_ids[layer] = topk_ids if type(topk_ids) is np.ndarray \
                else np.asarray(topk_ids)
        return plan

    def finish_layer(self, layer: int, topk_ids: Any) -> None:
        eng = self.engine
        decoding = eng._decoding()
        self._planner.finish(layer, topk_ids, decoding)
        if decoding and eng.estimator is not None:
            eng.estimator.drop_draft(layer)

    def prefetch_step(self) -> None:
        """end_step's prefetch for spac / hybrimoe (every layer not yet whole)."""
        self._planner.prefetch_step()

    def prefetch_layer(self, layer: int, score: np.ndarray, tiebreak: np.ndarray,
                       deadline: bool) -> None:
        self._planner.prefetch_with(layer, np.ascontiguousarray(score, dtype=np.float64),
                                    np.ascontiguousarray(tiebreak, dtype=np.int64), deadline)


__all__ = ["NativePlanner", "attach", "available", "unsupported"]
