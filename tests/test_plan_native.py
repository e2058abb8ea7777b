"""The native planner (csrc/plan.cpp via plan_native.py) against the Python engine, its reference:
identical plans, books, slot tables, levels, scores, window routing and copy sequences, on random
problems (hypothesis; routing handed over in every integer dtype, strided, as lists, big-endian)
and on the real Mixtral traces, for every policy; and the exact balancer's native port against
`ExactBalancer` bit for bit."""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moespac_vllm import plan_native
from moespac_vllm.balancer import ExactBalancer, MilpBalancer, random_problem
from moespac_vllm.config import MoESpacConfig, Policy
from moespac_vllm.cost_model import ExpertCosts, get_profile
from moespac_vllm.engine import ExpertEngine
from moespac_vllm.simulate import SimClock, SimMover
from moespac_vllm.step_context import Phase, StepContext
from moespac_vllm.trace import MIXTRAL_8X7B, ModelDims, read_mixtral_jsonl, request_streams

pytestmark = pytest.mark.skipif(not plan_native.available(),
                                reason="moespac_vllm._plan is not built")
ALL_POLICIES = tuple(Policy)


class RecordingMover(SimMover):
    """The simulator's serial-link mover, also recording every call the engine makes."""

    def __init__(self, clock: SimClock, fetch_ms: float) -> None:
        super().__init__(clock, fetch_ms, expert_bytes=1)
        self.calls: list[tuple] = []

    def load(self, layer: int, expert: int, slot: int) -> None:
        self.calls.append(("load", layer, expert, slot, self.clock.t_ms))
        super().load(layer, expert, slot)

    def cancel(self, layer: int, slot: int) -> bool:
        self.calls.append(("cancel", layer, slot))
        return super().cancel(layer, slot)

    def ready_mask(self, layer: int, slots) -> list[bool]:
        got = super().ready_mask(layer, slots)
        self.calls.append(("ready_mask", layer, tuple(slots), tuple(got)))
        return got


class Pair:
    """A Python-path and a native-path engine driven in lockstep, compared after every call."""

    def __init__(self, policy: Policy, dims: ModelDims, num_slots: int, costs: ExpertCosts,
                 future: np.ndarray | None = None, **flat: object) -> None:
        cfg = MoESpacConfig().replace(policy=policy.value, stats_file=None, **flat)
        self.sides = []
        for native in (False, True):
            clock = SimClock()
            mover = RecordingMover(clock, costs.fetch_ms)
            eng = ExpertEngine(cfg, dims, costs, mover, clock, num_slots=num_slots,
                               future_counts=future, native=native)
            assert (eng._native is not None) == native
            self.sides.append((eng, clock, mover))

    def advance(self, dt_ms: float) -> None:
        for _, clock, _ in self.sides:
            clock.t_ms += dt_ms

    def call(self, name: str, *args: object) -> list:
        out = [getattr(eng, name)(*args) for eng, _, _ in self.sides]
        self.check()
        return out

    def plan(self, layer: int, ids: np.ndarray) -> None:
        a, b = self.call("plan_layer", layer, ids)
        assert a.layer == b.layer
        np.testing.assert_array_equal(a.slot_ids, b.slot_ids)
        assert a.slot_ids.dtype == b.slot_ids.dtype == np.int32
        np.testing.assert_array_equal(a.cpu_mask, b.cpu_mask)
        assert (a.fetches, a.cpu_experts, a.device_experts) == \
            (b.fetches, b.cpu_experts, b.device_experts)
        assert type(a) is type(b)

    def check(self) -> None:
        (pe, _, pm), (ne, _, nm) = self.sides
        assert pe.stats() == ne.stats()
        assert pm.calls[-8:] == nm.calls[-8:] and len(pm.calls) == len(nm.calls)
        for x, y in zip(pe._window_ids, ne._window_ids):
            assert (x is None) == (y is None)
            if x is not None:
                np.testing.assert_array_equal(x, y)
        a, b = _state(pe), _state(ne)
        if a != b:  # one blob compare per call; the field-wise compare only names the culprit
            for x, y in zip(_fields(pe), _fields(ne)):
                np.testing.assert_array_equal(x, y)

    def check_tables(self) -> None:
        assert self.sides[0][2].calls == self.sides[1][2].calls
        for t in self.sides[1][0].tables:
            t.check()


