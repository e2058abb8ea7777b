"""ExpertEngine: the policy side, driven exactly as engine.py's contract says (pure, CPU)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moespac_vllm.config import MoESpacConfig, Policy
from moespac_vllm.cost_model import ExpertCosts
from moespac_vllm.engine import ExpertEngine
from moespac_vllm.step_context import Phase, StepContext
from moespac_vllm.trace import ModelDims

class FakeClock:
    def __init__(self) -> None:
        self.t_ms = 0.0

    def now_ms(self) -> float:
        return self.t_ms


class FakeMover:
    """`Mover` whose copies take `fetch_ms` on one serial link of the fake clock."""

    def __init__(self, clock: FakeClock, fetch_ms: float, expert_bytes: int) -> None:
        self.clock, self.fetch_ms, self.expert_bytes = clock, fetch_ms, expert_bytes
        self.done: dict[tuple[int, int], float] = {}
        self.link_free = 0.0
        self.loads = 0

    def load(self, layer: int, expert: int, slot: int) -> None:
        start = max(self.clock.t_ms, self.link_free)
        self.link_free = self.done[(layer, slot)] = start + self.fetch_ms
        self.loads += 1

    def is_ready(self, layer: int, slot: int) -> bool:
        return self.clock.t_ms >= self.done.get((layer, slot), float("inf"))

    def ready_mask(self, layer: int, slots) -> list[bool]:
        return [self.is_ready(layer, s) for s in slots]

    def wait(self, layer: int, slot: int) -> None:
        self.clock.t_ms = max(self.clock.t_ms, self.done[(layer, slot)])

    def cancel(self, layer: int, slot: int) -> bool:
        return self.done.pop((layer, slot), -1.0) > self.clock.t_ms

    @property
    def bytes_moved(self) -> int:
        return self.loads * self.expert_bytes


DIMS = ModelDims(num_layers=3, num_experts=8, top_k=2, hidden_size=16, intermediate_size=8)
COSTS = ExpertCosts(gpu_fixed_ms=0.1, gpu_per_token_ms=0.01, cpu_fixed_ms=1.0,
                    cpu_per_token_ms=0.1, fetch_ms=2.0)


def _engine(policy: Policy, ratio: float = 0.25, fetch_ms: float = 0.0, future=None,
            costs: ExpertCosts = COSTS, **flat) -> tuple[ExpertEngine, FakeClock, FakeMover]:
    clock = FakeClock()
    mover = FakeMover(clock, fetch_ms, DIMS.expert_bytes)
    cfg = MoESpacConfig().replace(policy=policy.value, cache_ratio=ratio, **flat)
    return ExpertEngine(cfg, DIMS, costs, mover, clock, future_counts=future), clock, mover


def _routing(rng: np.random.Generator, steps: int, tokens: int) -> np.ndarray:
    """[steps, tokens, L, K] distinct top-k ids, skewed towards low expert ids."""
    p = np.arange(DIMS.num_experts, 0, -1, dtype=float)
    p /= p.sum()
    out = np.empty((steps, tokens, DIMS.num_layers, DIMS.top_k), dtype=np.int64)
    for idx in np.ndindex(steps, tokens, DIMS.num_layers):
        out[idx] = rng.choice(DIMS.num_experts, DIMS.top_k, replace=False, p=p)
    return out


def _check_plan(engine: ExpertEngine, layer: int, ids: np.ndarray, plan) -> None:
    """Every routed pair exactly once: device xor CPU; a device pair reads its own expert."""
    assert plan.slot_ids.shape == ids.shape
    assert np.array_equal(plan.cpu_mask, plan.slot_ids < 0)
    table = engine.tables[layer]
    for (t, k), slot in np.ndenumerate(plan.slot_ids):
        if slot >= 0:
            assert table.expert_in(int(slot)) == ids[t, k]
    routed = set(np.unique(ids).tolist())
    assert set(plan.device_experts) | set(plan.cpu_experts) == routed
    assert not set(plan.device_experts) & set(plan.cpu_experts)
    assert len(table.residents()) <= engine.num_slots


def _future(routing: np.ndarray) -> np.ndarray:
    """[steps, L, E] counts of a [steps, T, L, K] routing (the oracle's future)."""
    out = np.zeros((routing.shape[0], DIMS.num_layers, DIMS.num_experts), dtype=np.int64)
    for s, window in enumerate(routing):
        for layer in range(DIMS.num_layers):
            out[s, layer] = np.bincount(window[:, layer, :].ravel(), minlength=DIMS.num_experts)
    return out


def _drive(engine: ExpertEngine, routing: np.ndarray, speculative: bool, clock=None,
           check=True) -> None:
    for s, window in enumerate(routing):
        phase = Phase.VERIFY if speculative else Phase.DECODE
        engine.begin_step(StepContext(step=s, phase=phase, num_tokens=window.shape[0],
                                      num_draft_tokens=window.shape[0] - 1 if speculative else 0))
        for layer in range(DIMS.num_layers):
            ids = window[:, layer, :]
            plan = engine.plan_layer(layer, ids)
            if check:
                _check_plan(engine, layer, ids, plan)
            for _, slot in plan.fetches:  # the caller waits for the copies, as offload.py does
                engine.mover.wait(layer, slot)
            if clock is not None:
                clock.t_ms += 10.0  # copies issued so far land
            engine.finish_layer(layer, ids)
        engine.end_step(max(0, window.shape[0] - 2) if speculative else 0)


NO_BALANCER = [Policy.LRU, Policy.SD_LRU, Policy.LFU, Policy.STATIC, Policy.SPAC_FAITHFUL]


@pytest.mark.parametrize("policy", [Policy.LRU, Policy.SD_LRU, Policy.LFU, Policy.STATIC])
def test_full_cache_hits_everything_after_warm_up(policy):
    engine, clock, mover = _engine(policy, ratio=1.0)
    rng = np.random.default_rng(0)
    routing = _routing(rng, 40, 3)
    _drive(engine, routing, speculative=True, clock=clock)
    warm = engine.stats()
    bytes_after_warmup = mover.bytes_moved
    _drive(engine, routing, speculative=True, clock=clock)
    after = engine.stats()
    assert after.misses == warm.misses and after.hits > warm.hits
    assert mover.bytes_moved == bytes_after_warmup
    assert after.cpu_experts == warm.cpu_experts


def test_a_mover_without_the_batched_readiness_query_is_refused_at_start():
    class OldMover:  # the per-slot protocol only
        bytes_moved = 0

        def load(self, layer: int, expert: int, slot: int) -> None: ...

        def is_ready(self, layer: int, slot: int) -> bool:
            return True

        def cancel(self, layer: int, slot: int) -> bool:
            return False

    with pytest.raises(ValueError, match="^mover: OldMover .*ready_mask"):
        ExpertEngine(MoESpacConfig(), DIMS, COSTS, OldMover(), FakeClock())


def test_on_demand_policies_never_use_the_cpu_while_slots_suffice():
    engine, _, _ = _engine(Policy.LRU, ratio=0.25)  # 2 slots, top-2, one token: always fits
    rng = np.random.default_rng(1)
    _drive(engine, _routing(rng, 30, 1), speculative=False)
    s = engine.stats()
    assert s.cpu_experts == 0 and s.fetched_experts == s.misses > 0


def test_faithful_never_fetches_on_demand():
    engine, clock, _ = _engine(Policy.SPAC_FAITHFUL, ratio=0.5)
    rng = np.random.default_rng(2)
    for s, window in enumerate(_routing(rng, 30, 9)):
        engine.begin_step(StepContext(step=s, phase=Phase.VERIFY, num_tokens=9,
                                      num_draft_tokens=8))
        for layer in range(DIMS.num_layers):
            plan = engine.plan_layer(layer, window[:, layer, :])
            assert plan.fetches == ()
            engine.finish_layer(layer, window[:, layer, :])
        engine.end_step(3)
        clock.t_ms += 100.0
    st_ = engine.stats()
    # the skewed routing makes expert 0 hot (>= 5 of 9 tokens): it gets prefetched and used
    assert st_.prefetch_issued > 0 and st_.prefetch_used > 0 and st_.fetched_experts == 0


def test_faithful_protects_residents_with_level_at_least_one():
    engine, clock, _ = _engine(Policy.SPAC_FAITHFUL, ratio=0.125)  # one slot
    hot = np.array([[0, 1]] * 9)
    for s in range(3):
        engine.begin_step(StepContext(step=s, phase=Phase.VERIFY, num_tokens=9))
        for layer in range(DIMS.num_layers):
            engine.plan_layer(layer, hot)
            engine.finish_layer(layer, hot)
        engine.end_step(8)
        clock.t_ms += 100.0
    held = engine.tables[0].residents()
    assert held and held[0] in (0, 1)
    cold = np.array([[4, 5]] * 9)  # 9 tokens on 4: its level rises, but the resident is protected
    engine.begin_step(StepContext(step=3, phase=Phase.VERIFY, num_tokens=9))
    engine.plan_layer(0, cold)
    engine.finish_layer(0, cold)
    assert engine.tables[0].residents() == held


def test_static_freezes_after_warm_up():
    engine, clock, mover = _engine(Policy.STATIC, ratio=0.25)
    rng = np.random.default_rng(3)
    _drive(engine, _routing(rng, 20, 1), speculative=False, clock=clock)
    frozen = [sorted(t.residents()) for t in engine.tables]
    loads = mover.loads
    _drive(engine, _routing(rng, 20, 1)[:, :, :, ::-1], speculative=False, clock=clock)
    assert [sorted(t.residents()) for t in engine.tables] == frozen
    assert mover.loads == loads
    assert engine.stats().fetched_experts == 0


def test_oracle_needs_the_future():
    with pytest.raises(ValueError, match="future_counts"):
        _engine(Policy.ORACLE)


def test_bad_routing_names_the_argument():
    engine, _, _ = _engine(Policy.LRU)
    engine.begin_step(StepContext(step=0, phase=Phase.DECODE, num_tokens=1))
    with pytest.raises(ValueError, match="topk_ids"):
        engine.plan_layer(0, np.array([[0, 9]]))
    with pytest.raises(ValueError, match="topk_ids"):
        engine.plan_layer(0, np.array([0, 1]))
    with pytest.raises(ValueError, match="num_accepted"):
        engine.end_step(-1)


def test_num_slots_out_of_range_names_the_field():
    clock = FakeClock()
    with pytest.raises(ValueError, match="num_slots"):
        ExpertEngine(MoESpacConfig().replace(policy="lru"), DIMS, COSTS,
                     FakeMover(clock, 1.0, 1), clock, num_slots=9)


def test_spac_fetches_only_when_the_balancer_says_it_pays():
    rng = np.random.default_rng(4)
    routing = _routing(rng, 12, 5)
    slow_link = ExpertCosts(gpu_fixed_ms=0.1, gpu_per_token_ms=0.0, cpu_fixed_ms=1.0,
                            cpu_per_token_ms=0.0, fetch_ms=1000.0)
    engine, clock, _ = _engine(Policy.SPAC, ratio=0.5, fetch_ms=1000.0, costs=slow_link)
    _drive(engine, routing, speculative=True, clock=clock)
    assert engine.stats().fetched_experts == 0 and engine.stats().cpu_experts > 0
    fast_link = ExpertCosts(gpu_fixed_ms=0.1, gpu_per_token_ms=0.0, cpu_fixed_ms=10.0,
                            cpu_per_token_ms=1.0, fetch_ms=0.01)
    engine, clock, _ = _engine(Policy.SPAC, ratio=0.5, fetch_ms=0.01, costs=fast_link)
    _drive(engine, routing, speculative=True, clock=clock)
    s = engine.stats()
    assert s.fetched_experts > 0 and s.device_experts > s.cpu_experts


def test_oracle_prefetches_exactly_the_next_window():
    rng = np.random.default_rng(5)
    routing = _routing(rng, 15, 2)
    engine, clock, _ = _engine(Policy.ORACLE, ratio=0.5, future=_future(routing))
    _drive(engine, routing, speculative=True, clock=clock)
    s = engine.stats()
    assert s.prefetch_issued > 0
    assert s.prefetch_used == s.prefetch_issued - s.prefetch_wasted
    assert s.prefetch_precision > 0.9


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(list(Policy)), st.sampled_from([0.125, 0.25, 0.5]),
       st.integers(1, 9), st.integers(0, 2**31 - 1), st.floats(0.0, 30.0))
