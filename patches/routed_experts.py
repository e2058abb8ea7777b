"""vLLM glue for the offloaded MoE layer: `OffloadedRoutedExperts`, an out-of-tree `RoutedExperts`.

The seam. In vLLM 0.32/0.33 a model builds each MoE block with `FusedMoEFactory`, which creates a
router, a `RoutedExperts` (owns w13/w2, loads them, runs `quant_method.apply`) and a `MoERunner`
(gate, router, shared experts, all-reduce, the `moe_forward` custom op). We replace `RoutedExperts`
through `PluggableLayer.register_oot` (RoutedExperts is a PluggableLayer, vLLM's OOT mechanism for
whole layers; `CustomOp.register_oot` is the same registry for ops) because it is the one class that
owns exactly what offloading changes:
- the weights: where they are allocated (host, not device), how they are post-processed (no
  device-format repacking), and that EVERY expert is kept (we refuse EP, so no rank skips any);
- `forward_modular(x, topk_weights, topk_ids)`: called AFTER the router with the target's original
  routing, BEFORE any kernel: the place to capture routing and remap ids to slots.
`MoERunner` would also work but owns gate/shared-experts/all-reduce/DP dispatch that we would have
to re-implement or call back into; `UnquantizedFusedMoEMethod` sees the same (x, ids, weights) but
not the layer name/role cleanly and is replaced per quantization scheme. The runner, router and
everything else stay stock.

Per layer, decided by its prefix:
- target layers (`model.layers.N...`): `_HostWeightsMethod` allocates w13/w2 in host memory,
  post-processing hands them to the runtime's `ExpertStore` (pinned on CUDA) and allocates the
  layer's `SlotCache` slots (config `slots_per_layer`) on the device; forward runs
  `offload.OffloadedExperts` (engine plan -> fetch waits -> device slots + CPU experts).
- draft layers (`draft_model.*`): stock path, untouched; their routing (top-k of the draft's
  routers) is fed to the engine as the draft signal when the draft is an MoE with the target's E.

One `runtime.OffloadRuntime` per target model (several engines may share a process in tests): the
library's framework-neutral runtime (config, store, slots, mover, engine, CPU expert pool, stats,
trace recorder, step boundaries), the very object the GPU harness drives. This module only
translates: vLLM layers into `add_target_layer` / `add_draft_layer` / `weights_loaded`, the MoE op
into `forward` / `observe_draft`; `spec_hook.py` drives the step boundaries. While a trace is
recorded, the op also hands `forward` layer N+1's router logits on layer N's input (the trace's
cross-layer lookahead; `_lookahead_gates` finds the routers).
"""
from __future__ import annotations

import atexit
import logging
import threading
import weakref
from typing import Any

import torch

from moespac_vllm.config import MoESpacConfig
from moespac_vllm.metrics import MetricsExporter
from moespac_vllm.runtime import OffloadRuntime, default_costs

from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
    UnquantizedFusedMoEMethod,
)

logger = logging.getLogger("moespac_vllm.layer")

DRAFT_PREFIX = "draft_model."
OOT_NAME = "RoutedExperts"
OP_NAME = "moespac_offloaded_experts"


# ---- refusals -----------------------------------------------------------------------------------
def check_supported(vllm_config: Any, moe_config: Any, quant_method: Any = None) -> None:
    """Raise one clear error for each setup the offloaded layer does not support (yet)."""
    par = moe_config.moe_parallel_config
    if par.use_ep:
        raise ValueError("moespac: expert parallelism (enable_expert_parallel) is not supported: "
                         "the offloaded layer keeps every expert of a layer on one rank's host")
    if par.enable_eplb:
        raise ValueError("moespac: EPLB (enable_eplb) is not supported: expert placement is "
                         "moespac's job; drop --enable-eplb")
    if par.dp_size > 1:
        raise ValueError(f"moespac: data parallelism (data_parallel_size={par.dp_size}) is not "
                         "supported; run one engine per GPU instead")
    if quant_method is not None and not isinstance(quant_method, UnquantizedFusedMoEMethod):
        raise ValueError(f"moespac: quantized MoE weights ({type(quant_method).__name__}) are not "
                         "supported yet; use an unquantized (bf16/fp16/fp32) checkpoint")
    if moe_config.has_bias:
        raise ValueError("moespac: MoE experts with biases are not supported yet")
    act = moe_config.activation.value  # vllm MoEActivation (an Enum since 0.32)
    if str(act).lower() != "silu" or not moe_config.is_act_and_mul:
        raise ValueError(f"moespac: expert activation {act!r} is not supported (SwiGLU/silu only)")
    check_cudagraph_mode(vllm_config)


