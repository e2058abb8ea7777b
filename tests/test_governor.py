"""Draft-length governor: the roofline's choice where the answer is known, the online acceptance
estimate, the histogram, bad input."""
from __future__ import annotations

import numpy as np
import pytest

from moespac_vllm import governor as gv
from moespac_vllm.config import MoESpacConfig
from moespac_vllm.cost_model import ExpertCosts
from moespac_vllm.engine import ExpertEngine
from moespac_vllm.simulate import SimClock, SimMover
from moespac_vllm.step_context import Phase, StepContext
from moespac_vllm.trace import ModelDims

DIMS = ModelDims(num_layers=2, num_experts=8, top_k=2, hidden_size=16, intermediate_size=8)


def _engine(ratio: float, costs: ExpertCosts) -> ExpertEngine:
    clock = SimClock()
    cfg = MoESpacConfig().replace(policy="spac", cache_ratio=ratio)
    engine = ExpertEngine(cfg, DIMS, costs, SimMover(clock, costs.fetch_ms, 1), clock)
    rng = np.random.default_rng(0)
    ids = np.stack([rng.choice(8, 2, replace=False) for _ in range(3)])
    engine.begin_step(StepContext(step=0, phase=Phase.VERIFY, num_tokens=3, num_draft_tokens=2))
    for layer in range(DIMS.num_layers):
        engine.plan_layer(layer, ids)
        engine.finish_layer(layer, ids)
    engine.end_step(1)
    return engine


CHEAP_GPU = ExpertCosts(gpu_fixed_ms=0.1, gpu_per_token_ms=0.0, cpu_fixed_ms=5.0,
                        cpu_per_token_ms=1.0, fetch_ms=10.0)


def test_free_perfect_drafts_on_a_resident_model_take_the_longest_window():
    engine = _engine(1.0, CHEAP_GPU)
    g = gv.DraftGovernor(k_max=6, draft_ms_per_token=0.0, step_overhead_ms=5.0,
                         fixed_acceptance=1.0)
    assert g.choose(engine) == 6


def test_a_draft_dearer_than_a_step_is_switched_off():
    engine = _engine(0.25, CHEAP_GPU)
    g = gv.DraftGovernor(k_max=6, draft_ms_per_token=1e4, step_overhead_ms=5.0,
                         fixed_acceptance=0.9)
    assert g.choose(engine) == 0
    assert g.draft_len_hist() == {0: 1}


def test_roofline_tokens_follow_the_first_rejection_model_and_time_grows_with_k():
    engine = _engine(0.25, CHEAP_GPU)
    roof = gv.roofline(engine, 0.5, 2.0, 5.0, 4)
    assert [k for k, _, _ in roof] == [0, 1, 2, 3, 4]
    assert [t for _, t, _ in roof] == pytest.approx([1.0, 1.5, 1.75, 1.875, 1.9375])
    ms = [m for _, _, m in roof]
    assert all(b >= a for a, b in zip(ms, ms[1:]))
    # the engine's delegates answer the same
    assert engine.draft_roofline(0.5, 2.0, 5.0, 4) == roof
    assert engine.choose_draft_tokens(0.5, 2.0, 5.0, 4, k_min=0) == gv.best_draft_tokens(roof)


def test_online_acceptance_estimate_moves_with_verified_drafts():
    g = gv.DraftGovernor(k_max=4, draft_ms_per_token=1.0, step_overhead_ms=1.0)
    assert g.acceptance == gv.ACCEPTANCE_PRIOR
    for _ in range(5):
        g.observe(4, 4)  # every draft accepted: no rejection trial
    assert g.acceptance == 1.0
    for _ in range(300):
        g.observe(4, 0)  # first draft rejected: one failed trial each
    assert g.acceptance < 0.01
    g.observe(0, 0)  # k = 0: nothing to learn
    # accepted 1 of 3 every time: 1 success in 2 trials
    h = gv.DraftGovernor(k_max=4, draft_ms_per_token=1.0, step_overhead_ms=1.0)
    for _ in range(10):
        h.observe(3, 1)
    assert h.acceptance == pytest.approx(0.5)
    fixed = gv.DraftGovernor(k_max=4, draft_ms_per_token=1.0, step_overhead_ms=1.0,
                             fixed_acceptance=0.8)
    fixed.observe(4, 0)
    assert fixed.acceptance == 0.8


