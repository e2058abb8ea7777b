"""`moespac calibrate`: the affine fit, the dims parser, a CPU run at tiny dims (the device side
absent and said so), the CLI writing a profile; on a GPU (marker gpu) a CUDA run at Qwen3 dims."""
from __future__ import annotations

import json

import pytest
import torch

from moespac_vllm import cli
from moespac_vllm.calibrate import AffineFit, DeviceKind, calibrate, parse_dims
from moespac_vllm.trace import ModelDims


def test_affine_fit_recovers_an_affine_curve():
    fit = AffineFit.fit([(n, 0.5 + 0.25 * n) for n in (1, 2, 4, 8, 16)])
    assert fit.fixed_ms == pytest.approx(0.5)
    assert fit.per_token_ms == pytest.approx(0.25)
    assert fit.ms(10) == pytest.approx(3.0)
    assert fit.max_rel_error() == pytest.approx(0.0, abs=1e-9)


def test_affine_fit_never_returns_negative_costs():
    flat_noisy = AffineFit.fit([(1, 2.0), (4, 1.9), (16, 1.8)])
    assert flat_noisy.per_token_ms == 0.0 and flat_noisy.fixed_ms == pytest.approx(1.9)
    steep = AffineFit.fit([(1, 0.1), (2, 1.0), (4, 3.0)])
    assert steep.fixed_ms == 0.0 and steep.per_token_ms > 0.0


def test_affine_fit_needs_two_distinct_token_counts():
    with pytest.raises(ValueError, match="^points:"):
        AffineFit.fit([(4, 1.0)])
    with pytest.raises(ValueError, match="^points:"):
        AffineFit.fit([(4, 1.0), (4, 2.0)])


def test_parse_dims_named_and_explicit():
    qwen = parse_dims("qwen3-30b-a3b")
    assert (qwen.num_layers, qwen.num_experts, qwen.top_k) == (48, 128, 8)
    assert (qwen.hidden_size, qwen.intermediate_size) == (2048, 768)
    assert parse_dims("Mixtral-8x7B").intermediate_size == 14336
    custom = parse_dims("64,32")
    assert (custom.hidden_size, custom.intermediate_size) == (64, 32)
    for bad in ("foo", "64", "64,x", "0,32"):
        with pytest.raises(ValueError, match="^dims:"):
            parse_dims(bad)


TINY = ModelDims(num_layers=1, num_experts=8, top_k=2, hidden_size=64, intermediate_size=32)


def test_cpu_calibration_says_the_device_side_is_absent():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cal = calibrate(TINY, tokens=(1, 4), reps=3, cpu_experts=2)
    assert cal.device_kind is DeviceKind.CPU_AS_DEVICE
    assert any("device side is absent" in n for n in cal.notes)
    # the CPU is the device: one measurement, the device's without the call's fixed cost
    M = cal.experts_per_call
    assert [n for n, _ in cal.device_fit.points] == [n for n, _ in cal.cpu_fit.points]
    for (_, dev), (_, cpu) in zip(cal.device_fit.points, cal.cpu_fit.points):
        assert dev == pytest.approx(max(0.0, cpu - cal.launch_ms / M))
    assert cal.launch_ms >= 0.0
    assert [n for n, _ in cal.cpu_fit.points] == [1, 4]
    assert all(ms > 0 for _, ms in cal.cpu_fit.points)
    assert cal.h2d_gbps > 0 and cal.fetch_ms > 0
    costs = cal.expert_costs()
    assert costs.cpu_ms(4) > 0 and costs.fetch_ms == cal.fetch_ms
    summary = cal.summary()
    assert summary["device_kind"] == "cpu-as-device"
    assert summary["expert_bytes"] == TINY.expert_bytes
    json.dumps(summary)  # JSON-ready