def test_every_pair_once_and_budget_never_exceeded(policy, ratio, tokens, seed, fetch_ms):
    rng = np.random.default_rng(seed)
    routing = _routing(rng, 6, tokens)
    future = _future(routing) if policy is Policy.ORACLE else None
    engine, clock, _ = _engine(policy, ratio=ratio, fetch_ms=fetch_ms, future=future)
    _drive(engine, routing, speculative=policy is not Policy.LRU, clock=clock)
    s = engine.stats()
    assert s.hits + s.misses == s.device_experts + s.cpu_experts


def test_stats_lines_are_written_every_interval(tmp_path):
    import json

    path = tmp_path / "stats.jsonl"
    engine, clock, _ = _engine(Policy.LRU, stats_file=str(path), stats_interval_steps=5)
    rng = np.random.default_rng(6)
    _drive(engine, _routing(rng, 12, 1), speculative=False, clock=clock)
    engine.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [d["steps"] for d in lines] == [5, 10]
    assert lines[-1]["policy"] == "lru" and 0.0 <= lines[-1]["hit_rate"] <= 1.0
    assert lines[-1]["hits"] + lines[-1]["misses"] == lines[-1]["device_experts"] + \
        lines[-1]["cpu_experts"]


def test_stats_log_line_and_derived_rates():
    from moespac_vllm.stats import EngineStats, format_log_line

    s = EngineStats(hits=3, misses=1, prefetch_used=2, prefetch_wasted=2, prefetch_late=1)
    assert s.hit_rate == 0.75 and s.prefetch_precision == 0.5 and s.prefetch_recall == 1.0
    line = format_log_line(s)
    assert "hit rate: 75.0%" in line and "\n" not in line


