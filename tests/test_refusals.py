"""Setups the offloaded layer does not support are refused with one clear error each.

Checked against vLLM's own config objects (FusedMoEConfig / FusedMoEParallelConfig /
CompilationConfig / VllmConfig, a FusedMoEMethodBase subclass standing for a quantized method), and
the version gate through the plugin's register path."""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.vllm, pytest.mark.slow]  # vLLM import + config objects: ~20 s alone, more under load

vllm = pytest.importorskip("vllm")

from vllm.config import CompilationConfig, VllmConfig  # noqa: E402
from vllm.model_executor.layers.fused_moe.activation import MoEActivation  # noqa: E402
from vllm.model_executor.layers.fused_moe.config import (  # noqa: E402
    FusedMoEConfig,
    FusedMoEParallelConfig,
    RoutingMethodType,
)
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import (  # noqa: E402
    FusedMoEMethodBase,
)

from moespac_vllm.patches import routed_experts  # noqa: E402


def _parallel(**over) -> FusedMoEParallelConfig:
    base = dict(tp_size=1, pcp_size=1, dp_size=1, ep_size=1, tp_rank=0, pcp_rank=0, dp_rank=0,
                ep_rank=0, sp_size=1, use_ep=False, all2all_backend="allgather_reducescatter",
                enable_eplb=False)
    base.update(over)
    return FusedMoEParallelConfig(**base)


def _moe(parallel: FusedMoEParallelConfig | None = None, **over) -> FusedMoEConfig:
    kw = dict(num_experts=16, experts_per_token=4, hidden_dim=128, intermediate_size=64,
              num_local_experts=16, num_logical_experts=16, activation=MoEActivation.SILU,
              device="cpu", routing_method=RoutingMethodType.Renormalize,
              moe_parallel_config=parallel or _parallel(), in_dtype=torch.float32)
    kw.update(over)
    return FusedMoEConfig(**kw)


class _Int4MoEMethod(FusedMoEMethodBase):
    """Stands for any quantized MoE method (what resolve_quant_method returns for a GPTQ/AWQ/FP8
    checkpoint): a FusedMoEMethodBase that is not the unquantized one."""

    def create_weights(self, *a, **k):  # pragma: no cover - never called
        raise NotImplementedError

    def get_fused_moe_quant_config(self, layer):  # pragma: no cover
        return None


def test_supported_setup_passes():
    routed_experts.check_supported(None, _moe())


@pytest.mark.parametrize("over,match", [
    (dict(use_ep=True, ep_size=2, tp_size=1, dp_size=2), "expert parallelism"),
    (dict(enable_eplb=True), "EPLB"),
    (dict(dp_size=2), "data parallelism"),
])
def test_parallel_setups_are_refused(over, match):
    with pytest.raises(ValueError, match=match):
        routed_experts.check_supported(None, _moe(_parallel(**over)))


def test_quantized_moe_weights_are_refused():
    moe = _moe()
    with pytest.raises(ValueError, match="quantized MoE weights .*_Int4MoEMethod"):
        routed_experts.check_supported(None, moe, quant_method=_Int4MoEMethod(moe))


def test_biased_and_non_silu_experts_are_refused():
    with pytest.raises(ValueError, match="biases"):
        routed_experts.check_supported(None, _moe(has_bias=True))
    with pytest.raises(ValueError, match="activation"):
        routed_experts.check_supported(None, _moe(activation=MoEActivation.GELU))


class _EngineView:
    """The two parts of a VllmConfig the check reads. A whole VllmConfig cannot be used here: on
    this CPU platform its post-init resets cudagraph_mode to NONE (no CUDA graphs on CPU)."""

    def __init__(self, enforce_eager: bool = False, **cc) -> None:
        self.model_config = type("ModelConfigView", (), {"enforce_eager": enforce_eager})()
        self.compilation_config = CompilationConfig(**cc)