@pytest.mark.parametrize("kw, field", [
    (dict(k_max=-1), "k_max"), (dict(k_max=2, k_min=3), "k_min"),
    (dict(k_max=2, fixed_acceptance=1.5), "fixed_acceptance"),
])
def test_bad_arguments_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        gv.DraftGovernor(draft_ms_per_token=1.0, step_overhead_ms=1.0, **kw)
    g = gv.DraftGovernor(k_max=2, draft_ms_per_token=1.0, step_overhead_ms=1.0)
    with pytest.raises(ValueError, match="accepted"):
        g.observe(2, 3)
    with pytest.raises(ValueError, match="acceptance"):
        gv.roofline(_engine(0.25, CHEAP_GPU), 1.2, 1.0, 1.0, 2)


# ---- the vLLM glue's uses: batches, stateful drafters, fixed mode, online costs -------------
def test_a_batch_scales_tokens_and_widens_the_window():
    engine = _engine(0.25, CHEAP_GPU)
    one = gv.roofline(engine, 0.5, 2.0, 5.0, 3)
    four = gv.roofline(engine, 0.5, 2.0, 5.0, 3, num_requests=4)
    assert [t for _, t, _ in four] == pytest.approx([4 * t for _, t, _ in one])
    # the window of 4 requests x (k+1) tokens: exactly what one request's roofline pays at 4(k+1)
    layers = gv.window_layer_ms(engine, np.array([4.0, 8.0]))
    assert four[0][2] == pytest.approx(5.0 + layers[0])
    assert four[1][2] == pytest.approx(2.0 + 5.0 + layers[1])


def test_a_stateful_drafter_pays_one_pass_at_k_zero():
    engine = _engine(0.25, CHEAP_GPU)
    free = gv.roofline(engine, 0.5, 3.0, 5.0, 2, min_draft_passes=0)
    kept = gv.roofline(engine, 0.5, 3.0, 5.0, 2, min_draft_passes=1)
    assert kept[0][2] == pytest.approx(free[0][2] + 3.0)  # k = 0: the first pass still runs
    assert [m for _, _, m in kept[1:]] == pytest.approx([m for _, _, m in free[1:]])


def test_fixed_draft_length_always_answers_k_max_and_still_estimates_acceptance():
    engine = _engine(0.25, CHEAP_GPU)
    g = gv.DraftGovernor(k_max=3, draft_ms_per_token=1e4, step_overhead_ms=5.0, adaptive=False)
    assert [g.choose(engine, num_requests=2) for _ in range(4)] == [3, 3, 3, 3]
    assert g.draft_len_hist() == {3: 4}
    assert g.acceptance_estimate() is None
    g.observe(3, 1)
    assert g.acceptance_estimate() == pytest.approx(0.5)
    assert g.verified_len_hist() == {3: 1}


def test_online_costs_start_at_k_max_then_follow_the_measured_draft():
    engine = _engine(0.25, CHEAP_GPU)
    g = gv.DraftGovernor(k_max=3, draft_ms_per_token=0.0, step_overhead_ms=0.0,
                         online_costs=True, fixed_acceptance=0.9)
    assert g.choose(engine) == 3  # nothing measured yet: draft at full length to time it
    g.observe_draft_ms(3, 0.0)  # the first draft is a warm-up, not counted
    assert g.choose(engine) == 3
    g.observe_draft_ms(3, 3e4)  # 10 s per draft pass: dearer than any verification
    assert g.choose(engine) == 0
    g.observe_draft_ms(1, 0.0)  # the draft became free: the mean moves, k comes back
    for _ in range(40):
        g.observe_draft_ms(1, 0.0)
    assert g.choose(engine) > 0
    with pytest.raises(ValueError, match="k_max"):
        gv.roofline(engine, 0.5, 1.0, 1.0, -1)