def _fields(eng: ExpertEngine) -> list[np.ndarray]:
    out = [x for t in eng.tables for x in t.snapshot()]
    out += [eng._masks, eng._score, eng._last_counts, eng._times, eng._clock,
            eng._layer_offset_ms]
    if eng.estimator is not None:
        out.append(eng.estimator.levels)
    return out


def _state(eng: ExpertEngine) -> bytes:
    return b"".join(x.tobytes() for x in _fields(eng))


def as_routing(ids: np.ndarray, how: str) -> object:
    """[T, K] routing handed to the engine in one of the forms the engine accepts."""
    if how == "list":
        return ids.tolist()
    if how == "strided":  # a view with non-unit strides, in place of a contiguous array
        wide = np.zeros((ids.shape[0], 2 * ids.shape[1]), dtype=ids.dtype)
        wide[:, ::2] = ids
        return wide[:, ::2]
    if how == "big-endian":
        return ids.astype(ids.dtype.newbyteorder(">"))
    return np.ascontiguousarray(ids, dtype=how)


ROUTING_FORMS = ("int64", "int32", "int16", "uint8", "uint32", "strided", "list", "big-endian")


def drive(pair: Pair, windows: list[np.ndarray], rng: np.random.Generator,
          prefill_every: int = 0, drafts: bool = False, layer_ms: float = 0.3,
          forms: tuple[str, ...] = ("same",)) -> None:
    """windows: [steps] of [T, L, K] routing. Decode/verify steps (T = 1: decode), an occasional
    prefill step, draft routing before each verify window, and clock time between layers; each
    layer's routing in a form drawn from `forms` ("same": the window's own dtype, contiguous)."""
    num_layers = windows[0].shape[1]
    E = pair.sides[0][0].dims.num_experts
    for step, w in enumerate(windows):
        T = w.shape[0]
        prefill = prefill_every and step % prefill_every == prefill_every - 1
        phase = Phase.PREFILL if prefill else (Phase.VERIFY if T > 1 else Phase.DECODE)
        pair.call("begin_step", StepContext(step, phase, T, (T,), 0 if prefill else T - 1))
        for layer in range(num_layers):
            ids = np.ascontiguousarray(w[:, layer])
            form = str(rng.choice(forms))
            if form != "same":
                ids = as_routing(ids, form)
            pair.plan(layer, ids)
            pair.advance(float(rng.uniform(0.0, 2 * layer_ms)))
            pair.call("finish_layer", layer, ids)
        pair.call("end_step", int(rng.integers(0, T)))
        pair.check_tables()
        pair.advance(float(rng.uniform(0.0, 4 * layer_ms)))  # the draft phase
        if drafts and step + 1 < len(windows):
            nxt = windows[step + 1]
            for layer in range(num_layers):
                if rng.random() < 0.5:  # router logits of W draft tokens
                    pair.call("observe_draft", layer, rng.normal(size=(nxt.shape[0], E)))
                else:  # or their top-k ids
                    pair.call("observe_draft", layer, np.ascontiguousarray(nxt[:, layer]))


def _future(windows: list[np.ndarray], E: int) -> np.ndarray:
    """[steps, L, E] token counts of every window (the oracle's future routing)."""
    L = windows[0].shape[1]
    out = np.zeros((len(windows), L, E), dtype=np.int64)
    for s, w in enumerate(windows):
        for layer in range(L):
            out[s, layer] = np.bincount(w[:, layer].ravel(), minlength=E)
    return out


@st.composite
def problems(draw):
    E = draw(st.sampled_from([4, 8, 16, 32]))
    K = draw(st.integers(1, min(4, E)))
    L = draw(st.integers(1, 3))
    S = draw(st.integers(1, E))
    seed = draw(st.integers(0, 2**31 - 1))
    integer_costs = draw(st.booleans())  # small integers: exact ties everywhere
    policy = draw(st.sampled_from(ALL_POLICIES))
    steps = draw(st.integers(1, 20))
    return E, K, L, S, seed, integer_costs, policy, steps