def check_cudagraph_mode(vllm_config: Any) -> None:
    """Refuse a config whose CUDA graphs would capture the offloaded MoE layers. FULL graphs replay
    one expert placement; PIECEWISE graphs split at the MoE op read the op's output (and shared
    experts') from the address captured once, while each call allocates afresh (engine_config.py
    says why). vLLM's own default is made safe where the config is built (engine_config.py); this
    check meets configs built around that hook (a VllmConfig made by hand)."""
    if vllm_config is None:
        return
    model_config = vllm_config.model_config
    if model_config is not None and model_config.enforce_eager:
        return
    mode = vllm_config.compilation_config.cudagraph_mode  # None until VllmConfig's post-init
    if mode is None or mode.name == "NONE":
        return
    kind = "FULL" if mode.has_full_cudagraphs() else "PIECEWISE"
    raise ValueError(
        f"moespac: cudagraph_mode {mode.name} captures the MoE layers in {kind} CUDA graphs, "
        "which would replay one expert placement / output buffer; build the engine through "
        "EngineArgs (LLM, vllm serve: moespac then picks NONE with torch.compile kept), set "
        "cudagraph_mode NONE, or use --enforce-eager")


# ---- registry of runtimes -----------------------------------------------------------------------
_lock = threading.RLock()
_config: MoESpacConfig | None = None
_runtimes: "weakref.WeakValueDictionary[int, OffloadRuntime]" = weakref.WeakValueDictionary()
_latest: OffloadRuntime | None = None


def runtime_of_model(model: Any) -> OffloadRuntime | None:
    """The runtime of a built model: the one its first offloaded target layer belongs to (None for
    a stock model, e.g. one built while the OOT class was unregistered)."""
    if model is None:
        return None
    for module in model.modules():
        if isinstance(module, OffloadedRoutedExperts) and module.moespac_role == "target":
            return module.moespac_runtime
    return None


def latest_runtime() -> OffloadRuntime | None:
    return _latest


