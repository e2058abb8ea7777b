"""Trace-driven simulator: replays a routing trace through `ExpertEngine` under a cost profile.

The simulator drives the SAME engine the vLLM layer drives, through the same calls (engine.py's
contract), with a simulated clock and a simulated mover in place of CUDA:

    per step:  [draft phase: k x draft_ms_per_token]        # SD policies only
               begin_step; for each layer l:
                   clock += dense_ms_per_layer (+ per token) # attention, router, norms
                   plan = plan_layer(l, ids[T, K])
                   clock += plan_ms_per_layer               # the plan's host time (S < E only)
                   device branch: after launch_ms_per_layer (S < E only), experts in ready
                                  order, each max(ready_at, t) + gpu_ms(n)
                   CPU branch:    sum of cpu_ms(n) over plan.cpu_experts, in parallel
                   clock = max(device end, CPU end)         # shared_compute: device end + CPU
                   finish_layer(l)
               clock += lm_head_ms; end_step(accepted)      # end_step issues prefetches

Overlap modelled: prefetch copies issued at end_step (or at a layer's end) run on the PCIe link
while the clock advances through the next draft phase and the earlier layers; on-demand fetches
queue behind them. `SimMover` serialises every copy on one link at the profile's bandwidth (one
expert = `costs.fetch_ms`), which is what one CUDA copy stream does. The CPU and device branches of
a layer overlap (the layer takes the max), as in offload.py.

Workload: speculative policies (spac, spac-faithful, sd-lru, oracle) replay verification windows;
plain decoding policies (lru, lfu, static, hybrimoe) replay the autoregressive token stream one
token per step. An autoregressive trace (the public Mixtral JSONL) is turned into windows with
`trace.windows_from_autoregressive(k, acceptance)`: accepted drafts are recorded routing, the
rejected drafts' routing is MODELLED (resampled from the same request) and the result is labelled
so. A speculative trace (recorded by the vLLM recorder) is replayed as is, and its accepted tokens
form the autoregressive stream for the plain policies. Prefill steps are not replayed: tok/s is
decode throughput. Tokens per speculative step = accepted + 1.

Output: `SimResult` (tokens_per_s, hit_rate, h2d_bytes, stall_ms, cpu_ms, prefetch precision and
recall, ...), tagged with the trace's label (real / real+modelled / synthetic) and `modelled: true`
(every time in it comes from the cost model, not from a device).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from moespac_vllm.config import MoESpacConfig, Policy, shared_data_dir
from moespac_vllm.engine import AUTOREGRESSIVE_POLICIES, ExpertEngine
from moespac_vllm.governor import DraftGovernor
from moespac_vllm.stats import EngineStats
from moespac_vllm.step_context import Phase, StepContext
from moespac_vllm.cost_model import CostProfile, StepTimes
from moespac_vllm.trace import (
    MIXTRAL_8X7B,
    QWEN3_30B_A3B,
    ModelDims,
    StepKind,
    Trace,
    windows_from_autoregressive,
)

logger = logging.getLogger(__name__)

SWEEP_RATIOS: tuple[float, ...] = (0.1, 0.17, 0.25, 0.5)
DEFAULT_DRAFT_TOKENS = 8  # the paper's γ
DEFAULT_ACCEPTANCE = 0.8  # per-draft-token acceptance probability (acceptance model, [I])


class SimClock:
    """A settable clock in milliseconds (the engine's `Clock`)."""

    __slots__ = ("t_ms",)

    def __init__(self) -> None:
        self.t_ms = 0.0

    def now_ms(self) -> float:
        return self.t_ms


class SimMover:
    """`Mover` on a simulated PCIe link: copies run one after another, each `fetch_ms` long,
    starting no earlier than when they are issued. `cancel` of a copy not yet started removes it
    (later queued copies move up); a started copy cannot be recalled (its bytes still count).
    `synchronous` (shared compute, cpu-as-device: the host thread makes the copy, as the
    runtime's synchronous mover does): a load advances the clock by its copy, so it lands when
    issued and overlaps nothing."""

    def __init__(self, clock: SimClock, fetch_ms: float, expert_bytes: int,
                 synchronous: bool = False) -> None:
        if not fetch_ms >= 0.0:
            raise ValueError(f"fetch_ms: must be >= 0, got {fetch_ms}")
        self.synchronous = bool(synchronous)
        self.clock = clock
        self.fetch_ms = float(fetch_ms)
        self.expert_bytes = int(expert_bytes)
        self._done: dict[tuple[int, int], float] = {}
        self._start: dict[tuple[int, int], float] = {}
        self._queue: list[tuple[int, int]] = []  # issued, not yet started (start > now), in order
        self._link_free = 0.0
        self._bytes = 0
        self.loads = 0

    def load(self, layer: int, expert: int, slot: int) -> None:
        now = self.clock.now_ms()
        start = max(now, self._link_free)
        key = (layer, slot)
        if key in self._start and self._start[key] > now:
            self._drop(key)  # superseded before it started
            start = max(now, self._link_free)
        self._start[key] = start
        self._done[key] = start + self.fetch_ms
        self._link_free = start + self.fetch_ms
        if start > now:
            self._queue.append(key)
        self._bytes += self.expert_bytes
        self.loads += 1
        if self.synchronous:
            self.clock.t_ms = max(self.clock.t_ms, self._link_free)

    def ready_at(self, layer: int, slot: int) -> float:
        """When the last load into (layer, slot) lands; +inf if none is recorded (never loaded,
        or cancelled: the slot holds no valid data)."""
        return self._done.get((layer, slot), math.inf)

    def is_ready(self, layer: int, slot: int) -> bool:
        return self.clock.now_ms() >= self.ready_at(layer, slot)

    def ready_mask(self, layer: int, slots: Sequence[int]) -> list[bool]:
        now, done = self.clock.now_ms(), self._done
        return [now >= done.get((layer, s), math.inf) for s in slots]

    def wait(self, layer: int, slot: int) -> None:
        """The simulator accounts the wait in the layer's device branch (ready_at)."""

    def cancel(self, layer: int, slot: int) -> bool:
        key = (layer, slot)
        now = self.clock.now_ms()
        if key not in self._done or self._done[key] <= now:
            return False
        if self._start[key] > now:
            self._drop(key)
            self._bytes -= self.expert_bytes
        self._done.pop(key, None)
        self._start.pop(key, None)
        return True

    def _drop(self, key: tuple[int, int]) -> None:
        """Remove a not-yet-started copy and move the later queued copies up."""
        now = self.clock.now_ms()
        self._queue = [k for k in self._queue if self._start.get(k, -1.0) > now]
        if key in self._queue:
            self._queue.remove(key)
        # the link is busy until the last started copy ends
        busy = max([now] + [d for k, d in self._done.items()
                            if self._start[k] <= now and d > now])
        t = busy
        for k in self._queue:
            self._start[k] = t
            self._done[k] = t + self.fetch_ms
            t += self.fetch_ms
        self._link_free = t

    @property
    def bytes_moved(self) -> int:
        return self._bytes


@dataclass(frozen=True, slots=True)
class SimResult:
    policy: str
    cache_ratio: float
    num_slots: int
    profile: str
    trace: str  # the trace's label: real / real+modelled(...) / synthetic, and its source
    synthetic: bool
    modelled: bool  # always True: times come from the cost model
    speculative: bool
    draft_tokens: int  # k per window (with adaptive_draft: the largest allowed)
    adaptive_draft: bool
    mean_draft_tokens: float
    acceptance: float | None
    steps: int
    tokens: int
    time_ms: float
    tokens_per_s: float
    step_ms: float
    draft_ms: float
    stats: EngineStats = field(default_factory=EngineStats)
    draft_len_hist: dict[int, int] = field(default_factory=dict)  # chosen k -> steps

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "stats"}
        d["draft_len_hist"] = {str(k): v for k, v in self.draft_len_hist.items()}
        s = self.stats.as_dict()
        for k in ("hit_rate", "h2d_bytes", "stall_ms", "cpu_ms", "gpu_ms", "prefetch_precision",
                  "prefetch_recall", "prefetch_issued", "prefetch_used", "prefetch_wasted",
                  "prefetch_late", "fetched_experts", "device_experts", "cpu_experts", "hits",
                  "misses"):
            d[k] = s[k]
        d["bytes_moved"] = s["h2d_bytes"]
        return d


