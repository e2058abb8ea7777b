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
    for _ in range(60):
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
