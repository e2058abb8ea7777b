"""Trace-driven simulator and `moespac simulate`: small traces where the right answer is known."""
from __future__ import annotations

import json

import numpy as np
import pytest

from moespac_vllm import cli
from moespac_vllm import simulate as sim
from moespac_vllm.config import Policy
from moespac_vllm.cost_model import CostProfile, get_profile
from moespac_vllm.trace import ModelDims, StepKind, Trace, TraceMeta

DIMS = ModelDims(num_layers=3, num_experts=8, top_k=2, hidden_size=64, intermediate_size=32)


def _ar_trace(tokens: int = 60, seed: int = 0, hot: int | None = None) -> Trace:
    """A plain decode stream; with `hot`, every token routes to experts < hot only."""
    rng = np.random.default_rng(seed)
    pool = DIMS.num_experts if hot is None else hot
    ids = np.stack([
        np.stack([rng.choice(pool, DIMS.top_k, replace=False) for _ in range(DIMS.num_layers)])
        for _ in range(tokens)])
    return Trace(dims=DIMS, meta=TraceMeta(source="test", synthetic=True),
                 kind=np.full(tokens, StepKind.DECODE), seq_id=np.zeros(tokens),
                 num_accepted=np.zeros(tokens), token_offsets=np.arange(tokens + 1),
                 topk_ids=ids)


PROFILE = get_profile("rtx4090-pcie4")


def test_sim_mover_serialises_copies_and_cancel_moves_the_queue_up():
    clock = sim.SimClock()
    mover = sim.SimMover(clock, fetch_ms=2.0, expert_bytes=10)
    mover.load(0, 1, 0)
    mover.load(0, 2, 1)
    mover.load(1, 3, 0)
    assert [mover.ready_at(0, 0), mover.ready_at(0, 1), mover.ready_at(1, 0)] == [2.0, 4.0, 6.0]
    clock.t_ms = 1.0
    assert not mover.is_ready(0, 0)
    assert mover.cancel(0, 1)  # not started: removed, the next copy moves up
    assert mover.ready_at(1, 0) == 4.0 and mover.bytes_moved == 20
    clock.t_ms = 4.0
    assert mover.is_ready(0, 0) and mover.is_ready(1, 0) and not mover.cancel(1, 0)
    assert not mover.is_ready(0, 1) and not mover.is_ready(2, 0)  # cancelled / never loaded


def test_full_cache_hits_everything_after_warm_up_and_moves_nothing_more():
    trace = _ar_trace(80)
    short = sim.simulate(trace, "lru", 1.0, PROFILE, max_tokens=30)
    full = sim.simulate(trace, "lru", 1.0, PROFILE)
    cold = DIMS.num_layers * DIMS.num_experts
    assert short.stats.misses <= cold and short.stats.misses == full.stats.misses
    assert full.stats.h2d_bytes == short.stats.h2d_bytes  # nothing moved after warm-up
    assert full.stats.hits == full.stats.device_experts - full.stats.misses
    assert full.stats.cpu_experts == 0


@pytest.mark.parametrize("policy", list(Policy))
def test_every_routed_expert_is_computed_exactly_once(policy):
    trace = _ar_trace(40, seed=1)
    r = sim.simulate(trace, policy, 0.25, PROFILE, draft_tokens=3)
    work = (sim.autoregressive_workload(trace) if not r.speculative
            else sim.speculative_workload(trace, 3, sim.DEFAULT_ACCEPTANCE))
    routed = int((sim.step_counts(work) > 0).sum())
    s = r.stats
    assert s.device_experts + s.cpu_experts == routed == s.hits + s.misses
    assert r.tokens == 40  # every token of the stream is emitted once


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_oracle_is_never_slower_than_speculative_lru(seed):
    from dataclasses import replace

    # the copy decisions alone: the host's plan time (20 us a layer) and the layer's launch
    # (30 us) shift when copies land relative to each layer, by which the oracle lost to sd-lru
    # by 0.01 % (plan) and 0.02 % (launch) on seed 0
    profile = replace(PROFILE, host_plan_ms=0.0, layer_launch_ms=0.0)
    trace = _ar_trace(60, seed=seed, hot=5)
    for ratio in (0.25, 0.5):
        orc = sim.simulate(trace, "oracle", ratio, profile, draft_tokens=3, seed=seed)
        lru = sim.simulate(trace, "sd-lru", ratio, profile, draft_tokens=3, seed=seed)
        assert orc.tokens == lru.tokens
        assert orc.time_ms <= lru.time_ms * 1.0001