# ---- workload ------------------------------------------------------------------------------------
SYNTHETIC_STEPS = 384  # default length of the synthetic Qwen3-scale stream (tokens)


def load_workload_trace(spec: str, seed: int = 0, data_dir: str | Path | None = None) -> Trace:
    """`--trace`: a path (npz or Mixtral JSONL, auto-detected) or `synthetic[:TOKENS]`, the
    synthetic Qwen3-30B-A3B-scale plain-decode stream (labelled synthetic), calibrated on the
    OLMoE routing stats (popularity, cross-layer co-occurrence) and on the real Mixtral traces'
    temporal reuse, both read from the shared data folder."""
    from moespac_vllm.trace import load_trace, synthetic_trace

    if spec.startswith("synthetic"):
        _, _, n = spec.partition(":")
        try:
            steps = int(n) if n else SYNTHETIC_STEPS
        except ValueError:
            raise ValueError(f"trace: 'synthetic:N' needs an integer N, got {spec!r}") from None
        d = Path(data_dir) if data_dir is not None else shared_data_dir()
        if d is None or not d.is_dir():
            raise ValueError("trace: the synthetic trace is calibrated on shared/data; set "
                             "MOESPAC_DATA_DIR")
        return synthetic_trace(num_steps=steps, k=0, seed=seed,
                               stats=d / "olmoe-mixtral-routing-stats",
                               reuse=d / "mixtral-8x7b-routing" / "humaneval_2_routing.jsonl")
    return load_trace(spec)