@settings(max_examples=300, deadline=None)
@given(problems())
def test_native_plans_equal_python_on_random_problems(p):
    E, K, L, S, seed, integer_costs, policy, steps = p
    rng = np.random.default_rng(seed)
    if integer_costs:
        costs = ExpertCosts(*rng.integers(0, 4, size=5).astype(float))
    else:
        costs = ExpertCosts(rng.uniform(0.001, 0.02), rng.uniform(0.0, 0.005),
                            rng.uniform(0.1, 1.0), rng.uniform(0.002, 0.05),
                            rng.uniform(0.05, 0.5))
    popularity = rng.dirichlet(np.full(E, rng.uniform(0.1, 1.0)))
    windows = []
    for _ in range(steps):
        T = int(rng.choice([1, 2, 4, 9]))
        w = np.empty((T, L, K), dtype=rng.choice([np.int32, np.int64]))
        for t in range(T):
            for layer in range(L):
                w[t, layer] = rng.choice(E, K, replace=False, p=popularity)
        windows.append(w)
    future = _future(windows, E) if policy is Policy.ORACLE else None
    pair = Pair(policy, ModelDims(L, E, K, 16, 8, 2), S, costs, future,
                prefetch=bool(rng.random() < 0.8))
    drive(pair, windows, rng, prefill_every=int(rng.choice([0, 3])), drafts=bool(seed % 2),
          layer_ms=float(costs.fetch_ms), forms=ROUTING_FORMS if seed % 3 == 0 else ("same",))
    pair.check()  # drive() compared after every call; once more at the end, stated here
    assert pair.sides[0][0].stats() == pair.sides[1][0].stats()


def _mixtral_windows(path, window: int, steps: int) -> list[np.ndarray]:
    out = []
    for stream in request_streams(read_mixtral_jsonl(path)):
        for s in range(0, stream.shape[0] - window + 1, window):
            out.append(stream[s:s + window])
            if len(out) == steps:
                return out
    return out


@pytest.mark.parametrize("policy", ALL_POLICIES, ids=lambda p: p.value)
def test_native_plans_equal_python_on_real_mixtral_traces(data_dir, policy):
    costs = get_profile("rtx4090-pcie4").expert_costs(MIXTRAL_8X7B)
    rng = np.random.default_rng(7)
    for name, window, slots in (("humaneval_2_routing.jsonl", 4, 2),
                                ("humaneval0_prefill_decode_routing_raw.jsonl", 1, 4)):
        windows = _mixtral_windows(data_dir / "mixtral-8x7b-routing" / name, window, 30)
        assert len(windows) == 30
        future = _future(windows, 8) if policy is Policy.ORACLE else None
        pair = Pair(policy, MIXTRAL_8X7B, slots, costs, future)
        drive(pair, windows, rng, prefill_every=0, drafts=window > 1, layer_ms=0.5)
        assert pair.sides[1][0].stats().hits > 0 or policy is Policy.SPAC_FAITHFUL


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 2**31 - 1), st.booleans())
def test_native_exact_balancer_equals_python_bit_for_bit(seed, adversarial):
    from moespac_vllm import _plan

    rng = np.random.default_rng(seed)
    prob = random_problem(rng, adversarial=adversarial,
                          num_tokens=int(rng.choice([1, 4, 9, 16, 64])))
    ref = ExactBalancer().solve(prob)
    c = prob.costs
    fetch, gpu, cpu = _plan.exact_solve(prob.tokens, prob.resident, prob.free_slots,
                                        c.gpu_fixed_ms, c.gpu_per_token_ms, c.cpu_fixed_ms,
                                        c.cpu_per_token_ms, c.fetch_ms, prob.hidden_fetch_ms)
    np.testing.assert_array_equal(fetch, ref.fetch)
    assert (gpu, cpu) == (ref.gpu_ms, ref.cpu_ms)


def test_engine_plans_natively_by_default_and_python_when_asked():
    costs = ExpertCosts(0.01, 0.001, 0.5, 0.01, 0.2)
    dims = ModelDims(2, 8, 2, 16, 8, 2)
    cfg = MoESpacConfig().replace(policy="spac", cache_ratio=0.25, stats_file=None)
    clock = SimClock()
    default = ExpertEngine(cfg, dims, costs, SimMover(clock, 0.2, 1), clock)
    assert isinstance(default._native, plan_native.NativePlanner)
    python = ExpertEngine(cfg, dims, costs, SimMover(clock, 0.2, 1), clock, native=False)
    assert python._native is None


