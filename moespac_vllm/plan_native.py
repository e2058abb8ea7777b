"""The native planner: `ExpertEngine`'s per-forward hot path in C++ (`csrc/plan.cpp`, module
`moespac_vllm._plan`), a drop-in for `plan_layer` / `finish_layer` and the spac / hybrimoe /
spac-faithful prefetch.

`attach(engine)` builds a `NativePlanner` over the engine's own state: the slot tables' arrays
(cache.py), the engine's masks, books, timeline and scores (engine_state.py) and the estimator's
levels. The C++ code changes those arrays in place and calls the engine's mover back in the order
the Python engine does (the clock it reads once per call: every decision of one plan uses the
time the plan started at), so plans, books and tables are identical to the Python reference's
(tests/test_plan_native.py: hypothesis problems and the real Mixtral traces, every policy). What the native planner does not cover stays in Python on the same state: the oracle's
and `static`'s end-of-step placement, the whole-layer path, the draft signal, statistics.

Used by default whenever the module imports and the configuration is covered (balanced policies
need the exact balancer; another balancer keeps the Python path); otherwise the engine stays on
the Python path and says so in one log line.

Measured (benchmarks/README.md, bench_layer_host.py --dims qwen3-30b-a3b): the Python plan costs
180-530 us per planned layer forward at Qwen3-30B-A3B scale; this path 3-9 us (2-core EPYC,
shared), a part of it the mover's own Python: its loads, and one batched readiness poll
(`ready_mask`) per refresh / finish.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import types
from typing import TYPE_CHECKING, Any

import numpy as np

from moespac_vllm.config import Policy, ThetaScale
from moespac_vllm.cost_model import ExpertCosts
from moespac_vllm.trace import ModelDims

if TYPE_CHECKING:
    from moespac_vllm.engine import ExpertEngine, LayerPlan

logger = logging.getLogger(__name__)

# csrc/plan.cpp's enums
POLICY_CODES = {Policy.SPAC: 0, Policy.SPAC_FAITHFUL: 1, Policy.LRU: 2, Policy.SD_LRU: 3,
                Policy.LFU: 4, Policy.STATIC: 5, Policy.HYBRIMOE: 6, Policy.ORACLE: 7,
                # plan.cpp's STATIC never looks at the phase beyond prefill vs decode/verify, so
                # sd-static (static's placement, verifying draft windows) is its STATIC
                Policy.SD_STATIC: 5}
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
    if engine.policy not in POLICY_CODES:
        return f"policy {engine.policy.value} has no native planner"
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
    """`plan_layer` / `finish_layer` / prefetch of one engine, in C++ on the engine's arrays.

    `plan_layer(layer, topk_ids) -> LayerPlan` and `finish_layer(layer, topk_ids)` are the
    compiled functions themselves (instance attributes), so the engine's dispatch reaches C++
    with no Python frame between: the whole Python cost of a planned forward is the engine's
    two method calls. Routing of any integer dtype and strides is read in place."""

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
        hooks: dict[str, Any] = dict(
            load=engine.mover.load, ready_mask=engine.mover.ready_mask, now=engine.clock.now_ms,
            as_ids=self._ids, window_ids=engine._window_ids, plan_type=LayerPlan,
            plan_fields=_slot_descriptors(LayerPlan, _PLAN_FIELDS),
            drop_draft=est.drop_draft if est is not None else None)
        self._planner = _plan.Planner(cfg, tables, arrays, hooks)
        self.plan_layer, self.finish_layer = self._planner.entry_points()
        if engine._next_use is not None:
            self.set_future(engine._next_use, engine._future)

    def set_future(self, next_use: np.ndarray, future_counts: np.ndarray) -> None:
        """The oracle's future (engine.set_future); integral counts let the native code place
        the next step's experts too (`prefetch_oracle`)."""
        f = np.asarray(future_counts)
        counts = np.ascontiguousarray(f, dtype=np.int64) if f.dtype.kind in "iub" else None
        self._planner.set_future(np.ascontiguousarray(next_use, dtype=np.int64), counts)

    def prefetch_oracle(self) -> bool:
        """end_step's oracle placement; False when it is left to the Python engine."""
        return self._planner.oracle_prefetch()

    @staticmethod
    def _ids(topk_ids: Any) -> np.ndarray:
        """Any integer [T, K] array-like -> `np.asarray` of it in native byte order (the native
        code reads integer ndarrays in place and sends everything else here; what it returns
        is also what the engine keeps as the layer's window routing)."""
        ids = np.asarray(topk_ids)
        if ids.ndim != 2 or ids.dtype.kind not in "iu":
            raise ValueError(f"topk_ids: expected an integer [T, K] array, got {ids.dtype} "
                             f"{ids.shape}")
        if not ids.dtype.isnative:
            ids = ids.astype(ids.dtype.newbyteorder("="))
        return ids

    def prefetch_step(self) -> None:
        """end_step's prefetch for spac / hybrimoe (every layer not yet whole)."""
        self._planner.prefetch_step()

    def prefetch_layer(self, layer: int, score: np.ndarray, tiebreak: np.ndarray,
                       deadline: bool) -> None:
        self._planner.prefetch_with(layer, np.ascontiguousarray(score, dtype=np.float64),
                                    np.ascontiguousarray(tiebreak, dtype=np.int64), deadline)