def test_step_overhead_is_the_measured_step_less_the_modelled_layers():
    engine = _engine(0.25, CHEAP_GPU)
    n = engine.window_ids()[0].shape[0]
    layers = float(gv.window_layer_ms(engine, np.array([n]))[0])
    g = gv.DraftGovernor(k_max=2, draft_ms_per_token=0.0, step_overhead_ms=0.0,
                         online_costs=True)
    g.observe_step_ms(engine, n, layers + 7.0)
    assert g.step_overhead_ms == pytest.approx(7.0)
    g.observe_step_ms(engine, n, 0.0)  # faster than the model: the overhead is never negative
    assert g.step_overhead_ms == pytest.approx(gv.COST_EMA * 7.0)


def test_k_zero_for_long_probes_one_draft_token_and_the_cap_is_respected():
    engine = _engine(0.25, CHEAP_GPU)
    g = gv.DraftGovernor(k_max=3, draft_ms_per_token=1e4, step_overhead_ms=5.0,
                         fixed_acceptance=0.9)
    ks = [g.choose(engine) for _ in range(gv.PROBE_AFTER_ZEROS + 1)]
    assert ks == [0] * gv.PROBE_AFTER_ZEROS + [1]
    assert g.draft_len_hist() == {0: gv.PROBE_AFTER_ZEROS, 1: 1}
    cheap = gv.DraftGovernor(k_max=6, draft_ms_per_token=0.0, step_overhead_ms=5.0,
                             fixed_acceptance=1.0)
    assert cheap.choose(_engine(1.0, CHEAP_GPU), k_limit=2) == 2


def test_the_k_in_force_is_kept_unless_another_k_wins_by_the_margin():
    roof = [(0, 1.0, 10.0), (1, 1.8, 17.0), (3, 2.8, 25.0)]  # rates 0.100, 0.106, 0.112
    assert gv.best_draft_tokens(roof) == 3
    assert gv.best_draft_tokens(roof, current=1, margin=0.1) == 1  # 0.112 < 1.1 x 0.106
    assert gv.best_draft_tokens(roof, current=0, margin=0.1) == 3  # 0.112 > 1.1 x 0.100
    assert gv.best_draft_tokens(roof, current=1, margin=0.0) == 3
    assert gv.best_draft_tokens(roof, current=2, margin=0.1) == 3  # not on the roofline: best


def test_the_governor_holds_its_k_through_a_near_tie_and_leaves_on_a_clear_loss():
    engine = _engine(1.0, CHEAP_GPU)  # resident: the window costs the device time only
    g = gv.DraftGovernor(k_max=3, draft_ms_per_token=0.0, step_overhead_ms=0.0,
                         online_costs=True, fixed_acceptance=0.7)
    assert g.choose(engine) == 3  # untimed: k_max
    g.observe_draft_ms(1, 1.0)  # warm-up
    roof = {k: t / m for k, t, m in gv.roofline(engine, 0.7, 2.0, 5.0, 3)}
    g.observe_draft_ms(1, 2.0)
    g.step_overhead_ms = 5.0
    best = max(roof, key=roof.get)
    near = [k for k in roof if k != best and roof[best] <= 1.1 * roof[k]]
    assert near, "the case must hold a near tie"
    g._current = near[0]
    assert g.choose(engine) == near[0]  # the model cannot tell them apart: no flip
    g.observe_draft_ms(1, 1e5)  # drafting became ruinous: k = 0 wins by far
    for _ in range(40):
        g.observe_draft_ms(1, 1e5)
    assert g.choose(engine) == 0
    assert g.choose_ms > 0.0  # its own host time is measured and in the overhead
    with pytest.raises(ValueError, match="switch_margin"):
        gv.DraftGovernor(k_max=2, draft_ms_per_token=1.0, step_overhead_ms=1.0, switch_margin=-1)