@pytest.mark.parametrize("mode", ["FULL", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE"])
def test_full_cuda_graphs_are_refused(mode):
    with pytest.raises(ValueError, match="FULL CUDA graphs"):
        routed_experts.check_cudagraph_mode(_EngineView(cudagraph_mode=mode))


def test_piecewise_graphs_are_refused_even_split_at_the_moe_op():
    """The graph after a split reads the MoE op's output from its capture-time address; the op
    (and vLLM's shared experts) allocate afresh on every call: a stale pointer."""
    for split in (["vllm::unified_attention"],
                  ["vllm::unified_attention", "vllm::moe_forward", "vllm::moe_forward_shared"]):
        with pytest.raises(ValueError, match="PIECEWISE CUDA graphs"):
            routed_experts.check_cudagraph_mode(
                _EngineView(cudagraph_mode="PIECEWISE", splitting_ops=split))


def test_no_cuda_graphs_pass():
    routed_experts.check_cudagraph_mode(_EngineView(cudagraph_mode="NONE"))
    routed_experts.check_cudagraph_mode(VllmConfig())  # this platform's own default


def test_enforce_eager_passes_whatever_the_graph_mode():
    routed_experts.check_cudagraph_mode(_EngineView(enforce_eager=True, cudagraph_mode="FULL"))


@pytest.mark.parametrize("tag,prefix", [
    ("backbone", "model.layers.3.mlp.experts"),
    ("draft_model", "draft_model.model.layers.0.mlp.experts"),  # V1 draft_model, V2 standalone
    ("eagle_head", "model.layers.0.mlp.experts"),  # eagle/eagle3/mtp: the model's own prefix
    ("eagle_head", "model.layers.48.mlp.experts"),  # an MTP head numbered after the target
    ("medusa_head", "model.layers.0.mlp.experts"),
])
def test_every_proposers_layers_are_draft_layers(tag, prefix):
    from vllm.compilation.backends import set_model_tag

    want = "target" if tag == "backbone" else "draft"
    if tag == "backbone":
        assert routed_experts._role(prefix) == want
        return
    with set_model_tag(tag):
        assert routed_experts._role(prefix) == want
    assert routed_experts._role("model.layers.0.mlp.experts") == "target"  # tag restored


class _LayerView:
    """The three attributes of a RoutedExperts the check reads."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor) -> None:
        self.layer_name = "model.layers.0.mlp.experts"
        self.w13_weight = torch.nn.Parameter(w13, requires_grad=False)
        self.w2_weight = torch.nn.Parameter(w2, requires_grad=False)


def test_after_loading_the_layer_reads_the_stores_host_tensors():
    w13, w2 = torch.zeros(4, 8, 16), torch.zeros(4, 16, 4)
    routed_experts.check_host_resident(_LayerView(w13, w2), w13, w2)
    with pytest.raises(RuntimeError, match="not the expert store's tensor"):
        routed_experts.check_host_resident(_LayerView(w13.clone(), w2), w13, w2)
    meta = _LayerView(torch.empty(4, 8, 16, device="meta"), w2)
    with pytest.raises(RuntimeError, match="must stay in host memory"):
        routed_experts.check_host_resident(meta, w13, w2)


def test_unverified_vllm_version_leaves_plugin_inert(monkeypatch):
    from moespac_vllm.patches import plugin

    monkeypatch.setattr(plugin, "vllm_version", lambda: "0.31.9")
    st = plugin._register({})
    assert not st.loaded and not st.layer_installed
    assert "unverified vLLM version" in st.inert_reason


# ---- the step hook's translation of vLLM's public scheduler output (patches/spec_hook.py) -------
def _sched(tokens: dict[str, int], spec: dict[str, list[int]] | None = None):
    import dataclasses

    from vllm.v1.core.sched.output import SchedulerOutput

    return dataclasses.replace(SchedulerOutput.make_empty(), num_scheduled_tokens=tokens,
                               total_num_scheduled_tokens=sum(tokens.values()),
                               scheduled_spec_decode_tokens=spec or {})


def test_step_context_phases_from_scheduler_output():
    from moespac_vllm.patches.spec_hook import step_context_from
    from moespac_vllm.step_context import Phase

    assert step_context_from(_sched({}), 0) is None
    ctx = step_context_from(_sched({"a": 17, "b": 5}), 3)
    assert (ctx.phase, ctx.num_tokens, ctx.tokens_per_request, ctx.step) == \
        (Phase.PREFILL, 22, (17, 5), 3)
    assert step_context_from(_sched({"a": 1, "b": 1}), 0).phase is Phase.DECODE
    ctx = step_context_from(_sched({"a": 4, "b": 4}, {"a": [1, 2, 3], "b": [4, 5, 6]}), 0)
    assert ctx.phase is Phase.VERIFY and ctx.num_draft_tokens == 3 and ctx.is_speculative
    assert step_context_from(_sched({"a": 4, "b": 30}, {"a": [1, 2, 3]}), 0).phase is Phase.MIXED


def test_accepted_tokens_from_sampled_ids():
    from moespac_vllm.patches.spec_hook import accepted_tokens

    assert accepted_tokens(torch.tensor([[5, 6, -1, -1], [7, 8, 9, 10], [3, -1, -1, -1]])) == 4
    assert accepted_tokens([[5, 6], [7], []]) == 1
    assert accepted_tokens(None) == 0