_PLAN_FIELDS = ("layer", "slot_ids", "cpu_mask", "fetches", "cpu_experts", "device_experts")


def _slot_descriptors(cls: type, names: tuple[str, ...]) -> tuple[Any, ...]:
    """The member descriptors of slotted dataclass `cls`'s fields, in field order: the native code
    sets a new instance's slots through them, which is all `cls(...)` does when nothing runs after
    `__init__` sets the fields. Raises ValueError when `cls` is not that (other fields than
    `names`, a `__post_init__`, no slots), so a change to LayerPlan stops here, not in a plan."""
    fields = tuple(f.name for f in dataclasses.fields(cls))
    post_init = any("__post_init__" in vars(k) for k in cls.__mro__)
    descriptors = tuple(vars(cls).get(n) for n in names)
    if fields != names or post_init or not all(
            isinstance(d, types.MemberDescriptorType) for d in descriptors):
        raise ValueError(f"plan_type: the native planner fills the slots {names} of a slotted "
                         f"dataclass without __post_init__; {cls.__name__} has fields {fields}"
                         f"{' and a __post_init__' if post_init else ''}")
    return descriptors


def measure_plan_ms(dims: ModelDims, costs: ExpertCosts, *, window_tokens: int = 4,
                    steps: int = 20, cache_ratio: float = 0.17, policy: str = "spac",
                    seed: int = 0) -> float:
    """Median host ms of one planned layer decision (`plan_layer` + `finish_layer`) of the real
    engine at `dims`, on the path it uses by default, deciding with `costs`: what the cost
    model's `host_plan_ms` holds (`calibrate` measures it). Routing: `steps` windows of
    `window_tokens` tokens drawn from a skewed per-layer popularity (Dirichlet 0.3, like trained
    routers); copies on the simulator's serial link over a clock that advances by each layer's
    modelled time, so the engine meets misses, copies in flight and evictions as in decoding."""
    from moespac_vllm.config import MoESpacConfig
    from moespac_vllm.engine import ExpertEngine
    from moespac_vllm.simulate import SimClock, SimMover
    from moespac_vllm.step_context import Phase, StepContext

    for name, v in (("window_tokens", window_tokens), ("steps", steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: must be a positive integer, got {v!r}")
    L, E, K = dims.num_layers, dims.num_experts, dims.top_k
    cfg = MoESpacConfig().replace(policy=policy, cache_ratio=cache_ratio, stats_file=None)
    clock = SimClock()
    engine = ExpertEngine(cfg, dims, costs, SimMover(clock, costs.fetch_ms, dims.expert_bytes),
                          clock)
    rng = np.random.default_rng(seed)
    popularity = rng.dirichlet(np.full(E, 0.3), size=L)
    phase = Phase.VERIFY if window_tokens > 1 else Phase.DECODE
    times_ms: list[float] = []
    for step in range(steps):
        engine.begin_step(StepContext(step, phase, window_tokens, (window_tokens,),
                                      window_tokens - 1))
        for layer in range(L):
            keys = np.log(popularity[layer] + 1e-12) + rng.gumbel(size=(window_tokens, E))
            ids = np.argpartition(-keys, K - 1, axis=1)[:, :K].astype(np.int64)
            t0 = time.perf_counter()
            plan = engine.plan_layer(layer, ids)
            engine.finish_layer(layer, ids)
            times_ms.append((time.perf_counter() - t0) * 1e3)
            n = np.bincount(ids.ravel(), minlength=E)
            dev = list(plan.device_experts)
            gpu = costs.gpu_fixed_ms * len(dev) + costs.gpu_per_token_ms * float(n[dev].sum())
            cpu = costs.cpu_fixed_ms * len(plan.cpu_experts) + costs.cpu_per_token_ms * float(
                n[list(plan.cpu_experts)].sum())
            clock.t_ms += max(gpu + costs.fetch_ms * len(plan.fetches), cpu)
        engine.end_step(window_tokens - 1)
        clock.t_ms += 2.0 * (window_tokens - 1)  # a draft phase
    return float(np.median(times_ms))


__all__ = ["NativePlanner", "attach", "available", "measure_plan_ms", "unsupported"]