def _step(engine: ExpertEngine, step: int, ids: np.ndarray) -> None:
    engine.begin_step(StepContext(step=step, phase=Phase.DECODE, num_tokens=ids.shape[0],
                                  num_draft_tokens=0))
    for layer in range(DIMS.num_layers):
        engine.plan_layer(layer, ids)
        engine.finish_layer(layer, ids)
    engine.end_step(0)


def test_the_hit_model_prices_the_misses_the_last_window_just_fetched():
    """Every token routes to new experts: each window misses all of them and fetches them, so
    afterwards they are resident. Priced from residency now, the next token would hit all;
    from the measured hit fraction (0 here) it misses all and its layers cost more."""
    costs = ExpertCosts(gpu_fixed_ms=0.1, gpu_per_token_ms=0.0, cpu_fixed_ms=5.0,
                        cpu_per_token_ms=1.0, fetch_ms=0.001)
    clock = SimClock()
    cfg = MoESpacConfig().replace(policy="lru", cache_ratio=0.25)
    engine = ExpertEngine(cfg, DIMS, costs, SimMover(clock, costs.fetch_ms, 1), clock)
    g = gv.DraftGovernor(k_max=2, draft_ms_per_token=1.0, step_overhead_ms=1.0,
                         fixed_acceptance=0.5)
    for step in range(4):
        g.choose(engine)
        _step(engine, step, np.array([[2 * (step % 4), 2 * (step % 4) + 1]]))
        clock.t_ms += 1.0  # the copies land
    g.choose(engine)
    assert g.hit_fraction is not None and np.allclose(g.hit_fraction, 0.0)
    one = np.array([1.0])
    now = float(gv.window_layer_ms(engine, one)[0])
    measured = float(gv.window_layer_ms(engine, one, g.hit_fraction)[0])
    assert now == pytest.approx(DIMS.num_layers * 2 * 0.1)  # both experts "resident"
    assert measured > now
    roof_new = {k: m for k, _, m in g.roofline(engine)}
    g.measured_hits = False
    roof_old = {k: m for k, _, m in g.roofline(engine)}
    assert roof_new[0] > roof_old[0]


def test_the_hit_fraction_is_each_layers_share_of_its_window_resident_when_it_began():
    engine = _engine(0.25, CHEAP_GPU)
    before = np.zeros((DIMS.num_layers, DIMS.num_experts), dtype=bool)
    ids = engine.window_ids()[0]
    first = int(np.unique(ids)[0])
    before[0, first] = True
    f = gv.window_hit_fractions(engine, before)
    assert f[0] == pytest.approx(1.0 / len(np.unique(ids)))
    assert f[1] == 0.0


