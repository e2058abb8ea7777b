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