def speculative_workload(trace: Trace, draft_tokens: int, acceptance: float | int,
                         seed: int = 0) -> Trace:
    """The verification windows a speculative policy replays."""
    if np.any(trace.kind == StepKind.VERIFY):
        return trace
    return windows_from_autoregressive(trace, draft_tokens, acceptance, seed=seed)


def autoregressive_workload(trace: Trace) -> Trace:
    """The plain decode stream (one token per step) a non-speculative policy replays. From a
    speculative trace: the first accepted + 1 tokens of each window (the tokens really emitted)."""
    decode = np.flatnonzero(trace.kind != StepKind.PREFILL)
    if not np.any(trace.kind == StepKind.VERIFY):
        return trace.select(decode)
    rows: list[np.ndarray] = []
    seq: list[int] = []
    for s in decode:
        a = int(trace.token_offsets[s])
        n = int(trace.token_offsets[s + 1]) - a
        keep = min(n, int(trace.num_accepted[s]) + 1) if trace.kind[s] == StepKind.VERIFY else n
        rows.append(np.arange(a, a + keep))
        seq += [int(trace.seq_id[s])] * keep
    idx = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    n = idx.shape[0]
    return Trace(dims=trace.dims, meta=trace.meta, kind=np.full(n, StepKind.DECODE),
                 seq_id=np.array(seq), num_accepted=np.zeros(n),
                 token_offsets=np.arange(n + 1), topk_ids=trace.topk_ids[idx],
                 token_modelled=trace.token_modelled[idx])


def step_counts(trace: Trace) -> np.ndarray:
    """[S, L, E] per-step token counts of every (layer, expert) (the oracle's future)."""
    return np.stack([trace.counts(layer) for layer in range(trace.dims.num_layers)], axis=1)


