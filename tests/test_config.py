from __future__ import annotations

import json

import pytest

from moespac_vllm.config import (
    BalancerKind,
    MoESpacConfig,
    Policy,
)


def test_defaults_are_spac_exact_quarter_cache():
    cfg = MoESpacConfig.resolve(None, {})
    assert cfg.policy is Policy.SPAC
    assert cfg.balancer is BalancerKind.EXACT
    assert cfg.cache.effective_ratio == 0.25
    assert cfg.estimator.utility_cap == 5


def test_sources_override_in_order():
    env = {
        "MOESPAC_CONFIG": json.dumps({"cache_ratio": 0.5, "policy": "lru", "utility_cap": 3}),
        "MOESPAC_POLICY": "lfu",
    }
    cfg = MoESpacConfig.resolve({"moespac": {"utility_cap": 7}}, env)
    assert cfg.cache.cache_ratio == 0.5  # from MOESPAC_CONFIG
    assert cfg.policy is Policy.LFU  # env var beats MOESPAC_CONFIG
    assert cfg.estimator.utility_cap == 7  # additional_config beats both


def test_flat_round_trip():
    cfg = MoESpacConfig.from_mapping({"gpu_expert_budget_gb": 9.7, "balancer": "milp"})
    assert MoESpacConfig.from_mapping(cfg.to_flat()) == cfg


@pytest.mark.parametrize(
    "values, field",
    [
        ({"nonsense": 1}, "nonsense"),
        ({"cache_ratio": 0}, "cache_ratio"),
        ({"cache_ratio": 1.01}, "cache_ratio"),
        ({"cache_ratio": "abc"}, "cache_ratio"),
        ({"gpu_expert_budget_gb": -2}, "gpu_expert_budget_gb"),
        ({"policy": "fifo"}, "policy"),
        ({"balancer": "greedy"}, "balancer"),
        ({"utility_cap": 0}, "utility_cap"),
        ({"theta_up": 1.5}, "theta_up"),
        ({"stats_interval_steps": 0}, "stats_interval_steps"),
        ({"prefetch": "maybe"}, "prefetch"),
        ({"cache_ratio": 0.5, "gpu_expert_budget_gb": 4}, "cache_ratio"),
    ],
)
def test_bad_value_names_the_field_in_one_line(values, field):
    with pytest.raises(ValueError) as err:
        MoESpacConfig.from_mapping(values)
    msg = str(err.value)
    assert msg.startswith(field + ":")
    assert "\n" not in msg


def test_unknown_env_variable_is_refused():
    with pytest.raises(ValueError, match="^MOESPAC_CACHE_RATI:"):
        MoESpacConfig.resolve(None, {"MOESPAC_CACHE_RATI": "0.5"})


def test_bad_json_env_is_named():
    with pytest.raises(ValueError, match="^MOESPAC_CONFIG:"):
        MoESpacConfig.resolve(None, {"MOESPAC_CONFIG": "{bad"})


def test_slots_per_layer_from_ratio_and_budget():
    dims = dict(num_experts=128, num_layers=48, expert_bytes=3 * 2048 * 768 * 2)
    assert MoESpacConfig.from_mapping({"cache_ratio": 0.17}).cache.slots_per_layer(**dims) == 22
    assert MoESpacConfig.from_mapping({"cache_ratio": 1.0}).cache.slots_per_layer(**dims) == 128
    # 9.7 GB over 48 layers of 9.4 MB experts -> 21 slots per layer
    budget = MoESpacConfig.from_mapping({"gpu_expert_budget_gb": 9.7})
    assert budget.cache.slots_per_layer(**dims) == 21
    with pytest.raises(ValueError, match="^gpu_expert_budget_gb:"):
        MoESpacConfig.from_mapping({"gpu_expert_budget_gb": 0.001}).cache.slots_per_layer(**dims)


def test_shared_data_dir_prefers_the_environment_then_the_checkout(tmp_path):
    from moespac_vllm.config import shared_data_dir

    assert shared_data_dir({"MOESPAC_DATA_DIR": str(tmp_path)}) == tmp_path
    beside = shared_data_dir({"MOESPAC_DATA_DIR": str(tmp_path / "missing")})
    assert beside is None or (beside.name == "data" and beside.parent.name == "shared")
    assert shared_data_dir({}) == beside
