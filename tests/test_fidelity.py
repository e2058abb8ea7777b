"""The simulator-fidelity benchmark (benchmarks/bench_fidelity.py) at tiny dims on the CPU: the
harness's cpu-as-device kernel computes what the reference computes, every case gets a measured
and a simulated row from the same engine (hit rates agree where the windows are the same), and
bad input is refused. Whether the two agree within 20 % is what the benchmark reports, not a test."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import load_benchmark

from moespac_vllm.offload import experts_reference


def test_the_native_device_kernel_matches_the_reference_and_skips_cpu_pairs():
    gd = load_benchmark("bench_gpu_decode")
    pytest.importorskip("moespac_vllm._cpu_experts")
    g = torch.Generator().manual_seed(0)
    E, H, I, T, K = 6, 32, 16, 3, 2
    w13 = (torch.randn(E, 2 * I, H, generator=g) / 6).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, generator=g) / 4).to(torch.bfloat16)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    ids = torch.tensor([[0, 3], [5, 1], [2, 4]])
    wts = torch.rand(T, K, generator=g)
    k = gd.NativeDeviceKernel()
    want = experts_reference(x, w13, w2, ids, wts).float()
    got = k(x, w13, w2, ids, wts)
    assert got.dtype == torch.float32 and got.shape == (T, H)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    # ids -1 (pairs the CPU computes): nothing from them
    cut = ids.clone()
    cut[:, 1] = -1
    only0 = experts_reference(x, w13, w2, ids[:, :1], wts[:, :1]).float()
    torch.testing.assert_close(k(x, w13, w2, cut, wts), only0, rtol=2e-2, atol=2e-2)


@pytest.mark.slow
def test_every_case_is_measured_and_simulated_from_the_same_engine(capsys):
    bench = load_benchmark("bench_fidelity")
    rc = bench.main(["--hidden", "64", "--inter", "32", "--layers", "2", "--steps", "4",
                     "--trace", "synthetic:60", "--json"])
    assert rc == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    setup, cases, summary = rows[0], rows[1:-1], rows[-1]
    assert setup["bench"] == "fidelity_setup" and "shared_compute=True" in setup["sim_times"]
    assert [c["case"] for c in cases] == ["lru", "static", "hybrimoe", "sd-lru-k3", "spac-k3",
                                          "spac-adaptive"]
    for c in cases:
        assert c["measured_tokens_per_s"] > 0 and c["sim_tokens_per_s"] > 0
        assert c["measured_over_sim"] == pytest.approx(
            c["measured_tokens_per_s"] / c["sim_tokens_per_s"])
        assert c["device"].startswith("cpu")
    # plain decoding replays the same tokens through the same engine: the same hits
    for c in cases[:3]:
        assert c["measured_hit_rate"] == pytest.approx(c["sim_hit_rate"])
    assert summary["bench"] == "fidelity_summary" and summary["cases"] == 6
    assert summary["within_goal"] == sum(bool(c["within_goal"]) for c in cases)


def test_bench_fidelity_refuses_bad_input():
    bench = load_benchmark("bench_fidelity")
    for argv, field in ((["--ratio", "1.0"], "ratio"), (["--steps", "0"], "steps")):
        with pytest.raises(ValueError, match=field):
            bench.parse_args(argv)