# ---- the replay ----------------------------------------------------------------------------------
def run_step(engine: ExpertEngine, ids: np.ndarray, num_accepted: int, speculative: bool,
             clock: SimClock, mover: SimMover, times: StepTimes, step: int,
             draft_ids: np.ndarray | None = None) -> float:
    """One decode/verify step of routing `ids` [T, L, K] through `engine`: the draft phase
    (speculative), then every layer (dense part, plan, device branch in copy-ready order || CPU
    branch, finish), then the LM head and end_step. Returns the draft ms spent."""
    costs = engine.costs
    T, L, _ = ids.shape
    E = engine.dims.num_experts
    gpu_fixed, gpu_tok = costs.gpu_fixed_ms, costs.gpu_per_token_ms
    cpu_fixed, cpu_tok = costs.cpu_fixed_ms, costs.cpu_per_token_ms
    k = T - 1 if speculative else 0
    draft_ms = 0.0
    if k:
        if draft_ids is not None and draft_ids.shape[0]:
            for layer in range(L):
                engine.observe_draft(layer, draft_ids[:, layer, :].astype(np.int64))
        draft_ms = k * times.draft_ms_per_token
        clock.t_ms += draft_ms
    engine.begin_step(StepContext(step=step, phase=Phase.VERIFY if speculative else Phase.DECODE,
                                  num_tokens=T, tokens_per_request=(T,), num_draft_tokens=k))
    planned = engine.num_slots < E  # whole layers: no plan, the resident path's own launch
    plan_ms = times.plan_ms_per_layer if planned else 0.0
    launch_ms = times.launch_ms_per_layer if planned else 0.0
    dense_ms = times.dense_ms_per_layer + (T - 1) * times.dense_ms_per_token
    for layer in range(L):
        clock.t_ms += dense_ms
        layer_ids = ids[:, layer, :]
        plan = engine.plan_layer(layer, layer_ids)
        clock.t_ms += plan_ms  # host work between the routing and the expert kernels
        t0 = clock.t_ms + launch_ms  # the device branch starts after its launch
        counts = np.bincount(layer_ids.ravel(), minlength=E)
        table = engine.tables[layer]
        ready = sorted((max(t0, mover.ready_at(layer, table.slot_of(e))), int(counts[e]))
                       for e in plan.device_experts)
        t = t0
        gpu_busy = 0.0
        for r, n in ready:
            g = gpu_fixed + gpu_tok * n
            t = max(t, r) + g
            gpu_busy += g
        cpu_busy = sum(cpu_fixed + cpu_tok * int(counts[e]) for e in plan.cpu_experts)
        # shared cores (cpu-as-device): the CPU branch runs after the device branch, not beside
        clock.t_ms = t + cpu_busy if times.shared_compute else max(t, t0 + cpu_busy)
        engine.record_timing(stall_ms=t - t0 - gpu_busy, cpu_ms=cpu_busy, gpu_ms=gpu_busy)
        engine.finish_layer(layer, layer_ids)
    clock.t_ms += times.lm_head_ms + (T - 1) * times.lm_head_ms_per_token
    engine.end_step(int(num_accepted) if speculative else 0)
    return draft_ms


def run_engine(engine: ExpertEngine, work: Trace, clock: SimClock, mover: SimMover,
               times: StepTimes, speculative: bool) -> tuple[float, int, float]:
    """Replay `work` through `engine`; returns (elapsed ms, steps, draft ms)."""
    draft_total = 0.0
    t_begin = clock.t_ms
    steps = 0
    for s in range(work.num_steps):
        if work.kind[s] == StepKind.PREFILL:
            continue
        st = work.step(s)
        if st.num_tokens == 0:
            continue
        draft_total += run_step(engine, st.topk_ids, st.num_accepted, speculative, clock, mover,
                                times, steps, st.draft_topk_ids)
        steps += 1
    return clock.t_ms - t_begin, steps, draft_total


def adaptive_governor(engine: ExpertEngine, times: StepTimes, acceptance: float,
                      k_max: int) -> DraftGovernor:
    """The governor of an adaptive replay (here and in the decode harness): the acceptance
    model's rate as its estimate, the step overhead the replay adds around the experts. Its first
    step drafts k = 0 (a window to model from) by the replay's own rule."""
    L = engine.dims.num_layers
    overhead = L * times.dense_ms_per_layer + times.lm_head_ms + (
        L * (times.plan_ms_per_layer + times.launch_ms_per_layer)
        if engine.num_slots < engine.dims.num_experts else 0.0)
    # every draft token also widens the verify window's dense layers and LM head by one token
    per_draft = times.draft_ms_per_token + L * times.dense_ms_per_token + \
        times.lm_head_ms_per_token
    return DraftGovernor(k_max=k_max, draft_ms_per_token=per_draft,
                         step_overhead_ms=overhead, k_min=0, fixed_acceptance=acceptance)