def test_skewed_routing_full_slots_never_touch_the_cpu():
    trace = _ar_trace(40, hot=2)  # two experts per layer, two slots per layer at 0.25
    r = sim.simulate(trace, "static", 0.25, PROFILE)
    assert r.stats.cpu_experts <= 2 * DIMS.num_layers * sim_warmup_steps()
    assert r.stats.hit_rate > 0.5


def sim_warmup_steps() -> int:
    from moespac_vllm.engine import STATIC_WARMUP_STEPS

    return STATIC_WARMUP_STEPS


def test_adaptive_draft_picks_long_windows_only_when_drafting_is_cheap():
    trace = _ar_trace(60, seed=3)
    free_draft = CostProfile(**{**_profile_fields(PROFILE), "name": "free-draft",
                                "draft_ms_per_token": 0.0})
    cheap = sim.simulate(trace, "spac", 0.5, free_draft, draft_tokens=6, acceptance=0.95,
                         adaptive_draft=True)
    assert 1.0 <= cheap.mean_draft_tokens <= 6.0 and cheap.tokens == 60
    slow_draft = CostProfile(**{**_profile_fields(PROFILE), "name": "slow-draft",
                                "draft_ms_per_token": 500.0})
    slow = sim.simulate(trace, "spac", 0.5, slow_draft, draft_tokens=6, acceptance=0.95,
                        adaptive_draft=True)
    assert slow.mean_draft_tokens < cheap.mean_draft_tokens
    with pytest.raises(ValueError, match="adaptive_draft"):
        sim.simulate(trace, "lru", 0.5, PROFILE, adaptive_draft=True)


def _profile_fields(p: CostProfile) -> dict:
    from dataclasses import fields

    return {f.name: getattr(p, f.name) for f in fields(p)}


def test_real_mixtral_trace_is_labelled_and_modelled(data_dir):
    path = data_dir / "mixtral-8x7b-routing" / "humaneval_2_routing.jsonl"
    trace = sim.load_workload_trace(str(path))
    r = sim.simulate(trace, "spac", 0.25, "h100-pcie5", max_tokens=40)
    d = r.as_dict()
    assert d["trace"].startswith("real+modelled(") and "rejected_draft" in d["trace"]
    assert d["modelled"] is True and d["synthetic"] is False
    plain = sim.simulate(trace, "lru", 0.25, "h100-pcie5", max_tokens=40)
    assert plain.trace.startswith("real:")  # plain decoding replays recorded routing only
    assert r.tokens == 40 and r.tokens_per_s > 0


