"""Speculative Utility Estimator: per-window expert counts -> discrete utility levels 0..K.

Shapes: L MoE layers, E experts per layer, K top-k, T tokens in one window, W draft tokens.

Inputs, per layer and window: `counts[E]`, the number of the window's tokens whose top-k contains
each expert (0 <= counts[e] <= T). Any source produces them: the target's routing over a
verification window (`counts_from_topk`), a draft's router logits (`counts_from_router_logits`), or
a sliding window of plain-decoding tokens (`AutoregressiveWindow`).
Output: `levels` [L, E] int, every (layer, expert) in 0..K whether resident or not, starting at 0;
`hot_mask(layer, threshold)` = levels >= threshold (what prefetch / the balancer admit).

The update rule is the reference code's (MOESPAC.md §2, [C]), vectorised over E:

    d = c - u;   d >= θ_up -> u = min(K, u + 1);   -d >= θ_down -> u = max(0, u - 1)

Options beyond the reference ([I], ours; the `spac-faithful` values are the defaults):

* `theta_scale = window`: θ_up is tuned for n ≈ 9-token windows (γ = 8). With this option the rise
  threshold is θ_up(n) = max(1, round(θ_up · n / reference_window_tokens)), so k = 3 windows
  (n = 4 -> θ_up 2) and plain decoding (n = 1 -> θ_up 1) still move levels; with the fixed rule and
  n = 1 a level can never rise (d <= 1 < 5). θ_down is already the minimum (1) and is not scaled.

* Draft routing as a provisional signal (`observe_draft`). When the draft has routers that mirror
  the target's (an MoE draft / self-draft), the W draft tokens are most of the coming verification
  window, and their routing is known *before* the window runs: early enough to steer prefetch.
  Design: draft counts never touch the committed levels. They are accumulated per layer (one call
  per draft token or one call for all W) and give *provisional* levels = the same rule applied once
  to the committed levels with the draft counts, as if verification will agree with the draft.
  `predicted_levels` / `hot_mask` / `score` use the provisional levels while a draft signal is
  pending; the verification window's real counts (`observe`) then update the committed levels from
  where they were and drop the provisional ones. So the committed state is driven only by the
  target's own routing (rejected drafts cannot pollute it) while prefetch sees the draft's lookahead.
  `source = verify` or `autoregressive` ignores draft signals.

Prediction scoring (the paper's Figure 4 metric, definition [I] in MOESPAC.md §2): before a window
is observed, predicted hot = predicted level >= threshold; actually hot = counts >= 1. Per layer we
keep TP/FP/TN/FN; `accuracy()` returns one frozen `HotColdScore` per layer with accuracy
(TP + TN) / E, precision and recall of the hot set.

Cost: `observe` for E = 128 is a handful of numpy ufuncs on one row (a few µs, see
benchmarks/README.md); nothing allocates [L, E] after construction.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moespac_vllm.config import EstimatorConfig, EstimatorSource, ThetaScale

LEVEL_DTYPE = np.int64  # same as counts: the in-place update then needs no casts (measured 10% faster)


@dataclass(frozen=True, slots=True)
class HotColdScore:
    """Hot/cold prediction quality of one layer over all scored windows."""

    layer: int
    windows: int
    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def accuracy(self) -> float:
        total = self.tp + self.fp + self.tn + self.fn
        return (self.tp + self.tn) / total if total else float("nan")

    @property
    def precision(self) -> float:
        predicted = self.tp + self.fp
        return self.tp / predicted if predicted else float("nan")

    @property
    def recall(self) -> float:
        actual = self.tp + self.fn
        return self.tp / actual if actual else float("nan")


class UtilityEstimator:
    """Utility levels for every (layer, expert), moved by per-window activation counts."""

    def __init__(self, num_layers: int, num_experts: int, cfg: EstimatorConfig | None = None):
        _check_positive_int("num_layers", num_layers)
        _check_positive_int("num_experts", num_experts)
        cfg = EstimatorConfig() if cfg is None else cfg
        if not isinstance(cfg, EstimatorConfig):
            raise ValueError(f"cfg: expected EstimatorConfig, got {type(cfg).__name__}")
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.cfg = cfg
        self._levels = np.zeros((num_layers, num_experts), dtype=LEVEL_DTYPE)
        self._levels_view = self._levels.view()
        self._levels_view.flags.writeable = False
        self._accepts_draft = cfg.source in (EstimatorSource.AUTO, EstimatorSource.DRAFT)
        # pending draft signal per layer: accumulated counts and token count (0 = none pending)
        self._draft_counts = np.zeros((num_layers, num_experts), dtype=np.int64)
        self._draft_tokens = [0] * num_layers
        self._draft_levels: list[np.ndarray | None] = [None] * num_layers
        # confusion counts per layer: tp, fp, tn, fn, windows
        self._confusion = np.zeros((num_layers, 5), dtype=np.int64)
        self._theta_up_cache: dict[int, int] = {}

    # ---- the rule ----------------------------------------------------------------------------
    def theta_up_for(self, num_tokens: int | None) -> int:
        """The rise threshold in force for a window of `num_tokens` tokens."""
        if self.cfg.theta_scale is ThetaScale.FIXED:
            return self.cfg.theta_up
        if num_tokens is None:
            raise ValueError("num_tokens: required when theta_scale is 'window'")
        cached = self._theta_up_cache.get(num_tokens)
        if cached is None:
            if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, np.integer)) \
                    or num_tokens < 1:
                raise ValueError(f"num_tokens: must be a positive integer, got {num_tokens!r}")
            ref = self.cfg.reference_window_tokens
            # round half up in integers: floor(θ·n/ref + 1/2)
            cached = max(1, (2 * self.cfg.theta_up * int(num_tokens) + ref) // (2 * ref))
            self._theta_up_cache[int(num_tokens)] = cached
        return cached

    def _apply(self, u: np.ndarray, counts: np.ndarray, theta_up: int) -> None:
        """In place on one layer's row. Rise and fall are exclusive (θ_up, θ_down >= 1), and a fall
        never goes below 0 (it needs c <= u - θ_down with c >= 0), so only the cap needs a clamp."""
        d = counts - u
        np.add(u, d >= theta_up, out=u, casting="unsafe")
        np.subtract(u, d <= -self.cfg.theta_down, out=u, casting="unsafe")
        np.minimum(u, self.cfg.utility_cap, out=u)

    # ---- signals -----------------------------------------------------------------------------
    def observe(self, layer: int, counts: np.ndarray, num_tokens: int | None = None) -> None:
        """Commit one window's per-expert counts for `layer` (target routing: the verification
        window, or a pseudo-window in plain decoding). Drops that layer's pending draft signal.

        `num_tokens` (the window size n) is needed only with theta_scale 'window'."""
        c = self._check_counts(layer, counts)
        self._apply(self._levels[layer], c, self.theta_up_for(num_tokens))
        self.drop_draft(layer)

    def drop_draft(self, layer: int) -> None:
        """Forget `layer`'s pending draft signal (done by `observe`; the native planner, which
        applies the rule to `levels` itself, calls it after each committed window)."""
        if self._draft_tokens[layer]:
            self._draft_counts[layer].fill(0)
            self._draft_tokens[layer] = 0
            self._draft_levels[layer] = None

    def observe_draft(self, layer: int, counts: np.ndarray, num_tokens: int = 1) -> bool:
        """Add draft routing counts for the coming window of `layer` (call once per draft token,
        or once with all W). Returns False (and does nothing) when the source ignores drafts."""
        if not self._accepts_draft:
            return False
        c = self._check_counts(layer, counts)
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, np.integer)) \
                or num_tokens < 1:
            raise ValueError(f"num_tokens: must be a positive integer, got {num_tokens!r}")
        self._draft_counts[layer] += c
        self._draft_tokens[layer] += int(num_tokens)
        self._draft_levels[layer] = None
        return True

    def reset(self) -> None:
        """Forget all levels, pending draft signals and scores (e.g. a new request stream)."""
        self._levels.fill(0)
        self._draft_counts.fill(0)
        self._draft_tokens = [0] * self.num_layers
        self._draft_levels = [None] * self.num_layers
        self._confusion.fill(0)

    # ---- reading -----------------------------------------------------------------------------
    @property
    def levels(self) -> np.ndarray:
        """[L, E] committed levels, read-only view (changes as windows are observed)."""
        return self._levels_view

    def has_draft_signal(self, layer: int) -> bool:
        return self._draft_tokens[self._check_layer(layer)] > 0

    def predicted_levels(self, layer: int) -> np.ndarray:
        """[E] levels expected for `layer`'s coming window: provisional ones while a draft signal
        is pending, else the committed ones. Read-only."""
        layer = self._check_layer(layer)
        n = self._draft_tokens[layer]
        if not n:
            return self._levels_view[layer]
        cached = self._draft_levels[layer]
        if cached is None:
            cached = self._levels[layer].copy()
            self._apply(cached, self._draft_counts[layer], self.theta_up_for(n))
            cached.flags.writeable = False
            self._draft_levels[layer] = cached
        return cached

    def hot_mask(self, layer: int, threshold: int = 1) -> np.ndarray:
        """[E] bool: predicted level >= threshold."""
        if isinstance(threshold, bool) or not isinstance(threshold, (int, np.integer)) \
                or threshold < 0:
            raise ValueError(f"threshold: must be a non-negative integer, got {threshold!r}")
        return self.predicted_levels(layer) >= threshold

    # ---- prediction quality ------------------------------------------------------------------
    def score(self, layer: int, counts: np.ndarray, threshold: int = 1) -> None:
        """Score the current prediction for `layer` against the window about to be observed
        (call before `observe` with the same counts)."""
        c = self._check_counts(layer, counts)
        predicted = self.hot_mask(layer, threshold)
        actual = c > 0
        tp = int(np.count_nonzero(predicted & actual))
        n_pred = int(np.count_nonzero(predicted))
        n_act = int(np.count_nonzero(actual))
        row = self._confusion[layer]
        row[0] += tp
        row[1] += n_pred - tp
        row[2] += self.num_experts - n_pred - n_act + tp
        row[3] += n_act - tp
        row[4] += 1

    def accuracy(self) -> tuple[HotColdScore, ...]:
        """One `HotColdScore` per layer (layers never scored have windows == 0, NaN ratios)."""
        return tuple(
            HotColdScore(layer=i, windows=int(w), tp=int(tp), fp=int(fp), tn=int(tn), fn=int(fn))
            for i, (tp, fp, tn, fn, w) in enumerate(self._confusion.tolist())
        )

    # ---- validation --------------------------------------------------------------------------
    def _check_layer(self, layer: int) -> int:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) \
                or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer: must be an integer in [0, {self.num_layers}), got {layer!r}")
        return int(layer)

    def _check_counts(self, layer: int, counts: np.ndarray) -> np.ndarray:
        self._check_layer(layer)
        c = np.asarray(counts)
        if c.shape != (self.num_experts,) or c.dtype.kind not in "iu":
            raise ValueError(
                f"counts: expected an integer array of shape ({self.num_experts},), got "
                f"{c.dtype} {c.shape}"
            )
        return c


# ---- signal helpers ------------------------------------------------------------------------------
def counts_from_topk(topk_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """[T, K] routed expert ids -> [E] int64: tokens whose top-k contains each expert.

    A token lists an expert at most once in its top-k, so the bincount is the token count."""
    _check_positive_int("num_experts", num_experts)
    ids = np.asarray(topk_ids)
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise ValueError(f"topk_ids: expected an integer [T, K] array, got {ids.dtype} {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
        raise ValueError(f"topk_ids: expert ids must be in [0, {num_experts})")
    return np.bincount(ids.ravel(), minlength=num_experts).astype(np.int64, copy=False)


def counts_from_router_logits(logits: np.ndarray, top_k: int) -> np.ndarray:
    """[W, E] draft router logits -> [E] counts of the W draft tokens' top-k experts.

    Top-k of softmax = top-k of the logits, so no softmax is computed. Ties break towards the lower
    expert id (a stable sort), as torch.topk does on CPU for equal values in practice."""
    x = np.asarray(logits)
    if x.ndim != 2 or x.dtype.kind not in "fiu":
        raise ValueError(f"logits: expected a numeric [W, E] array, got {x.dtype} {x.shape}")
    w, e = x.shape
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= e:
        raise ValueError(f"top_k: must be an integer in [1, {e}], got {top_k!r}")
    if w == 0:
        return np.zeros(e, dtype=np.int64)
    if not np.all(np.isfinite(x)):
        raise ValueError("logits: must be finite")
    top = np.argsort(-x, axis=1, kind="stable")[:, :top_k]
    return np.bincount(top.ravel(), minlength=e).astype(np.int64, copy=False)


class AutoregressiveWindow:
    """Plain decoding: a sliding pseudo-window over the last `window_tokens` tokens of each layer.

    `push(layer, topk_ids[T, K])` adds the new tokens' routing and returns the [E] counts of the
    last `window_tokens` tokens (fewer at the start: `num_tokens(layer)` says how many). Feed them to
    `UtilityEstimator.observe(layer, counts, num_tokens=...)`. Note a token stays in the window for
    `window_tokens` consecutive observations; with window_tokens=1 this is plain n=1 decoding, where
    the faithful rule never rises (use theta_scale 'window')."""

    def __init__(self, num_layers: int, num_experts: int, window_tokens: int):
        _check_positive_int("num_layers", num_layers)
        _check_positive_int("num_experts", num_experts)
        _check_positive_int("window_tokens", window_tokens)
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.window_tokens = window_tokens
        self._history: list[list[np.ndarray]] = [[] for _ in range(num_layers)]
        self._counts = np.zeros((num_layers, num_experts), dtype=np.int64)

    def push(self, layer: int, topk_ids: np.ndarray) -> np.ndarray:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) \
                or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer: must be an integer in [0, {self.num_layers}), got {layer!r}")
        ids = np.asarray(topk_ids)
        if ids.ndim == 1:
            ids = ids[None, :]
        row_counts = self._counts[layer]
        hist = self._history[layer]
        for token in ids:
            row = counts_from_topk(token[None, :], self.num_experts)
            hist.append(row)
            row_counts += row
            if len(hist) > self.window_tokens:
                row_counts -= hist.pop(0)
        return row_counts.copy()

    def num_tokens(self, layer: int) -> int:
        return len(self._history[layer])


def _check_positive_int(name: str, v: object) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name}: must be a positive integer, got {v!r}")


__all__ = [
    "AutoregressiveWindow",
    "HotColdScore",
    "UtilityEstimator",
    "counts_from_router_logits",
    "counts_from_topk",
]
