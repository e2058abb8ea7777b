"""Prometheus metrics of the offloaded experts, for vLLM's existing `/metrics` endpoint.

Input: cumulative `EngineStats` snapshots (plus the runtime's pair counts), the same values the
stats line and `stats_file` report; output: `moespac_*` series on a prometheus_client registry.
Nothing is created until a `MetricsExporter` is built, so a process where the plugin is not enabled
exports no `moespac_` series.

Process layout. The statistics live in the process that runs the model (vLLM's engine core, or a
worker), while `/metrics` is served by the API-server process. The bridge is prometheus_client's
multiprocess mode, which vLLM itself uses for its API servers (`vllm.v1.metrics.prometheus`): when
`PROMETHEUS_MULTIPROC_DIR` is set before prometheus_client is imported, every process writes its
series to memory-mapped files in that directory and vLLM's `/metrics` (its
`get_prometheus_registry()`) serves a `MultiProcessCollector` over the directory. `moespac serve`
sets the variable for the processes it starts; without it (offline `LLM`, or a server started
without the variable) the series live in the model process's default registry and cost nothing.

Series (label `model_name`, vLLM's convention; no per-layer labels: 48 layers x 15 series would
multiply the cardinality for little operational value):
- counters: `moespac_expert_hits_total`, `moespac_expert_misses_total`,
  `moespac_experts_fetched_total`, `moespac_device_experts_total`, `moespac_cpu_experts_total`
  ((layer, expert) pairs computed on the CPU), `moespac_cpu_expert_pairs_total` ((token, expert)
  pairs computed on the CPU), `moespac_h2d_bytes_total`, `moespac_prefetch_{issued,used,wasted,
  late}_total`, `moespac_stall_seconds_total`, `moespac_cpu_expert_seconds_total`,
  `moespac_host_fused_expert_seconds_total` (CPU-only engines), `moespac_steps_total`;
- gauges: `moespac_slots_per_layer`, `moespac_cache_ratio`, `moespac_cost_profile_info{profile}`
  (= 1; an info metric emulated as a gauge, as vLLM does, since multiprocess mode has no Info);
- speculative decoding (governor.py): counter `moespac_draft_steps_total{k}` (steps drafted at
  length k: the stats' `draft_len_hist`; k is at most num_speculative_tokens, so the labels stay
  few) and gauge `moespac_draft_acceptance` (the per-draft-token acceptance estimate), both only
  once a draft was chosen / verified.

Counters only ever increase: each update adds the difference to the previous snapshot, so after an
update the counter equals the snapshot's total (what the stats file's line of the same step says).
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Any

from moespac_vllm.stats import EngineStats

PREFIX = "moespac_"


@dataclass(frozen=True, slots=True)
class CounterSpec:
    name: str  # without the `_total` suffix prometheus_client appends
    source: str  # EngineStats field, or a key of the runtime's extra counts
    scale: float  # multiply the source by this (ms -> s)
    doc: str


COUNTERS: tuple[CounterSpec, ...] = (
    CounterSpec("expert_hits", "hits", 1.0,
                "Routed (layer, expert) pairs whose expert was resident when the layer ran"),
    CounterSpec("expert_misses", "misses", 1.0,
                "Routed (layer, expert) pairs whose expert was not resident when the layer ran"),
    CounterSpec("experts_fetched", "fetched_experts", 1.0,
                "Experts copied host->device on demand"),
    CounterSpec("device_experts", "device_experts", 1.0,
                "Routed (layer, expert) pairs computed on the device"),
    CounterSpec("cpu_experts", "cpu_experts", 1.0,
                "Routed (layer, expert) pairs computed on the CPU"),
    CounterSpec("cpu_expert_pairs", "cpu_pairs", 1.0,
                "Routed (token, expert) pairs computed on the CPU"),
    CounterSpec("h2d_bytes", "h2d_bytes", 1.0, "Expert bytes copied host->device"),
    CounterSpec("prefetch_issued", "prefetch_issued", 1.0, "Expert prefetches issued"),
    CounterSpec("prefetch_used", "prefetch_used", 1.0,
                "Prefetched experts routed before eviction"),
    CounterSpec("prefetch_wasted", "prefetch_wasted", 1.0,
                "Prefetched experts evicted or cancelled unused"),
    CounterSpec("prefetch_late", "prefetch_late", 1.0,
                "Prefetched experts still loading when their layer ran"),
    CounterSpec("stall_seconds", "stall_ms", 1e-3, "Time the device branch waited for copies"),
    CounterSpec("cpu_expert_seconds", "cpu_ms", 1e-3, "Busy time of the CPU expert branch"),
    CounterSpec("host_fused_expert_seconds", "host_fused_ms", 1e-3,
                "Time of the host-fused expert calls (CPU-only engines: device-slot and CPU "
                "pairs in one host call)"),
    CounterSpec("steps", "steps", 1.0, "Engine steps seen by the offloaded experts"),
)

_families_lock = threading.Lock()
# registry -> its metric families, built once; weak keys, since an id() outlives its object
# (a later registry at a freed one's address would get families registered on the dead one)
_families: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _build_families(registry: Any) -> dict[str, Any]:
    from prometheus_client import Counter, Gauge

    fam: dict[str, Any] = {}
    for c in COUNTERS:
        fam[c.name] = Counter(PREFIX + c.name, c.doc, ["model_name"], registry=registry)
    fam["slots_per_layer"] = Gauge(PREFIX + "slots_per_layer", "Device expert slots per MoE layer",
                                   ["model_name"], registry=registry,
                                   multiprocess_mode="mostrecent")
    fam["cache_ratio"] = Gauge(PREFIX + "cache_ratio",
                               "Device expert slots per layer as a share of the layer's experts",
                               ["model_name"], registry=registry, multiprocess_mode="mostrecent")
    fam["cost_profile_info"] = Gauge(PREFIX + "cost_profile_info",
                                     "The cost profile in force (value 1)",
                                     ["model_name", "profile"], registry=registry,
                                     multiprocess_mode="mostrecent")
    fam["draft_steps"] = Counter(PREFIX + "draft_steps",
                                 "Speculative steps per draft length k chosen by the governor",
                                 ["model_name", "k"], registry=registry)
    fam["draft_acceptance"] = Gauge(PREFIX + "draft_acceptance",
                                    "Per-draft-token acceptance estimate of the draft-length "
                                    "governor", ["model_name"], registry=registry,
                                    multiprocess_mode="mostrecent")
    return fam


def families(registry: Any = None) -> dict[str, Any]:
    """The `moespac_*` metric families on `registry` (prometheus_client's default one if None),
    created at the first call for that registry."""
    if registry is None:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    with _families_lock:
        fam = _families.get(registry)
        if fam is None:
            fam = _families[registry] = _build_families(registry)
        return fam


class MetricsExporter:
    """Turns cumulative stats snapshots of one model into `moespac_*` series."""

    def __init__(self, model_name: str, registry: Any = None) -> None:
        if not model_name:
            raise ValueError("model_name: must be a non-empty string")
        self.model_name = model_name
        self._fam = families(registry)
        self._last: dict[str, float] = {c.name: 0.0 for c in COUNTERS}
        self._last_k: dict[int, int] = {}  # draft_len_hist totals exported so far
        for c in COUNTERS:  # every series exists from the start, at 0, not at its first event
            self._fam[c.name].labels(model_name)
        self._lock = threading.Lock()

    def set_config(self, slots_per_layer: int, num_experts: int, profile: str) -> None:
        """Gauges of the configuration in force (call once the layer sizes are known)."""
        if num_experts <= 0:
            raise ValueError(f"num_experts: must be > 0, got {num_experts}")
        self._fam["slots_per_layer"].labels(self.model_name).set(slots_per_layer)
        self._fam["cache_ratio"].labels(self.model_name).set(slots_per_layer / num_experts)
        self._fam["cost_profile_info"].labels(self.model_name, profile).set(1)

    def update(self, stats: EngineStats, extra: dict[str, float] | None = None) -> None:
        """Advance every counter to the totals in `stats` (and `extra`, e.g. `cpu_pairs`)."""
        values = stats.as_dict()
        if extra:
            values.update(extra)
        with self._lock:
            for c in COUNTERS:
                if c.source not in values:
                    continue
                total = float(values[c.source]) * c.scale
                delta = total - self._last[c.name]
                if delta > 0:
                    self._fam[c.name].labels(self.model_name).inc(delta)
                    self._last[c.name] = total
            for k, n in stats.draft_len_hist.items():
                delta = n - self._last_k.get(k, 0)
                if delta > 0:
                    self._fam["draft_steps"].labels(self.model_name, str(k)).inc(delta)
                    self._last_k[k] = n
            if stats.draft_acceptance is not None:
                self._fam["draft_acceptance"].labels(self.model_name).set(stats.draft_acceptance)


__all__ = ["COUNTERS", "CounterSpec", "MetricsExporter", "PREFIX", "families"]
