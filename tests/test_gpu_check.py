"""benchmarks/gpu_check.sh --cpu-smoke: the GPU check's every step (gpu-marked tests, moespac
calibrate, the suite of decode-harness cases through the library runtime with routing on the
device) at tiny dims on this CPU, writing what the GPU run writes under $OUT. Speed is not
checked (benchmarks report it); that every case ran, with every key, and took its path is."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
CASES = {"ceiling", "plugin-1.0-plain", "plugin-0.17-plain", "spac-k3", "spac-k8",
         "spac-adaptive", "lru", "static", "sd-lru-k3", "sd-lru-k8", "prefill",
         "spac-k3-threads1", "spac-adaptive@0.5", "lru@0.5"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("gpu-check")
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-smoke"],
                       env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    return out, json.loads((out / "steps.json").read_text()), \
        json.loads((out / "gpu_check.json").read_text())


def test_every_step_ran_and_wrote_under_out(smoke):
    out, steps, result = smoke
    assert steps["mode"] == "cpu-smoke"
    assert steps["gpu_tests"] == 0 and steps["calibrate"] == 0 and steps["suite"] == 0
    assert json.loads((out / "profile.json").read_text())  # the calibrated profile
    assert "--profile" in result["command"] and str(out / "profile.json") in result["command"]
    assert (out / "gpu_check.png").stat().st_size > 0 and result["plot"]
    assert "skipped" in (out / "gpu_tests.log").read_text()  # no CUDA: the gpu tests skip


def test_every_case_has_every_key_and_its_path(smoke):
    _, _, result = smoke
    gc = load_benchmark("gpu_check")
    rows = {r["case"]: r for r in result["cases"]}
    assert set(rows) == CASES
    keys = set(next(iter(rows.values())))
    for name, r in rows.items():
        assert set(r) == keys and set(gc.ROW_KEYS) <= keys, name
        assert r["tokens"] >= 1 and r["tokens_per_s"] > 0 and r["steps"] >= 1
        assert r["device"].startswith("cpu")
    assert rows["ceiling"]["graphed"] is False  # no CUDA graph on a CPU, and it says so
    # the resident path never waits inside a layer; a planned layer waits exactly once
    assert rows["plugin-1.0-plain"]["syncs_per_layer"] == 0.0
    assert rows["plugin-1.0-plain"]["step_end_waits"] == rows["plugin-1.0-plain"]["steps"]
    assert rows["plugin-1.0-plain"]["planned_forwards"] == 0
    for name in ("lru", "spac-k3", "prefill"):
        assert rows[name]["syncs_per_layer"] == 1.0
        assert rows[name]["planned_forwards"] == rows[name]["layer_forwards"]
    assert rows["lru"]["gb_moved"] > 0 and rows["static"]["cpu_ms"] > 0
    assert rows["spac-k8"]["mean_draft_tokens"] == 8.0
    assert 0 <= rows["spac-adaptive"]["mean_draft_tokens"] <= 8.0
    assert rows["prefill"]["tokens"] == 64 and rows["prefill"]["steps"] == 1
    assert rows["spac-k3-threads1"]["cpu_threads"] == 1
    for name in ("lru", "static", "sd-lru-k3", "spac-k8", "spac-adaptive"):
        assert rows[name]["sim_tokens_per_s"] > 0, name
    for name in ("ceiling", "prefill", "plugin-1.0-plain"):
        assert rows[name]["sim_tokens_per_s"] is None and rows[name]["sim_note"]
    t = result["targets"]
    assert t["resident_syncs_per_layer"] == 0.0 and t["max_planned_syncs_per_layer"] == 1.0
    assert t["plugin_1.0_over_ceiling"] > 0 and t["spac_adaptive_over_best_baseline"] > 0


def test_gpu_check_refuses_bad_input(tmp_path):
    gc = load_benchmark("gpu_check")
    with pytest.raises(ValueError, match="ratio"):
        gc.parse_args(["--out", str(tmp_path), "--ratio", "0"])
    with pytest.raises(ValueError, match="steps"):
        gc.parse_args(["--out", str(tmp_path), "--steps", "0"])
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--bogus"],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and "--bogus" in p.stderr


def test_without_the_shared_data_the_synthetic_trace_runs_uncalibrated_and_says_so(capsys,
                                                                                   data_dir):
    bench = load_benchmark("gpu_check")
    trace = bench.workload_trace("synthetic:20", seed=0, data_dir=None)  # a lent GPU machine
    assert trace.meta.synthetic and trace.num_steps > 0
    assert "uniform" in json.dumps(trace.meta.notes)
    assert "UNCALIBRATED" in capsys.readouterr().err
    calibrated = bench.workload_trace("synthetic:20", seed=0, data_dir=data_dir)
    assert "uniform" not in json.dumps(calibrated.meta.notes)
