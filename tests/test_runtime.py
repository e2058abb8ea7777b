"""The framework-neutral offload runtime (moespac_vllm/runtime.py) on CPU tensors, driven the way the
vLLM glue and the GPU harness drive it: layers registered in model order, weights handed in, steps
opened and closed, one forward per layer per step."""
from __future__ import annotations

import pytest
import torch

from moespac_vllm.config import MoESpacConfig
from moespac_vllm.cost_model import get_profile
from moespac_vllm.offload import experts_reference
from moespac_vllm.runtime import OffloadRuntime, default_costs
from moespac_vllm.step_context import Phase, StepContext
from moespac_vllm.trace import ModelDims, StepKind, load_trace

L, E, K, H, INTER = 3, 8, 2, 32, 16


def _weights(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(E, 2 * INTER, H, generator=g) / H**0.5,
            torch.randn(E, H, INTER, generator=g) / INTER**0.5)


def _routing(T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w, ids = torch.topk(torch.softmax(torch.randn(T, E, generator=g), -1), K, dim=-1)
    return ids, w / w.sum(-1, keepdim=True)


def _runtime(config: MoESpacConfig) -> tuple[OffloadRuntime, list]:
    rt = OffloadRuntime(config, "cpu", model_name="unit")
    banks = []
    for layer in range(L):
        assert rt.add_target_layer(f"model.layers.{2 * layer}.mlp.experts", num_experts=E,
                                   top_k=K, model_layer=2 * layer) == layer
    for layer in range(L):
        banks.append(_weights(layer))
        w13, w2 = rt.weights_loaded(layer, *banks[-1])
        assert torch.equal(w13, banks[-1][0]) and torch.equal(w2, banks[-1][1])
    return rt, banks


def test_steps_compute_every_layer_like_the_reference_and_record_the_trace(tmp_path):
    cfg = MoESpacConfig().replace(cache_ratio=0.25, policy="lru",
                                  record_trace=str(tmp_path / "t.npz"))
    rt, banks = _runtime(cfg)
    assert rt.engine is None  # built at the first step, once every layer's weights are in
    for step in range(4):
        T = 5 if step == 0 else 1
        rt.begin_step(StepContext(rt.next_step_index(), Phase.PREFILL if step == 0
                                  else Phase.DECODE, T, (T,), 0), explicit=True)
        x = torch.randn(T, H)
        for layer in range(L):
            ids, w = _routing(T, seed=10 * step + layer)
            got = rt.forward(layer, x, w, ids)
            want = experts_reference(x, *banks[layer], ids, w)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        rt.end_step(0)
    s = rt.summary()
    assert s["decode_steps"] == 3 and s["slots_per_layer"] == 2 and s["num_experts"] == E
    assert s["cpu_pairs"] + s["device_pairs"] == L * K * (5 + 3)
    rt.close()
    trace = load_trace(tmp_path / "t.npz")
    assert trace.num_steps == 4 and trace.dims.num_layers == L
    assert list(trace.kind) == [StepKind.PREFILL] + [StepKind.DECODE] * 3
    assert trace.meta.notes["model"] == "unit"


def test_a_forward_outside_a_step_opens_an_implicit_one():
    rt, banks = _runtime(MoESpacConfig().replace(cache_ratio=0.5))
    x = torch.randn(1, H)
    ids, w = _routing(1, seed=3)
    for layer in range(L):
        rt.forward(layer, x, w, ids)
    assert rt.step_open
    rt.forward(0, x, w, ids)  # layer 0 again: the next implicit step
    rt.end_step(0)
    assert not rt.step_open and rt.stats().steps == 2


def test_layers_must_come_in_model_order_and_before_the_first_step():
    rt = OffloadRuntime(MoESpacConfig(), "cpu")
    rt.add_target_layer("model.layers.3.mlp.experts", num_experts=E, top_k=K, model_layer=3)
    with pytest.raises(RuntimeError, match="model order"):
        rt.add_target_layer("model.layers.1.mlp.experts", num_experts=E, top_k=K, model_layer=1)
    with pytest.raises(ValueError, match="top_k"):
        rt.add_target_layer("model.layers.4.mlp.experts", num_experts=E, top_k=0)
    rt.weights_loaded(0, *_weights(0))
    rt.begin_step(StepContext(0, Phase.DECODE, 1, (1,), 0), explicit=True)
    with pytest.raises(RuntimeError, match="after the model started"):
        rt.add_target_layer("model.layers.5.mlp.experts", num_experts=E, top_k=K)
    with pytest.raises(ValueError, match="^config:"):
        OffloadRuntime({"cache_ratio": 0.5}, "cpu")


def test_configured_cost_profile_is_the_one_the_engine_uses():
    dims = ModelDims(L, E, K, H, INTER, 4)
    costs, label = default_costs(MoESpacConfig().replace(profile="h100-pcie5"), dims)
    assert label == "h100-pcie5"
    assert costs == get_profile("h100-pcie5").expert_costs(dims)
    _, auto = default_costs(MoESpacConfig(), dims)
    assert auto == "builtin-estimate"
    with pytest.raises(ValueError, match="^profile:"):
        default_costs(MoESpacConfig().replace(profile="no-such-gpu"), dims)
    rt, _ = _runtime(MoESpacConfig().replace(profile="h100-pcie5"))
    rt.build()
    assert rt.costs_label == "h100-pcie5"
    assert rt.engine.costs == get_profile("h100-pcie5").expert_costs(rt.dims)
