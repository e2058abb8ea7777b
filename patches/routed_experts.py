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

One `OffloadRuntime` per target model (several engines may share a process in tests): it owns the
config, store, slots, mover, engine (built lazily at the first forward, when every MoE layer is
known), the step board, stats and the trace recorder. `spec_hook.py` drives its step boundaries.
"""
from __future__ import annotations

import atexit

import logging
import threading
import time
import weakref
from typing import Any

import numpy as np
import torch

from moespac_vllm.config import EstimatorSource, MoESpacConfig, Policy
from moespac_vllm.cost_model import ExpertCosts
from moespac_vllm.offload import ExpertStore, OffloadedExperts, SlotCache
from moespac_vllm.step_context import Phase, StepBoard, StepContext
from moespac_vllm.trace import ModelDims

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
    act = getattr(moe_config.activation, "value", str(moe_config.activation))
    if str(act).lower() != "silu" or not moe_config.is_act_and_mul:
        raise ValueError(f"moespac: expert activation {act!r} is not supported (SwiGLU/silu only)")
    check_cudagraph_mode(vllm_config)


def check_cudagraph_mode(vllm_config: Any) -> None:
    """FULL CUDA graphs would capture the host-side plan once and replay stale slot ids: refused.
    PIECEWISE is fine only when the MoE op is a graph split point (it syncs with the host)."""
    if vllm_config is None:
        return
    model_config = getattr(vllm_config, "model_config", None)
    if model_config is not None and getattr(model_config, "enforce_eager", False):
        return
    cc = vllm_config.compilation_config
    mode = getattr(cc, "cudagraph_mode", None)
    if mode is None:
        return
    from vllm.config.compilation import CUDAGraphMode

    if mode.has_full_cudagraphs() if hasattr(mode, "has_full_cudagraphs") else \
            mode.decode_mode() == CUDAGraphMode.FULL:
        raise ValueError(
            f"moespac: cudagraph_mode {mode.name} captures the MoE layers in FULL CUDA graphs, "
            "which would replay one fixed expert placement; use --enforce-eager or "
            "-O '{\"cudagraph_mode\": \"PIECEWISE\", \"splitting_ops\": [\"vllm::moe_forward\", "
            "\"vllm::moe_forward_shared\", ...attention ops]}'")
    if mode.requires_piecewise_compilation():
        split = set(cc.splitting_ops or ())
        if not {"vllm::moe_forward", "vllm::moe_forward_shared"} <= split:
            raise ValueError(
                "moespac: PIECEWISE CUDA graphs need the MoE op as a split point: add "
                "\"vllm::moe_forward\" and \"vllm::moe_forward_shared\" to "
                "compilation_config.splitting_ops, or use --enforce-eager")


# ---- default costs ------------------------------------------------------------------------------
def default_costs(config: MoESpacConfig, dims: ModelDims) -> tuple[ExpertCosts, str]:
    """The cost profile the balancer uses: the core issue's `CostProfile` when it can resolve
    `config.profile`, else a built-in estimate from dims (labelled so in the stats)."""
    try:
        from moespac_vllm import cost_model

        resolve = getattr(cost_model, "resolve_profile", None) or getattr(
            getattr(cost_model, "CostProfile", None), "resolve", None)
        if resolve is not None:
            profile = resolve(config.profile, dims) if config.profile != "auto" else resolve(
                "auto", dims)
            return profile.expert_costs(dims), str(getattr(profile, "name", config.profile))
    except (ImportError, ValueError, TypeError, AttributeError) as e:
        logger.info("moespac: cost profile %r not resolved (%s); using the built-in estimate",
                    config.profile, e)
    b = dims.expert_bytes
    f = dims.expert_flops_per_token
    # PCIe 5 x16 ~25 GB/s effective; device ~2 TB/s, 400 TFLOP/s; CPU ~50 GB/s, 1 TFLOP/s.
    return ExpertCosts(gpu_fixed_ms=b / 2e12 * 1e3, gpu_per_token_ms=f / 4e14 * 1e3,
                       cpu_fixed_ms=b / 5e10 * 1e3, cpu_per_token_ms=f / 1e12 * 1e3,
                       fetch_ms=b / 2.5e10 * 1e3), "builtin-estimate"


class _MonotonicClock:
    def now_ms(self) -> float:
        return time.perf_counter() * 1e3


# ---- the runtime (one per target model) ---------------------------------------------------------
class OffloadRuntime:
    """Everything one offloaded target model shares across its MoE layers."""

    _serials = iter(range(1 << 62))

    def __init__(self, config: MoESpacConfig, vllm_config: Any, device: torch.device) -> None:
        self.serial = next(OffloadRuntime._serials)
        self.config = config
        self.vllm_config = vllm_config
        self.device = device
        self.store = ExpertStore(pin_memory=device.type == "cuda")
        self.slots = SlotCache(device)
        self.layers: list[OffloadedRoutedExperts] = []  # target MoE layers, in model order
        self.draft_layers: list[OffloadedRoutedExperts] = []
        self.board = StepBoard()
        self.engine: Any = None
        self.mover: Any = None
        self.experts: dict[int, OffloadedExperts] = {}
        self.host_kernels: dict[int, StockCpuExpertsKernel] = {}
        self.dims: ModelDims | None = None
        self.costs_label = ""
        self.spec_method: str | None = None
        self.num_spec_tokens = 0
        self._step = 0
        self._open = False  # a step is open on the engine
        self._explicit = False  # opened by the scheduler hook (not an implicit dummy run)
        self._planned: set[int] = set()
        self._draft_seen = False
        self._draft_ids: dict[int, list[np.ndarray]] = {}
        self._stats_writer: Any = None
        self._recorder: Any = None
        self._steps_since_log = 0
        self.decode_steps = 0
        self._closed = False
        self.lock = threading.Lock()

    # ---- construction -------------------------------------------------------------------------
    def add_target_layer(self, layer: OffloadedRoutedExperts) -> int:
        """The layer's MoE index: its rank among this model's MoE layers. vLLM builds layers in
        model order; the transformer index from the prefix (`model.layers.N.mlp.experts`) is kept
        to check that order (dense layers in between, e.g. DeepSeek's first_k_dense, are fine)."""
        if self.engine is not None:
            raise RuntimeError("moespac: a MoE layer was built after the model started running")
        number = _layer_number(layer.layer_name)
        if self.layers and number is not None and self.layers[-1].moespac_model_layer is not None \
                and number <= self.layers[-1].moespac_model_layer:
            raise RuntimeError(f"moespac: MoE layer {layer.layer_name} was built after layer "
                               f"{self.layers[-1].layer_name}; the engine needs model order")
        layer.moespac_model_layer = number
        self.layers.append(layer)
        return len(self.layers) - 1

    def add_draft_layer(self, layer: OffloadedRoutedExperts) -> int:
        self.draft_layers.append(layer)
        return len(self.draft_layers) - 1

    def weights_loaded(self, layer: OffloadedRoutedExperts,
                       host_kernel: StockCpuExpertsKernel | None = None) -> None:
        """Hand the layer's host weights to the store and allocate its device slots. With
        `host_kernel` (a CPU-only engine running stock's CPU experts) the weights come in stock's
        packed layout and the slots are the store's spare rows (offload.py's host-fused mode)."""
        idx = layer.moespac_index
        w13, w2 = layer.w13_weight.data, layer.w2_weight.data
        E = w13.shape[0]
        expert_bytes = (w13[0].numel() * w13.element_size()) + (w2[0].numel() * w2.element_size())
        num_slots = self.config.cache.slots_per_layer(E, max(1, len(self.layers)), expert_bytes)
        if host_kernel is not None:
            self.store.add_layer(idx, w13, w2, spare_rows=num_slots)
            self.slots.attach_layer(idx, *self.store.spare(idx))
            self.host_kernels[idx] = host_kernel
        else:
            self.store.add_layer(idx, w13, w2)
            self.slots.add_layer(idx, num_slots, self.store.w13(idx), self.store.w2(idx))
        # the store may have made a (pinned / spare-row) copy: point the parameters at it, which
        # frees the original
        layer.w13_weight.data = self.store.w13(idx)
        layer.w2_weight.data = self.store.w2(idx)

    def _build_engine(self) -> None:
        from moespac_vllm.engine import ExpertEngine
        from moespac_vllm.mover import CudaStreamMover, SyncMover

        missing = [i for i in range(len(self.layers)) if i not in self.store.layers]
        if missing:
            raise RuntimeError(f"moespac: MoE layers {missing[:4]} ran before their weights were "
                               "loaded")
        first = self.layers[0]
        w13 = self.store.w13(0)
        E, two_i, H = w13.shape
        self.dims = ModelDims(num_layers=len(self.layers), num_experts=E, top_k=first.top_k,
                              hidden_size=H, intermediate_size=two_i // 2,
                              dtype_bytes=w13.element_size())
        costs, self.costs_label = default_costs(self.config, self.dims)
        if self.device.type == "cuda":
            self.mover = CudaStreamMover(self.store, self.slots)
        else:
            self.mover = SyncMover(self.store, self.slots)
        num_slots = self.slots.num_slots(0)
        # The runtime reports (log line + stats_file), not the engine: it also knows the signal
        # source and what really ran where. So the engine gets no stats file and no interval.
        engine_config = self.config.replace(stats_file=None, stats_interval_steps=1 << 62)
        self.engine = ExpertEngine(engine_config, self.dims, costs, self.mover, _MonotonicClock(),
                                   num_slots=num_slots)
        warm = self.engine.load_full_layers()  # everything fits: load it all now
        if warm:
            logger.info("moespac: all %d experts of every MoE layer fit; %d copied in at start",
                        E, warm)
        cpu_pool = None
        if self.device.type == "cuda":
            from moespac_vllm.offload import ThreadCpuExperts

            cpu_pool = ThreadCpuExperts()
        for i in range(len(self.layers)):
            self.experts[i] = OffloadedExperts(self.store, self.engine, i, self.device, self.slots,
                                               self.mover, cpu_experts=cpu_pool,
                                               host_fused=self.host_kernels.get(i))
        st = self.config.stats
        if st.stats_file:
            from moespac_vllm.stats import StatsWriter

            self._stats_writer = StatsWriter(st.stats_file)
        if st.record_trace:
            from moespac_vllm.trace import TraceRecorder

            self._recorder = TraceRecorder(self.dims, source="vllm", notes={
                "model": str(getattr(getattr(self.vllm_config, "model_config", None), "model",
                                     "")),
                "spec_method": self.spec_method or "none",
                "num_spec_tokens": self.num_spec_tokens})
        logger.info("moespac: MoE layers (transformer index): %s",
                    [layer.moespac_model_layer for layer in self.layers])
        logger.info(
            "moespac: offloading %d MoE layers x %d experts (%.1f MB/expert): %d slots/layer "
            "(%.1f MB on %s), host store %.1f MB, policy %s, costs %s, signal %s, experts run by %s",
            self.dims.num_layers, E, self.dims.expert_bytes / 1e6, num_slots,
            self.slots.total_bytes / 1e6, self.device, self.store.total_bytes / 1e6,
            self.config.policy.value, self.costs_label, self.signal_source, self.compute_path)

    @property
    def compute_path(self) -> str:
        """What computes the experts: stock vLLM's CPU experts over [store | slot] rows (CPU-only
        engines), or moespac's slot-cache kernel + CPU experts."""
        if self.host_kernels and len(self.host_kernels) == len(self.layers):
            return f"stock CPU experts ({next(iter(self.host_kernels.values())).name}, host-fused)"
        return "moespac kernels (slot cache + CPU experts)"

    # ---- the signal in use ----------------------------------------------------------------------
    @property
    def draft_has_routers(self) -> bool:
        if not self.draft_layers or not self.layers:
            return False
        return self.draft_layers[0].global_num_experts == self.layers[0].global_num_experts

    @property
    def signal_source(self) -> str:
        src = self.config.estimator.source
        if self.spec_method is None or src is EstimatorSource.AUTOREGRESSIVE:
            return "autoregressive"
        if self.draft_has_routers and src in (EstimatorSource.AUTO, EstimatorSource.DRAFT):
            return "draft+verify"
        return "verify"

    # ---- steps ---------------------------------------------------------------------------------
    def begin_step(self, ctx: StepContext, explicit: bool) -> None:
        with self.lock:
            if self.engine is None:
                if not self.layers or len(self.store.layers) < len(self.layers):
                    return
                self._build_engine()
            if self._open:
                self._end_locked(0)
            self.engine.begin_step(ctx)
            self.board.publish(ctx)
            if self._recorder is not None and ctx.phase is not Phase.DRAFT:
                from moespac_vllm.trace import StepKind

                kind = {Phase.DECODE: StepKind.DECODE, Phase.VERIFY: StepKind.VERIFY}.get(
                    ctx.phase, StepKind.PREFILL)
                for layer, parts in self._draft_ids.items():
                    self._recorder.record_draft_layer(layer, np.concatenate(parts))
                self._recorder.begin_step(kind)
            self._draft_ids = {}
            self._open, self._explicit = True, explicit
            self._planned = set()
            self._draft_seen = False

    def next_step_index(self) -> int:
        self._step += 1
        return self._step - 1

    def end_step(self, num_accepted: int) -> None:
        with self.lock:
            if self._open:
                self._end_locked(num_accepted)

    def _end_locked(self, num_accepted: int) -> None:
        ctx = self.board.current()
        self._open = False
        if self._recorder is not None:
            if len(self._planned) == len(self.layers):
                self._recorder.end_step(num_accepted)
            else:  # an aborted forward: drop it rather than write a partial step
                self._recorder._open = None
        self.engine.end_step(int(num_accepted))
        if ctx is not None and ctx.phase in (Phase.DECODE, Phase.VERIFY):
            self.decode_steps += 1
            self._steps_since_log += 1
            if self._steps_since_log >= self.config.stats.stats_interval_steps:
                self._steps_since_log = 0
                self.report()

    def report(self) -> None:
        from moespac_vllm.stats import format_log_line

        s = self.engine.stats()
        logger.info("%s, signal: %s", format_log_line(s), self.signal_source)
        if self._stats_writer is not None:
            self._stats_writer.write(s, signal=self.signal_source, policy=self.config.policy.value,
                                     cpu_pairs=sum(e.counters.cpu_pairs
                                                   for e in self.experts.values()),
                                     device_pairs=sum(e.counters.device_pairs
                                                      for e in self.experts.values()))

    def mark_draft_phase(self) -> None:
        """The drafter is about to run: publish a DRAFT context (layers and stats read it)."""
        ctx = self.board.current()
        if ctx is not None and ctx.phase is not Phase.DRAFT:
            self.board.publish(StepContext(ctx.step, Phase.DRAFT, 0, (), ctx.num_draft_tokens))

    # ---- forwards ------------------------------------------------------------------------------
    def forward(self, idx: int, x: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor) -> torch.Tensor:
        with self.lock:
            needs_step = not self._open or idx in self._planned
        if needs_step:
            # A forward outside the scheduler hook (profiling / dummy / warm-up run), or a second
            # forward inside one step: an implicit step of its own.
            T = int(x.shape[0])
            phase = Phase.DECODE if T == 1 else Phase.PREFILL
            self.begin_step(StepContext(self.next_step_index(), phase, T, (T,), 0),
                            explicit=False)
        self._planned.add(idx)
        out = self.experts[idx].forward(x, topk_ids, topk_weights)
        if self._recorder is not None and self._recorder._open is not None:
            self._recorder.record_layer(idx, topk_ids.detach().to("cpu").numpy(),
                                        topk_weights.detach().to("cpu", torch.float32).numpy())
        return out

    def observe_draft(self, draft_idx: int, topk_ids: torch.Tensor) -> None:
        if self.engine is None or self.signal_source != "draft+verify":
            return
        L, Ld = len(self.layers), len(self.draft_layers)
        # Draft layer i speaks for target layer round(i * (L-1) / (Ld-1)): the identity when
        # the draft has as many MoE layers as the target ([I]: a depth-proportional map).
        layer = draft_idx if Ld == L else round(draft_idx * (L - 1) / max(1, Ld - 1))
        ids = topk_ids.detach().to("cpu", torch.int64).numpy()
        self.engine.observe_draft(layer, ids)
        if self._recorder is not None and Ld == L:
            self._draft_ids.setdefault(layer, []).append(ids)

    def stats(self) -> Any:
        return None if self.engine is None else self.engine.stats()

    def summary(self) -> dict[str, Any]:
        """Engine stats + what really ran where (for tests, the demo and benchmarks)."""
        s = self.stats()
        d = {} if s is None else s.as_dict()
        d["signal"] = self.signal_source
        d["cpu_pairs"] = sum(e.counters.cpu_pairs for e in self.experts.values())
        d["device_pairs"] = sum(e.counters.device_pairs for e in self.experts.values())
        d["fetches_run"] = sum(e.counters.fetches for e in self.experts.values())
        d["slots_per_layer"] = self.slots.num_slots(0) if self.store.layers else 0
        d["num_experts"] = self.dims.num_experts if self.dims else 0
        d["decode_steps"] = self.decode_steps
        return d

    def save_trace(self) -> str | None:
        if self._recorder is None or not self.config.stats.record_trace:
            return None
        if self._recorder.num_steps == 0:
            return None
        return str(self._recorder.save(self.config.stats.record_trace))

    def close(self) -> None:
        """End the open step, report, save the trace, close the stats file. Runs once (also at
        interpreter exit, so `moespac serve` and plain `vllm.LLM` users get their trace)."""
        if self._closed:
            return
        self._closed = True
        if self._open and self.engine is not None:
            self.end_step(0)
        if self.engine is not None:
            self.report()
        self.save_trace()
        if self._stats_writer is not None:
            self._stats_writer.close()
            self._stats_writer = None


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
    global _latest
    from moespac_vllm.patches.plugin import config_for

    config = config_for(vllm_config)
    device = torch.device(str(vllm_config.device_config.device)) if vllm_config is not None \
        else torch.device("cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    rt = OffloadRuntime(config, vllm_config, device)
    spec = getattr(vllm_config, "speculative_config", None)
    if spec is not None:
        rt.spec_method = str(spec.method)
        rt.num_spec_tokens = int(spec.num_speculative_tokens or 0)
    _runtimes[id(vllm_config)] = rt
    _latest = rt
    atexit.register(rt.close)
    return rt


def stats_line() -> str:
    """The plugin's statistics line (plugin.stats_line calls it)."""
    rt = _latest
    if rt is None or rt.engine is None:
        return "moespac: offloaded layer installed, no offloaded model has run in this process"
    from moespac_vllm.stats import format_log_line

    return f"{format_log_line(rt.engine.stats())}, signal: {rt.signal_source}"


# ---- the layer ----------------------------------------------------------------------------------
def _layer_number(layer_name: str) -> int | None:
    """N of `...layers.N...` (vLLM's layer naming), None if the prefix has no such part."""
    parts = layer_name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a in ("layers", "h", "blocks") and b.isdigit():
            return int(b)
    return None


def _role(layer_name: str) -> str:
    return "draft" if layer_name.startswith(DRAFT_PREFIX) else "target"


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
        self.name = f"{type(experts).__name__}, isa {getattr(experts, 'isa', '?')}"

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
        layer.moespac_runtime.weights_loaded(layer, kernel)

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
            if rt is None or rt.vllm_config is not vllm_config:  # ids are reused after GC
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
            self.moespac_index = rt.add_target_layer(self)
            self.moespac_key = f"{rt.serial}:{self.moespac_index}"
            _layers[self.moespac_key] = (weakref.ref(rt), self.moespac_index)
        elif rt is not None:
            self.moespac_index = rt.add_draft_layer(self)
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
    return rt.forward(idx, x, topk_weights, topk_ids)


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


def _ensure_ops() -> None:
    """Register both ops once per process, outside any traced code."""
    from vllm.utils.torch_utils import direct_register_custom_op

    with _lock:
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
        from moespac_vllm.patches import spec_hook

        spec_hook.install()
    _ensure_ops()


def unregister() -> None:
    """Remove the OOT class (tests that build a stock engine in the same process)."""
    from vllm.model_executor.custom_op import op_registry_oot

    with _lock:
        if op_registry_oot.get(OOT_NAME) is OffloadedRoutedExperts:
            del op_registry_oot[OOT_NAME]


__all__ = [
    "OffloadRuntime",
    "OffloadedRoutedExperts",
    "check_cudagraph_mode",
    "check_supported",
    "latest_runtime",
    "register",
    "runtime_of_model",
    "stats_line",
    "unregister",
]
