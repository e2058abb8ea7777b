"""The offload runtime: everything one offloaded target model shares across its MoE layers.

One runtime, two drivers. The vLLM glue (`patches/routed_experts.py`) translates vLLM's layers,
config and step hooks into the calls below; the GPU harness (`benchmarks/bench_gpu_decode.py`)
makes the same calls while replaying a trace. Both therefore run the same store, slots, mover,
engine, CPU expert pool and `OffloadedExperts` layers, so a harness run measures what vLLM runs.
No vLLM here.

Lifecycle (shapes: T tokens, K top-k, H hidden, E experts, I expert intermediate):

    rt = OffloadRuntime(config, device)                     # costs, CPU pool, kernel: optional
    i = rt.add_target_layer(name, num_experts=E, top_k=K, model_layer=N)   # in model order
    rt.add_draft_layer(name, num_experts=E_draft)           # a draft model's MoE layers (signal)
    w13, w2 = rt.weights_loaded(i, w13 [E,2I,H], w2 [E,H,I])   # into the store; slots allocated
    rt.begin_step(StepContext, explicit=True)               # builds the engine at the first step
    y [T,H] = rt.forward(i, x [T,H], topk_weights [T,K], topk_ids [T,K])   # every MoE layer
    #   recording a trace (rt.records_lookahead): also lookahead_logits [T,E] = layer i+1's
    #   router logits on this x, recorded as the trace's lookahead_ids of layer i+1
    rt.end_step(num_accepted); rt.mark_draft_phase(); rt.observe_draft(j, draft_ids [T,K])
    rt.close()                                              # final report, trace, stats file

The engine is built when the first step begins and every layer's weights are in (the model's MoE
layer count and dims are known only then). A forward outside an open step (profiling, warm-up,
dummy runs) or a second forward of a layer inside one step opens an implicit step of its own.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from moespac_vllm.config import EstimatorSource, MoESpacConfig
from moespac_vllm.cost_model import ExpertCosts
from moespac_vllm.engine import ExpertEngine
from moespac_vllm.governor import DraftGovernor
from moespac_vllm.kernels.cpu_experts import CpuExpertPool
from moespac_vllm.metrics import MetricsExporter
from moespac_vllm.mover import CudaStreamMover, FaultTolerantMover, Mover, SyncMover
from moespac_vllm.offload import (
    CpuExperts,
    ExpertStore,
    HostFusedKernel,
    OffloadedExperts,
    SlotCache,
)
from moespac_vllm.staging import Staging
from moespac_vllm.streaming import PrefillStreamer
from moespac_vllm.stats import EngineStats, StatsWriter, format_log_line
from moespac_vllm.step_context import Phase, StepBoard, StepContext
from moespac_vllm.trace import ModelDims, StepKind, TraceRecorder

logger = logging.getLogger("moespac_vllm.layer")


def default_costs(config: MoESpacConfig, dims: ModelDims,
                  device: torch.device | None = None) -> tuple[ExpertCosts, str]:
    """The expert costs the balancer uses and the label of the profile in force. A configured
    profile (`profile`: a name or a calibrated JSON) is resolved by `cost_model.get_profile` (an
    unknown one raises ValueError naming the field); `auto` (the default) is measured on this
    machine at the model's dims, or read from the per-machine cache (`startup_profile`). Without
    a `device` (drivers that only want the arithmetic) `auto` is the built-in estimate, so
    labelled."""
    if config.profile != "auto" or device is not None:
        from moespac_vllm import startup_profile

        kind = "cuda" if device is not None and device.type == "cuda" else "cpu"
        name = torch.cuda.get_device_name(device) if kind == "cuda" else "cpu"
        profile, label = startup_profile.resolve(config.profile, dims, device=kind,
                                                 device_name=name)
        return profile.expert_costs(dims), label if config.profile == "auto" else profile.name
    b = dims.expert_bytes
    f = dims.expert_flops_per_token
    # PCIe 5 x16 ~25 GB/s effective; device ~2 TB/s, 400 TFLOP/s; CPU ~50 GB/s, 1 TFLOP/s.
    return ExpertCosts(gpu_fixed_ms=b / 2e12 * 1e3, gpu_per_token_ms=f / 4e14 * 1e3,
                       cpu_fixed_ms=b / 5e10 * 1e3, cpu_per_token_ms=f / 1e12 * 1e3,
                       fetch_ms=b / 2.5e10 * 1e3), "builtin-estimate"


# Sizing by device memory (cache_ratio and gpu_expert_budget_gb unset, a driver that can say what
# the device has): the slots get this share of what the engine's memory budget leaves after the
# weights; the rest stays for the KV cache and activations.
KV_RESERVE_FRACTION = 0.5

# Warm-up / profiling / dummy runs make a few forwards before the first scheduled step; this many
# in a row without a step boundary means the driver's hooks are not firing.
NO_BOUNDARY_WARN_STEPS = 64
# record_trace is checkpointed (atomically) at the first complete step, then at intervals doubling
# from TRACE_FIRST_CHECKPOINT_S up to TRACE_CHECKPOINT_S, never more often than ten times the last
# save took: vLLM force-kills its workers at shutdown (no atexit runs there), so a run keeps its
# trace up to about the last interval, for <= 10% of time. (A short clean run lost its whole trace
# with one fixed 10 s interval: tests/test_soak.py on a quiet machine.)
TRACE_CHECKPOINT_S = 10.0
TRACE_FIRST_CHECKPOINT_S = 1.0
# /metrics is refreshed at every report and, between reports, at most this often (s): a scrape
# then lags the engine by about a second at most, for one stats() snapshot per second.
METRICS_REFRESH_S = 1.0


class MonotonicClock:
    """The engine's Clock on the host's monotonic timer."""

    def now_ms(self) -> float:
        return time.perf_counter() * 1e3


class OffloadRuntime:
    """One offloaded target model: config, store, slots, mover, engine, CPU expert pool, stats,
    trace recorder and the step boundaries (lifecycle in the module docstring).

    Optional, for drivers that choose them (the GPU harness): `costs` (+ `costs_label`) instead of
    `default_costs`, the `cpu_experts` path (default: a worker thread beside a CUDA device, inline
    on a CPU), the `device_kernel` of every layer. `owner` is the object the runtime serves (the
    glue: its VllmConfig), kept only so that a registry keyed by id() can tell reused ids apart.
    `model_name` goes into the recorded trace's notes.

    `device_memory() -> (free_bytes, total_bytes)` of the device and `memory_share` (the share of
    it the engine may use, vLLM's gpu_memory_utilization) let the runtime size the slots when
    neither `cache_ratio` nor `gpu_expert_budget_gb` is set (KV_RESERVE_FRACTION of what is left
    after the weights stays for the KV cache), and check any budget leaves KV cache at all.
    `mover(store, slots) -> Mover` replaces the default copy engine (tests inject faults so);
    whichever runs is wrapped in `mover.FaultTolerantMover`."""

    _serials = iter(range(1 << 62))

    def __init__(self, config: MoESpacConfig, device: torch.device | str, *,
                 costs: ExpertCosts | None = None, costs_label: str = "given",
                 cpu_experts: CpuExperts | None = None,
                 device_kernel: Callable[..., torch.Tensor] | None = None,
                 model_name: str = "", owner: object | None = None,
                 device_memory: Callable[[], tuple[int, int]] | None = None,
                 memory_share: float = 1.0, metrics: MetricsExporter | None = None,
                 mover: Callable[[ExpertStore, SlotCache], Mover] | None = None) -> None:
        if not isinstance(config, MoESpacConfig):
            raise ValueError(f"config: expected MoESpacConfig, got {type(config).__name__}")
        if costs is not None and not isinstance(costs, ExpertCosts):
            raise ValueError(f"costs: expected ExpertCosts, got {type(costs).__name__}")
        self.serial = next(OffloadRuntime._serials)
        self.config = config
        self.device = torch.device(device)
        self.owner = owner
        self.model_name = model_name
        self.store = ExpertStore(pin_memory=self.device.type == "cuda")
        self.slots = SlotCache(self.device)
        self.layer_names: list[str] = []  # target MoE layers, in model order
        self.model_layers: list[int | None] = []  # their transformer index, where known
        self.top_k: list[int] = []
        self.num_experts: list[int] = []
        self.draft_layer_names: list[str] = []
        self.draft_num_experts: list[int] = []
        self.board = StepBoard()
        self.engine: ExpertEngine | None = None
        self.mover: Mover | None = None
        self.experts: dict[int, OffloadedExperts] = {}
        self.streamer: PrefillStreamer | None = None  # built with the layers
        self.staging = Staging(self.device)  # every layer's host <-> device crossings
        # the draft signal's readback: per draft token and layer ('immediate', a CPU device,
        # where it costs nothing) or once per draft phase ('per-phase', CUDA: `flush_draft`)
        self.draft_readback = "per-phase" if self.device.type == "cuda" else "immediate"
        self._draft_dev: dict[int, list[torch.Tensor]] = {}
        self.draft_reads = 0
        self.host_kernels: dict[int, HostFusedKernel] = {}
        self.host_kernel_name = ""
        self.dims: ModelDims | None = None
        self._costs = costs
        self.costs_label = costs_label if costs is not None else ""
        self._cpu_experts = cpu_experts
        self._own_pool: CpuExpertPool | None = None
        self._device_kernel = device_kernel
        self._device_memory = device_memory
        self._memory_share = float(memory_share)
        if metrics is not None and not isinstance(metrics, MetricsExporter):
            raise ValueError(f"metrics: expected MetricsExporter, got {type(metrics).__name__}")
        self.metrics = metrics  # `moespac_*` Prometheus series, advanced at every report
        self._metrics_at = 0.0
        self.sizing = ""  # what the device-memory sizing decided (offloading line)
        self.spec_method: str | None = None
        self.num_spec_tokens = 0
        # the draft-length governor, set by the glue when the runner drafts (patches/spec_hook)
        self.governor: DraftGovernor | None = None
        self._step = 0
        self._open = False  # a step is open on the engine
        self._explicit = False  # opened by the driver's step hook (not an implicit dummy run)
        self._planned: set[int] = set()
        self._draft_ids: dict[int, list[np.ndarray]] = {}
        self._stats_writer: StatsWriter | None = None
        self._recorder: TraceRecorder | None = None
        self._steps_since_log = 0
        self.decode_steps = 0
        self._implicit_steps = 0  # implicit steps since the driver's last step boundary
        self._boundary_warned = False
        self._closed = False
        self._trace_due = 0.0  # next record_trace checkpoint: the first complete step
        self._trace_interval_s = TRACE_FIRST_CHECKPOINT_S
        self._trace_warned = False
        self._mover_factory = mover
        self.lock = threading.Lock()

    # ---- construction -------------------------------------------------------------------------
    def add_target_layer(self, name: str, *, num_experts: int, top_k: int,
                         model_layer: int | None = None) -> int:
        """Register the next MoE layer of the model; returns its MoE index (its rank among the
        model's MoE layers). Layers come in model order; `model_layer` (the transformer index,
        where the driver knows it) checks that order (dense layers in between are fine)."""
        if self.engine is not None:
            raise RuntimeError("moespac: a MoE layer was built after the model started running")
        prev = self.model_layers[-1] if self.model_layers else None
        if model_layer is not None and prev is not None and model_layer <= prev:
            raise RuntimeError(f"moespac: MoE layer {name} was built after layer "
                               f"{self.layer_names[-1]}; the engine needs model order")
        for field_name, v in (("num_experts", num_experts), ("top_k", top_k)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{field_name}: must be a positive integer, got {v!r}")
        self.layer_names.append(name)
        self.model_layers.append(model_layer)
        self.num_experts.append(num_experts)
        self.top_k.append(top_k)
        return len(self.layer_names) - 1

    def add_draft_layer(self, name: str, *, num_experts: int) -> int:
        """Register a draft model's MoE layer (its routing can be the speculative signal)."""
        self.draft_layer_names.append(name)
        self.draft_num_experts.append(int(num_experts))
        return len(self.draft_layer_names) - 1

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    def weights_loaded(self, idx: int, w13: torch.Tensor, w2: torch.Tensor,
                       host_kernel: HostFusedKernel | None = None, host_kernel_name: str = ""
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hand layer `idx`'s host weights (w13 [E,2I,H], w2 [E,H,I]) to the store and allocate its
        device slots. With `host_kernel` (a CPU-only engine's host-fused kernel) the weights may
        come in the kernel's packed layout and the slots are the store's spare rows (offload.py's
        host-fused mode). Returns the store's (w13, w2): the store may have copied them (pinned /
        spare rows), so the caller should point its parameters at them and free the originals."""
        if not 0 <= idx < self.num_layers:
            raise ValueError(f"idx: {idx} is not a registered MoE layer (0..{self.num_layers - 1})")
        E = w13.shape[0]
        expert_bytes = (w13[0].numel() * w13.element_size()) + (w2[0].numel() * w2.element_size())
        num_slots = self.config.cache.slots_per_layer(E, max(1, self.num_layers), expert_bytes)
        if host_kernel is not None:
            self.store.add_layer(idx, w13, w2, spare_rows=num_slots)
            self.slots.attach_layer(idx, *self.store.spare(idx))
            self.host_kernels[idx] = host_kernel
            self.host_kernel_name = host_kernel_name or type(host_kernel).__name__
        else:
            self.store.add_layer(idx, w13, w2)
            if not self.sized_by_device:  # else build() allocates them, every weight loaded
                self.slots.add_layer(idx, num_slots, self.store.w13(idx), self.store.w2(idx))
        return self.store.w13(idx), self.store.w2(idx)

    @property
    def sized_by_device(self) -> bool:
        """Slots sized from device memory at build: no cache_ratio, no byte budget, no host-fused
        layers, and a driver that reports device memory."""
        cache = self.config.cache
        return (self._device_memory is not None and not self.host_kernels
                and cache.cache_ratio is None and cache.gpu_expert_budget_gb is None)

    def _size_slots(self) -> None:
        """Device-memory sizing (see `sized_by_device`), or the check that the configured slots
        leave KV cache. Raises ValueError with the numbers (MB, 1 decimal) when the budget holds
        no slot or leaves no KV cache."""
        if self._device_memory is None or self.host_kernels:
            return
        free, total = (int(v) for v in self._device_memory())
        used = total - free
        left = self._memory_share * total - used
        eb, L, E = self.store.expert_bytes(0), self.num_layers, self.store.num_experts(0)
        where = (f"{left / 1e6:.1f} MB left on {self.device} (memory share "
                 f"{self._memory_share:g} x {total / 1e6:.1f} MB - {used / 1e6:.1f} MB in use)")
        if self.sized_by_device:
            budget = max(0.0, left) * (1.0 - KV_RESERVE_FRACTION)
            per_layer = int(budget // (eb * L))
            if per_layer < 1:
                raise ValueError(
                    f"cache_ratio: unset, and {where} less a {KV_RESERVE_FRACTION:.0%} KV-cache "
                    f"reserve ({budget / 1e6:.1f} MB) holds no expert slot ({L} layers x "
                    f"{eb / 1e6:.1f} MB = {L * eb / 1e6:.1f} MB per slot); set cache_ratio or "
                    "gpu_expert_budget_gb, or give the engine more device memory")
            S = min(E, per_layer)
            for i in range(L):
                self.slots.add_layer(i, S, self.store.w13(i), self.store.w2(i))
            self.sizing = (f"sized by device memory: {where}; slots {S * L * eb / 1e6:.1f} MB, "
                           f"{KV_RESERVE_FRACTION:.0%} of it kept for the KV cache")
            return
        slot_bytes = self.slots.total_bytes  # already allocated: `used` includes them
        field = ("gpu_expert_budget_gb" if self.config.cache.gpu_expert_budget_gb is not None
                 else "cache_ratio")
        if left <= 0:
            raise ValueError(f"{field}: {slot_bytes / 1e6:.1f} MB of expert slots leave no KV "
                             f"cache: {where}")
        self.sizing = f"KV cache and activations keep {where}"

    @property
    def ready(self) -> bool:
        """Every registered layer has its weights (the engine can be built)."""
        return self.num_layers > 0 and len(self.store.layers) >= self.num_layers

    def build(self) -> None:
        """Build the mover, the engine and the layers (once; `begin_step` calls it lazily)."""
        if self.engine is not None:
            return
        missing = [i for i in range(self.num_layers) if i not in self.store.layers]
        if not self.layer_names or missing:
            raise RuntimeError(f"moespac: MoE layers {missing[:4]} ran before their weights were "
                               "loaded")
        self._size_slots()
        w13 = self.store.w13(0)
        E, two_i, H = w13.shape
        self.dims = ModelDims(num_layers=self.num_layers, num_experts=E, top_k=self.top_k[0],
                              hidden_size=H, intermediate_size=two_i // 2,
                              dtype_bytes=w13.element_size())
        if self._costs is not None:
            costs = self._costs
        else:
            costs, self.costs_label = default_costs(self.config, self.dims, self.device)
        if self._mover_factory is not None:
            inner = self._mover_factory(self.store, self.slots)
        elif self.device.type == "cuda":
            inner = CudaStreamMover(self.store, self.slots)
        else:
            inner = SyncMover(self.store, self.slots)
        # a failed copy is a slot not ready (fetched again or computed on the CPU), never a
        # wrong expert or an exception out of a step
        self.mover = FaultTolerantMover(inner)
        num_slots = self.slots.num_slots(0)
        # The runtime reports (log line + stats_file), not the engine: it also knows the signal
        # source and what really ran where. So the engine gets no stats file and no interval.
        engine_config = self.config.replace(stats_file=None, stats_interval_steps=1 << 62)
        self.engine = ExpertEngine(engine_config, self.dims, costs, self.mover, MonotonicClock(),
                                   num_slots=num_slots)
        warm = self.engine.load_full_layers()  # everything fits: load it all now
        if warm:
            logger.info("moespac: all %d experts of every MoE layer fit; %d copied in at start",
                        E, warm)
        cpu_pool = self._cpu_experts
        if cpu_pool is None and self.device.type == "cuda":
            cpu_pool = self._own_pool = CpuExpertPool(self.config.cpu_threads)  # native kernel
        # prefill / large steps stream CPU-planned experts (not in host-fused mode: there the
        # host is the device)
        self.streamer = None if self.host_kernels else PrefillStreamer(
            self.device, costs, staging=self.staging)
        for i in range(self.num_layers):
            self.experts[i] = OffloadedExperts(self.store, self.engine, i, self.device, self.slots,
                                               self.mover, cpu_experts=cpu_pool,
                                               device_kernel=self._device_kernel,
                                               host_fused=self.host_kernels.get(i),
                                               staging=self.staging, streamer=self.streamer)
        st = self.config.stats
        if st.stats_file:
            try:
                self._stats_writer = StatsWriter(st.stats_file)
            except OSError as e:
                logger.warning("moespac: stats_file %s cannot be opened (%s); serving without "
                               "it", st.stats_file, e)
        if st.record_trace:
            self._recorder = TraceRecorder(self.dims, source="vllm", notes={
                "model": self.model_name, "spec_method": self.spec_method or "none",
                "num_spec_tokens": self.num_spec_tokens})
        if self.metrics is not None:
            self.metrics.set_config(num_slots, E, self.costs_label)
        logger.info("moespac: MoE layers (transformer index): %s", self.model_layers)
        logger.info("%s", self.offloading_line())

    def offloading_line(self) -> str:
        """The one `moespac: offloading ...` line: what is in force (after build)."""
        assert self.dims is not None
        E, S = self.dims.num_experts, self.slots.num_slots(0)
        cache = self.config.cache
        if self.sized_by_device:
            budget = "cache_ratio unset, sized by device memory"
        elif cache.gpu_expert_budget_gb is not None:
            budget = f"gpu_expert_budget_gb {cache.gpu_expert_budget_gb}"
        else:
            budget = (f"cache_ratio {cache.effective_ratio:g}"
                      + ("" if cache.cache_ratio is not None else " (default)"))
        return (f"moespac: offloading {self.dims.num_layers} MoE layers x {E} experts "
                f"({self.dims.expert_bytes / 1e6:.1f} MB/expert): {budget} -> {S} slots/layer "
                f"({S / E:.2f} of E; {self.slots.total_bytes / 1e6:.1f} MB on {self.device}), "
                f"host store {self.store.total_bytes / 1e6:.1f} MB, policy "
                f"{self.config.policy.value}, cost profile {self.costs_label}, signal "
                f"{self.signal_source}, experts run by {self.compute_path}"
                + (f"; {self.sizing}" if self.sizing else ""))

    @property
    def compute_path(self) -> str:
        """What computes the experts: a host-fused kernel over [store | slot] rows (CPU-only
        engines: stock vLLM's CPU experts), or moespac's slot-cache kernel + CPU experts."""
        if self.host_kernels and len(self.host_kernels) == self.num_layers:
            return f"stock CPU experts ({self.host_kernel_name}, host-fused)"
        return "moespac kernels (slot cache + CPU experts)"

    # ---- the signal in use ----------------------------------------------------------------------
    @property
    def draft_has_routers(self) -> bool:
        if not self.draft_num_experts or not self.num_experts:
            return False
        return self.draft_num_experts[0] == self.num_experts[0]

    @property
    def signal_source(self) -> str:
        src = self.config.estimator.source
        if self.spec_method is None or src is EstimatorSource.AUTOREGRESSIVE:
            return "autoregressive"
        if self.draft_has_routers and src in (EstimatorSource.AUTO, EstimatorSource.DRAFT):
            return "draft+verify"
        return "verify"

    # ---- steps ---------------------------------------------------------------------------------
    @property
    def step_open(self) -> bool:
        """A step is open on the engine (between `begin_step` and `end_step`)."""
        return self._open

    def begin_step(self, ctx: StepContext, explicit: bool) -> None:
        with self.lock:
            if self.engine is None:
                if not self.ready:
                    return
                self.build()
            if self._open:
                self._end_locked(0)
            self.flush_draft()
            self.engine.begin_step(ctx)
            self.board.publish(ctx)
            if self._recorder is not None and ctx.phase is not Phase.DRAFT:
                kind = {Phase.DECODE: StepKind.DECODE, Phase.VERIFY: StepKind.VERIFY}.get(
                    ctx.phase, StepKind.PREFILL)
                for layer, parts in self._draft_ids.items():
                    self._recorder.record_draft_layer(layer, np.concatenate(parts))
                self._recorder.begin_step(kind)
            self._draft_ids = {}
            self._open, self._explicit = True, explicit
            self._planned = set()
            if explicit:
                self._implicit_steps = 0
            else:
                self._implicit_steps += 1
                if self._implicit_steps >= NO_BOUNDARY_WARN_STEPS and not self._boundary_warned:
                    self._boundary_warned = True
                    logger.warning(
                        "moespac: %d forwards of the model without a step boundary from the "
                        "runner: the speculative signal (verify windows, accepted tokens, draft "
                        "phase) is lost and every forward is planned as its own step; is this "
                        "vLLM runner hooked (patches/spec_hook.py)?", self._implicit_steps)

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
            if len(self._planned) == self.num_layers:
                self._recorder.end_step(num_accepted)
                if time.monotonic() >= self._trace_due:
                    self.save_trace()
            else:  # an aborted forward: drop it rather than write a partial step
                self._recorder.abort_step()
        self.flush_draft()
        self.staging.settle()  # the step's one wait: resident layers' ids for the books
        self.engine.end_step(int(num_accepted))
        if ctx is not None and ctx.phase in (Phase.DECODE, Phase.VERIFY):
            self.decode_steps += 1
            self._steps_since_log += 1
            if self._steps_since_log >= self.config.stats.stats_interval_steps:
                self._steps_since_log = 0
                self.report()
            elif self.metrics is not None and \
                    time.monotonic() - self._metrics_at >= METRICS_REFRESH_S:
                self._refresh_metrics()

    def report(self) -> None:
        """The stats line, the stats file's line and the Prometheus series, from one snapshot
        (so /metrics equals the stats file's latest totals)."""
        s = self.stats()
        logger.info("%s, signal: %s", format_log_line(s), self.signal_source)
        cpu_pairs = sum(e.counters.cpu_pairs for e in self.experts.values())
        if self._stats_writer is not None:
            self._stats_writer.write(s, signal=self.signal_source, policy=self.config.policy.value,
                                     cpu_pairs=cpu_pairs,
                                     device_pairs=sum(e.counters.device_pairs
                                                      for e in self.experts.values()))
        if self.metrics is not None:
            self.metrics.update(s, {"cpu_pairs": cpu_pairs})
            self._metrics_at = time.monotonic()

    def _refresh_metrics(self) -> None:
        """Between reports (every `stats_interval_steps`), keep /metrics at most
        METRICS_REFRESH_S behind: a scrape should not wait 50 steps."""
        assert self.metrics is not None
        self.metrics.update(self.stats(), {"cpu_pairs": sum(e.counters.cpu_pairs
                                                            for e in self.experts.values())})
        self._metrics_at = time.monotonic()

    def mark_draft_phase(self) -> None:
        """The drafter is about to run: publish a DRAFT context (layers and stats read it)."""
        ctx = self.board.current()
        if ctx is not None and ctx.phase is not Phase.DRAFT:
            self.board.publish(StepContext(ctx.step, Phase.DRAFT, 0, (), ctx.num_draft_tokens))

    # ---- draft length (governor.py; the glue measures, the governor decides) --------------------
    def choose_draft_tokens(self, num_requests: int, k_limit: int) -> int:
        """k for the draft about to run (`k_limit` without a governor or before the engine)."""
        with self.lock:
            if self.governor is None:
                return k_limit
            return self.governor.choose(self.engine, num_requests, k_limit)

    def observe_drafts(self, drafts: list[tuple[int, int]]) -> None:
        """Verified drafts, one (proposed, accepted) per request."""
        if self.governor is not None:
            with self.lock:
                for proposed, accepted in drafts:
                    self.governor.observe(proposed, accepted)

    def observe_draft_ms(self, passes: int, ms: float) -> None:
        if self.governor is not None:
            with self.lock:
                self.governor.observe_draft_ms(passes, ms)

    def observe_step_ms(self, num_tokens: int, ms: float) -> None:
        """A decode/verify step's wall ms up to its draft (after `end_step`)."""
        if self.governor is not None and self.engine is not None:
            with self.lock:
                self.governor.observe_step_ms(self.engine, num_tokens, ms)

    # ---- forwards ------------------------------------------------------------------------------
    @property
    def records_lookahead(self) -> bool:
        """Should the driver pass `forward` its `lookahead_logits`? Only while a trace is
        recorded (`record_trace`): the extra [T,H] x [H,E] GEMV per layer is paid for nothing
        else."""
        return bool(self.config.stats.record_trace)

    def forward(self, idx: int, x: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor,
                lookahead_logits: torch.Tensor | None = None) -> torch.Tensor:
        """MoE layer `idx`: x [T,H], the router's topk_weights / topk_ids [T,K] -> [T,H].

        `lookahead_logits` [T,E] (recording only, `records_lookahead`): layer idx+1's router
        logits on this x; their top-k is recorded as layer idx+1's lookahead. The top-k of the
        logits is the router's choice for routers whose scores are a monotone function of the
        logits (softmax / sigmoid top-k: Qwen3-MoE, Mixtral); the driver passes none otherwise.
        The routing used here (topk_ids) is never touched."""
        with self.lock:
            needs_step = not self._open or idx in self._planned
        if needs_step:
            # A forward outside the driver's step hook (profiling / dummy / warm-up run), or a
            # second forward inside one step: an implicit step of its own.
            T = int(x.shape[0])
            phase = Phase.DECODE if T == 1 else Phase.PREFILL
            self.begin_step(StepContext(self.next_step_index(), phase, T, (T,), 0),
                            explicit=False)
        self._planned.add(idx)
        out = self.experts[idx].forward(x, topk_ids, topk_weights)
        if self._recorder is not None and self._recorder.is_open:
            self._recorder.record_layer(idx, topk_ids.detach().to("cpu").numpy(),
                                        topk_weights.detach().to("cpu", torch.float32).numpy())
            if lookahead_logits is not None and idx + 1 < self.num_layers:
                ahead = lookahead_logits.detach().float().topk(self.top_k[idx + 1], dim=-1)
                self._recorder.record_lookahead(idx + 1, ahead.indices.to("cpu").numpy())
        return out

    def observe_draft(self, draft_idx: int, topk_ids: torch.Tensor) -> None:
        """A draft MoE layer's routing [T,K]: the draft signal, when that is the signal in use."""
        if self.engine is None or self.signal_source != "draft+verify":
            return
        L, Ld = self.num_layers, len(self.draft_layer_names)
        # Draft layer i speaks for target layer round(i * (L-1) / (Ld-1)): the identity when
        # the draft has as many MoE layers as the target ([I]: a depth-proportional map).
        layer = draft_idx if Ld == L else round(draft_idx * (L - 1) / max(1, Ld - 1))
        if self.draft_readback == "immediate":
            self._observe_draft_ids(layer, topk_ids.detach().to("cpu", torch.int64).numpy())
        else:  # kept on the device (a copy: the drafter may reuse its buffer), read per phase
            self._draft_dev.setdefault(layer, []).append(
                topk_ids.detach().to(torch.int64, copy=True))

    def _observe_draft_ids(self, layer: int, ids: np.ndarray) -> None:
        self.engine.observe_draft(layer, ids)
        if self._recorder is not None and len(self.draft_layer_names) == self.num_layers:
            self._draft_ids.setdefault(layer, []).append(ids)

    def flush_draft(self) -> None:
        """The draft phase's routing kept on the device (`draft_readback` 'per-phase'): ONE
        non-blocking readback of every layer's ids [W,K] and one wait (`draft_reads`), then one
        `engine.observe_draft` per layer with all W draft tokens. Called at both step boundaries
        (before the engine ends or begins a step), so the engine sees the draft in the same
        interval as with 'immediate' readback."""
        if not self._draft_dev:
            return
        pending, self._draft_dev = self._draft_dev, {}
        layers = sorted(pending)
        hosts, ev = self.staging.to_host(*(torch.cat(pending[layer]) for layer in layers))
        ev.synchronize()
        self.draft_reads += 1
        for layer, ids in zip(layers, hosts):
            self._observe_draft_ids(layer, ids.numpy())

    # ---- results -------------------------------------------------------------------------------
    def stats(self) -> EngineStats | None:
        """The engine's statistics, times named for what was measured: on a host-fused engine
        (CPU-only vLLM) one host call computes device-slot and CPU pairs together, and the layer
        reports that call's time through the device branch; it is `host_fused_ms` here."""
        if self.engine is None:
            return None
        s = self.engine.stats()
        if self.host_kernels and len(self.host_kernels) == self.num_layers:
            s = replace(s, host_fused_ms=s.gpu_ms + s.cpu_ms, gpu_ms=0.0, cpu_ms=0.0)
        if self.governor is not None:
            s = replace(s, draft_len_hist=self.governor.draft_len_hist(),
                        draft_acceptance=self.governor.acceptance_estimate())
        return s

    def summary(self) -> dict[str, Any]:
        """Engine stats + what really ran where (for tests, the demo and benchmarks)."""
        s = self.stats()
        d = {} if s is None else s.as_dict()
        d["signal"] = self.signal_source
        d["cpu_pairs"] = sum(e.counters.cpu_pairs for e in self.experts.values())
        d["device_pairs"] = sum(e.counters.device_pairs for e in self.experts.values())
        d["fetches_run"] = sum(e.counters.fetches for e in self.experts.values())
        d["slots_per_layer"] = self.slots.num_slots(0) if self.engine is not None or (
            self.store.layers and not self.sized_by_device) else 0
        d["num_experts"] = self.dims.num_experts if self.dims else 0
        d["decode_steps"] = self.decode_steps
        if self.governor is not None:
            d["verified_draft_hist"] = {str(k): v for k, v in
                                        self.governor.verified_len_hist().items()}
        return d

    def save_trace(self) -> str | None:
        """Write the recorded steps to `record_trace` (atomically: the file on disk is always a
        whole trace). A failure (full disk, removed directory) logs one warning and returns None;
        recording goes on and the next checkpoint tries again."""
        if self._recorder is None or not self.config.stats.record_trace:
            return None
        if self._recorder.num_steps == 0:
            return None
        t0 = time.monotonic()
        try:
            path = str(self._recorder.save(self.config.stats.record_trace))
        except OSError as e:
            if not self._trace_warned:
                self._trace_warned = True
                logger.warning("moespac: record_trace %s: save failed (%s); serving goes on, the "
                               "file keeps the last complete save (retried at each checkpoint)",
                               self.config.stats.record_trace, e)
            path = None
        took = time.monotonic() - t0
        self._trace_due = time.monotonic() + max(self._trace_interval_s, 10.0 * took)
        self._trace_interval_s = min(TRACE_CHECKPOINT_S, 2.0 * self._trace_interval_s)
        return path

    def close(self) -> None:
        """End the open step, report, save the trace, close the stats file and the CPU pool this
        runtime started. Runs once (the glue also runs it at interpreter exit)."""
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
        if self._own_pool is not None:
            self._own_pool.close()
            self._own_pool = None


__all__ = ["KV_RESERVE_FRACTION", "METRICS_REFRESH_S", "MonotonicClock", "NO_BOUNDARY_WARN_STEPS",
           "OffloadRuntime", "TRACE_CHECKPOINT_S", "TRACE_FIRST_CHECKPOINT_S", "default_costs"]