@pytest.mark.parametrize("kwargs, field", [
    ({"device": "tpu"}, "device"),
    ({"tokens": (4,)}, "tokens"),
    ({"tokens": (0, 4)}, "tokens"),
    ({"reps": 0}, "reps"),
    ({"cpu_threads": 0}, "cpu_threads"),
    ({"cpu_path": "gpu"}, "cpu_path"),
])
def test_calibrate_refuses_bad_arguments(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        calibrate(TINY, **kwargs)


def test_calibrate_times_the_chosen_cpu_path():
    cal = calibrate(TINY, device="cpu", tokens=(1, 2), reps=2, cpu_experts=1, cpu_path="native")
    from moespac_vllm.kernels.cpu_experts import native_available

    ran = "native" if native_available() else "torch"  # the pool's fallback when not built
    assert cal.cpu_method == f"kernels.cpu_experts.CpuExpertPool({ran})"
    assert cal.device_method == cal.cpu_method  # no accelerator: the CPU path is the device


def test_calibrate_refuses_cuda_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="^device:"):
        calibrate(TINY, device="cuda")


def test_cli_writes_a_profile_and_prints_the_measurements(tmp_path, capsys):
    out = tmp_path / "profile.json"
    rc = cli.main(["calibrate", "--dims", "64,32", "--tokens", "1,2", "--quick", "--device", "cpu",
                   "--out", str(out), "--name", "tiny-test"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["profile"] == str(out)
    assert printed["dims"]["hidden_size"] == 64
    profile_text = out.read_text()
    assert "tiny-test" in profile_text
    from moespac_vllm import cost_model

    profile_cls = getattr(cost_model, "CostProfile", None)
    if profile_cls is not None and hasattr(profile_cls, "from_json"):
        loaded = profile_cls.from_json(profile_text)  # the balancer's loader reads it back
        assert loaded is not None


def test_cli_bad_dims_is_one_clear_error(tmp_path, capsys):
    rc = cli.main(["calibrate", "--dims", "nope", "--out", str(tmp_path / "p.json")])
    assert rc == 2
    assert "dims:" in capsys.readouterr().err


@pytest.mark.gpu
def test_cuda_calibration_at_qwen3_dims():
    cal = calibrate(parse_dims("qwen3-30b-a3b"), device="cuda", tokens=(1, 4, 16), reps=5)
    assert cal.device_kind is DeviceKind.CUDA
    assert cal.h2d_gbps > 1.0  # any PCIe link moves more than this pinned
    # one expert is 9.4 MB: its fetch cannot beat 128 GB/s (faster than any PCIe 5 x16)
    assert cal.fetch_ms > cal.dims.expert_bytes / 128e9 * 1e3
    assert cal.device_fit.ms(8) < cal.cpu_fit.ms(8)


def test_calibration_measures_the_engines_host_time_per_layer_decision():
    from moespac_vllm.cost_model import CostProfile
    from moespac_vllm.plan_native import measure_plan_ms

    cal = calibrate(TINY, device="cpu", tokens=(1, 2), reps=2, cpu_experts=1)
    assert 0.0 < cal.host_plan_ms < 50.0  # ms: a real timing of plan_layer + finish_layer
    assert CostProfile.from_calibration("t", cal).host_plan_ms == cal.host_plan_ms
    with pytest.raises(ValueError, match="window_tokens"):
        measure_plan_ms(TINY, cal.expert_costs(), window_tokens=0)


def test_split_launch_takes_the_calls_fixed_cost_out_of_the_per_expert_points():
    from moespac_vllm.calibrate import split_launch

    # call(M experts) = M x 0.1 ms + 0.3 ms launch, per expert at M = 4: 0.175 ms; call(1) = 0.4
    launch, pts = split_launch([(1, 0.175), (4, 0.275)], 4, 0.4)
    assert launch == pytest.approx(0.3)
    assert pts == [(1, pytest.approx(0.1)), (4, pytest.approx(0.2))]
    assert split_launch([(1, 0.2)], 1, 0.5) == (0.0, [(1, 0.2)])  # one expert per call: no split
    launch, pts = split_launch([(1, 0.1)], 4, 0.05)  # noise: one call cheaper than its share
    assert launch == 0.0 and pts == [(1, 0.1)]