def test_draft_prefetch_displaces_a_resident_the_draft_predicts_cold():
    """Regression: prefetch from draft routing checks victims by the provisional levels; admitting
    by the committed ones found no victim and raised ("no slot can be freed")."""
    cheap_fetch = ExpertCosts(gpu_fixed_ms=0.1, gpu_per_token_ms=0.01, cpu_fixed_ms=1.0,
                              cpu_per_token_ms=0.1, fetch_ms=0.01)
    engine, clock, mover = _engine(Policy.SPAC, ratio=0.25, estimator_source="draft",
                                   costs=cheap_fetch)
    window = np.tile(np.array([[0, 1]]), (9, 1))
    for step in range(1):
        engine.begin_step(StepContext(step=step, phase=Phase.VERIFY, num_tokens=9,
                                      tokens_per_request=(9,), num_draft_tokens=8))
        for layer in range(DIMS.num_layers):
            engine.plan_layer(layer, window)
            engine.finish_layer(layer, window)
        engine.end_step(8)
    table = engine.tables[0]
    assert table.slot_of(0) >= 0 and table.slot_of(1) >= 0
    assert engine.estimator.levels[0][[0, 1]].min() >= 1
    # the draft says the next window routes to experts 6 and 7 only
    engine.observe_draft(0, np.tile(np.array([[6, 7]]), (9, 1)))
    predicted = engine.estimator.predicted_levels(0)
    assert predicted[6] > predicted[0]
    assert table.slot_of(6) >= 0 or table.slot_of(7) >= 0


