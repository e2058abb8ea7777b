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

Whole layers (S == E, every expert READY; `load_full_layers` copies them in at start when
everything fits): their placement can never change, so a caller may skip the plan:

    slots = engine.resident_slots(l)            # [E] slot per expert, or None
    if slots is not None: compute with slots; engine.note_resident_forward(l, topk_ids)

The routing is then only counted into the stats when the step ends; such a layer keeps no levels
or scores (only eviction and prefetch read them) and is never prefetched into.

Invariants (property-tested): a layer never holds more than its slot budget; every routed
(token, k) pair is computed exactly once (device xor CPU); a slot is never overwritten while a
plan that reads it is in flight (pinned between plan_layer and finish_layer).

Policies (config.Policy), all behind the same five calls. "Misses" are routed experts whose slot is
not READY when `plan_layer` runs.

| policy        | signal            | misses go to                  | eviction   | prefetch                    |
|---------------|-------------------|-------------------------------|------------|-----------------------------|
| spac          | utility levels    | balancer: fetch or CPU        | utility    | end_step: top levels/layer  |
| spac-faithful | levels K5 θ(5,1)  | CPU, always                   | utility,   | finish_layer: level >= 1,   |
|               |                   |                               | protect >=1| high level first            |
| lru / sd-lru  | -                 | fetch (overflow -> CPU)       | LRU        | none                        |
| lfu           | -                 | fetch (overflow -> CPU)       | LFU        | none                        |
| static        | observed frequency| CPU                           | -          | hot set during warm-up only |
| sd-static     | as static, verifying draft windows (llama.cpp + SD, the paper's strongest baseline)   |
| hybrimoe      | EMA activation    | balancer: fetch or CPU        | score      | end_step: top scores/layer  |
| oracle        | future routing    | balancer: fetch or CPU        | Belady     | end_step: next step's set   |

Decisions that are ours ([I], documented so they can be argued with):
- A prefetched copy still LOADING when its layer starts is offered to the balancer like a miss; if
  the balancer puts it on the device the plan lists it in `fetches` (the caller waits for the copy
  already in flight, which costs at most one fetch), else it runs on the CPU this step and the copy
  completes for later steps. Policies without a balancer (spac-faithful, static) use the CPU, as
  the reference code does. On-demand policies (lru, lfu, sd-lru) wait.
- On-demand policies never compute on the CPU, except when a layer routes to more experts than it
  has slots: the overflow (the fewest-token experts) runs on the CPU, since one plan cannot reuse a
  slot twice.
- Prefill / mixed forwards use on-demand fetch for every policy but `static` (whose placement is
  frozen: CPU), do not move utility levels and do not count in the hit statistics (MOESPAC.md §1:
  SpAc hooks are off during prefill).
- `spac` scores an expert as level + a recency fraction in [0, 1) (an EMA of "routed in the last
  windows"): levels decide, recency breaks ties instead of the reference's lowest id. With the
  config's estimator left at the reference defaults, spac scales θ_up with the window
  (`ThetaScale.WINDOW`) so short windows still move levels.
- `spac` prefetch (end_step) targets, per layer, the S best-scored experts; a newcomer may replace
  a resident only if the resident's score is strictly lower (the reference's "below the threshold"
  rule with the newcomer's score as threshold). Copies are issued layer by layer and only while
  they can land before the draft phase ends (the link is idle then): measured in the simulator, a
  prefetch that spills into the verification pass delays that pass's on-demand fetches more than
  its ~50-65% precision saves (Mixtral, rtx4090-pcie4, ratio 0.17, k = 1: 3.19-3.57 tok/s spilling
  vs 3.64 idle-only). hybrimoe and the oracle may spill up to their layer's expected start.
- On-demand fetches queue behind prefetches on the one copy link: when the engine's own model of
  the link says it is busy, the balancer's fetching placement is compared, with that backlog
  added, against fetching nothing.
- `choose_draft_tokens` (adaptive draft length, simulator switch on spac): the k maximising
  expected tokens per modelled step time (`draft_roofline`); k = 0 turns speculation off.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from moespac_vllm.cache import EvictionOrder, SlotTable
from moespac_vllm.config import EstimatorConfig, MoESpacConfig, Policy, ThetaScale
from moespac_vllm.cost_model import ExpertCosts
from moespac_vllm.engine_state import (BEGIN_MS, DECODING, END_MS, GAP_MS, LINK_FREE_MS, STEP,
                                       TICK, ArrayField, Counters, ExpertSet)
from moespac_vllm.stats import EngineStats, StatsWriter, format_log_line
from moespac_vllm.step_context import Phase, StepContext
from moespac_vllm.trace import ModelDims

logger = logging.getLogger(__name__)


class Clock(Protocol):
    def now_ms(self) -> float: ...


@runtime_checkable
class EngineMover(Protocol):
    """The verbs the engine calls on its copy engine (mover.Mover is the whole contract)."""

    def load(self, layer: int, expert: int, slot: int) -> None: ...

    def ready_mask(self, layer: int, slots: list[int]) -> list[bool]: ...

    def cancel(self, layer: int, slot: int) -> bool: ...

    @property
    def bytes_moved(self) -> int: ...


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


_ORDER = {
    Policy.SPAC: EvictionOrder.UTILITY,
    Policy.SPAC_FAITHFUL: EvictionOrder.UTILITY,
    Policy.LRU: EvictionOrder.LRU,
    Policy.SD_LRU: EvictionOrder.LRU,
    Policy.LFU: EvictionOrder.LFU,
    Policy.STATIC: EvictionOrder.LFU,
    Policy.SD_STATIC: EvictionOrder.LFU,
    Policy.HYBRIMOE: EvictionOrder.UTILITY,
    Policy.ORACLE: EvictionOrder.BELADY,
}
_ON_DEMAND = frozenset({Policy.LRU, Policy.SD_LRU, Policy.LFU})
_BALANCED = frozenset({Policy.SPAC, Policy.HYBRIMOE, Policy.ORACLE})
_STATIC = frozenset({Policy.STATIC, Policy.SD_STATIC})  # frozen hot set; sd-static also drafts
# Policies that decode plain autoregressively (one token per request per step) in the simulator;
# the others verify speculative windows.
AUTOREGRESSIVE_POLICIES = frozenset({Policy.LRU, Policy.LFU, Policy.STATIC, Policy.HYBRIMOE})

FAITHFUL_ESTIMATOR = EstimatorConfig(utility_cap=5, theta_up=5, theta_down=1)
FAITHFUL_THRESHOLD = 1  # the reference code's fixed `threshold`
SPAC_DEFAULT_ESTIMATOR = EstimatorConfig(theta_scale=ThetaScale.WINDOW)
PREFETCH_IDLE_ONLY = True
SPAC_PREFETCH_MIN_LEVEL = 0.0  # spac prefetches experts whose score (level + recency) exceeds it
RECENCY_DECAY = 0.5  # spac: EMA of "routed in this window", the tie-break inside a level
HYBRIMOE_DECAY = 0.5  # weight of the past in HybriMoE's score (an EMA of activations; [I])
STATIC_WARMUP_STEPS = 16  # steps over which `static` observes frequencies before freezing


class ExpertEngine:
    """Policy side of the offloaded MoE: slot tables, estimator, balancer, prefetch. `native`:
    plan with the compiled planner (plan_native.py, identical decisions; None = whenever it is
    built and covers the configuration); the Python methods below stay the reference."""

    # scalar state in shared arrays (engine_state.py): the native planner reads and writes them
    _link_free_ms = ArrayField("_times", LINK_FREE_MS)
    _begin_ms = ArrayField("_times", BEGIN_MS, optional=True)
    _gap_ms = ArrayField("_times", GAP_MS)  # end_step -> next begin_step (the draft phase)
    _end_ms = ArrayField("_times", END_MS, optional=True)
    _tick = ArrayField("_clock", TICK)
    _step = ArrayField("_clock", STEP)  # index of the current decode/verify step (oracle)

    def __init__(self, config: MoESpacConfig, dims: ModelDims, costs: ExpertCosts, mover: Any,
                 clock: Clock, balancer: Any = None, num_slots: int | None = None,
                 future_counts: np.ndarray | None = None, native: bool | None = None) -> None:
        if not isinstance(config, MoESpacConfig):
            raise ValueError(f"config: expected MoESpacConfig, got {type(config).__name__}")
        if not isinstance(mover, EngineMover):
            raise ValueError(f"mover: {type(mover).__name__} does not implement the engine's "
                             "mover verbs (load, ready_mask, cancel, bytes_moved; mover.Mover)")
        self.config = config
        self.policy = config.policy
        self.dims = dims
        self.costs = costs
        self.mover = mover
        self.clock = clock
        L, E = dims.num_layers, dims.num_experts
        if num_slots is None:
            num_slots = config.cache.slots_per_layer(E, L, dims.expert_bytes)
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or not 1 <= num_slots <= E:
            raise ValueError(f"num_slots: must be an integer in [1, {E}], got {num_slots!r}")
        self.num_slots = num_slots
        order = _ORDER[self.policy]
        self.tables = [SlotTable(num_slots, E, order) for _ in range(L)]

        self.estimator = None
        if self.policy in (Policy.SPAC, Policy.SPAC_FAITHFUL):
            from moespac_vllm.estimator import UtilityEstimator

            est_cfg = config.estimator if self.policy is Policy.SPAC else FAITHFUL_ESTIMATOR
            if self.policy is Policy.SPAC and est_cfg == EstimatorConfig():
                # untouched defaults are the reference's, tuned for 9-token windows; ours scales
                # θ_up with the window so k < 8 and plain decoding still move levels
                est_cfg = SPAC_DEFAULT_ESTIMATOR
            self.estimator = UtilityEstimator(L, E, est_cfg)
        self.balancer = None
        if self.policy in _BALANCED:
            if balancer is None:
                from moespac_vllm.balancer import make_balancer

                balancer = make_balancer(config.balancer)
            self.balancer = balancer
        self._native = None
        self._times = np.array([0.0, np.nan, 0.0, np.nan])
        self._clock = np.array([0, -1, 1], dtype=np.int64)  # tick, step, decoding
        self._next_use = None
        if self.policy is Policy.ORACLE:
            if future_counts is None:
                raise ValueError("future_counts: the oracle policy needs the future routing "
                                 "([steps, L, E] counts)")
            self.set_future(future_counts)

        self._score = np.zeros((L, E), dtype=np.float64)  # hybrimoe EMA / static frequency
        self._last_counts = np.zeros((L, E), dtype=np.int64)
        self._ctx: StepContext | None = None
        # per-layer state of the plan in flight, as [L, E] masks (engine_state.py)
        self._masks = np.zeros((3, L, E), dtype=bool)
        self._pinned = [ExpertSet(m) for m in self._masks[0]]
        self._pending = [ExpertSet(m) for m in self._masks[1]]  # loads the plan waits for
        self._prefetched = [ExpertSet(m) for m in self._masks[2]]  # issued, not yet used
        self._c = Counters()
        self._stall_ms = 0.0
        self._streamed = 0  # CPU-planned experts run from streamed weights (note_streamed)
        self._cpu_ms = 0.0
        self._gpu_ms = 0.0
        # the engine's own model of the copy link and of the step's timeline (clock ms), for
        # deadline-aware prefetch: a copy is issued only if it can land before its layer starts
        self._layer_offset_ms = np.zeros(L, dtype=np.float64)  # begin_step -> plan_layer(l)
        self._window_ids: list[np.ndarray | None] = [None] * L  # last decode/verify routing
        self._full: list[np.ndarray | None] = [None] * L  # resident_slots() once a layer is full
        self._open = np.ones(L, dtype=bool)  # not yet whole (_full[layer] is None)
        self._stash: list[tuple[int, Any]] = []  # (layer, routing) of whole layers, this step
        self._writer: StatsWriter | None = None  # opened at the first report (stats_file)
        if native is not False:
            from moespac_vllm.plan_native import attach

            self._native = attach(self, required=bool(native))
            if self._native is not None:  # its compiled calls themselves: no frame between
                self.plan_layer = self._native.plan_layer
                self.finish_layer = self._native.finish_layer

    # ---- oracle ------------------------------------------------------------------------------
    def set_future(self, future_counts: np.ndarray) -> None:
        """The routing of every coming decode/verify step: [steps, L, E] token counts. Step i is the
        i-th `begin_step` with a decode or verify phase."""
        f = np.asarray(future_counts)
        L, E = self.dims.num_layers, self.dims.num_experts
        if f.ndim != 3 or f.shape[1:] != (L, E):
            raise ValueError(f"future_counts: expected [steps, {L}, {E}], got {f.shape}")
        n = f.shape[0]
        self._future = f
        # next_use[s, l, e] = first step >= s that routes (l, e), n + 1 if none (Belady key)
        nxt = np.full((n + 1, L, E), n + 1, dtype=np.int64)
        for s in range(n - 1, -1, -1):
            nxt[s] = np.where(f[s] > 0, s, nxt[s + 1])
        self._next_use = nxt
        if self._native is not None:
            self._native.set_future(nxt, f)

    def _belady_key(self, layer: int) -> np.ndarray | None:
        if self._next_use is None:
            return None
        s = min(self._step + 1, self._next_use.shape[0] - 1)
        return self._next_use[s, layer]

    # ---- per step ----------------------------------------------------------------------------
    def begin_step(self, ctx: StepContext) -> None:
        self._flush_resident()
        self._ctx = ctx
        self._clock[DECODING] = ctx.phase in (Phase.DECODE, Phase.VERIFY)
        if ctx.phase in (Phase.DECODE, Phase.VERIFY):
            self._step += 1
            now = self.clock.now_ms()
            if self._end_ms is not None:
                self._gap_ms = max(0.0, now - self._end_ms)
            self._begin_ms = now

    def _decoding(self) -> bool:  # no step begun yet, or a decode/verify one (begin_step)
        return bool(self._clock[DECODING])

    def _scores(self, layer: int) -> np.ndarray | None:
        """The per-expert score the utility eviction order compares. spac: level + a recency
        fraction in [0, 1) (levels decide; within a level the more recently routed expert stays,
        instead of the reference's lowest-id tie-break); spac-faithful: the level alone."""
        if self.policy is Policy.SPAC:
            return self.estimator.levels[layer] + self._score[layer] * (1.0 - RECENCY_DECAY) * 0.999
        if self.estimator is not None:
            return self.estimator.levels[layer]
        if self.policy is Policy.HYBRIMOE:
            return self._score[layer]
        return None

    def _refresh(self, layer: int) -> None:
        """Mark finished copies READY; a copy that finished counts as a prefetch only once used."""
        self._mark_landed(layer, self.tables[layer].residents())

    def _mark_landed(self, layer: int, experts: list[int]) -> None:
        """The LOADING ones among `experts` whose copies landed become READY: one mover call."""
        t = self.tables[layer]
        loading = [e for e in experts if t.is_loading(e)]
        if loading:
            ready = self.mover.ready_mask(layer, [t.slot_of(e) for e in loading])
            for e in (e for e, r in zip(loading, ready) if r):
                t.mark_ready(e)

    def plan_layer(self, layer: int, topk_ids: np.ndarray) -> LayerPlan:
        if self._native is not None:
            return self._native.plan_layer(layer, topk_ids)
        ids = np.asarray(topk_ids)
        E = self.dims.num_experts
        if ids.ndim != 2 or ids.dtype.kind not in "iu":
            raise ValueError(f"topk_ids: expected an integer [T, K] array, got {ids.dtype} "
                             f"{ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= E):
            raise ValueError(f"topk_ids: expert ids must be in [0, {E})")
        if self._pinned[layer] or self._pending[layer]:
            raise ValueError(f"layer: {layer} planned twice without finish_layer")
        counts = np.bincount(ids.ravel(), minlength=E)
        routed = np.flatnonzero(counts)
        table = self.tables[layer]
        if table.num_loading:
            self._refresh(layer)
        decoding = self._decoding()
        if decoding and self._begin_ms is not None:
            self._layer_offset_ms[layer] = self.clock.now_ms() - self._begin_ms
        if decoding:
            self._window_ids[layer] = ids
        ready_mask = table.ready_mask()
        loading: list[int] = []
        absent: list[int] = []
        is_ready = ready_mask[routed]
        if is_ready.all():  # the common case: every routed expert holds valid data
            ready = routed.tolist()
        else:
            has_slot = table.slots_of(routed) >= 0
            ready = routed[is_ready].tolist()
            loading = routed[has_slot & ~is_ready].tolist()
            absent = routed[~has_slot].tolist()
        table.pin_many(np.asarray(ready, dtype=np.int64))
        self._pinned[layer].assign(ready)
        if decoding:
            c = self._c
            c["hits"] += len(ready)
            c["misses"] += len(loading) + len(absent)
            pre = self._prefetched[layer]
            if pre:
                for e in ready:
                    if e in pre:
                        pre.discard(e)
                        c["prefetch_used"] += 1

        device = list(ready)
        wait: list[int] = []  # LOADING copies the device branch waits for
        fetch: list[int] = []  # new on-demand copies
        # With no miss there is nothing to decide: the balancer's model never moves a resident to
        # the CPU (allow_resident_cpu is off), and on-demand policies have nothing to fetch.
        if not (loading or absent):
            pass
        elif (not decoding and self.policy not in _STATIC) or self.policy in _ON_DEMAND:
            wait, fetch = self._on_demand(layer, counts, loading, absent)
        elif self.policy in _BALANCED:
            wait, fetch, to_cpu = self._balance(layer, counts, ready, loading, absent)
            for e in to_cpu:  # the balancer may move a resident expert to the CPU
                table.unpin(e)
                device.remove(e)
                self._pinned[layer].remove(e)
        # spac-faithful / static: every non-ready expert runs on the CPU.

        fetches: list[tuple[int, int]] = []
        for e in wait:
            fetches.append((e, table.slot_of(e)))
            if decoding and e in self._prefetched[layer]:
                self._prefetched[layer].discard(e)
                self._c["prefetch_used"] += 1
                self._c["prefetch_late"] += 1
        for e in fetch:
            slot = self._admit(layer, e, demand=True)
            self._load(layer, e, slot)
            fetches.append((e, slot))
            self._c["fetched_experts"] += 1
        self._pending[layer].assign(wait + fetch)
        device += wait + fetch

        slot_map = np.full(E, -1, dtype=np.int32)
        dev = np.asarray(device, dtype=np.int64)
        slot_map[dev] = table.slots_of(dev)
        slot_ids = slot_map[ids] if ids.size else np.zeros(ids.shape, dtype=np.int32)
        cpu_mask = slot_ids < 0
        if len(device) == len(routed):
            cpu: tuple[int, ...] = ()
        else:
            dev_set = set(device)
            cpu = tuple(int(e) for e in routed if int(e) not in dev_set)
        if decoding:
            self._c["device_experts"] += len(device)
            self._c["cpu_experts"] += len(cpu)
        return LayerPlan(layer=layer, slot_ids=slot_ids.astype(np.int32, copy=False),
                         cpu_mask=cpu_mask, fetches=tuple(fetches), cpu_experts=cpu,
                         device_experts=tuple(sorted(device)))

    def _on_demand(self, layer: int, counts: np.ndarray, loading: list[int], absent: list[int]
                   ) -> tuple[list[int], list[int]]:
        """Fetch every miss while slots can be freed; the overflow (fewest tokens) stays on CPU."""
        table = self.tables[layer]
        room = table.num_evictable(self._scores(layer))
        by_tokens = sorted(absent, key=lambda e: (-int(counts[e]), e))
        return list(loading), by_tokens[:room]

    def _balance(self, layer: int, counts: np.ndarray, ready: list[int], loading: list[int],
                 absent: list[int]) -> tuple[list[int], list[int], list[int]]:
        """Ask the balancer which misses to fetch (or wait for) and which to run on the CPU."""
        from moespac_vllm.balancer import BalanceProblem

        table = self.tables[layer]
        experts = ready + loading + absent
        tokens = np.array([int(counts[e]) for e in experts], dtype=np.int64)
        resident = np.array([True] * len(ready) + [False] * (len(loading) + len(absent)))
        # a LOADING miss already owns its slot, so it needs no free one; the balancer's slot budget
        # is the free + evictable slots plus those.
        free = table.num_evictable(self._scores(layer)) + len(loading)
        problem = BalanceProblem(tokens=tokens, resident=resident, free_slots=free,
                                 costs=self.costs, hidden_fetch_ms=0.0)
        placement = self.balancer.solve(problem)
        backlog = max(0.0, self._link_free_ms - self.clock.now_ms())
        if backlog > 0.0 and placement.num_fetched > 0:
            # copies already queued on the link (prefetches) delay on-demand fetches by `backlog`;
            # the model assumes an idle link, so compare with fetching nothing
            from moespac_vllm.balancer import evaluate

            none = evaluate(problem, np.zeros(len(experts), dtype=bool))
            if none.makespan_ms <= max(placement.gpu_ms + backlog, placement.cpu_ms):
                placement = none
        wait, fetch, to_cpu = [], [], []
        for i, e in enumerate(experts):
            if i < len(ready):
                if placement.on_cpu[i]:
                    to_cpu.append(e)
            elif placement.fetch[i]:
                (wait if i < len(ready) + len(loading) else fetch).append(e)
        # the budget above lets a LOADING expert's own slot count for any fetch; new copies can
        # only take free or evictable slots, so the surplus (fewest tokens) stays on the CPU
        room = free - len(loading)
        if len(fetch) > room:
            fetch = sorted(fetch, key=lambda e: (-int(counts[e]), e))[:room]
        return wait, fetch, to_cpu

    def _load(self, layer: int, expert: int, slot: int) -> None:
        self.mover.load(layer, expert, slot)
        self._link_free_ms = max(self.clock.now_ms(), self._link_free_ms) + self.costs.fetch_ms

    def _fits_deadline(self, layer: int, idle_only: bool = False) -> bool:
        """Would one more copy land before `layer` starts in the next step (last step's
        timeline: the draft phase, then the layers before it)? With `idle_only`, before the
        draft phase ends: then prefetches never delay the next pass's on-demand fetches."""
        deadline = self.clock.now_ms() + self._gap_ms
        if not idle_only:
            deadline += self._layer_offset_ms[layer]
        return max(self.clock.now_ms(), self._link_free_ms) + self.costs.fetch_ms <= deadline

    def _admit(self, layer: int, expert: int, demand: bool, threshold: float | None = None,
               scores: np.ndarray | None = None) -> int:
        """`scores`: the array the caller's `can_admit` check used (prefetch from draft routing
        ranks by provisional levels); admitting by another array could find no victim."""
        table = self.tables[layer]
        if scores is None:
            scores = self._scores(layer)
        slot, evicted = table.admit(expert, scores, threshold, self._belady_key(layer))
        if evicted >= 0 and evicted in self._prefetched[layer]:
            self._prefetched[layer].discard(evicted)
            self._c["prefetch_wasted"] += 1
        if not demand:
            self._prefetched[layer].add(expert)
            self._c["prefetch_issued"] += 1
        return slot

    def finish_layer(self, layer: int, topk_ids: np.ndarray) -> None:
        if self._native is not None:
            return self._native.finish_layer(layer, topk_ids)
        ids = np.asarray(topk_ids)
        E = self.dims.num_experts
        counts = np.bincount(ids.ravel(), minlength=E) if ids.size else np.zeros(E, np.int64)
        table = self.tables[layer]
        self._mark_landed(layer, list(self._pending[layer]))
        table.unpin_many(np.asarray(self._pinned[layer], dtype=np.int64))
        self._masks[:2, layer] = False
        self._tick += 1
        table.touch_many(np.flatnonzero(counts), self._tick)
        if self._decoding():
            self._commit_counts(layer, counts, ids)

    def _commit_counts(self, layer: int, counts: np.ndarray, ids: np.ndarray) -> None:
        """A decode/verify forward's routing of `layer` into the estimator and the scores."""
        self._last_counts[layer] = counts
        n_tokens = int(ids.shape[0]) if ids.ndim == 2 else 1
        if self.estimator is not None:
            self.estimator.observe(layer, counts.astype(np.int64), num_tokens=max(1, n_tokens))
        if self.policy is Policy.HYBRIMOE:
            self._score[layer] = HYBRIMOE_DECAY * self._score[layer] + (counts > 0)
        elif self.policy is Policy.SPAC:
            self._score[layer] = RECENCY_DECAY * self._score[layer] + (counts > 0)
        elif self.policy in _STATIC:
            self._score[layer] += counts
        if self.policy is Policy.SPAC_FAITHFUL and self.config.prefetch:
            self._faithful_prefetch(layer)

    # ---- fully resident layers ----------------------------------------------------------------
    def load_full_layers(self) -> int:
        """When every expert of a layer fits (S == E), copy them all in now instead of waiting
        for each one's first use: a deployment whose model fits runs the fast, plan-free path
        (`resident_slots`) from its first steps, whatever the routing (a trained model may not
        route to some experts for a long time). Returns the number of copies issued; they count
        in the mover's bytes, not as fetches or prefetches."""
        E = self.dims.num_experts
        issued = 0
        if self.num_slots != E:
            return 0
        for layer, table in enumerate(self.tables):
            for e in range(E):
                if table.slot_of(e) < 0:
                    slot, _ = table.admit(e)
                    self._load(layer, e, slot)
                    issued += 1
        return issued

    def resident_slots(self, layer: int) -> np.ndarray | None:
        """[E] int32, the slot of every expert, once `layer` has as many slots as experts and all
        of them hold valid data; None before. From then on the layer's placement never changes
        (no expert is left to admit, so none is ever evicted), so a caller may run its forwards
        without `plan_layer` / `finish_layer` and report each with `note_resident_forward`."""
        full = self._full[layer]
        if full is not None:
            return full
        table = self.tables[layer]
        E = self.dims.num_experts
        if table.num_slots != E:
            return None
        if table.num_loading and not self._pinned[layer]:
            self._refresh(layer)
        if table.num_loading == 0 and not self._pinned[layer] and table.ready_mask().all():
            full = table.slots_of(np.arange(E)).astype(np.int32)
            full.flags.writeable = False
            self._full[layer] = full
            self._open[layer] = False
        return full

    def note_streamed(self, layer: int, experts: int) -> None:
        """`experts` of layer `layer`'s CPU-planned experts ran on the device from streamed
        weights instead (offload's PrefillStreamer): counted as streamed, not as CPU experts
        (in the steps the books count, as the plan's CPU experts are)."""
        if self._decoding():
            self._streamed += int(experts)

    def note_resident_forward(self, layer: int, topk_ids: Any) -> None:
        """Report a forward of a layer `resident_slots` returned slots for. A whole layer has no
        decision left: nothing is admitted, evicted, pinned or prefetched, and its utility levels
        and scores would feed only those, so they are no longer kept. What remains is the books
        (hits, device experts, prefetch use, the last window for the draft-length model): the
        routing (any integer array-like [T, K], e.g. a CPU tensor) is only stashed here and
        counted when the step ends, so a forward costs a list append. Ids outside [0, E) raise
        ValueError then."""
        if self._full[layer] is None:
            raise ValueError(f"layer: {layer} is not fully resident; use plan_layer")
        if self._decoding():
            self._stash.append((layer, topk_ids))

    def _flush_resident(self) -> None:
        """Count the stashed routing of whole layers into the books."""
        if not self._stash:
            return
        stash, self._stash = self._stash, []
        E = self.dims.num_experts
        c = self._c
        for layer, raw in stash:
            ids = np.asarray(raw)
            if ids.dtype.kind not in "iu" or (ids.size and ids.min() < 0):
                raise ValueError(f"topk_ids: layer {layer} routed to ids outside [0, {E})")
            counts = np.bincount(ids.ravel(), minlength=E)
            if counts.shape[0] != E:
                raise ValueError(f"topk_ids: layer {layer} routed to ids outside [0, {E})")
            n_routed = int(np.count_nonzero(counts))
            c["hits"] += n_routed
            c["device_experts"] += n_routed
            pre = self._prefetched[layer]
            if pre:
                for e in np.flatnonzero(counts).tolist():
                    if e in pre:
                        pre.discard(e)
                        c["prefetch_used"] += 1
            self._window_ids[layer] = ids

    def _faithful_prefetch(self, layer: int) -> None:
        """Reference code: enqueue level >= 1 experts; pop highest level first; a victim must score
        below the threshold (1), so residents with level >= 1 are never displaced."""
        levels = self.estimator.levels[layer]
        table = self.tables[layer]
        order = sorted((int(-levels[e]), int(e)) for e in np.flatnonzero(levels >= 1))
        for _, e in order:
            if table.slot_of(e) >= 0:
                continue
            if not table.can_admit(levels, FAITHFUL_THRESHOLD):
                break
            slot = self._admit(layer, e, demand=False, threshold=FAITHFUL_THRESHOLD,
                               scores=levels)
            self._load(layer, e, slot)

    def observe_draft(self, layer: int, signal: np.ndarray) -> None:
        """Draft-phase routing of `layer` for the coming window: router logits [W, E] (float) or
        top-k ids [W, K] (int). Moves provisional levels; `spac` prefetches the newly hot experts."""
        if self.estimator is None or self._full[layer] is not None:
            return  # a whole layer has nothing to prefetch
        from moespac_vllm.estimator import counts_from_router_logits, counts_from_topk

        x = np.asarray(signal)
        if x.ndim != 2:
            raise ValueError(f"signal: expected [W, E] logits or [W, K] ids, got {x.shape}")
        if x.dtype.kind == "f":
            counts = counts_from_router_logits(x, self.dims.top_k)
        else:
            counts = counts_from_topk(x, self.dims.num_experts)
        if not self.estimator.observe_draft(layer, counts, num_tokens=max(1, x.shape[0])):
            return
        if self.policy is Policy.SPAC and self.config.prefetch:
            prefetch = self._prefetch_layer if self._native is None else self._native.prefetch_layer
            prefetch(layer, self.estimator.predicted_levels(layer), counts, deadline=False)

    def end_step(self, num_accepted: int) -> None:
        if isinstance(num_accepted, bool) or not isinstance(num_accepted, (int, np.integer)) \
                or num_accepted < 0:
            raise ValueError(f"num_accepted: must be a non-negative integer, got {num_accepted!r}")
        self._flush_resident()
        if not self._decoding():
            return
        self._end_ms = self.clock.now_ms()
        ctx = self._ctx
        requests = len(ctx.tokens_per_request) if ctx and ctx.tokens_per_request else 1
        self._c["steps"] += 1
        if ctx is not None and ctx.phase is Phase.VERIFY:
            self._c["tokens"] += int(num_accepted) + requests
        else:
            self._c["tokens"] += requests
        if self._c["steps"] % self.config.stats.stats_interval_steps == 0:
            self._report()
        if not self.config.prefetch:
            return
        L = self.dims.num_layers
        open_layers = [layer for layer in range(L) if self._full[layer] is None]
        if self._native is not None and self.policy in (Policy.SPAC, Policy.HYBRIMOE):
            self._native.prefetch_step()
        elif self.policy is Policy.SPAC:
            for layer in open_layers:
                self._prefetch_layer(layer, self._scores(layer), self._last_counts[layer])
        elif self.policy is Policy.HYBRIMOE:
            for layer in open_layers:
                self._prefetch_layer(layer, self._score[layer], self._last_counts[layer])
        elif self.policy is Policy.ORACLE:
            self._oracle_prefetch()
        elif self.policy in _STATIC and self._c["steps"] <= STATIC_WARMUP_STEPS:
            for layer in range(L):
                self._static_place(layer)

    def _prefetch_layer(self, layer: int, score: np.ndarray, tiebreak: np.ndarray,
                        deadline: bool = True) -> None:
        """Bring the S best-scored experts of `layer` on the device; a newcomer displaces only a
        resident of strictly lower score. With `deadline`, only copies that can land before the
        layer starts next step are issued (a late copy only delays on-demand fetches)."""
        table = self.tables[layer]
        floor = SPAC_PREFETCH_MIN_LEVEL if self.policy is Policy.SPAC else 0.0
        candidates = np.flatnonzero(score > floor) if floor == 0.0 else np.flatnonzero(
            score >= floor)
        if candidates.size == 0 or (table.slots_of(candidates) >= 0).all():
            return  # nothing to bring in (always so once a layer's experts all fit)
        order = sorted(candidates.tolist(), key=lambda e: (-score[e], -tiebreak[e], e))
        for e in order[: self.num_slots]:
            if table.slot_of(e) >= 0:
                continue
            if not table.can_admit(score, threshold=score[e]):
                break
            if deadline and not self._fits_deadline(
                    layer, idle_only=PREFETCH_IDLE_ONLY and self.policy is Policy.SPAC):
                break
            slot = self._admit(layer, e, demand=False, threshold=score[e], scores=score)
            self._load(layer, e, slot)

    def _oracle_prefetch(self) -> None:
        if self._native is not None and self._native.prefetch_oracle():
            return
        nxt = self._step + 1
        if nxt >= self._future.shape[0]:
            return
        for layer in range(self.dims.num_layers):
            need = self._future[nxt, layer]
            table = self.tables[layer]
            order = sorted(np.flatnonzero(need).tolist(), key=lambda e: (-need[e], e))
            key = self._next_use[nxt, layer]
            for e in order[: self.num_slots]:
                if table.slot_of(e) >= 0:
                    continue
                victim = table.victim(next_use=key)
                if table.num_free == 0 and (victim < 0 or key[victim] <= nxt):
                    break  # every evictable resident is also needed next step
                if not self._fits_deadline(layer):
                    break
                slot, evicted = table.admit(e, next_use=key)
                if evicted >= 0 and evicted in self._prefetched[layer]:
                    self._prefetched[layer].discard(evicted)
                    self._c["prefetch_wasted"] += 1
                self._prefetched[layer].add(e)
                self._c["prefetch_issued"] += 1
                self._load(layer, e, slot)

    def _static_place(self, layer: int) -> None:
        """`static`: the S most frequently routed experts so far; frozen after the warm-up."""
        table = self.tables[layer]
        freq = self._score[layer]
        hot = sorted(np.flatnonzero(freq > 0).tolist(), key=lambda e: (-freq[e], e))
        hot = hot[: self.num_slots]
        hot_set = set(hot)
        for e in table.residents():
            if e not in hot_set and not table.is_pinned(e):
                if table.is_loading(e):
                    self.mover.cancel(layer, table.slot_of(e))
                table.evict(e)
                self._prefetched[layer].discard(e)
        for e in hot:
            if table.slot_of(e) < 0:
                slot = self._admit(layer, e, demand=False)
                self._load(layer, e, slot)

    # ---- adaptive draft length (governor.py) ----------------------------------------------------
    def window_ids(self) -> list[np.ndarray | None]:
        """The last decode/verify routing [T, K] of every layer (None before any)."""
        return self._window_ids

    def draft_roofline(self, acceptance: float, draft_ms_per_token: float,
                       step_overhead_ms: float, k_max: int) -> list[tuple[int, float, float]]:
        """(k, expected tokens, modelled step ms) for k = 0..k_max (`governor.roofline`)."""
        from moespac_vllm.governor import roofline

        return roofline(self, acceptance, draft_ms_per_token, step_overhead_ms, k_max)

    def choose_draft_tokens(self, acceptance: float, draft_ms_per_token: float,
                            step_overhead_ms: float, k_max: int, k_min: int = 1) -> int:
        """The k in [k_min, k_max] with the most expected tokens per modelled ms (ties: smaller)."""
        from moespac_vllm.governor import best_draft_tokens

        return best_draft_tokens(self.draft_roofline(acceptance, draft_ms_per_token,
                                                     step_overhead_ms, k_max), k_min)

    # ---- statistics --------------------------------------------------------------------------
    def record_timing(self, stall_ms: float = 0.0, cpu_ms: float = 0.0, gpu_ms: float = 0.0
                      ) -> None:
        """The caller (simulator or offloaded layer) reports the time one layer spent."""
        self._stall_ms += float(stall_ms)
        self._cpu_ms += float(cpu_ms)
        self._gpu_ms += float(gpu_ms)

    def _report(self) -> None:
        """Every `stats_interval_steps`: the log line, and a JSON line to `stats_file` if set."""
        st = self.stats()
        logger.info(format_log_line(st))
        path = self.config.stats.stats_file
        if path is not None:
            if self._writer is None:
                self._writer = StatsWriter(path)
            self._writer.write(st, policy=self.policy.value, num_slots=self.num_slots)

    def close(self) -> None:
        """Flush and close the stats file (if any)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def stats(self) -> EngineStats:
        c = self._c
        return EngineStats(
            steps=c["steps"], tokens=c["tokens"], hits=c["hits"], misses=c["misses"],
            fetched_experts=c["fetched_experts"], device_experts=c["device_experts"],
            cpu_experts=c["cpu_experts"] - self._streamed, streamed_experts=self._streamed,
            prefetch_issued=c["prefetch_issued"],
            prefetch_used=c["prefetch_used"], prefetch_wasted=c["prefetch_wasted"],
            prefetch_late=c["prefetch_late"],
            h2d_bytes=int(self.mover.bytes_moved),
            stall_ms=self._stall_ms, cpu_ms=self._cpu_ms, gpu_ms=self._gpu_ms,
        )


__all__ = ["AUTOREGRESSIVE_POLICIES", "Clock", "ExpertEngine", "LayerPlan"]
