"""The GPU decode harness (benchmarks/bench_gpu_decode.py) at tiny dims on the CPU: it runs the real
engine and layer over the real Mixtral routing for every policy and writes JSON lines and a plot.
Speed is not checked here (benchmarks report it); what each policy's plan did is."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import load_benchmark


def _harness():
    return load_benchmark("bench_gpu_decode")


@pytest.fixture(scope="module")
def harness():
    return _harness()


@pytest.fixture(scope="module")
def tiny_run(harness, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_decode")
    trace = data_dir / "mixtral-8x7b-routing" / "humaneval_2_routing.jsonl"
    rc = harness.main(["--trace", str(trace), "--tiny", "--device", "cpu", "--layers", "1",
                       "--steps", "3", "--ratios", "0.25", "--draft-tokens", "2",
                       "--out", str(out)])
    assert rc == 0
    lines = [json.loads(x) for x in (out / "gpu_decode.jsonl").read_text().splitlines()]
    return out, lines


def test_every_policy_runs_once_per_ratio_with_device_and_command(tiny_run):
    out, lines = tiny_run
    rows = [r for r in lines if r["bench"] == "gpu_decode"]
    assert [r["policy"] for r in rows] == ["all-resident", "lru", "static", "sd-lru", "spac"]
    for r in rows:
        assert r["device"].startswith("cpu")
        assert "--tiny" in r["command"]
        assert r["steps"] == 3 and r["tokens"] >= 3 and r["tokens_per_s"] > 0
        assert r["dims"] == {"layers": 1, "experts": 8, "top_k": 2, "hidden": 64,
                             "intermediate": 32}
        assert r["trace"].startswith(("real:", "real+modelled"))
    assert (out / "gpu_decode.png").stat().st_size > 0


def test_all_resident_never_misses_or_copies(tiny_run):
    _, lines = tiny_run
    r = next(x for x in lines if x.get("policy") == "all-resident")
    assert r["hit_rate"] == 1.0 and r["gb_moved"] == 0.0 and r["cpu_experts"] == 0
    assert r["slots_per_layer"] == 8
    assert r["sim_tokens_per_s"] is None  # the simulator starts cold; this run preloads


def test_each_measured_run_carries_the_simulators_prediction(tiny_run):
    _, lines = tiny_run
    setup = next(x for x in lines if x["bench"] == "gpu_decode_setup")
    assert set(setup["step_times_ms"]) == {"draft_ms_per_token", "dense_ms_per_layer",
                                           "lm_head_ms", "dense_ms_per_token",
                                           "lm_head_ms_per_token"}
    assert all(v >= 0.0 for v in setup["step_times_ms"].values())
    for r in lines:
        if r["bench"] == "gpu_decode" and r["policy"] != "all-resident":
            assert r["sim_tokens_per_s"] > 0


def test_policies_really_took_their_paths(tiny_run):
    _, lines = tiny_run
    by = {x["policy"]: x for x in lines if x["bench"] == "gpu_decode"}
    assert by["lru"]["fetched_experts"] > 0 and by["lru"]["gb_moved"] > 0
    assert by["lru"]["speculative"] is False and by["lru"]["tokens"] == 3
    assert by["static"]["cpu_experts"] > 0 and by["static"]["cpu_ms"] > 0
    for name in ("sd-lru", "spac"):
        assert by[name]["speculative"] is True
        assert by[name]["tokens"] > by[name]["steps"]  # windows emit accepted drafts too
        assert by[name]["draft_forwards"] > 0
        assert "modelled" in by[name]["trace"]  # rejected drafts' routing is modelled


def test_harness_refuses_bad_input(harness, data_dir, tmp_path):
    trace = str(data_dir / "mixtral-8x7b-routing" / "humaneval_2_routing.jsonl")
    with pytest.raises(ValueError, match="^policies:"):
        harness.main(["--trace", trace, "--policies", "fifo", "--out", str(tmp_path)])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="^device:"):
            harness.main(["--trace", trace, "--device", "cuda", "--out", str(tmp_path)])


def test_cut_layers_keeps_the_first_layers(harness, data_dir):
    from moespac_vllm.trace import load_trace

    full = load_trace(data_dir / "mixtral-8x7b-routing" / "humaneval_2_routing.jsonl")
    cut = harness.cut_layers(full, 3)
    assert cut.dims.num_layers == 3
    assert (cut.topk_ids == full.topk_ids[:, :3]).all()
    with pytest.raises(ValueError, match="^layers:"):
        harness.cut_layers(full, 0)
