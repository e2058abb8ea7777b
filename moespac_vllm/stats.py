"""Engine statistics: one value type, a vLLM-style log line, and a JSON-lines writer.

Counting units (all cumulative since the engine started):
- hits / misses: routed (layer, expert) pairs of a decode/verify forward whose expert was / was not
  READY in a device slot when `plan_layer` ran (an expert counts once per layer per forward, however
  many tokens route to it).
- fetched_experts: on-demand copies issued by `plan_layer`; device_experts / cpu_experts: routed
  (layer, expert) pairs computed on each side.
- prefetch_issued: copies issued ahead of need (between steps or at layer end). A prefetched copy
  is `used` when its expert is routed at that layer before it is evicted, `wasted` when it is
  evicted (or cancelled) unused. precision = used / (used + wasted); recall = used / (used +
  misses), i.e. the share of the demand not already resident that prefetching covered.
- h2d_bytes: host->device bytes (mover); stall_ms: time the device branch waited on copies;
  cpu_ms / gpu_ms: modelled (simulator) or measured busy time of each branch; host_fused_ms: on
  a CPU-only engine both branches run in ONE host call (stock vLLM's CPU experts over the store
  and slot rows), so that call's time is reported as what it is, not split into "GPU" and "CPU".
- draft_len_hist: speculative steps per draft length k the draft-length governor chose (k -> steps;
  `draft_length: fixed`: every step at vLLM's k); draft_acceptance: its per-draft-token acceptance
  estimate from the verified drafts (None before any, or without speculation). Filled by the
  runtime (governor.py), empty in the engine's own stats.

Ratios with nothing to count (no routed pair, nothing prefetched) are undefined: the properties
return 0.0 for numeric consumers, `as_dict` gives None and the log line prints `n/a`.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineStats:
    steps: int = 0
    tokens: int = 0  # tokens emitted (accepted + 1 per speculative step)
    hits: int = 0
    misses: int = 0
    fetched_experts: int = 0
    device_experts: int = 0
    cpu_experts: int = 0
    # planned for the CPU but run on the device from experts streamed through two buffers
    # (prefill / large steps, offload's PrefillStreamer); not counted in cpu_experts
    streamed_experts: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0
    prefetch_late: int = 0  # used, but still loading when its layer started (also a miss)
    h2d_bytes: int = 0
    stall_ms: float = 0.0
    cpu_ms: float = 0.0
    gpu_ms: float = 0.0
    host_fused_ms: float = 0.0  # CPU-only engines: device-slot and CPU pairs in one host call
    draft_len_hist: dict[int, int] = field(default_factory=dict)  # chosen k -> steps
    draft_acceptance: float | None = None  # the governor's per-draft-token estimate

    @property
    def hit_rate_defined(self) -> bool:
        return self.hits + self.misses > 0

    @property
    def prefetch_precision_defined(self) -> bool:
        return self.prefetch_used + self.prefetch_wasted > 0

    @property
    def prefetch_recall_defined(self) -> bool:
        return self.prefetch_used + self.misses - self.prefetch_late > 0

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    @property
    def prefetch_precision(self) -> float:
        n = self.prefetch_used + self.prefetch_wasted
        return self.prefetch_used / n if n else 0.0

    @property
    def prefetch_recall(self) -> float:
        n = self.prefetch_used + self.misses - self.prefetch_late
        return self.prefetch_used / n if n else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hit_rate"] = self.hit_rate if self.hit_rate_defined else None
        d["prefetch_precision"] = (self.prefetch_precision if self.prefetch_precision_defined
                                   else None)
        d["prefetch_recall"] = self.prefetch_recall if self.prefetch_recall_defined else None
        d["draft_len_hist"] = {str(k): v for k, v in sorted(self.draft_len_hist.items())}
        return d

    @property
    def mean_draft_len(self) -> float | None:
        n = sum(self.draft_len_hist.values())
        return sum(k * v for k, v in self.draft_len_hist.items()) / n if n else None


def _pct(value: float, defined: bool) -> str:
    return f"{100 * value:.1f}%" if defined else "n/a"


def format_log_line(s: EngineStats) -> str:
    """One line in the style of vLLM's periodic metrics log. Times are named for what was
    measured: the host-fused call on a CPU-only engine, else the device and CPU branches."""
    if s.host_fused_ms > 0 and s.gpu_ms == 0 and s.cpu_ms == 0:
        times = f"host-fused experts: {s.host_fused_ms:.1f} ms"
    else:
        times = f"device experts: {s.gpu_ms:.1f} ms, CPU experts: {s.cpu_ms:.1f} ms"
    streamed = f"streamed: {s.streamed_experts}, " if s.streamed_experts else ""
    mean_k = s.mean_draft_len
    draft = "" if mean_k is None else (
        f", draft length: mean {mean_k:.2f}, acceptance: "
        + ("n/a" if s.draft_acceptance is None else f"{100 * s.draft_acceptance:.1f}%"))
    return (
        f"MoE-SpAc: steps: {s.steps}, expert hit rate: {_pct(s.hit_rate, s.hit_rate_defined)}, "
        f"prefetch precision: {_pct(s.prefetch_precision, s.prefetch_precision_defined)}, "
        f"prefetch recall: {_pct(s.prefetch_recall, s.prefetch_recall_defined)}, "
        f"experts device-slot/CPU: {s.device_experts}/{s.cpu_experts}, {streamed}"
        f"fetched: {s.fetched_experts}, H2D: {s.h2d_bytes / 1e9:.2f} GB, "
        f"stall: {s.stall_ms:.1f} ms, {times}{draft}"
    )


class StatsWriter:
    """Appends one JSON object per call to a JSON-lines file (or an open text stream), flushed
    line by line. A write that fails (a full disk, a removed directory) logs one warning and
    stops the writer (`failed`; later records are only counted in `dropped`): serving goes on,
    and the lines written before stay whole (a record is written in one call, so at most the
    failed one is cut short, at the end of the file)."""

    def __init__(self, target: str | Path | TextIO) -> None:
        if isinstance(target, (str, Path)):
            if not str(target).strip():
                raise ValueError("stats_file: must be a non-empty path")
            self._stream: TextIO = open(target, "a", encoding="utf-8")  # noqa: SIM115
            self._owned = True
        else:
            self._stream = target
            self._owned = False
        self._name = str(target) if isinstance(target, (str, Path)) else "stream"
        self.failed = False
        self.dropped = 0

    def write(self, stats: EngineStats, **extra: Any) -> None:
        if self.failed:
            self.dropped += 1
            return
        record = {**extra, **stats.as_dict()}
        try:
            self._stream.write(json.dumps(record, sort_keys=True) + "\n")
            self._stream.flush()
        except (OSError, ValueError) as e:  # ValueError: the stream was closed under us
            self.failed = True
            self.dropped += 1
            logger.warning("moespac: stats_file %s: write failed (%s); no more stats lines are "
                           "written, serving goes on", self._name, e)

    def close(self) -> None:
        if self._owned:
            try:
                self._stream.close()
            except OSError as e:  # the final flush of a full disk
                if not self.failed:
                    logger.warning("moespac: stats_file %s: close failed (%s)", self._name, e)
                self.failed = True


__all__ = ["EngineStats", "StatsWriter", "format_log_line"]
