"""What the runtime says and measures at start (issue 10): `profile: auto` measured at the model's
dims and cached per machine + dims, the one `moespac: offloading` line with what is in force, the
warning when no step boundary ever comes, and host-fused time named for what it is."""
from __future__ import annotations

import logging

import pytest
import torch

from moespac_vllm import startup_profile
from moespac_vllm.config import MoESpacConfig
from moespac_vllm.runtime import NO_BOUNDARY_WARN_STEPS, OffloadRuntime
from moespac_vllm.stats import EngineStats, format_log_line
from moespac_vllm.trace import ModelDims

L, E, K, H, INTER = 2, 8, 2, 32, 16


def _runtime(config: MoESpacConfig) -> OffloadRuntime:
    rt = OffloadRuntime(config, "cpu", model_name="unit")
    g = torch.Generator().manual_seed(0)
    for layer in range(L):
        rt.add_target_layer(f"model.layers.{layer}.mlp.experts", num_experts=E, top_k=K,
                            model_layer=layer)
    for layer in range(L):
        rt.weights_loaded(layer, torch.randn(E, 2 * INTER, H, generator=g),
                          torch.randn(E, H, INTER, generator=g))
    return rt


def _forward_all(rt: OffloadRuntime, T: int = 1) -> None:
    ids = torch.arange(K).repeat(T, 1)
    w = torch.full((T, K), 1.0 / K)
    for layer in range(L):
        rt.forward(layer, torch.randn(T, H), w, ids)


def test_auto_profile_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOESPAC_CACHE_DIR", str(tmp_path))
    dims = ModelDims(num_layers=L, num_experts=E, top_k=K, hidden_size=H, intermediate_size=INTER,
                     dtype_bytes=4)
    calls = []
    real = startup_profile._short_calibration

    def counting(d, device):
        calls.append((d, device))
        return real(d, device)

    monkeypatch.setattr(startup_profile, "_short_calibration", counting)
    prof, label = startup_profile.resolve("auto", dims, device="cpu", device_name="cpu",
                                          measure=counting)
    assert calls == [(dims, "cpu")] and "measured on this machine in" in label
    path = startup_profile.cache_path(dims, "cpu", tmp_path)
    assert path.is_file() and str(path) in label
    again, label2 = startup_profile.resolve("auto", dims, device="cpu", device_name="cpu",
                                            measure=counting)
    assert len(calls) == 1 and "cached" in label2 and again == prof
    other = startup_profile.cache_path(ModelDims(L, E, K, 2 * H, INTER, 4), "cpu", tmp_path)
    assert other != path  # per dims


def test_the_offloading_line_names_what_is_in_force(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MOESPAC_CACHE_DIR", str(tmp_path))
    rt = _runtime(MoESpacConfig().replace(cache_ratio=0.25, policy="lru", profile="h100-pcie5"))
    with caplog.at_level(logging.INFO, logger="moespac_vllm"):
        _forward_all(rt)
    lines = [r.getMessage() for r in caplog.records
             if r.getMessage().startswith("moespac: offloading")]
    assert len(lines) == 1
    line = lines[0]
    assert "cache_ratio 0.25 -> 2 slots/layer (0.25 of E" in line
    assert "policy lru" in line and "cost profile h100-pcie5" in line
    rt.close()


def test_default_profile_is_auto_and_measured_at_start(tmp_path, monkeypatch):
    """Old code: `auto` always meant a built-in estimate, whatever the machine."""
    monkeypatch.setenv("MOESPAC_CACHE_DIR", str(tmp_path))
    rt = _runtime(MoESpacConfig())
    _forward_all(rt)
    assert rt.costs_label.startswith("auto (measured on this machine")
    assert "(default)" in rt.offloading_line()
    rt.close()


def test_warns_once_when_no_step_boundary_comes(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MOESPAC_CACHE_DIR", str(tmp_path))
    rt = _runtime(MoESpacConfig().replace(profile="rtx4090-pcie4"))
    with caplog.at_level(logging.WARNING, logger="moespac_vllm"):
        for _ in range(NO_BOUNDARY_WARN_STEPS + 10):
            _forward_all(rt)  # every forward opens an implicit step: no hook ever fired
    warnings = [r for r in caplog.records if "without a step boundary" in r.getMessage()]
    assert len(warnings) == 1
    rt.close()


def test_host_fused_time_is_not_called_gpu_time():
    s = EngineStats(hits=0, misses=0, host_fused_ms=12.5)
    line = format_log_line(s)
    assert "host-fused experts: 12.5 ms" in line and "device experts" not in line
    assert "hit rate: n/a" in line and "prefetch precision: n/a" in line
    assert s.as_dict()["prefetch_precision"] is None
    line = format_log_line(EngineStats(hits=3, misses=1, gpu_ms=2.0, cpu_ms=3.0))
    assert "hit rate: 75.0%" in line and "device experts: 2.0 ms, CPU experts: 3.0 ms" in line


# ---- sizing on a small card (item 8): a fake device-memory probe, the CPU standing in ---------
EXPERT_BYTES = 3 * H * INTER * 4  # fp32


def _sized(probe, share: float = 0.9, **cfg) -> OffloadRuntime:
    rt = OffloadRuntime(MoESpacConfig().replace(profile="rtx4090-pcie4", **cfg), "cpu",
                        device_memory=probe, memory_share=share)
    g = torch.Generator().manual_seed(0)
    for layer in range(L):
        rt.add_target_layer(f"model.layers.{layer}.mlp.experts", num_experts=E, top_k=K)
    for layer in range(L):
        rt.weights_loaded(layer, torch.randn(E, 2 * INTER, H, generator=g),
                          torch.randn(E, H, INTER, generator=g))
    return rt


def test_unset_ratio_sizes_slots_from_what_the_device_leaves():
    total = 100 * EXPERT_BYTES
    # 90% of the device is the engine's; 70 experts' worth in use -> 20 left, half for slots:
    # 10 experts over 2 layers = 5 slots per layer
    rt = _sized(lambda: (total - 70 * EXPERT_BYTES, total))
    assert rt.sized_by_device
    rt.build()
    assert rt.slots.num_slots(0) == rt.slots.num_slots(1) == 5
    line = rt.offloading_line()
    assert "cache_ratio unset, sized by device memory -> 5 slots/layer" in line
    assert f"{20 * EXPERT_BYTES / 1e6:.1f} MB left on cpu" in line and "50%" in line
    rt.close()


def test_a_device_too_small_for_one_slot_fails_with_the_numbers():
    total = 100 * EXPERT_BYTES
    rt = _sized(lambda: (total - 89 * EXPERT_BYTES, total))  # 1 expert left: 0.5 for 2 layers
    with pytest.raises(ValueError, match=r"^cache_ratio: unset, .* holds no expert slot") as e:
        rt.build()
    assert f"{EXPERT_BYTES / 1e6:.1f} MB left" in str(e.value)


def test_a_budget_that_leaves_no_kv_cache_fails_with_the_numbers():
    total = 100 * EXPERT_BYTES
    rt = _sized(lambda: (5 * EXPERT_BYTES, total), cache_ratio=0.5)  # 95 in use > 90 allowed
    with pytest.raises(ValueError, match=r"^cache_ratio: .* MB of expert slots leave no KV cache"):
        rt.build()
    ok = _sized(lambda: (50 * EXPERT_BYTES, total), gpu_expert_budget_gb=1.0)
    ok.build()
    assert "KV cache and activations keep" in ok.offloading_line()
    ok.close()