def run_adaptive(engine: ExpertEngine, ar: Trace, clock: SimClock, mover: SimMover,
                 times: StepTimes, acceptance: float, k_max: int, seed: int = 0
                 ) -> tuple[float, int, float, list[int]]:
    """Speculative replay with the draft length chosen before every step by the draft-length
    governor (`governor.DraftGovernor`, the acceptance model's rate as its estimate). Windows are cut from the autoregressive
    stream `ar` on the fly with the same acceptance model as `windows_from_autoregressive`
    (per-draft acceptance probability, first rejection ends it; the rejected drafts' routing is
    MODELLED by resampling a token of the same request). Returns (ms, steps, draft ms, ks)."""
    rng = np.random.default_rng([seed, 17])
    governor = adaptive_governor(engine, times, acceptance, k_max)
    t_begin = clock.t_ms
    draft_total = 0.0
    steps = 0
    ks: list[int] = []
    decode = ar.kind == StepKind.DECODE
    for sid in dict.fromkeys(ar.seq_id[decode].tolist()):
        rows = ar.token_offsets[:-1][decode & (ar.seq_id == sid)]
        n = rows.shape[0]
        p = 0
        while p < n:
            k = 0 if steps == 0 else governor.choose(engine)  # step 0: a window to model from
            ks.append(k)
            k_eff = min(k, n - 1 - p)
            a = 0
            while a < k_eff and rng.random() < acceptance:
                a += 1
            window = rows[p:p + k_eff + 1].copy()
            if a < k_eff:
                window[a + 1:] = rows[rng.integers(0, n, size=k_eff - a)]
            draft_total += run_step(engine, ar.topk_ids[window], a, True, clock, mover, times,
                                    steps)
            steps += 1
            p += a + 1
    return clock.t_ms - t_begin, steps, draft_total, ks


def simulate(trace: Trace, policy: Policy | str, cache_ratio: float, profile: CostProfile | str, *,
             draft_tokens: int = DEFAULT_DRAFT_TOKENS,
             acceptance: float | int = DEFAULT_ACCEPTANCE, seed: int = 0,
             config: MoESpacConfig | None = None, times: StepTimes | None = None,
             max_tokens: int | None = None, adaptive_draft: bool = False) -> SimResult:
    """Replay `trace` under `policy` at `cache_ratio` on the cost `profile` (a CostProfile or a
    profile name). `max_tokens` keeps the first decode tokens (steps of a recorded speculative
    trace) so that every policy sees the same stream. `adaptive_draft` (spac only): the draft
    length is re-chosen before every step by the engine's roofline, up to `draft_tokens`."""
    if isinstance(policy, str):
        try:
            policy = Policy(policy)
        except ValueError:
            raise ValueError(f"policy: unknown policy {policy!r}; expected one of: "
                             f"{', '.join(p.value for p in Policy)}") from None
    profile = _profile(profile)
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or draft_tokens < 0:
        raise ValueError(f"draft_tokens: must be an integer >= 0, got {draft_tokens!r}")
    if adaptive_draft and policy is not Policy.SPAC:
        raise ValueError(f"adaptive_draft: only a switch on spac, not {policy.value}")
    if adaptive_draft and not isinstance(acceptance, float):
        raise ValueError("acceptance: adaptive_draft needs a per-token probability (float)")
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens: must be an integer >= 1, got {max_tokens!r}")
        decode = np.flatnonzero(trace.kind != StepKind.PREFILL)[:max_tokens]
        trace = trace.select(np.sort(np.concatenate(
            [np.flatnonzero(trace.kind == StepKind.PREFILL), decode])))
    base = config if config is not None else MoESpacConfig()
    cfg = base.replace(policy=policy.value, cache_ratio=cache_ratio)
    dims = trace.dims
    costs = profile.expert_costs(dims)
    if times is None:
        times = step_times(profile, dims)
    speculative = policy not in AUTOREGRESSIVE_POLICIES
    if speculative and not adaptive_draft:
        work = speculative_workload(trace, draft_tokens, acceptance, seed)
    else:
        work = autoregressive_workload(trace)
    clock = SimClock()
    mover = SimMover(clock, costs.fetch_ms, dims.expert_bytes,
                     synchronous=times.shared_compute)
    future = None
    if policy is Policy.ORACLE:
        future = step_counts(work.select(np.flatnonzero(work.kind != StepKind.PREFILL)))
    engine = ExpertEngine(cfg, dims, costs, mover, clock, future_counts=future)
    if adaptive_draft:
        elapsed, steps, draft_ms, ks = run_adaptive(engine, work, clock, mover, times,
                                                    float(acceptance), draft_tokens, seed)
        mean_k = float(np.mean(ks)) if ks else 0.0
        hist = {int(k): int(n) for k, n in zip(*np.unique(ks, return_counts=True))}
    else:
        elapsed, steps, draft_ms = run_engine(engine, work, clock, mover, times, speculative)
        mean_k = float(draft_tokens) if speculative else 0.0
        hist = {draft_tokens if speculative else 0: steps} if steps else {}
    stats = engine.stats()
    meta = work.meta
    if adaptive_draft and "rejected_draft_routing" not in meta.modelled:
        meta = replace(meta, modelled=meta.modelled + ("rejected_draft_routing",))
    return SimResult(
        policy=policy.value, cache_ratio=float(cache_ratio), num_slots=engine.num_slots,
        profile=profile.name, trace=meta.label,
        synthetic=bool(trace.meta.synthetic), modelled=True, speculative=speculative,
        draft_tokens=draft_tokens if speculative else 0, adaptive_draft=adaptive_draft,
        mean_draft_tokens=mean_k,
        acceptance=float(acceptance) if speculative else None, steps=steps,
        tokens=stats.tokens, time_ms=elapsed,
        tokens_per_s=1000.0 * stats.tokens / elapsed if elapsed > 0 else 0.0,
        step_ms=elapsed / steps if steps else 0.0, draft_ms=draft_ms, stats=stats,
        draft_len_hist=hist)