@pytest.mark.parametrize("policy", [Policy.SPAC, Policy.HYBRIMOE, Policy.LRU, Policy.STATIC,
                                    Policy.SPAC_FAITHFUL])
def test_full_layers_skip_planning_without_changing_the_books(policy):
    """At cache_ratio 1.0, once a layer holds all its experts the fast path (resident_slots +
    note_resident_forward) keeps the books exactly as plan_layer/finish_layer would (every
    counter, the last window), and the layer's levels and scores, which only eviction and
    prefetch read, stop moving: two engines driven the two ways agree after every step on
    everything else, and the planned one never fetches or prefetches into a whole layer."""
    rng = np.random.default_rng(3)
    routing = _routing(rng, steps=14, tokens=3)
    planned, c1, _ = _engine(policy, ratio=1.0)
    fast, c2, _ = _engine(policy, ratio=1.0)
    every = np.arange(8).reshape(4, 2)  # a prefill routing every expert of every layer
    for eng in (planned, fast):
        eng.begin_step(StepContext(0, Phase.PREFILL, 4, (4,), 0))
        for layer in range(DIMS.num_layers):
            eng.plan_layer(layer, every)
            eng.finish_layer(layer, every)
        eng.end_step(0)
    used_fast = 0
    for step in range(routing.shape[0]):
        for eng in (planned, fast):
            eng.begin_step(StepContext(step, Phase.DECODE, 3, (1, 1, 1), 0))
        for layer in range(DIMS.num_layers):
            ids = routing[step, :, layer]
            planned.plan_layer(layer, ids)
            planned.finish_layer(layer, ids)
            slots = fast.resident_slots(layer)
            if slots is None:
                fast.plan_layer(layer, ids)
                fast.finish_layer(layer, ids)
            else:
                used_fast += 1
                assert slots.tolist() == [fast.tables[layer].slot_of(e) for e in range(8)]
                fast.note_resident_forward(layer, ids)
        for eng in (planned, fast):
            eng.end_step(0)
        assert planned.stats() == fast.stats()
        for layer in range(DIMS.num_layers):
            assert np.array_equal(planned._window_ids[layer], fast._window_ids[layer])
            if fast._full[layer] is None:  # still planned in both: same levels and scores
                assert np.array_equal(planned._score[layer], fast._score[layer])
                if planned.estimator is not None:
                    assert np.array_equal(planned.estimator.levels[layer],
                                          fast.estimator.levels[layer])
    # static and spac-faithful never fetch a miss on demand: their layers fill (if ever) through
    # prefetch / placement, so only the on-demand and balanced policies are sure to get here
    assert used_fast > 0 or policy in (Policy.STATIC, Policy.SPAC_FAITHFUL)


