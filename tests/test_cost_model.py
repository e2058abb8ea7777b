"""Cost model: profile arithmetic, named profiles, JSON, calibrated profiles."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from moespac_vllm.cost_model import PROFILES, CostProfile, ExpertCosts, get_profile
from moespac_vllm.trace import MIXTRAL_8X7B, QWEN3_30B_A3B, ModelDims


def _profile(**kw) -> CostProfile:
    base = dict(name="t", h2d_gbps=10.0, device_mem_gbps=1000.0, device_tflops=100.0,
                device_expert_overhead_ms=0.01, cpu_mem_gbps=50.0, cpu_gflops=500.0,
                cpu_expert_overhead_ms=0.02, draft_ms_per_token=3.0, h2d_latency_ms=0.005)
    base.update(kw)
    return CostProfile(**base)


def test_expert_costs_are_bytes_over_bandwidth_plus_flops_over_rate() -> None:
    dims = ModelDims(2, 4, 2, hidden_size=1000, intermediate_size=500, dtype_bytes=2)
    c = _profile().expert_costs(dims)
    nbytes = 3 * 1000 * 500 * 2  # 3 MB
    flops = 6 * 1000 * 500
    assert c.fetch_ms == pytest.approx(nbytes / 10e9 * 1e3 + 0.005)
    assert c.gpu_fixed_ms == pytest.approx(nbytes / 1000e9 * 1e3 + 0.01)
    assert c.gpu_per_token_ms == pytest.approx(flops / 100e12 * 1e3)
    assert c.cpu_fixed_ms == pytest.approx(nbytes / 50e9 * 1e3 + 0.02)
    assert c.cpu_per_token_ms == pytest.approx(flops / 500e9 * 1e3)
    assert c.gpu_ms(4) == pytest.approx(c.gpu_fixed_ms + 4 * c.gpu_per_token_ms)


def test_missing_flop_rate_means_no_per_token_term() -> None:
    c = _profile(device_tflops=None, cpu_gflops=None).expert_costs(QWEN3_30B_A3B)
    assert c.gpu_per_token_ms == 0.0 and c.cpu_per_token_ms == 0.0


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_named_profiles_order_device_copy_and_cpu_sensibly(name: str) -> None:
    p = get_profile(name)
    assert p.name == name and p.notes
    for dims in (QWEN3_30B_A3B, MIXTRAL_8X7B):
        c = p.expert_costs(dims)
        # running a resident expert on the device is far cheaper than fetching or CPU compute
        assert c.gpu_ms(9) < 0.5 * min(c.fetch_ms, c.cpu_ms(9))
        assert isinstance(c, ExpertCosts)
    t = p.step_times(QWEN3_30B_A3B)
    assert t.draft_ms_per_token > 0 and t.dense_ms_per_layer > 0 and t.lm_head_ms > 0


def test_the_paper_machine_has_25_gbps_pcie_and_a_terabyte_per_second_of_gddr6x() -> None:
    p = get_profile("rtx4090-pcie4")
    assert p.h2d_gbps == 25.0
    assert 800 <= p.device_mem_gbps <= 1008
    # one Qwen3-30B-A3B F16 expert (9.4 MB) crosses PCIe 4.0 in ~0.4 ms
    assert get_profile("rtx4090-pcie4").expert_costs(QWEN3_30B_A3B).fetch_ms == pytest.approx(
        QWEN3_30B_A3B.expert_bytes / 25e6 + p.h2d_latency_ms)
    assert get_profile("jetson-orin").unified_memory


def test_json_round_trip_and_file(tmp_path: Path) -> None:
    for p in list(PROFILES.values()) + [_profile(device_tflops=None)]:
        assert CostProfile.from_json(p.to_json()) == p
    path = _profile().save(tmp_path / "p.json")
    assert get_profile(str(path)) == _profile()


@pytest.mark.parametrize("edit,field", [
    (lambda d: d.update(h2d_gbps=0), "h2d_gbps"),
    (lambda d: d.update(bogus=1), "bogus"),
    (lambda d: d.pop("cpu_mem_gbps"), "cpu_mem_gbps"),
    (lambda d: d.update(format="other"), "format"),
    (lambda d: d.update(draft_ms_per_token=-1.0), "draft_ms_per_token"),
])
def test_bad_profile_json_raises_naming_the_field(edit, field: str) -> None:
    d = json.loads(_profile().to_json())
    edit(d)
    with pytest.raises(ValueError, match=f"^{field}"):
        CostProfile.from_json(json.dumps(d))


def test_unknown_profile_names_are_refused_with_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="h100-pcie5"):
        get_profile("a100-nvlink")
    with pytest.raises(ValueError, match="^profile"):
        get_profile(str(tmp_path / "missing.json"))
    assert get_profile("auto", device_name="NVIDIA H100 80GB HBM3").name == "h100-pcie5"
    assert get_profile("auto", device_name="NVIDIA GeForce RTX 4090").name == "rtx4090-pcie4"


def test_calibrated_profile_reproduces_the_measured_fits() -> None:
    cal_mod = pytest.importorskip("moespac_vllm.calibrate")
    dims = ModelDims(4, 8, 2, hidden_size=256, intermediate_size=128)
    cal = cal_mod.Calibration(
        dims=dims, device_kind=cal_mod.DeviceKind.CPU_AS_DEVICE, device_name="unit",
        cpu_threads=2, h2d_gbps=5.0, fetch_ms=0.04,
        device_fit=cal_mod.AffineFit.fit([(1, 0.11), (4, 0.14), (16, 0.26)]),
        cpu_fit=cal_mod.AffineFit.fit([(1, 0.5), (4, 0.8), (16, 2.0)]),
        device_method="unit", cpu_method="unit", experts_per_call=4)
    p = CostProfile.from_json(cal.to_profile_json("calibrated-unit"))
    c = p.expert_costs(dims)
    want = cal.expert_costs()
    for f in ("gpu_fixed_ms", "gpu_per_token_ms", "cpu_fixed_ms", "cpu_per_token_ms", "fetch_ms"):
        assert getattr(c, f) == pytest.approx(getattr(want, f), rel=1e-9), f
    assert p.calibration["device_name"] == "unit" and "calibrated" in p.notes
    # other dims scale with bytes: twice the intermediate size, twice the streaming time
    big = ModelDims(4, 8, 2, hidden_size=256, intermediate_size=256)
    assert p.expert_costs(big).cpu_fixed_ms == pytest.approx(2 * want.cpu_fixed_ms)


def test_calibration_fitted_through_the_origin_still_gives_a_profile() -> None:
    cal_mod = pytest.importorskip("moespac_vllm.calibrate")
    dims = ModelDims(4, 8, 2, hidden_size=256, intermediate_size=128)
    fit = cal_mod.AffineFit(0.0, 0.05, ((1, 0.05), (4, 0.2)))
    cal = cal_mod.Calibration(
        dims=dims, device_kind=cal_mod.DeviceKind.CPU_AS_DEVICE, device_name="unit",
        cpu_threads=2, h2d_gbps=5.0, fetch_ms=0.04, device_fit=fit, cpu_fit=fit,
        device_method="unit", cpu_method="unit", experts_per_call=4)
    c = CostProfile.from_calibration("origin", cal).expert_costs(dims)
    assert c.gpu_fixed_ms == pytest.approx(0.0, abs=1e-5)
    assert c.gpu_ms(4) == pytest.approx(0.2, rel=1e-3)


def test_named_profiles_state_the_host_time_of_a_layer_decision_and_step_times_carry_it():
    for name in ("h100-pcie5", "rtx4090-pcie4", "jetson-orin"):
        p = get_profile(name)
        assert 0.0 < p.host_plan_ms < 0.1  # tens of microseconds (bench_layer_host.py)
        assert p.step_times(QWEN3_30B_A3B).plan_ms_per_layer == p.host_plan_ms
        assert CostProfile.from_json(p.to_json()).host_plan_ms == p.host_plan_ms
    with pytest.raises(ValueError, match="host_plan_ms"):
        replace(get_profile("h100-pcie5"), host_plan_ms=-1.0)


def test_calibrated_profile_carries_the_measured_host_plan_time() -> None:
    cal_mod = pytest.importorskip("moespac_vllm.calibrate")
    dims = ModelDims(4, 8, 2, hidden_size=256, intermediate_size=128)
    fit = cal_mod.AffineFit.fit([(1, 0.11), (4, 0.14)])
    cal = cal_mod.Calibration(
        dims=dims, device_kind=cal_mod.DeviceKind.CPU_AS_DEVICE, device_name="unit",
        cpu_threads=2, h2d_gbps=5.0, fetch_ms=0.04, device_fit=fit, cpu_fit=fit,
        device_method="unit", cpu_method="unit", experts_per_call=4, host_plan_ms=0.0123)
    assert CostProfile.from_calibration("unit", cal).host_plan_ms == 0.0123


def test_launch_per_layer_and_shared_compute_reach_the_step_times_and_json() -> None:
    for name in ("h100-pcie5", "rtx4090-pcie4", "jetson-orin"):
        p = get_profile(name)
        assert 0.0 < p.layer_launch_ms < 0.2 and not p.shared_compute
        t = p.step_times(QWEN3_30B_A3B)
        assert t.launch_ms_per_layer == p.layer_launch_ms and t.shared_compute is False
    p = replace(get_profile("h100-pcie5"), layer_launch_ms=0.07, shared_compute=True)
    back = CostProfile.from_json(p.to_json())
    assert back.layer_launch_ms == 0.07 and back.shared_compute is True
    with pytest.raises(ValueError, match="layer_launch_ms"):
        replace(p, layer_launch_ms=-0.1)
    with pytest.raises(ValueError, match="shared_compute"):
        replace(p, shared_compute=1)


def test_a_cpu_as_device_calibration_shares_its_cores_and_keeps_the_launch() -> None:
    cal_mod = pytest.importorskip("moespac_vllm.calibrate")
    dims = ModelDims(4, 8, 2, hidden_size=256, intermediate_size=128)
    fit = cal_mod.AffineFit.fit([(1, 0.11), (4, 0.14)])
    kw = dict(dims=dims, device_name="unit", cpu_threads=2, h2d_gbps=5.0, fetch_ms=0.04,
              device_fit=fit, cpu_fit=fit, device_method="unit", cpu_method="unit",
              experts_per_call=4, launch_ms=0.05)
    cpu = CostProfile.from_calibration("c", cal_mod.Calibration(
        device_kind=cal_mod.DeviceKind.CPU_AS_DEVICE, **kw))
    gpu = CostProfile.from_calibration("g", cal_mod.Calibration(
        device_kind=cal_mod.DeviceKind.CUDA, **kw))
    assert cpu.shared_compute and not gpu.shared_compute
    assert cpu.layer_launch_ms == gpu.layer_launch_ms == 0.05