def _profile(profile: CostProfile | str) -> CostProfile:
    """A CostProfile, or the named one (`cost_model.get_profile`); anything else is refused."""
    if isinstance(profile, str):
        from moespac_vllm.cost_model import get_profile

        return get_profile(profile)
    if not isinstance(profile, CostProfile):
        raise ValueError(f"profile: expected a CostProfile or a profile name, got "
                         f"{type(profile).__name__}")
    return profile


def step_times(profile: CostProfile, dims: ModelDims) -> StepTimes:
    """Draft, dense per-layer and LM-head times from the profile, with the model's own attention
    size and vocabulary where we know them (Qwen3-30B-A3B: 32 q heads x 128 = 4096 > H, 4 kv heads
    x 128, so q/o are 2 x 4096 H and k/v 2 x 512 H; Mixtral-8x7B: the 2.5 H^2 default, 32k vocab)."""
    h = dims.hidden_size
    if dims == QWEN3_30B_A3B:
        return profile.step_times(dims, dense_params_per_layer=2 * 4096 * h + 2 * 512 * h
                                  + h * dims.num_experts, vocab_size=151_936)
    if dims == MIXTRAL_8X7B:
        return profile.step_times(dims, vocab_size=32_000)
    return profile.step_times(dims)


# ---- sweep ---------------------------------------------------------------------------------------
ADAPTIVE_LABEL = "spac+adaptive-k"
ORACLE_BEST_LABEL = "oracle-best-k"
ORACLE_KS = (0, 1, 2, 4, 8)


def sweep(trace: Trace, profile: CostProfile | str, *, policies: Sequence[Policy] | None = None,
          ratios: Sequence[float] = SWEEP_RATIOS, extras: bool = True,
          **kw: Any) -> list[SimResult]:
    """Every policy at every ratio (same trace, profile, draft length and acceptance model).
    With `extras`, two more rows per ratio: `spac+adaptive-k` (spac with the per-step draft
    length roofline, 0 <= k <= draft_tokens) and `oracle-best-k` (the oracle at its best fixed k
    in 0, 1, 2, 4, 8 up to draft_tokens: the bound for a policy that may also choose k; k = 0 is
    plain decoding)."""
    profile = _profile(profile)
    policies = list(Policy) if policies is None else list(policies)
    k_max = kw.get("draft_tokens", DEFAULT_DRAFT_TOKENS)
    out = []
    for ratio in ratios:
        for p in policies:
            out.append(simulate(trace, p, ratio, profile, **kw))
        if extras:
            ad = simulate(trace, Policy.SPAC, ratio, profile, adaptive_draft=True, **kw)
            out.append(replace(ad, policy=ADAPTIVE_LABEL))
            best = None
            for k in sorted({min(k, k_max) for k in ORACLE_KS}):
                r = simulate(trace, Policy.ORACLE, ratio, profile, **{**kw, "draft_tokens": k})
                if best is None or r.tokens_per_s > best.tokens_per_s:
                    best = r
            out.append(replace(best, policy=ORACLE_BEST_LABEL))
    return out


