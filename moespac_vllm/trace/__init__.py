"""Routing traces: per decoding step, per MoE layer, the experts every processed token routed to.

One package, one module per concern, the public API re-exported here (`from moespac_vllm.trace
import X` and `trace.X` both work):

    format      `ModelDims` (+ MIXTRAL_8X7B, QWEN3_30B_A3B), `StepKind`, `TraceMeta`, `TraceStep`,
                `Trace`: the flat CSR arrays (layout in its docstring), npz save / load
    recorder    `TraceRecorder`: streaming builder (the vLLM recorder, the GPU harness, readers)
    readers     `read_mixtral_jsonl` (the public Mixtral-8x7B routing JSONL of
                shared/data/mixtral-8x7b-routing), `load_trace` (auto-detects that or our npz)
    windows     `windows_from_autoregressive`: speculative verification windows from a plain
                decode trace, with an acceptance model
    statistics  `expert_shares`, `share_skew`, `independent_reuse`, `request_streams`,
                `reuse_curve`, `crosslayer_nmi`, `rank_pair_counts`
    synthetic   `synthetic_trace` (Qwen3-30B-A3B scale, calibrated on real statistics, labelled
                synthetic), its targets (`synthetic_targets`, `reuse_target`) and fit

Every trace carries `TraceMeta`; anything built from a synthetic or partly modelled trace must
report its label (`Trace.label`).
"""
from __future__ import annotations

from moespac_vllm.trace.format import (
    FORMAT_VERSION,
    MIXTRAL_8X7B,
    QWEN3_30B_A3B,
    ModelDims,
    StepKind,
    Trace,
    TraceMeta,
    TraceStep,
)
from moespac_vllm.trace.readers import load_trace, read_mixtral_jsonl
from moespac_vllm.trace.recorder import TraceRecorder
from moespac_vllm.trace.statistics import (
    crosslayer_nmi,
    expert_shares,
    independent_reuse,
    rank_pair_counts,
    request_streams,
    reuse_curve,
    share_skew,
)
from moespac_vllm.trace.synthetic import (
    SyntheticModel,
    SyntheticTargets,
    fit_synthetic,
    reuse_target,
    synthetic_targets,
    synthetic_trace,
)
from moespac_vllm.trace.windows import windows_from_autoregressive

__all__ = [
    "FORMAT_VERSION", "MIXTRAL_8X7B", "QWEN3_30B_A3B", "ModelDims", "StepKind", "SyntheticModel",
    "SyntheticTargets", "Trace", "TraceMeta", "TraceRecorder", "TraceStep", "crosslayer_nmi",
    "expert_shares", "fit_synthetic", "independent_reuse", "load_trace", "rank_pair_counts",
    "read_mixtral_jsonl", "request_streams", "reuse_curve", "reuse_target", "share_skew",
    "synthetic_targets", "synthetic_trace", "windows_from_autoregressive",
]
