"""Trace format, readers (npz + real Mixtral JSONL), verification windows, synthetic generator."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moespac_vllm.trace import (
    MIXTRAL_8X7B,
    QWEN3_30B_A3B,
    ModelDims,
    StepKind,
    Trace,
    TraceMeta,
    TraceRecorder,
    crosslayer_nmi,
    expert_shares,
    independent_reuse,
    load_trace,
    rank_pair_counts,
    reuse_curve,
    reuse_target,
    share_skew,
    synthetic_trace,
    windows_from_autoregressive,
)

SMALL = ModelDims(num_layers=3, num_experts=6, top_k=2, hidden_size=8, intermediate_size=4)


def _random_ids(rng: np.random.Generator, n: int, dims: ModelDims = SMALL) -> np.ndarray:
    scores = rng.random((n, dims.num_layers, dims.num_experts))
    return np.argsort(-scores, axis=-1)[..., : dims.top_k]


def _decode_trace(n_per_seq: tuple[int, ...] = (40, 25), seed: int = 0,
                  dims: ModelDims = SMALL) -> Trace:
    rng = np.random.default_rng(seed)
    rec = TraceRecorder(dims, source="unit")
    for sid, n in enumerate(n_per_seq):
        ids = _random_ids(rng, n, dims)
        for t in range(n):
            w = rng.random((1, dims.num_layers, dims.top_k))
            rec.add_step(StepKind.DECODE, ids[t:t + 1], w, seq_id=sid)
    return rec.build()


# ---- format and recorder --------------------------------------------------------------------
def test_npz_round_trip_keeps_every_array_and_the_label(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rec = TraceRecorder(SMALL, source="unit", modelled=("draft_routing",), notes={"a": 1})
    for s, t in enumerate((5, 1, 3)):
        rec.add_step(StepKind.VERIFY if t > 1 else StepKind.DECODE, _random_ids(rng, t),
                     rng.random((t, 3, 2)), rng.standard_normal((t, 3, 6)), num_accepted=t - 1,
                     seq_id=s % 2, draft_topk_ids=_random_ids(rng, 2))
    tr = rec.build()
    path = tr.save(tmp_path / "t")
    assert path.suffix == ".npz"
    back = Trace.load(path)
    assert back.dims == tr.dims and back.meta == tr.meta
    for name in Trace._ARRAYS:
        a, b = getattr(tr, name), getattr(back, name)
        assert (a is None) == (b is None), name
        if a is not None:
            np.testing.assert_array_equal(a, b, err_msg=name)
    assert back.label == "real+modelled(draft_routing):unit"
    assert load_trace(path).num_tokens == 9


def test_layerwise_recording_equals_whole_step_recording() -> None:
    rng = np.random.default_rng(2)
    ids = _random_ids(rng, 4)
    w = rng.random((4, 3, 2)).astype(np.float32)
    draft = _random_ids(rng, 3)
    a = TraceRecorder(SMALL, source="u")
    a.add_step(StepKind.VERIFY, ids, w, num_accepted=2, draft_topk_ids=draft)
    b = TraceRecorder(SMALL, source="u")
    for layer in range(3):  # the draft phase runs before the verification it feeds
        b.record_draft_layer(layer, topk_ids=draft[:, layer])
    b.begin_step(StepKind.VERIFY)
    for layer in range(3):
        b.record_layer(layer, ids[:, layer], w[:, layer])
    b.end_step(num_accepted=2)
    ta, tb = a.build(), b.build()
    for name in ("topk_ids", "topk_weights", "draft_topk_ids", "draft_offsets", "num_accepted"):
        np.testing.assert_array_equal(getattr(ta, name), getattr(tb, name), err_msg=name)


def test_an_aborted_step_is_not_written() -> None:
    rec = TraceRecorder(SMALL, source="u")
    rec.begin_step(StepKind.DECODE)
    rec.record_layer(0, np.array([[0, 1]]))
    assert rec.is_open
    rec.abort_step()
    assert not rec.is_open and rec.build().num_steps == 0


def test_end_step_refuses_a_step_with_a_missing_layer() -> None:
    rec = TraceRecorder(SMALL, source="u")
    rec.begin_step(StepKind.DECODE)
    rec.record_layer(0, np.array([[0, 1]]))
    with pytest.raises(ValueError, match="topk_ids"):
        rec.end_step()


@pytest.mark.parametrize("field,value", [
    ("topk_ids", np.array([[[0, 6], [0, 1], [0, 1]]])),  # expert 6 of 6
    ("topk_ids", np.array([[[2, 2], [0, 1], [0, 1]]])),  # duplicate in one top-k
    ("topk_ids", np.array([[[0, 65536], [0, 1], [0, 1]]])),  # would wrap to 0 in int16
    ("token_offsets", np.array([0, 2])),  # does not end at N = 1
    ("num_accepted", np.array([-1])),
])
def test_bad_arrays_raise_naming_the_field(field: str, value: np.ndarray) -> None:
    kw = dict(dims=SMALL, meta=TraceMeta("u"), kind=np.array([1]), seq_id=np.array([0]),
              num_accepted=np.array([0]), token_offsets=np.array([0, 1]),
              topk_ids=np.array([[[0, 1], [0, 1], [0, 1]]]))
    kw[field] = value
    with pytest.raises(ValueError, match=f"^{field}"):
        Trace(**kw)


def test_a_partial_draft_signal_is_refused() -> None:
    rec = TraceRecorder(SMALL, source="u")
    rec.record_draft_layer(0, topk_ids=np.array([[0, 1]]))
    rec.begin_step(StepKind.VERIFY)
    for layer in range(3):
        rec.record_layer(layer, np.array([[0, 1], [2, 3]]))
    with pytest.raises(ValueError, match="^draft_topk_ids"):
        rec.end_step(1)


def test_counts_equal_a_brute_force_count() -> None:
    rng = np.random.default_rng(3)
    rec = TraceRecorder(SMALL, source="u")
    for t in (3, 1, 4, 2):
        rec.add_step(StepKind.VERIFY, _random_ids(rng, t))
    tr = rec.build()
    for layer in range(3):
        c = tr.counts(layer)
        for s in range(tr.num_steps):
            want = np.zeros(6, int)
            for row in tr.step(s).layer_ids(layer):
                want[row] += 1
            np.testing.assert_array_equal(c[s], want)


def test_select_keeps_steps_in_the_given_order() -> None:
    tr = _decode_trace((6,))
    sub = tr.select([4, 1])
    np.testing.assert_array_equal(sub.topk_ids[0], tr.topk_ids[4])
    np.testing.assert_array_equal(sub.topk_ids[1], tr.topk_ids[1])
    assert sub.num_steps == 2


def test_load_trace_refuses_other_files(tmp_path: Path) -> None:
    p = tmp_path / "x.txt"
    p.write_text("hello\n")
    with pytest.raises(ValueError, match="^path"):
        load_trace(p)
    with pytest.raises(ValueError, match="^path"):
        load_trace(tmp_path / "missing.npz")


# ---- the real Mixtral traces ----------------------------------------------------------------
def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open() if line.strip()]


def test_reads_the_mixtral_decode_trace_trimmed_to_the_shortest_layer(data_dir: Path) -> None:
    path = data_dir / "mixtral-8x7b-routing" / "humaneval_2_routing.jsonl"
    tr = load_trace(path)
    rows = _rows(path)
    assert tr.dims == MIXTRAL_8X7B and tr.label.startswith("real:")
    for pid in (0, 1):
        per_layer = [sorted((r for r in rows if r["problem_id"] == pid and r["layer"] == l),
                            key=lambda r: r["token_idx"]) for l in range(32)]
        n = min(len(v) for v in per_layer)
        steps = np.flatnonzero(tr.seq_id == pid)
        assert len(steps) == n
        assert np.all(tr.kind[steps] == StepKind.DECODE)
        for t in (0, n // 2, n - 1):
            st = tr.step(int(steps[t]))
            for l in (0, 17, 31):
                assert st.topk_ids[0, l].tolist() == per_layer[l][t]["experts"]
                np.testing.assert_allclose(st.topk_weights[0, l], per_layer[l][t]["gating_probs"],
                                           rtol=1e-6)
    # the README's sanity numbers: adjacent tokens share 0.80 of 2 experts on HumanEval
    lag, _ = reuse_curve(tr, max_lag=1)
    assert 0.75 <= 2 * lag[:, 0].mean() <= 0.85


def test_reads_prefill_and_decode_and_labels_filled_rows(data_dir: Path) -> None:
    path = data_dir / "mixtral-8x7b-routing" / "humaneval0_prefill_decode_routing_raw.jsonl"
    tr = load_trace(path)
    rows = _rows(path)
    assert tr.kind[0] == StepKind.PREFILL and tr.tokens_per_step[0] == 135
    assert np.all(tr.kind[1:] == StepKind.DECODE)
    filled = tr.meta.notes["filled"]["0"]["rows_filled"]
    assert tr.num_tokens * 32 - filled == len(rows)  # every recorded row is used exactly once
    assert "missing_rows_filled" in tr.meta.modelled
    assert tr.token_modelled.sum() == tr.meta.notes["filled"]["0"]["tokens_with_a_filled_row"]
    first = [r for r in rows if r["layer"] == 3 and r["token_pos"] == 0][0]
    assert tr.topk_ids[0, 3].tolist() == first["experts"]
    # exact windows keep the filled-row label and add no rejected-draft label
    w = windows_from_autoregressive(tr, k=3, acceptance=3)
    assert w.meta.modelled == ("missing_rows_filled",)
    assert w.kind[0] == StepKind.PREFILL and w.tokens_per_step[0] == 135


# ---- verification windows -------------------------------------------------------------------
def test_fully_accepted_windows_are_exact_and_tile_the_stream() -> None:
    tr = _decode_trace()
    w = windows_from_autoregressive(tr, k=3, acceptance=3)
    assert not w.token_modelled.any() and w.meta.modelled == ()
    for sid in (0, 1):
        steps = np.flatnonzero(w.seq_id == sid)
        got = np.concatenate([w.step(int(s)).topk_ids for s in steps])
        np.testing.assert_array_equal(got, tr.topk_ids[tr.seq_id[tr.step_of_token()] == sid])
    assert set(w.tokens_per_step[w.kind == StepKind.VERIFY]) == {4}


def test_rejected_drafts_are_modelled_and_labelled() -> None:
    tr = _decode_trace((60,))
    w = windows_from_autoregressive(tr, k=3, acceptance=0, seed=1)
    assert "rejected_draft_routing" in w.meta.modelled and "rejected" in w.label
    stream = tr.topk_ids
    for s in range(w.num_steps - 3):
        st = w.step(s)
        assert st.num_accepted == 0 and st.num_tokens == 4
        np.testing.assert_array_equal(st.topk_ids[0], stream[s])  # the last accepted token
        assert st.token_modelled.tolist() == [False, True, True, True]
        for row in st.topk_ids[1:]:  # resampled from another token of the same stream
            matches = np.all(stream == row, axis=(1, 2))
            assert matches.any()


def test_perturbed_rejections_change_about_the_requested_share() -> None:
    tr = _decode_trace((400,), dims=ModelDims(4, 32, 4, 8, 4))
    w = windows_from_autoregressive(tr, k=2, acceptance=0, rejected="perturb", perturb_prob=0.5)
    changed, total = 0, 0
    for s in range(w.num_steps - 2):
        st = w.step(s)
        truth = tr.topk_ids[s + 1]  # the true next token the first rejected draft stands for
        changed += (st.topk_ids[1] != truth).sum()
        total += truth.size
    assert 0.45 <= changed / total <= 0.55


def test_acceptance_probability_gives_the_expected_accepted_count() -> None:
    tr = _decode_trace((3000,))
    w = windows_from_autoregressive(tr, k=4, acceptance=0.6, seed=3)
    acc = w.num_accepted[w.kind == StepKind.VERIFY][:-5]
    expected = sum(0.6 ** i for i in range(1, 5))  # E[min(geometric, k)]
    assert abs(acc.mean() - expected) < 0.08
    assert w.meta.notes["windows"]["acceptance"] == 0.6


def test_draft_signal_mirrors_the_window_at_the_requested_agreement() -> None:
    tr = _decode_trace((500,), dims=ModelDims(4, 32, 4, 8, 4))
    exact = windows_from_autoregressive(tr, k=3, acceptance=3, draft_agreement=1.0)
    for s in range(exact.num_steps - 1):
        st = exact.step(s)
        np.testing.assert_array_equal(st.draft_topk_ids, st.topk_ids[:3])
    half = windows_from_autoregressive(tr, k=3, acceptance=3, draft_agreement=0.5)
    assert "draft_routing" in half.meta.modelled
    kept = total = 0
    for s in range(half.num_steps - 1):
        st = half.step(s)
        kept += (st.draft_topk_ids == st.topk_ids[:3]).sum()
        total += st.draft_topk_ids.size
    assert 0.45 <= kept / total <= 0.55
    np.testing.assert_array_equal(half.draft_counts(0).sum(axis=1),
                                  4 * np.diff(half.draft_offsets))


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 30), min_size=1, max_size=3), k=st.integers(0, 5),
       alpha=st.floats(0.0, 1.0), seed=st.integers(0, 2**16),
       rejected=st.sampled_from(["resample", "perturb"]))
def test_windows_replay_every_emitted_token_exactly_once(lengths, k, alpha, seed, rejected) -> None:
    tr = _decode_trace(tuple(lengths), seed=seed % 7)
    w = windows_from_autoregressive(tr, k, alpha, seed=seed, rejected=rejected)
    for sid, n in enumerate(lengths):
        stream = tr.topk_ids[tr.seq_id[tr.step_of_token()] == sid]
        steps = np.flatnonzero(w.seq_id == sid)
        # the windows advance by accepted + 1 and together emit the whole stream
        assert int((w.num_accepted[steps] + 1).sum()) == n
        p = 0
        for s in steps:
            step = w.step(int(s))
            assert step.num_tokens <= k + 1 and step.num_accepted < max(step.num_tokens, 1)
            exact = ~step.token_modelled
            # recorded tokens are the stream's own routing at their positions, in order
            np.testing.assert_array_equal(step.topk_ids[exact],
                                          stream[p:p + step.num_tokens][exact])
            assert exact[: step.num_accepted + 1].all()
            assert not exact[step.num_accepted + 1:].any()
            p += step.num_accepted + 1


def test_draft_counts_fall_back_to_the_top_k_of_draft_logits() -> None:
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((3, 3, 6)).astype(np.float16)
    rec = TraceRecorder(SMALL, source="u")
    rec.add_step(StepKind.VERIFY, _random_ids(rng, 4), draft_logits=logits)
    tr = rec.build()
    for layer in range(3):
        want = np.zeros(6, int)
        for row in logits[:, layer].astype(np.float32):
            want[np.argsort(-row)[:2]] += 1
        np.testing.assert_array_equal(tr.draft_counts(layer)[0], want)


@pytest.mark.parametrize("kw,field", [
    ({"k": -1}, "k"), ({"k": 2, "acceptance": 3}, "acceptance"),
    ({"k": 2, "acceptance": 1.5}, "acceptance"), ({"k": 2, "rejected": "x"}, "rejected"),
    ({"k": 2, "draft_agreement": 2.0}, "draft_agreement"),
])
def test_window_arguments_are_validated(kw: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}"):
        windows_from_autoregressive(_decode_trace((5,)), **kw)


# ---- statistics -----------------------------------------------------------------------------
def test_reuse_curve_on_a_hand_made_stream() -> None:
    # layer 0 of E=4, K=1: 0,0,1,0 -> lag 1: (0->0 yes, 0->1 no, 1->0 no) = 1/3
    ids = np.array([0, 0, 1, 0]).reshape(4, 1, 1)
    lag, within = reuse_curve([ids], 4, max_lag=2)
    assert lag[0, 0] == pytest.approx(1 / 3)
    assert lag[0, 1] == pytest.approx(1 / 2)  # 0->1 no, 0->0 yes
    assert within[0, 1] == pytest.approx(2 / 2)  # both sources see a 0 within 2


def test_crosslayer_nmi_is_zero_for_independence_and_one_for_identity() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(16, size=(50000, 1))
    b = rng.integers(16, size=(50000, 1))
    assert crosslayer_nmi(rank_pair_counts(a, b, 16)) < 0.005
    assert crosslayer_nmi(rank_pair_counts(a, a, 16)) == pytest.approx(1.0, abs=1e-3)


# ---- synthetic generator --------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic(data_dir: Path) -> Trace:
    return synthetic_trace(
        QWEN3_30B_A3B, num_steps=1500, k=0, seed=7,
        stats=data_dir / "olmoe-mixtral-routing-stats",
        reuse=data_dir / "mixtral-8x7b-routing" / "humaneval_2_routing.jsonl")


def test_synthetic_trace_is_labelled_synthetic_everywhere(synthetic: Trace, tmp_path: Path) -> None:
    assert synthetic.meta.synthetic and synthetic.label.startswith("synthetic:")
    assert synthetic.token_modelled.all()
    assert Trace.load(synthetic.save(tmp_path / "s")).label.startswith("synthetic:")
    assert synthetic.dims == QWEN3_30B_A3B


def test_synthetic_reproduces_the_popularity_skew(synthetic: Trace, data_dir: Path) -> None:
    from moespac_vllm.trace import synthetic_targets

    targets = synthetic_targets(QWEN3_30B_A3B, 7, data_dir / "olmoe-mixtral-routing-stats")
    got = share_skew(expert_shares(synthetic.topk_ids, 128))
    want = targets.skew
    # the target interpolates OLMoE's c4 skew (0.32 / 0.40 / 0.51 at layers 0 / 7 / 15)
    assert 0.3 < want.mean() < 0.55
    # 1500 tokens x 8 = 94 assignments per expert: sampling noise alone adds ~0.1 CV
    noise = np.sqrt(128 / (1500 * 8))
    assert np.abs(np.sqrt(np.maximum(got ** 2 - noise ** 2, 0)) - want).mean() < 0.08
    assert np.corrcoef(got, want)[0, 1] > 0.5  # the depth trend survives


def test_synthetic_reproduces_the_measured_temporal_reuse(synthetic: Trace, data_dir: Path) -> None:
    from moespac_vllm.trace import synthetic_targets

    targets = synthetic_targets(QWEN3_30B_A3B, 7, data_dir / "olmoe-mixtral-routing-stats",
                                data_dir / "mixtral-8x7b-routing" / "humaneval_2_routing.jsonl")
    lag, _ = reuse_curve(synthetic, max_lag=4)
    want = reuse_target(targets, 8)
    assert 0.1 < targets.reuse_lift.mean() < 0.3  # Mixtral: ~0.17 lift at lag 1
    assert abs(lag[:, 0].mean() - want.mean()) < 0.02
    # per layer: within 0.03 except where Mixtral shows almost no lift (its first and last
    # layers): there the topic persistence that carries the lag-2..4 reuse alone exceeds it
    # (up to +0.09 at layer 0, recorded in meta.notes)
    dev = lag[:, 0] - want
    assert np.median(np.abs(dev)) < 0.01 and np.abs(dev[5:-5]).max() < 0.03
    assert dev.min() > -0.03 and dev.max() < 0.12
    for d in (2, 3, 4):  # not fitted: the model's topic persistence gives the decay
        assert abs(lag[:, d - 1].mean() - reuse_target(targets, 8, d).mean()) < 0.03
    # reuse well above what independent draws at the same popularity give
    base = independent_reuse(expert_shares(synthetic.topk_ids, 128), 8)
    assert (lag[:, 0] > base).mean() > 0.9


def test_synthetic_reproduces_the_crosslayer_cooccurrence(synthetic: Trace) -> None:
    target = synthetic.meta.notes["target"]["nmi"]
    got = synthetic.meta.notes["achieved"]["nmi_model"]
    assert np.mean(got) == pytest.approx(np.mean(target), rel=0.25)


def test_synthetic_windows_are_deterministic_per_seed(data_dir: Path) -> None:
    kw = dict(num_steps=30, k=3, stats=data_dir / "olmoe-mixtral-routing-stats", reuse=0.2,
              draft_agreement=0.9)
    a = synthetic_trace(QWEN3_30B_A3B, seed=1, **kw)
    b = synthetic_trace(QWEN3_30B_A3B, seed=1, **kw)
    np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
    assert a.has_draft and np.any(a.kind == StepKind.VERIFY)
    assert a.label.startswith("synthetic:")


def test_synthetic_requests_are_separate_streams(data_dir: Path) -> None:
    tr = synthetic_trace(QWEN3_30B_A3B, num_steps=40, k=0, seed=2, num_requests=2,
                         stats=data_dir / "olmoe-mixtral-routing-stats", reuse=0.2)
    assert sorted(np.unique(tr.seq_id).tolist()) == [0, 1]
    assert (tr.seq_id == 0).sum() == (tr.seq_id == 1).sum() == 20
    with pytest.raises(ValueError, match="^num_requests"):
        synthetic_trace(QWEN3_30B_A3B, num_steps=4, num_requests=0, stats=None, reuse=None)