def sweep_table(results: Sequence[SimResult]) -> str:
    """Markdown: one row per (ratio, policy) with tok/s, the ratios to sd-lru / spac-faithful /
    oracle at that ratio, hit rate, stall, CPU, H2D and prefetch precision/recall."""
    if not results:
        return ""
    first = results[0]
    lines = [
        f"trace: {first.trace} · profile: {first.profile} · modelled (cost model, not measured)"
        f" · acceptance {first.acceptance if first.acceptance is not None else '-'} per draft"
        " token · AR = plain decoding",
        "",
        "| ratio | slots | policy | k | tok/s | vs sd-lru | vs spac-faithful | ms/token vs "
        "oracle-best-k | hit rate | stall ms/step | CPU ms/step | H2D MB/token | prefetch P/R |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_ratio: dict[float, dict[str, SimResult]] = {}
    for r in results:
        by_ratio.setdefault(r.cache_ratio, {})[r.policy] = r
    for ratio, group in by_ratio.items():
        sd = group.get(Policy.SD_LRU.value)
        fa = group.get(Policy.SPAC_FAITHFUL.value)
        orc = group.get(ORACLE_BEST_LABEL) or group.get(Policy.ORACLE.value)
        for name, r in group.items():
            def rel(base: SimResult | None) -> str:
                return f"{r.tokens_per_s / base.tokens_per_s:.2f}x" if base and \
                    base.tokens_per_s > 0 else "-"
            def kdesc(x: SimResult) -> str:
                if not x.speculative:
                    return "AR"
                return f"{x.mean_draft_tokens:.1f}" if x.adaptive_draft else str(x.draft_tokens)
            # step time per emitted token, relative to the oracle's
            vs_orc = (f"{(r.time_ms / max(r.tokens, 1)) / (orc.time_ms / max(orc.tokens, 1)):.2f}x"
                      if orc and orc.tokens else "-")
            st = r.stats
            lines.append(
                f"| {ratio:g} | {r.num_slots} | {name} | {kdesc(r)} | {r.tokens_per_s:.2f} | "
                f"{rel(sd)} | "
                f"{rel(fa)} | {vs_orc} | {st.hit_rate:.3f} | {st.stall_ms / max(r.steps, 1):.1f} "
                f"| {st.cpu_ms / max(r.steps, 1):.1f} | {st.h2d_bytes / 1e6 / max(r.tokens, 1):.1f} | "
                f"{st.prefetch_precision:.2f}/{st.prefetch_recall:.2f} |")
    return "\n".join(lines) + "\n"


# ---- compare -------------------------------------------------------------------------------------
COMPARE_KS = (1, 2, 3, 8)  # the draft lengths a speculative baseline is tried at
PRODUCT_LABEL = "spac (adaptive k)"
AR_BASELINES = (Policy.LRU, Policy.HYBRIMOE, Policy.STATIC)
SD_BASELINES = (Policy.SD_LRU, Policy.SD_STATIC)


@dataclass(frozen=True, slots=True)
class Comparison:
    """`compare`'s answer: the product row, each baseline at its best k, the oracle at its best k,
    and every run tried (`tried`, for the JSON rows)."""

    product: SimResult
    baselines: tuple[SimResult, ...]
    oracle: SimResult
    tried: tuple[SimResult, ...]

    @property
    def best_baseline(self) -> SimResult:
        return max(self.baselines, key=lambda r: r.tokens_per_s)

    def ratio(self, other: SimResult) -> float:
        return self.product.tokens_per_s / other.tokens_per_s if other.tokens_per_s > 0 else 0.0

    def rows(self) -> list[dict[str, Any]]:
        """One JSON row per reported run (product, baselines at their best k, oracle), each with
        `role` and `vs_product`, then a summary row."""
        out = []
        for role, r in ([("product", self.product)] + [("baseline", b) for b in self.baselines]
                        + [("oracle", self.oracle)]):
            out.append({**r.as_dict(), "role": role, "product_vs_this": self.ratio(r)})
        bb = self.best_baseline
        out.append({"role": "summary", "cache_ratio": self.product.cache_ratio,
                    "profile": self.product.profile, "trace": self.product.trace,
                    "best_baseline": bb.policy, "product_vs_best_baseline": self.ratio(bb),
                    "product_vs_oracle": self.ratio(self.oracle)})
        return out


def _best(runs: list[SimResult]) -> SimResult:
    return max(runs, key=lambda r: (r.tokens_per_s, -r.draft_tokens))


def compare(trace: Trace, profile: CostProfile | str, cache_ratio: float, *,
            ks: Sequence[int] = COMPARE_KS, k_max: int = DEFAULT_DRAFT_TOKENS,
            **kw: Any) -> Comparison:
    """The product mode (spac, draft length chosen per step up to `k_max`) against every baseline
    at its own best draft length: lru, hybrimoe, static (plain decoding), sd-lru and sd-static at
    each k in `ks`, and the oracle at its best k in {0} | `ks` | ORACLE_KS (k = 0: plain decoding).
    `kw`: simulate's acceptance, seed, max_tokens, config, times."""
    if "draft_tokens" in kw or "adaptive_draft" in kw:
        raise ValueError("draft_tokens: compare chooses the draft lengths itself (ks, k_max)")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks: draft lengths must be integers >= 1, got {ks}")
    profile = _profile(profile)
    tried: list[SimResult] = []

    def run(policy: Policy, k: int, **extra: Any) -> SimResult:
        r = simulate(trace, policy, cache_ratio, profile, draft_tokens=k, **extra, **kw)
        tried.append(r)
        return r

    product = replace(run(Policy.SPAC, k_max, adaptive_draft=True), policy=PRODUCT_LABEL)
    baselines = [run(p, 0) for p in AR_BASELINES]
    for p in SD_BASELINES:
        baselines.append(_best([run(p, k) for k in ks]))
    oracle_ks = sorted({0, *ks, *(k for k in ORACLE_KS if k <= max(ks))})
    oracle = _best([run(Policy.ORACLE, k) for k in oracle_ks])
    return Comparison(product=product, baselines=tuple(baselines), oracle=oracle,
                      tried=tuple(tried))


def compare_table(comparisons: Sequence[Comparison]) -> str:
    """Markdown: per (trace, profile, ratio), one row per policy at its best k (tok/s, k, hit
    rate, prefetch P/R, product / that row), then product / best baseline and product / oracle."""
    lines = ["| trace | profile | ratio | policy | k | tok/s | product / this | hit rate | "
             "prefetch issued | prefetch P/R |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        for r in (c.product, *c.baselines, c.oracle):
            src = r.trace.rsplit(":", 1)[-1]
            kind = "synthetic" if r.synthetic else r.trace.split(":", 1)[0]
            k = ("AR" if not r.speculative else
                 f"adaptive (mean {r.mean_draft_tokens:.2f})" if r.adaptive_draft
                 else ("AR" if r.draft_tokens == 0 else str(r.draft_tokens)))
            st = r.stats
            lines.append(f"| {src} ({kind}) | {r.profile} | {r.cache_ratio:g} | {r.policy} | {k} | "
                         f"{r.tokens_per_s:.2f} | {c.ratio(r):.2f}x | {st.hit_rate:.3f} | "
                         f"{st.prefetch_issued} | {st.prefetch_precision:.2f}/"
                         f"{st.prefetch_recall:.2f} |")
        bb = c.best_baseline
        lines.append(f"| | | | **product / best baseline ({bb.policy})** | | | "
                     f"**{c.ratio(bb):.2f}x** | | | |")
        lines.append(f"| | | | **product / oracle (best k)** | | | **{c.ratio(c.oracle):.2f}x** "
                     "| | | |")
    return "\n".join(lines) + "\n"


def sweep_plot(results: Sequence[SimResult], path: str | Path) -> Path:
    """tok/s against cache ratio, one line per policy (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_policy: dict[str, list[SimResult]] = {}
    for r in results:
        by_policy.setdefault(r.policy, []).append(r)
    for name, rs in by_policy.items():
        rs = sorted(rs, key=lambda r: r.cache_ratio)
        ours = name in ("spac", ADAPTIVE_LABEL)
        style = "-" if ours or name in ("oracle", ORACLE_BEST_LABEL) else "--"
        ax.plot([r.cache_ratio for r in rs], [r.tokens_per_s for r in rs], style, marker="o",
                label=name, linewidth=2.5 if ours else 1.2)
    first = results[0]
    ax.set_xlabel("expert cache ratio (device slots / experts)")
    ax.set_ylabel("decode tokens/s (modelled)")
    ax.set_title(f"{first.profile} · {first.trace}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p


__all__ = [
    "COMPARE_KS",
    "adaptive_governor",
    "Comparison",
    "compare",
    "compare_table",
    "DEFAULT_ACCEPTANCE",
    "DEFAULT_DRAFT_TOKENS",
    "SWEEP_RATIOS",
    "SimClock",
    "SimMover",
    "SimResult",
    "autoregressive_workload",
    "run_engine",
    "simulate",
    "speculative_workload",
    "step_counts",
    "sweep",
    "sweep_plot",
    "sweep_table",
]