def test_resident_slots_only_once_every_expert_is_ready():
    eng, _, _ = _engine(Policy.SPAC, ratio=0.5)
    assert eng.resident_slots(0) is None  # 4 slots for 8 experts: never full
    eng, clock, _ = _engine(Policy.LRU, ratio=1.0, fetch_ms=1.0)
    eng.begin_step(StepContext(0, Phase.DECODE, 1, (1,), 0))
    ids = np.array([[0, 1]])
    eng.plan_layer(0, ids)
    eng.finish_layer(0, ids)
    assert eng.resident_slots(0) is None  # 2 of 8 resident
    with pytest.raises(ValueError, match="not fully resident"):
        eng.note_resident_forward(0, ids)


def test_load_full_layers_makes_a_fitting_model_resident_from_the_start():
    eng, clock, mover = _engine(Policy.SPAC, ratio=1.0, fetch_ms=1.0)
    assert eng.load_full_layers() == DIMS.num_layers * DIMS.num_experts
    assert eng.resident_slots(0) is None  # copies still in flight
    clock.t_ms = 1e6
    slots = eng.resident_slots(0)
    assert slots is not None and sorted(slots.tolist()) == list(range(DIMS.num_experts))
    assert eng.load_full_layers() == 0  # idempotent
    assert eng.stats().fetched_experts == 0 and eng.stats().prefetch_issued == 0
    part, _, _ = _engine(Policy.SPAC, ratio=0.5)
    assert part.load_full_layers() == 0  # only layers that fit whole


def test_sd_static_freezes_after_warm_up_while_verifying_windows():
    engine, clock, mover = _engine(Policy.SD_STATIC, ratio=0.25)
    rng = np.random.default_rng(3)
    _drive(engine, _routing(rng, 20, 4), speculative=True, clock=clock)
    frozen = [sorted(t.residents()) for t in engine.tables]
    assert all(len(r) == engine.num_slots for r in frozen)
    loads = mover.loads
    _drive(engine, _routing(rng, 20, 4)[:, :, :, ::-1], speculative=True, clock=clock)
    assert [sorted(t.residents()) for t in engine.tables] == frozen
    assert mover.loads == loads
    s = engine.stats()
    assert s.fetched_experts == 0 and s.cpu_experts > 0
    # tokens count the accepted drafts (sd) on top of one per step
    assert s.tokens == 40 * 3


def test_sd_static_plans_equal_natively_and_in_python():
    from moespac_vllm import plan_native

    if not plan_native.available():
        pytest.skip("moespac_vllm._plan not built")
    routing = _routing(np.random.default_rng(5), 24, 3)
    books = []
    for native in (True, False):
        clock = FakeClock()
        mover = FakeMover(clock, 2.0, DIMS.expert_bytes)
        cfg = MoESpacConfig().replace(policy="sd-static", cache_ratio=0.375)
        engine = ExpertEngine(cfg, DIMS, COSTS, mover, clock, native=native)
        assert (engine._native is not None) is native
        _drive(engine, routing, speculative=True, clock=clock)
        books.append((engine.stats(), [sorted(t.residents()) for t in engine.tables]))
    assert books[0] == books[1]


def test_a_policy_without_native_code_stays_on_the_python_path(monkeypatch):
    from moespac_vllm import plan_native

    if not plan_native.available():
        pytest.skip("moespac_vllm._plan not built")
    monkeypatch.delitem(plan_native.POLICY_CODES, Policy.SD_STATIC)
    engine, _, _ = _engine(Policy.SD_STATIC)
    assert engine._native is None
    clock = FakeClock()
    cfg = MoESpacConfig().replace(policy="sd-static", cache_ratio=0.25)
    with pytest.raises(ValueError, match="native planner"):
        ExpertEngine(cfg, DIMS, COSTS, FakeMover(clock, 0.0, DIMS.expert_bytes), clock,
                     native=True)
