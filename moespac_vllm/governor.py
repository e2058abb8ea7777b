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
- H(n): those of them resident now (scaled the same way, at most S);
- layer ms = min over m on-demand fetches of max((H+m) g + m f, (D-H-m) c), g / c / f the
  device / CPU / copy time of an expert with n K / D tokens (the balancer's makespan model);
- step ms = k x draft ms + overhead ms + sum of layer ms;
- expected tokens = (1 - a^(k+1)) / (1 - a) for per-draft acceptance a.

The acceptance estimate is the first-rejection model's maximum-likelihood rate over exponentially
decayed counts: a verified draft of k tokens with `accepted` accepted is `accepted` successes in
accepted + (1 if accepted < k else 0) Bernoulli trials (ours [I]).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from moespac_vllm.engine import ExpertEngine

ACCEPTANCE_EMA = 0.9  # weight of the past in the online acceptance estimate
ACCEPTANCE_PRIOR = 0.7  # the estimate before any draft was verified


def roofline(engine: ExpertEngine, acceptance: float, draft_ms_per_token: float,
             step_overhead_ms: float, k_max: int) -> list[tuple[int, float, float]]:
    """For k = 0..k_max: (k, expected tokens per step, modelled step ms) at `engine`'s current
    residency and last routing window (module docstring)."""
    if not 0.0 <= acceptance <= 1.0:
        raise ValueError(f"acceptance: must be in [0, 1], got {acceptance}")
    if isinstance(k_max, bool) or not isinstance(k_max, int) or k_max < 0:
        raise ValueError(f"k_max: must be an integer >= 0, got {k_max!r}")
    if not draft_ms_per_token >= 0.0:
        raise ValueError(f"draft_ms_per_token: must be >= 0, got {draft_ms_per_token}")
    E, K, S = engine.dims.num_experts, engine.dims.top_k, engine.num_slots
    c = engine.costs
    ns = np.arange(1, k_max + 2, dtype=np.float64)
    total = np.zeros_like(ns)
    ms = np.arange(S + 1, dtype=np.float64)[:, None]  # on-demand fetch counts considered
    for layer, ids in enumerate(engine.window_ids()):
        if ids is None or ids.size == 0:
            continue
        T = ids.shape[0]
        resident = engine.tables[layer].slots_of(np.arange(E)) >= 0
        # first[e]: the first token of the window routed to e (T if none)
        first = np.full(E, T, dtype=np.int64)
        np.minimum.at(first, ids.ravel(), np.repeat(np.arange(T), ids.shape[1]))
        d_obs = np.bincount(first[first < T], minlength=T).cumsum()
        h_obs = np.bincount(first[(first < T) & resident], minlength=T).cumsum()
        dT, hT = float(d_obs[-1]), float(h_obs[-1])
        q = (1.0 - min(dT, E - 0.5) / E) ** (1.0 / T)  # per-token "not drawn" probability
        idx = np.minimum(ns.astype(np.int64), T) - 1
        D = np.where(ns <= T, d_obs[idx], E * (1.0 - q ** ns))
        H = np.where(ns <= T, h_obs[idx], np.minimum(S, hT * D / max(dT, 1.0)))
        per = ns * K / np.maximum(D, 1.0)
        g = c.gpu_fixed_ms + c.gpu_per_token_ms * per
        cp = c.cpu_fixed_ms + c.cpu_per_token_ms * per
        mm = np.minimum(ms, np.maximum(0.0, np.minimum(D - H, S - H)))  # [S+1, n]
        t = np.maximum((H + mm) * g + mm * c.fetch_ms, (D - H - mm) * cp)
        total += t.min(axis=0)
    out = []
    for i, n in enumerate(ns):
        k = int(n) - 1
        tokens = float(n) if acceptance >= 1.0 else (1 - acceptance ** n) / (1 - acceptance)
        out.append((k, tokens, k * draft_ms_per_token + step_overhead_ms + float(total[i])))
    return out


def best_draft_tokens(roof: list[tuple[int, float, float]], k_min: int = 0) -> int:
    """The k >= k_min of `roof` with the most expected tokens per modelled ms (ties: smaller k)."""
    cand = [r for r in roof if r[0] >= k_min] or roof
    return max(cand, key=lambda r: (r[1] / max(r[2], 1e-9), -r[0]))[0]


@dataclass(slots=True)
class DraftGovernor:
    """Chooses k per step from an online acceptance estimate (or a fixed one) and the roofline;
    keeps the histogram of chosen k. `fixed_acceptance` set: the estimate never moves (the
    simulator's acceptance model is known)."""

    k_max: int
    draft_ms_per_token: float
    step_overhead_ms: float
    k_min: int = 0
    fixed_acceptance: float | None = None
    acceptance: float = ACCEPTANCE_PRIOR
    hist: Counter = field(default_factory=Counter)
    _succ: float = 0.0
    _trials: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.k_max, bool) or not isinstance(self.k_max, int) or self.k_max < 0:
            raise ValueError(f"k_max: must be an integer >= 0, got {self.k_max!r}")
        if not 0 <= self.k_min <= self.k_max:
            raise ValueError(f"k_min: must be in [0, k_max={self.k_max}], got {self.k_min}")
        if self.fixed_acceptance is not None:
            if not 0.0 <= self.fixed_acceptance <= 1.0:
                raise ValueError(f"fixed_acceptance: must be in [0, 1], got "
                                 f"{self.fixed_acceptance}")
            self.acceptance = float(self.fixed_acceptance)

    def choose(self, engine: ExpertEngine) -> int:
        roof = roofline(engine, self.acceptance, self.draft_ms_per_token, self.step_overhead_ms,
                        self.k_max)
        k = best_draft_tokens(roof, self.k_min)
        self.hist[k] += 1
        return k

    def observe(self, proposed: int, accepted: int) -> None:
        """One verified draft: `proposed` draft tokens, `accepted` of them accepted."""
        if not 0 <= accepted <= proposed:
            raise ValueError(f"accepted: must be in [0, proposed={proposed}], got {accepted}")
        if proposed == 0 or self.fixed_acceptance is not None:
            return
        self._succ = ACCEPTANCE_EMA * self._succ + accepted
        self._trials = ACCEPTANCE_EMA * self._trials + accepted + (accepted < proposed)
        self.acceptance = self._succ / self._trials

    def draft_len_hist(self) -> dict[int, int]:
        return dict(sorted(self.hist.items()))


__all__ = ["DraftGovernor", "best_draft_tokens", "roofline"]
