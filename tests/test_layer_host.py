"""The layer host-time harness (benchmarks/bench_layer_host.py) on a few real Mixtral windows: which
path each forward took is checked here, never its speed (the benchmark reports that)."""
from __future__ import annotations

import json

from conftest import load_benchmark


def test_whole_layers_skip_the_plan_and_partial_ones_never_do(data_dir, capsys):
    bench = load_benchmark("bench_layer_host")
    assert bench.main(["--json", "--steps", "3", "--ratios", "1.0,0.5",
                       "--data-dir", str(data_dir)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["policy"], r["cache_ratio"]) for r in rows] == [
        ("spac", 1.0), ("spac", 0.5), ("lru", 1.0), ("lru", 0.5)]
    for r in rows:
        assert r["forwards"] == 3 * 32 and r["window_tokens"] == 4
        if r["cache_ratio"] == 1.0:  # loaded at start: every forward plan-free, every hit
            assert r["plan_free_forwards"] == r["forwards"] and r["hit_rate"] == 1.0
        else:
            assert r["plan_free_forwards"] == 0 and r["hit_rate"] < 1.0
        assert r["us_per_layer_forward_median"] > 0


def test_qwen3_rows_time_planned_forwards_and_steps_on_either_path(capsys):
    """At Qwen3-30B-A3B dims (synthetic routing, ratio 0.17): one row per policy and window,
    every forward planned, and the native and Python planners reach the same books (the copy
    link runs on a modelled clock, so their decisions do not depend on the host's speed)."""
    from moespac_vllm import plan_native

    bench = load_benchmark("bench_layer_host")
    rows = {}
    for path in ("python", "native") if plan_native.available() else ("python",):
        assert bench.main(["--dims", "qwen3-30b-a3b", "--json", "--steps", "3",
                           "--windows", "1,4", "--policies", "spac,lru", "--path", path]) == 0
        rows[path] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for path, rs in rows.items():
        assert [(r["policy"], r["window_tokens"]) for r in rs] == [
            ("spac", 1), ("spac", 4), ("lru", 1), ("lru", 4)]
        for r in rs:
            assert r["dims"] == "qwen3-30b-a3b" and r["trace"] == "synthetic"
            assert r["native"] == (path == "native")
            assert r["cache_ratio"] == 0.17 and r["slots_per_layer"] == 22
            assert r["forwards"] == 3 * 48 and r["plan_free_forwards"] == 0
            for key in ("us_per_layer_forward_median", "us_per_layer_forward_p90",
                        "us_per_step_median"):
                assert r[key] > 0
    if "native" in rows:
        assert [r["hit_rate"] for r in rows["native"]] == [r["hit_rate"] for r in rows["python"]]