# ---- CLI --------------------------------------------------------------------------------------
def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(["simulate", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_prints_one_json_object_with_the_documented_keys(tmp_path, capsys):
    path = _ar_trace(30).save(tmp_path / "t.npz")
    rc, out, _ = _run(capsys, "--trace", str(path), "--policy", "spac", "--cache-ratio", "0.25",
                      "--profile", "h100-pcie5", "--json")
    assert rc == 0
    lines = out.strip().splitlines()
    assert len(lines) == 1
    d = json.loads(lines[0])
    for key in ("tokens_per_s", "hit_rate", "h2d_bytes", "stall_ms", "cpu_ms",
                "prefetch_precision", "prefetch_recall", "bytes_moved", "policy", "cache_ratio",
                "profile", "trace", "synthetic", "modelled"):
        assert key in d, key
    assert d["policy"] == "spac" and d["profile"] == "h100-pcie5" and d["synthetic"] is True


@pytest.mark.parametrize("argv, field", [
    (["--cache-ratio", "0"], "cache_ratio"),
    (["--cache-ratio", "1.5"], "cache_ratio"),
    (["--policy", "fifo"], "policy"),
    (["--profile", "nope"], "profile"),
    (["--draft-tokens", "-1"], "draft_tokens"),
    (["--acceptance", "2"], "acceptance"),
    (["--sweep"], "out"),
])
def test_cli_bad_arguments_give_one_line_naming_the_argument(tmp_path, capsys, argv, field):
    path = _ar_trace(10).save(tmp_path / "t.npz")
    rc, out, err = _run(capsys, "--trace", str(path), *argv)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and field in err


def test_cli_missing_trace_names_the_path(tmp_path, capsys):
    rc, _, err = _run(capsys, "--trace", str(tmp_path / "absent.npz"))
    assert rc == 2 and "path" in err and len(err.strip().splitlines()) == 1


def test_cli_sweep_writes_table_plot_and_json_lines(tmp_path, capsys):
    path = _ar_trace(12).save(tmp_path / "t.npz")
    out_dir = tmp_path / "sweep"
    rc, out, _ = _run(capsys, "--trace", str(path), "--profile", "h100-pcie5", "--sweep",
                      "--out", str(out_dir), "--draft-tokens", "2")
    assert rc == 0
    md = (out_dir / "sweep-h100-pcie5.md").read_text()
    png = (out_dir / "sweep-h100-pcie5.png").read_bytes()
    rows = [json.loads(x) for x in (out_dir / "sweep-h100-pcie5.jsonl").read_text().splitlines()]
    assert png[:4] == b"\x89PNG"
    assert {(r["policy"], r["cache_ratio"]) for r in rows} >= {
        (p.value, x) for p in Policy for x in sim.SWEEP_RATIOS}
    assert "| 0.17 |" in md and "spac" in out


def test_a_planned_layers_host_time_is_on_the_critical_path_and_whole_layers_have_none():
    from dataclasses import replace

    trace = _ar_trace(tokens=30, hot=2)  # two experts per layer: every layer fits in 2 slots
    free, slow = replace(PROFILE, host_plan_ms=0.0), replace(PROFILE, host_plan_ms=0.5)
    assert sim.step_times(slow, DIMS).plan_ms_per_layer == 0.5
    # static at 0.25 (2 slots): after the warm-up the hot pair is resident, nothing moves, and
    # each planned layer costs exactly its plan more
    a = sim.simulate(trace, "static", 0.25, free)
    b = sim.simulate(trace, "static", 0.25, slow)
    books = ("hits", "misses", "fetched_experts", "cpu_experts", "prefetch_issued")
    assert [getattr(a.stats, k) for k in books] == [getattr(b.stats, k) for k in books]
    assert b.time_ms - a.time_ms == pytest.approx(a.steps * DIMS.num_layers * 0.5)
    # at 1.0 every layer is whole: the glue skips the plan, so the simulator adds nothing
    full_a = sim.simulate(trace, "lru", 1.0, free)
    full_b = sim.simulate(trace, "lru", 1.0, slow)
    assert full_a.time_ms == full_b.time_ms


def test_a_planned_layers_launch_is_on_the_critical_path_and_shared_cores_add_the_branches():
    from dataclasses import replace

    trace = _ar_trace(tokens=30, hot=2)
    free, slow = (replace(PROFILE, layer_launch_ms=0.0, host_plan_ms=0.0),
                  replace(PROFILE, layer_launch_ms=0.3, host_plan_ms=0.0))
    a = sim.simulate(trace, "static", 0.25, free)
    b = sim.simulate(trace, "static", 0.25, slow)
    assert b.stats.hits == a.stats.hits and b.stats.misses == a.stats.misses
    assert b.time_ms - a.time_ms == pytest.approx(a.steps * DIMS.num_layers * 0.3)
    assert sim.simulate(trace, "lru", 1.0, slow).time_ms == sim.simulate(
        trace, "lru", 1.0, free).time_ms  # whole layers: the resident path, no planned launch
    # a plain stream over 8 experts at 2 slots: static sends the cold experts to the CPU, so a
    # layer has both branches; on shared cores it takes their sum, never less than their max
    wide = _ar_trace(tokens=30, seed=3)
    apart = sim.simulate(wide, "static", 0.25, free)
    shared = sim.simulate(wide, "static", 0.25, replace(free, shared_compute=True))
    assert apart.stats.cpu_experts > 0 and shared.stats.cpu_experts == apart.stats.cpu_experts
    assert shared.time_ms > apart.time_ms
    assert shared.time_ms <= apart.time_ms + shared.stats.cpu_ms + 1e-6


def test_a_synchronous_sim_mover_makes_each_copy_on_the_clock():
    clock = sim.SimClock()
    mover = sim.SimMover(clock, fetch_ms=2.0, expert_bytes=10, synchronous=True)
    mover.load(0, 1, 0)
    assert clock.t_ms == 2.0 and mover.is_ready(0, 0)  # landed when the call returned
    mover.load(0, 2, 1)
    assert clock.t_ms == 4.0 and mover.ready_at(0, 1) == 4.0


def test_a_verify_window_pays_the_per_token_dense_and_head_costs_per_extra_token():
    from dataclasses import replace

    trace = _ar_trace(tokens=40, hot=2)
    times = sim.step_times(replace(PROFILE, host_plan_ms=0.0, layer_launch_ms=0.0), DIMS)
    base = replace(times, dense_ms_per_token=0.0, lm_head_ms_per_token=0.0)
    wide = replace(base, dense_ms_per_token=0.2, lm_head_ms_per_token=1.0)
    a = sim.simulate(trace, "sd-lru", 1.0, PROFILE, draft_tokens=3, acceptance=1.0, times=base)
    b = sim.simulate(trace, "sd-lru", 1.0, PROFILE, draft_tokens=3, acceptance=1.0, times=wide)
    extra = 3 * (DIMS.num_layers * 0.2 + 1.0)  # windows of 4 tokens: 3 more per step
    assert b.time_ms - a.time_ms == pytest.approx(a.steps * extra)
    # the profile's own per-token terms are FLOPs at its device rate
    assert times.dense_ms_per_token > 0.0 and times.lm_head_ms_per_token > 0.0
    assert replace(PROFILE, device_tflops=None).step_times(DIMS).dense_ms_per_token == 0.0


# ---- compare / sd-static / governor in the replay ----------------------------------------------
def test_sd_static_verifies_windows_over_a_frozen_hot_set():
    trace = _ar_trace(60, seed=4)
    r = sim.simulate(trace, "sd-static", 0.25, PROFILE, draft_tokens=3, acceptance=0.8)
    assert r.speculative and r.draft_tokens == 3 and r.draft_len_hist == {3: r.steps}
    assert r.stats.fetched_experts == 0  # no fetching: misses run on the CPU
    assert r.tokens == 60 and r.steps < 60


def test_compare_reports_each_baseline_at_its_best_draft_length():
    trace = _ar_trace(40, seed=5)
    c = sim.compare(trace, PROFILE, 0.25, ks=(1, 3), k_max=3, acceptance=0.8)
    assert c.product.adaptive_draft and c.product.policy == sim.PRODUCT_LABEL
    assert sum(c.product.draft_len_hist.values()) == c.product.steps
    names = [b.policy for b in c.baselines]
    assert names == ["lru", "hybrimoe", "static", "sd-lru", "sd-static"]
    for b in c.baselines:
        tried = [r for r in c.tried if r.policy == b.policy]
        assert b.tokens_per_s == max(r.tokens_per_s for r in tried)
        assert {r.draft_tokens for r in tried} == ({0} if not b.speculative else {1, 3})
    assert {r.draft_tokens for r in c.tried if r.policy == "oracle"} == {0, 1, 2, 3}
    assert c.best_baseline.tokens_per_s == max(b.tokens_per_s for b in c.baselines)
    summary = c.rows()[-1]
    assert summary["product_vs_oracle"] == pytest.approx(
        c.product.tokens_per_s / c.oracle.tokens_per_s)
    table = sim.compare_table([c])
    assert "product / best baseline" in table and "sd-static" in table
    with pytest.raises(ValueError, match="ks"):
        sim.compare(trace, PROFILE, 0.25, ks=(0, 2))
    with pytest.raises(ValueError, match="draft_tokens"):
        sim.compare(trace, PROFILE, 0.25, draft_tokens=2)


def test_cli_compare_prints_json_rows_and_a_summary(tmp_path, capsys):
    path = _ar_trace(20).save(tmp_path / "t.npz")
    rc, out, _ = _run(capsys, "--trace", str(path), "--profile", "h100-pcie5", "--compare",
                      "--compare-ks", "1,2", "--draft-tokens", "2", "--json")
    assert rc == 0
    rows = [json.loads(x) for x in out.strip().splitlines()]
    assert [r["role"] for r in rows] == ["product"] + ["baseline"] * 5 + ["oracle", "summary"]
    assert rows[-1]["product_vs_best_baseline"] > 0
    rc, _, err = _run(capsys, "--trace", str(path), "--compare", "--compare-ks", "1,x")
    assert rc == 2 and "compare-ks" in err
