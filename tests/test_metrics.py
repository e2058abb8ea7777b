"""The `moespac_*` Prometheus series: counters follow the stats snapshots, never go down, and cross
from the model process to the API process through prometheus_client's multiprocess directory."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

prometheus_client = pytest.importorskip("prometheus_client")

from prometheus_client import CollectorRegistry  # noqa: E402

from moespac_vllm.metrics import COUNTERS, MetricsExporter  # noqa: E402
from moespac_vllm.stats import EngineStats  # noqa: E402


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_counters_equal_the_latest_snapshot_totals() -> None:
    reg = CollectorRegistry()
    ex = MetricsExporter("tiny", registry=reg)
    ex.update(EngineStats(steps=3, hits=10, misses=4, stall_ms=1500.0, h2d_bytes=2048),
              {"cpu_pairs": 7})
    ex.update(EngineStats(steps=5, hits=12, misses=9, stall_ms=2500.0, h2d_bytes=4096),
              {"cpu_pairs": 11})
    assert _value(reg, "moespac_expert_hits_total", model_name="tiny") == 12
    assert _value(reg, "moespac_expert_misses_total", model_name="tiny") == 9
    assert _value(reg, "moespac_steps_total", model_name="tiny") == 5
    assert _value(reg, "moespac_h2d_bytes_total", model_name="tiny") == 4096
    assert _value(reg, "moespac_cpu_expert_pairs_total", model_name="tiny") == 11
    assert _value(reg, "moespac_stall_seconds_total", model_name="tiny") == pytest.approx(2.5)


def test_every_series_exists_at_zero_before_its_first_event() -> None:
    reg = CollectorRegistry()
    MetricsExporter("m", registry=reg)
    for c in COUNTERS:
        assert _value(reg, f"moespac_{c.name}_total", model_name="m") == 0


def test_counters_never_decrease_when_a_snapshot_goes_back() -> None:
    reg = CollectorRegistry()
    ex = MetricsExporter("m", registry=reg)
    ex.update(EngineStats(hits=10))
    ex.update(EngineStats(hits=3))  # e.g. a second engine's fresh stats: a counter never drops
    assert _value(reg, "moespac_expert_hits_total", model_name="m") == 10
    ex.update(EngineStats(hits=15))
    assert _value(reg, "moespac_expert_hits_total", model_name="m") == 15


def test_config_gauges_and_profile_info() -> None:
    reg = CollectorRegistry()
    ex = MetricsExporter("m", registry=reg)
    ex.set_config(slots_per_layer=4, num_experts=16, profile="rtx4090-pcie4")
    assert _value(reg, "moespac_slots_per_layer", model_name="m") == 4
    assert _value(reg, "moespac_cache_ratio", model_name="m") == 0.25
    assert _value(reg, "moespac_cost_profile_info", model_name="m", profile="rtx4090-pcie4") == 1
    with pytest.raises(ValueError, match="num_experts"):
        ex.set_config(slots_per_layer=4, num_experts=0, profile="x")


def test_a_fresh_registry_gets_fresh_families_even_at_a_dead_registrys_address() -> None:
    """Families are kept per registry object, not per id(): a registry freed by an earlier test
    leaves its address to the next one (CPython reuses it), which must not inherit dead
    families registered elsewhere (that read back None here, in the whole suite only)."""
    for _ in range(20):
        reg = CollectorRegistry()
        MetricsExporter("m", registry=reg).set_config(slots_per_layer=4, num_experts=16,
                                                      profile="p")
        assert _value(reg, "moespac_slots_per_layer", model_name="m") == 4
        del reg


def test_every_counter_source_is_a_stats_field_or_a_known_extra() -> None:
    fields = set(EngineStats().as_dict())
    extras = {"cpu_pairs"}
    assert {c.source for c in COUNTERS} <= fields | extras
    assert len({c.name for c in COUNTERS}) == len(COUNTERS)


def test_model_name_is_required() -> None:
    with pytest.raises(ValueError, match="model_name"):
        MetricsExporter("", registry=CollectorRegistry())


def test_importing_creates_no_series() -> None:
    code = textwrap.dedent("""
        import moespac_vllm.metrics, moespac_vllm.stats
        from prometheus_client import REGISTRY, generate_latest
        text = generate_latest(REGISTRY).decode()
        assert "moespac_" not in text, text
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_series_cross_processes_through_the_multiprocess_directory(tmp_path) -> None:
    """What vLLM's API server does for /metrics (a MultiProcessCollector over the directory) sees
    what the model process exported."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    writer = textwrap.dedent("""
        from moespac_vllm.metrics import MetricsExporter
        from moespac_vllm.stats import EngineStats
        ex = MetricsExporter("tiny")
        ex.set_config(slots_per_layer=4, num_experts=16, profile="auto:cpu")
        ex.update(EngineStats(steps=2, hits=5, misses=3, prefetch_issued=4), {"cpu_pairs": 6})
    """)
    subprocess.run([sys.executable, "-c", writer], env=env, check=True)
    reader = textwrap.dedent("""
        from prometheus_client import CollectorRegistry, generate_latest, multiprocess
        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg)
        print(generate_latest(reg).decode())
    """)
    text = subprocess.run([sys.executable, "-c", reader], env=env, check=True,
                          capture_output=True, text=True).stdout
    assert 'moespac_expert_hits_total{model_name="tiny"} 5.0' in text
    assert 'moespac_cpu_expert_pairs_total{model_name="tiny"} 6.0' in text
    assert 'moespac_cache_ratio{model_name="tiny"} 0.25' in text
    assert 'moespac_cost_profile_info{model_name="tiny",profile="auto:cpu"} 1.0' in text