def test_unsupported_balancer_falls_back_with_one_log_line_or_refuses(caplog):
    pytest.importorskip("highspy")
    costs = ExpertCosts(0.01, 0.001, 0.5, 0.01, 0.2)
    dims = ModelDims(2, 8, 2, 16, 8, 2)
    cfg = MoESpacConfig().replace(policy="spac", cache_ratio=0.25, stats_file=None)
    clock = SimClock()
    plan_native._logged.clear()
    with caplog.at_level(logging.INFO, logger="moespac_vllm.plan_native"):
        for _ in range(2):
            eng = ExpertEngine(cfg, dims, costs, SimMover(clock, 0.2, 1), clock,
                               balancer=MilpBalancer())
            assert eng._native is None
    assert [r.getMessage() for r in caplog.records] == [
        "moespac: per-layer plan on the Python path: the balancer is MilpBalancer, "
        "not ExactBalancer"]
    with pytest.raises(ValueError, match="native"):
        ExpertEngine(cfg, dims, costs, SimMover(clock, 0.2, 1), clock, balancer=MilpBalancer(),
                     native=True)


def test_native_rejects_bad_routing_naming_the_field():
    costs = ExpertCosts(0.01, 0.001, 0.5, 0.01, 0.2)
    dims = ModelDims(2, 8, 2, 16, 8, 2)
    cfg = MoESpacConfig().replace(policy="lru", cache_ratio=0.25, stats_file=None)
    clock = SimClock()
    eng = ExpertEngine(cfg, dims, costs, SimMover(clock, 0.2, 1), clock)
    with pytest.raises(ValueError, match="topk_ids"):
        eng.plan_layer(0, np.array([[0, 8]]))
    with pytest.raises(ValueError, match="topk_ids"):
        eng.plan_layer(0, np.array([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="layer"):
        eng.plan_layer(2, np.array([[0, 1]]))
    eng.plan_layer(0, np.array([[0, 1]]))
    with pytest.raises(ValueError, match="planned twice"):
        eng.plan_layer(0, np.array([[0, 1]]))


def test_native_plans_are_layer_plans_set_slot_by_slot_as_the_class_builds_them(monkeypatch):
    """The native code sets a new LayerPlan's slots itself through the member descriptors
    plan_native hands it (refused for a class whose fields differ or that has a __post_init__),
    or, given none, calls LayerPlan(...): both give a frozen LayerPlan equal to the Python
    engine's."""
    from moespac_vllm.engine import LayerPlan

    assert len(plan_native._slot_descriptors(LayerPlan, plan_native._PLAN_FIELDS)) == 6

    @dataclasses.dataclass(frozen=True, slots=True)
    class Checked:
        layer: int

        def __post_init__(self) -> None:
            pass

    with pytest.raises(ValueError, match="plan_type: .* and a __post_init__"):
        plan_native._slot_descriptors(Checked, ("layer",))
    with pytest.raises(ValueError, match="plan_type"):
        plan_native._slot_descriptors(LayerPlan, ("layer",))
    costs = ExpertCosts(0.01, 0.001, 0.5, 0.01, 0.2)
    dims = ModelDims(2, 8, 2, 16, 8, 2)
    ids = np.array([[0, 3], [3, 5]], dtype=np.int16)
    plans = []
    for fields in ("found", "none"):
        if fields == "none":
            monkeypatch.setattr(plan_native, "_slot_descriptors", lambda cls, names: None)
        pair = Pair(Policy.SPAC, dims, 2, costs)
        pair.call("begin_step", StepContext(0, Phase.VERIFY, 2, (2,), 1))
        python, native = pair.call("plan_layer", 0, ids)
        assert type(native) is LayerPlan
        assert (native.layer, native.fetches, native.cpu_experts, native.device_experts) == \
            (python.layer, python.fetches, python.cpu_experts, python.device_experts)
        with pytest.raises(dataclasses.FrozenInstanceError):
            native.layer = 1
        plans.append(native)
    assert repr(plans[0]) == repr(plans[1])