# The per-layer loop window_layer_ms was before it priced all layers in one numpy pass: its
# reference.
def _window_layer_ms_loop(engine: ExpertEngine, num_tokens: np.ndarray,
                    hit_fraction: np.ndarray | None = None) -> np.ndarray:
    """Modelled ms of every MoE layer together for windows of `num_tokens` [N] tokens at
    `engine`'s current residency and last routing window (module docstring) -> [N].
    `hit_fraction` [L] (nan: unknown): H(n) = that fraction of D(n) instead of the last window's
    experts resident now, which the last window itself just fetched."""
    E, K, S = engine.dims.num_experts, engine.dims.top_k, engine.num_slots
    c = engine.costs
    ns = np.asarray(num_tokens, dtype=np.float64)
    total = np.zeros_like(ns)
    ms = np.arange(S + 1, dtype=np.float64)[:, None]  # on-demand fetch counts considered
    for layer, ids in enumerate(engine.window_ids()):
        if ids is None or ids.size == 0:
            continue
        T = ids.shape[0]
        resident = engine.tables[layer].slots_of(np.arange(E)) >= 0
        # first[e]: the first token of the window routed to e (T if none)
        first = np.full(E, T, dtype=np.int64)
        np.minimum.at(first, ids.ravel(), np.repeat(np.arange(T), ids.shape[1]))
        d_obs = np.bincount(first[first < T], minlength=T).cumsum()
        h_obs = np.bincount(first[(first < T) & resident], minlength=T).cumsum()
        dT, hT = float(d_obs[-1]), float(h_obs[-1])
        q = (1.0 - min(dT, E - 0.5) / E) ** (1.0 / T)  # per-token "not drawn" probability
        idx = np.clip(ns.astype(np.int64), 1, T) - 1
        D = np.where(ns <= T, d_obs[idx], E * (1.0 - q ** ns))
        if hit_fraction is not None and not np.isnan(hit_fraction[layer]):
            H = np.minimum(float(S), hit_fraction[layer] * D)
        else:
            H = np.where(ns <= T, h_obs[idx], np.minimum(S, hT * D / max(dT, 1.0)))
        per = ns * K / np.maximum(D, 1.0)
        g = c.gpu_fixed_ms + c.gpu_per_token_ms * per
        cp = c.cpu_fixed_ms + c.cpu_per_token_ms * per
        mm = np.minimum(ms, np.maximum(0.0, np.minimum(D - H, S - H)))  # [S+1, n]
        t = np.maximum((H + mm) * g + mm * c.fetch_ms, (D - H - mm) * cp)
        total += t.min(axis=0)
    return total


@pytest.mark.parametrize("ratio", [0.125, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("T", [1, 3, 9])
def test_window_layer_ms_prices_every_layer_as_the_per_layer_loop(ratio, T):
    rng = np.random.default_rng(T)
    dims = ModelDims(num_layers=5, num_experts=16, top_k=3, hidden_size=16, intermediate_size=8)
    costs = ExpertCosts(gpu_fixed_ms=0.1, gpu_per_token_ms=0.02, cpu_fixed_ms=2.0,
                        cpu_per_token_ms=0.5, fetch_ms=1.5)
    clock = SimClock()
    engine = ExpertEngine(MoESpacConfig().replace(policy="lru", cache_ratio=ratio), dims, costs,
                          SimMover(clock, costs.fetch_ms, 1), clock)
    ns = np.arange(1.0, 12.0)
    hits = np.array([np.nan, 0.0, 0.3, 1.0, 0.55])
    for step in range(6):
        w = T if step % 2 else 1 + step % 3  # the last window's length varies with the step
        engine.begin_step(StepContext(step=step, phase=Phase.VERIFY, num_tokens=w,
                                      num_draft_tokens=w - 1))
        for layer in range(dims.num_layers):
            ids = np.stack([rng.choice(16, 3, replace=False) for _ in range(w)])
            engine.plan_layer(layer, ids)
            engine.finish_layer(layer, ids)
        engine.end_step(0)
        clock.t_ms += 1.0
        for h in (None, hits):
            got = gv.window_layer_ms(engine, ns, h)
            want = _window_layer_ms_loop(engine, ns, h)
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=0.0)
        before = rng.random((dims.num_layers, dims.num_experts)) < 0.4
        want_f = [before[layer, np.unique(ids)].mean() for layer, ids in
                  enumerate(engine.window_ids())]
        np.testing.assert_allclose(gv.window_hit_fractions(engine, before), want_f, rtol=1e-12)


def test_the_governor_benchmark_times_both_hit_models(capsys):
    import json

    from conftest import load_benchmark

    bench = load_benchmark("bench_governor")
    assert bench.main(["--json", "--windows", "1,2", "--calls", "2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["window_tokens"], r["measured_hits"]) for r in rows] == [
        (1, True), (1, False), (2, True), (2, False)]
    assert all(r["choose_ms_median"] > 0 and r["window_layer_ms_ms_median"] > 0 for r in rows)
    with pytest.raises(SystemExit):
        bench.main(["--windows", "0"])