def _new_runtime(vllm_config: Any) -> OffloadRuntime:
    """A runtime for a VllmConfig (None: a layer built outside any engine, e.g. in a test)."""
    global _latest
    from moespac_vllm.patches.plugin import config_for

    config = config_for(vllm_config)
    device = torch.device(str(vllm_config.device_config.device)) if vllm_config is not None \
        else torch.device("cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    model_config = vllm_config.model_config if vllm_config is not None else None
    sizing: dict[str, Any] = {}
    if device.type == "cuda" and vllm_config is not None:
        # what the device has, and the share vLLM may use: slots sized from it at the first
        # forward (vLLM's profile run), when no cache_ratio / gpu_expert_budget_gb is set
        sizing = dict(device_memory=lambda: torch.cuda.mem_get_info(device),
                      memory_share=float(vllm_config.cache_config.gpu_memory_utilization))
    rt = OffloadRuntime(config, device, owner=vllm_config,
                        model_name=str(model_config.model) if model_config is not None else "",
                        metrics=MetricsExporter(_served_model_name(model_config)), **sizing)
    spec = vllm_config.speculative_config if vllm_config is not None else None
    if spec is not None:
        rt.spec_method = str(spec.method)
        rt.num_spec_tokens = int(spec.num_speculative_tokens or 0)
    _runtimes[id(vllm_config)] = rt
    _latest = rt
    atexit.register(rt.close)
    return rt


def _served_model_name(model_config: Any) -> str:
    """The `model_name` label vLLM's own Prometheus series carry (its PrometheusStatLogger uses
    `model_config.served_model_name`: a str, or the first of a list, in vLLM 0.32/0.33)."""
    if model_config is None:
        return "unknown"
    name = model_config.served_model_name or model_config.model
    if isinstance(name, (list, tuple)):
        name = name[0] if name else model_config.model
    return str(name)


def stats_line() -> str:
    """The plugin's statistics line (plugin.stats_line calls it)."""
    rt = _latest
    if rt is None or rt.engine is None:
        return "moespac: offloaded layer installed, no offloaded model has run in this process"
    from moespac_vllm.stats import format_log_line

    return f"{format_log_line(rt.stats())}, signal: {rt.signal_source}"


# ---- the layer ----------------------------------------------------------------------------------
def _layer_number(layer_name: str) -> int | None:
    """N of `...layers.N...` (vLLM's layer naming), None if the prefix has no such part."""
    parts = layer_name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a in ("layers", "h", "blocks") and b.isdigit():
            return int(b)
    return None


# vLLM builds every drafter's model under `set_model_tag(...)` (vllm.compilation.backends): V1
# draft_model / V2 standalone_ar "draft_model" (prefix `draft_model.`), eagle/eagle3/mtp (V1
# llm_base_proposer, V2 eagle/utils.load_eagle_model, which mtp uses too) "eagle_head" with the
# model's own prefix (`model.layers.N...`, like the target's), medusa/dflash/dspark/lilicorr
# `<name>_head`. The tag is the one signal common to all of them (vLLM 0.32/0.33).
DRAFT_MODEL_TAGS = frozenset({"draft_model", "eagle_head", "medusa_head", "dflash_head",
                              "dspark_head", "lilicorr_head", "extract_hidden_states"})


def _model_tag() -> str:
    from vllm.compilation import backends

    return str(backends.model_tag)


def _role(layer_name: str) -> str:
    """`draft` for a layer of any speculative proposer's model, else `target`."""
    if layer_name.startswith(DRAFT_PREFIX):
        return "draft"
    tag = _model_tag()
    return "draft" if tag in DRAFT_MODEL_TAGS or tag.endswith("_head") else "target"


class StockCpuExpertsKernel:
    """offload.HostFusedKernel over the CPU experts object stock vLLM builds for this layer
    (`CPUUnquantizedExperts` and its per-ISA subclasses: the grouped-GEMM `cpu_fused_moe` op in its
    packed layout, or zentorch's op where vLLM picks it). Calling stock's own `apply` with the
    remapped rows makes every pair's arithmetic, the in-order k-sum and the final cast stock's:
    greedy outputs equal stock vLLM's in bf16 too, not only up to round-off."""

    _APPLY_PARAMS = ("output", "hidden_states", "w1", "w2", "topk_weights", "topk_ids",
                     "activation", "global_num_experts", "expert_map", "a1q_scale", "a2_scale",
                     "workspace13", "workspace2", "expert_tokens_meta",
                     "apply_router_weight_on_input")

    def __init__(self, experts: Any, activation: Any) -> None:
        import inspect

        params = tuple(inspect.signature(experts.apply).parameters)
        if params != self._APPLY_PARAMS:
            raise RuntimeError(f"moespac: {type(experts).__name__}.apply{params} changed upstream; "
                               "this vLLM version is not supported by the host-fused path")
        self.experts = experts
        self.activation = activation
        self.name = f"{type(experts).__name__}, isa {experts.isa}"

    def __call__(self, hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                 rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        hidden = hidden.contiguous()
        out = torch.empty_like(hidden)
        self.experts.apply(out, hidden, w13, w2, weights, rows, self.activation, w13.shape[0],
                           None, None, None, None, None, None, False)
        return out


def _stock_cpu_experts(experts_cls: Any) -> bool:
    """Is vLLM's choice for this layer one of its CPU grouped-GEMM experts classes?"""
    if experts_cls is None:
        return False
    try:
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    except ImportError:
        return False
    return isinstance(experts_cls, type) and issubclass(experts_cls, CPUUnquantizedExperts)


def check_host_resident(layer: Any, w13: torch.Tensor, w2: torch.Tensor) -> None:
    """vLLM's `requires_device_loading = False` contract, checked after loading: no expert weight
    of the layer is on the device, and the parameters the layer reads ARE the store's tensors."""
    for name, param, stored in (("w13_weight", layer.w13_weight, w13),
                                ("w2_weight", layer.w2_weight, w2)):
        if param.device.type != "cpu":
            raise RuntimeError(f"moespac: {layer.layer_name}.{name} is on {param.device} after "
                               "loading; expert weights must stay in host memory")
        if param.data_ptr() != stored.data_ptr() or param.shape != stored.shape:
            raise RuntimeError(f"moespac: {layer.layer_name}.{name} is not the expert store's "
                               "tensor after loading")


class _HostWeightsMethod(UnquantizedFusedMoEMethod):
    """Unquantized weights kept in host memory.

    On a CPU-only engine (vLLM picked its CPU experts for the layer) stock post-processing runs
    unchanged (intermediate padding, packing into the kernel's layout) and the layer computes with
    stock's experts object (`StockCpuExpertsKernel`). Elsewhere (CUDA) the weights stay in vLLM's
    [E,2I,H]/[E,H,I] layout in host memory, with no device repacking and no move to the device."""

    requires_device_loading = False

    def __init__(self, moe: Any) -> None:
        super().__init__(moe)
        self.stock_cpu = _stock_cpu_experts(self.experts_cls)

    def create_weights(self, layer: Any, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype,
                       **extra_weight_attrs: Any) -> None:
        with torch.device("cpu"):
            super().create_weights(layer, num_experts, hidden_size,
                                   intermediate_size_per_partition, params_dtype,
                                   **extra_weight_attrs)

    def maybe_roundup_sizes(self, hidden_size: int, intermediate_size_per_partition: int,
                            act_dtype: torch.dtype, moe_parallel_config: Any) -> tuple[int, int]:
        if self.stock_cpu:  # stock's sizes: stock's kernel runs
            return super().maybe_roundup_sizes(hidden_size, intermediate_size_per_partition,
                                               act_dtype, moe_parallel_config)
        return hidden_size, intermediate_size_per_partition  # our kernels need no padding

    def process_weights_after_loading(self, layer: Any) -> None:
        kernel = None
        if self.stock_cpu:
            super().process_weights_after_loading(layer)  # stock padding + packing, in place
            experts = self.moe_kernel.fused_experts
            # The runner keeps seeing a method without a modular kernel (it then calls our
            # forward_modular and runs shared experts itself, as before).
            self.moe_kernel = None
            kernel = StockCpuExpertsKernel(experts, layer.moe_config.activation)
        rt = layer.moespac_runtime
        # the store may have made a (spare-row) copy: point the parameters at it, which frees the
        # original
        idx = layer.moespac_index
        layer.w13_weight.data, layer.w2_weight.data = rt.weights_loaded(
            idx, layer.w13_weight.data, layer.w2_weight.data, kernel,
            kernel.name if kernel is not None else "")
        check_host_resident(layer, rt.store.w13(idx), rt.store.w2(idx))

    @property
    def is_monolithic(self) -> bool:
        return False

    def apply(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("moespac: the offloaded layer runs through forward_modular")


class OffloadedRoutedExperts(RoutedExperts):
    """`RoutedExperts` whose target instances compute from host memory + device slots."""

    def __init__(self, layer_name: str, params_dtype: torch.dtype, moe_config: Any,
                 quant_config: Any, *args: Any, **kwargs: Any) -> None:
        from vllm.config import get_current_vllm_config_or_none

        role = _role(layer_name)
        vllm_config = get_current_vllm_config_or_none()
        rt: OffloadRuntime | None
        if role == "target":
            rt = _runtimes.get(id(vllm_config)) if vllm_config is not None else None
            if rt is None or rt.owner is not vllm_config:  # ids are reused after GC
                rt = _new_runtime(vllm_config)
            check_supported(vllm_config, moe_config)
        else:
            rt = _latest
        # Plain attributes before nn.Module.__init__ are fine (only Parameters/Modules are not).
        object.__setattr__(self, "moespac_role", role)
        object.__setattr__(self, "moespac_runtime", rt)
        super().__init__(layer_name, params_dtype, moe_config, quant_config, *args, **kwargs)
        if role == "target":
            if self.local_num_experts != self.global_num_experts:
                raise ValueError("moespac: this rank holds a subset of the experts "
                                 f"({self.local_num_experts}/{self.global_num_experts}); expert "
                                 "parallel placements are not supported")
            number = _layer_number(layer_name)
            self.moespac_model_layer = number
            self.moespac_index = rt.add_target_layer(layer_name,
                                                     num_experts=self.global_num_experts,
                                                     top_k=self.top_k, model_layer=number)
            self.moespac_key = f"{rt.serial}:{self.moespac_index}"
            _layers[self.moespac_key] = (weakref.ref(rt), self.moespac_index)
        elif rt is not None:
            self.moespac_index = rt.add_draft_layer(layer_name,
                                                    num_experts=self.global_num_experts)
            self.moespac_key = f"{rt.serial}:draft:{self.moespac_index}"
            _layers[self.moespac_key] = (weakref.ref(rt), self.moespac_index)
        else:
            self.moespac_index = -1
            self.moespac_key = None
        _ensure_ops()

    def _get_quant_method(self, prefix: str, quant_config: Any, moe_config: Any) -> Any:
        if _role(prefix) != "target":
            return super()._get_quant_method(prefix, quant_config, moe_config)
        if quant_config is not None:
            from vllm.model_executor.layers.quantization.base_config import resolve_quant_method

            qm = resolve_quant_method(quant_config, self, prefix)
            if qm is not None:
                check_supported(None, moe_config, quant_method=qm)
        return _HostWeightsMethod(moe_config)

    def forward_modular(self, x: torch.Tensor, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor, shared_experts: Any = None,
                        shared_experts_input: torch.Tensor | None = None) -> Any:
        if self.moespac_role == "target":
            # shared experts (if any) already ran in the runner: our method has no modular
            # kernel, so the runner computes them NO_OVERLAP before calling us.
            return getattr(torch.ops.vllm, OP_NAME)(x, topk_weights, topk_ids,
                                                    self.moespac_key)
        if self.moespac_key is not None:
            topk_ids = getattr(torch.ops.vllm, DRAFT_OP_NAME)(topk_ids, self.moespac_key)
        return super().forward_modular(x, topk_weights, topk_ids, shared_experts,
                                       shared_experts_input)


# ---- the layer as an opaque torch op -------------------------------------------------------------
# On CPU vLLM calls the MoE runner directly (no `moe_forward` custom op) and compiles the model with
# Dynamo (DYNAMO_TRACE_ONCE); tracing into the offloaded forward would either break the graph (host
# sync, numpy) or, worse, freeze one expert placement into it. As a custom op it stays opaque and
# runs eagerly on every call, like vLLM's own `moe_forward` on CUDA.
_layers: dict[str, tuple[weakref.ReferenceType, int]] = {}
DRAFT_OP_NAME = "moespac_observe_draft"


def _runtime_of_key(layer_key: str) -> tuple[OffloadRuntime, int]:
    ref, idx = _layers[layer_key]
    rt = ref()
    if rt is None:
        raise RuntimeError(f"moespac: the runtime of layer {layer_key} is gone")
    return rt, idx


def _op_impl(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
             layer_key: str) -> torch.Tensor:
    rt, idx = _runtime_of_key(layer_key)
    ahead = None
    if rt.records_lookahead and idx + 1 < rt.num_layers:  # recording a trace only
        gates = _lookahead_gates(rt)
        if gates is not None:
            out = gates[idx + 1](x)  # layer idx+1's router on this layer's MoE input
            ahead = out[0] if isinstance(out, tuple) else out  # (logits, bias) from a Linear
    return rt.forward(idx, x, topk_weights, topk_ids, ahead)


def _op_fake(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
             layer_key: str) -> torch.Tensor:
    return torch.empty_like(x)


def _draft_op_impl(topk_ids: torch.Tensor, layer_key: str) -> torch.Tensor:
    """Feed a draft layer's routing to the engine; returns a copy of the ids, which the stock
    kernel then consumes, so a compiler can never drop this call as dead code."""
    rt, idx = _runtime_of_key(layer_key)
    rt.observe_draft(idx, topk_ids)
    return topk_ids.clone()


def _draft_op_fake(topk_ids: torch.Tensor, layer_key: str) -> torch.Tensor:
    return torch.empty_like(topk_ids)


# ---- cross-layer router lookahead (recorded with `record_trace` only) ----------------------------
# In vLLM 0.32/0.33 `FusedMoEFactory` builds a `MoERunner` per MoE block under the same prefix as
# its RoutedExperts; the runner registers itself in `compilation_config.static_forward_context
# [prefix]` and holds the block's `gate` (the router's Linear, called as `gate(x) -> (logits,
# bias)`) and `router` (logits -> top-k). We call the gate module itself rather than read its
# weight: on a CPU engine vLLM replaces `gate.weight` by an empty tensor after packing it
# (layers/utils.dispatch_cpu_unquantized_gemm, remove_weight=True); and not `router.select_experts`,
# which has side effects (EPLB load recording, the routed-experts capture callback).
_gates: "weakref.WeakKeyDictionary[OffloadRuntime, tuple[Any, ...] | None]" = \
    weakref.WeakKeyDictionary()


def _lookahead_gates(rt: OffloadRuntime) -> tuple[Any, ...] | None:
    """Every target MoE layer's gate module, in MoE order; None (no lookahead in the trace, said
    once in the log) where one layer has no gate in its runner or its router does not pick the
    top-k of its logits. All layers or none: the trace's lookahead is all or nothing per step."""
    with _lock:
        if rt in _gates:
            return _gates[rt]
        gates: tuple[Any, ...] | None = None
        if rt.owner is not None:
            found, why = [], ""
            context = rt.owner.compilation_config.static_forward_context
            for name in rt.layer_names:
                runner = context.get(name)
                why = _no_lookahead_reason(runner)
                if why:
                    logger.info("moespac: no router lookahead in the trace: layer %s %s",
                                name, why)
                    break
                found.append(runner.gate)
            gates = tuple(found) if not why else None
        _gates[rt] = gates
        return gates


def _no_lookahead_reason(runner: Any) -> str:
    """'' where `runner.gate`'s logits' top-k is exactly what `runner.router` picks (vLLM 0.32/0.33:
    CPURouter on every CPU engine, FusedTopKRouter on CUDA, softmax / sigmoid top-k without
    grouping, correction bias, hash or custom routing), else why not."""
    from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter
    from vllm.model_executor.layers.fused_moe.router.fused_topk_router import FusedTopKRouter
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    if not isinstance(runner, MoERunner):
        return f"is run by {type(runner).__name__}, not a MoERunner"
    if runner.gate is None or runner.routed_input_transform is not None:
        return "computes its router logits outside its MoERunner"
    r = runner.router
    if isinstance(r, CPURouter):
        plain = (not r.use_grouped_topk and r.e_score_correction_bias is None
                 and r.custom_routing_function is None and r._hash_indices_table is None)
    else:
        plain = isinstance(r, FusedTopKRouter)
    if not plain:
        return f"routes with {type(r).__name__}, not a plain top-k of its logits"
    if r.scoring_func not in ("softmax", "sigmoid"):
        return f"scores its logits with {r.scoring_func}, not a monotone softmax / sigmoid"
    return ""


def _ensure_ops() -> None:
    """Register both ops once per process, outside any traced code."""
    from vllm.utils.torch_utils import direct_register_custom_op

    with _lock:
        # torch.ops.vllm is the op namespace vLLM registers into: register ours once per process
        if not hasattr(torch.ops.vllm, OP_NAME):
            direct_register_custom_op(op_name=OP_NAME, op_func=_op_impl, mutates_args=[],
                                      fake_impl=_op_fake)
        if not hasattr(torch.ops.vllm, DRAFT_OP_NAME):
            direct_register_custom_op(op_name=DRAFT_OP_NAME, op_func=_draft_op_impl,
                                      mutates_args=[], fake_impl=_draft_op_fake)


# ---- registration -------------------------------------------------------------------------------
def register(config: MoESpacConfig) -> None:
    """Install the OOT RoutedExperts and the step hooks (idempotent). `config` is the plugin's
    env-level config; each model resolves its own (`config_for(vllm_config)`) when built."""
    global _config
    with _lock:
        _config = config
        from vllm.model_executor.custom_op import PluggableLayer, op_registry_oot

        current = op_registry_oot.get(OOT_NAME)
        if current is None:
            PluggableLayer.register_oot(OffloadedRoutedExperts, name=OOT_NAME)
        elif current is not OffloadedRoutedExperts:
            raise RuntimeError(f"moespac: another plugin already replaced {OOT_NAME} with "
                               f"{current.__module__}.{current.__qualname__}")
        from moespac_vllm.patches import engine_errors, spec_hook

        spec_hook.install()
        engine_errors.install()
    _ensure_ops()


def unregister() -> None:
    """Remove the OOT class (tests that build a stock engine in the same process)."""
    from vllm.model_executor.custom_op import op_registry_oot

    with _lock:
        if op_registry_oot.get(OOT_NAME) is OffloadedRoutedExperts:
            del op_registry_oot[OOT_NAME]


__all__ = [
    "OffloadRuntime",
    "default_costs",
    "OffloadedRoutedExperts",
    "check_cudagraph_mode",
    "check_host_resident",
    "check_supported",
    "latest_runtime",
    "register",
    "runtime_of_model",
    "stats_line",
    "unregister",
]
