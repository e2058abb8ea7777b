"""Synthetic Qwen3-30B-A3B-scale traces from a generator calibrated on real routing statistics
(OLMoE popularity and co-occurrence, Mixtral temporal reuse); every trace is labelled synthetic
and carries its targets and what it achieved in `meta.notes`.
"""
from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moespac_vllm.trace.format import QWEN3_30B_A3B, ModelDims, StepKind, Trace, TraceMeta
from moespac_vllm.trace.readers import load_trace
from moespac_vllm.trace.recorder import TraceRecorder
from moespac_vllm.trace.statistics import (
    crosslayer_nmi,
    expert_shares,
    independent_reuse,
    rank_pair_counts,
    reuse_curve,
    share_skew,
)
from moespac_vllm.trace.windows import windows_from_autoregressive

log = logging.getLogger(__name__)


# ---- synthetic Qwen3-30B-A3B-scale traces ----------------------------------------------------
# Generative model (ours, documented as such). Each token has a latent "topic" c_t in {0..C-1}
# shared by all layers (it stays with probability `topic_stay` from token to token); at layer l
# the token's experts are the top-K of  log p_l + sigma * z[l, c_t] + Gumbel  (Plackett-Luce
# sampling without replacement), except that each of the previous token's experts is first kept
# with probability rho_l. The knobs are fitted to three targets:
#   popularity skew  p_l: OLMoE's sorted expert shares at layers 0/7/15 (of 16), resampled to E
#                    and interpolated in log space over depth (shared/data/olmoe-mixtral-routing-
#                    stats); corrected for Plackett-Luce flattening by re-weighting;
#   co-occurrence    sigma: the rank-paired normalised MI I(X;Y)/H(X) of OLMoE's layer pairs
#                    0->7 and 7->15, mapped by depth (one knob: fitted to their mean);
#   temporal reuse   rho_l: the lag-1 reuse LIFT over independent draws measured per layer in the
#                    Mixtral decode traces, lift = (R1 - R0) / (1 - R0), interpolated over depth
#                    and re-applied at the synthetic model's own independent baseline R0.
_TOPICS = 16
_TOPIC_STAY = 0.5
_STATS_LAYERS = (0, 7, 15)  # the layers the routing-stats files keep
# MoE layers of the model each stats file came from (OLMoE-1B-7B: 16, Mixtral-8x7B: 32)
_STATS_MODEL_LAYERS = {"olmoe": 16, "mixtral": 32}


@dataclass(frozen=True, slots=True)
class SyntheticTargets:
    """Calibration targets of the synthetic generator and where they came from."""

    shares: np.ndarray  # [L, E] target expert shares (rows sum to 1), expert ids permuted
    reuse_lift: np.ndarray  # [L] lag-1 reuse lift over independent draws (fitted)
    reuse_lift_lags: np.ndarray  # [L, 4] lift at lags 1..4 (lags 2..4: reported, not fitted)
    nmi_pairs: tuple[tuple[int, int, float], ...]  # (layer a, layer b, target I/H)
    sources: dict[str, Any]

    @property
    def skew(self) -> np.ndarray:
        return share_skew(self.shares)


def _resample_sorted(shares_sorted: np.ndarray, num_experts: int) -> np.ndarray:
    """Quantile-resample a descending share curve to num_experts points (sum 1)."""
    src = np.asarray(shares_sorted, dtype=np.float64)
    q_src = (np.arange(src.size) + 0.5) / src.size
    q_dst = (np.arange(num_experts) + 0.5) / num_experts
    out = np.exp(np.interp(q_dst, q_src, np.log(np.maximum(src, 1e-12))))
    return out / out.sum()


def _depth_interp(values: np.ndarray, src_depths: np.ndarray, num_layers: int) -> np.ndarray:
    """Linear interpolation over relative depth of per-source-layer rows, to num_layers rows."""
    dst = np.linspace(0.0, 1.0, num_layers) if num_layers > 1 else np.zeros(1)
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 1:
        return np.interp(dst, src_depths, v)
    return np.stack([np.interp(dst, src_depths, v[:, j]) for j in range(v.shape[1])], axis=1)


def _stats_file(stats: str | Path) -> Path:
    p = Path(stats)
    if p.is_dir():
        p = p / "olmoe_1b_7b_0924_routing_stats.npz"
    if not p.is_file():
        raise ValueError(f"stats: {p} not found (give the OLMoE routing-stats npz or its folder)")
    return p


def synthetic_targets(dims: ModelDims, seed: int = 0, stats: str | Path | None = None,
                      reuse: str | Path | Trace | float | None = None,
                      domain: str = "c4") -> SyntheticTargets:
    """The generator's targets. `stats`: OLMoE routing-stats npz (or folder); None = uniform
    popularity and no co-occurrence. `reuse`: a Mixtral routing JSONL / plain decode Trace to
    measure the lag-1 lift from, or the lift itself as a float; None = 0 (no reuse beyond
    popularity)."""
    rng = np.random.default_rng([seed, 1])
    L, E = dims.num_layers, dims.num_experts
    sources: dict[str, Any] = {}
    nmi_pairs: tuple[tuple[int, int, float], ...] = ()
    if stats is None:
        shares = np.full((L, E), 1.0 / E)
        sources["popularity"] = "uniform (no stats given or found)"
    else:
        path = _stats_file(stats)
        model_layers = [n for key, n in _STATS_MODEL_LAYERS.items() if key in path.name.lower()]
        if len(model_layers) != 1:
            raise ValueError(f"stats: cannot tell the source model of {path.name} (expected "
                             f"a name containing one of {sorted(_STATS_MODEL_LAYERS)})")
        src_depths = np.array(_STATS_LAYERS, float) / (model_layers[0] - 1)
        with np.load(path, allow_pickle=False) as z:
            key = f"expert_counts__{domain}"
            if key not in z.files:
                raise ValueError(f"domain: {domain!r} not in {path.name}")
            counts = z[key].astype(np.float64)
            cross = z[f"expert_counts_crosslayer__{domain}"].astype(np.float64)
        curves = np.stack([_resample_sorted(np.sort(c / c.sum())[::-1], E) for c in counts])
        log_curves = _depth_interp(np.log(curves), src_depths, L)
        shares = np.exp(log_curves)
        shares /= shares.sum(axis=1, keepdims=True)
        for l in range(L):
            shares[l] = shares[l][rng.permutation(E)]
        la = [int(round(d * (L - 1))) for d in src_depths]
        nmi_pairs = tuple((la[i], la[i + 1], crosslayer_nmi(cross[i])) for i in range(2))
        sources["popularity"] = (f"{path.name}:{key} layers {_STATS_LAYERS} of "
                                 f"{model_layers[0]}, interpolated over depth")
        sources["cooccurrence"] = f"{path.name}:expert_counts_crosslayer__{domain} (0->7, 7->15)"
    if reuse is None:
        lifts = np.zeros((L, 4))
        sources["reuse"] = "none given or found (lift 0)"
    elif isinstance(reuse, (int, float)) and not isinstance(reuse, bool):
        lifts = np.full((L, 4), np.nan)
        lifts[:, 0] = float(reuse)
        sources["reuse"] = f"given lag-1 lift {float(reuse)}"
    else:
        tr = reuse if isinstance(reuse, Trace) else load_trace(reuse)
        lag, _ = reuse_curve(tr, max_lag=4)
        r0 = independent_reuse(expert_shares(tr.topk_ids, tr.dims.num_experts), tr.dims.top_k)
        src_lift = (lag - r0[:, None]) / (1.0 - r0[:, None])
        lifts = _depth_interp(np.clip(src_lift, 0.0, 1.0),
                              np.linspace(0.0, 1.0, tr.dims.num_layers), L)
        sources["reuse"] = (f"lag-1..4 lifts measured on {tr.label} ({tr.num_tokens} tokens;"
                            " lag 1 fitted), "
                            "interpolated over depth")
    return SyntheticTargets(shares=shares, reuse_lift=lifts[:, 0], reuse_lift_lags=lifts,
                            nmi_pairs=nmi_pairs, sources=sources)


def reuse_target(targets: SyntheticTargets, top_k: int, lag: int = 1) -> np.ndarray:
    """[L] target reuse P(e in S_{t+lag} | e in S_t) for a model with these shares (lag 1..4)."""
    if not 1 <= lag <= targets.reuse_lift_lags.shape[1]:
        raise ValueError(f"lag: must be in [1, {targets.reuse_lift_lags.shape[1]}], got {lag}")
    r0 = independent_reuse(targets.shares, top_k)
    return r0 + targets.reuse_lift_lags[:, lag - 1] * (1.0 - r0)


def _topk_ranked(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest along the last axis, best first."""
    part = np.argpartition(-scores, k - 1, axis=-1)[..., :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=-1), axis=-1)
    return np.take_along_axis(part, order, axis=-1)


def _sample_independent(logits: np.ndarray, n: int, k: int, rng: np.random.Generator,
                        topics: np.ndarray) -> np.ndarray:
    """[n, L, K] tokens drawn independently given their topics (no temporal copying)."""
    num_layers = logits.shape[0]
    out = np.empty((n, num_layers, k), np.int64)
    for l in range(num_layers):
        sc = logits[l, topics] + rng.gumbel(size=(n, logits.shape[2])).astype(np.float32)
        out[:, l] = _topk_ranked(sc, k)
    return out


def _sample_stream(logits: np.ndarray, rho: np.ndarray, n: int, k: int,
                   rng: np.random.Generator, stay: float) -> np.ndarray:
    """[n, L, K] one autoregressive stream with topic persistence and expert copying."""
    num_layers, num_topics, num_experts = logits.shape
    out = np.empty((n, num_layers, k), np.int64)
    rows = np.arange(num_layers)[:, None]
    topic = int(rng.integers(num_topics))
    chunk = 256
    for t0 in range(0, n, chunk):
        m = min(chunk, n - t0)
        gum = rng.gumbel(size=(m, num_layers, num_experts)).astype(np.float32)
        keep_u = rng.random((m, num_layers, k))
        switch = rng.random(m) >= stay
        new_topics = rng.integers(num_topics, size=m)
        for i in range(m):
            t = t0 + i
            if switch[i]:
                topic = int(new_topics[i])
            sc = logits[:, topic, :] + gum[i]
            if t > 0:
                boosted = sc.copy()
                keep = keep_u[i] < rho[:, None]
                prev = out[t - 1]
                boosted[np.broadcast_to(rows, prev.shape)[keep], prev[keep]] += 1e4
                part = np.argpartition(-boosted, k - 1, axis=1)[:, :k]
            else:
                part = np.argpartition(-sc, k - 1, axis=1)[:, :k]
            order = np.argsort(-np.take_along_axis(sc, part, axis=1), axis=1)
            out[t] = np.take_along_axis(part, order, axis=1)
    return out


@dataclass(frozen=True, slots=True)
class SyntheticModel:
    """The fitted generator: logits [L, C, E], copy probabilities rho [L], topic persistence."""

    logits: np.ndarray
    rho: np.ndarray
    topic_stay: float
    sigma: float
    targets: SyntheticTargets

    def sample(self, num_tokens: int, top_k: int, rng: np.random.Generator) -> np.ndarray:
        """[num_tokens, L, top_k] one autoregressive stream."""
        return _sample_stream(self.logits, self.rho, num_tokens, top_k, rng, self.topic_stay)


def _model_nmi(logits: np.ndarray, pairs: Sequence[tuple[int, int, float]], top_k: int,
               seed: int, num_tokens: int = 20000) -> list[float]:
    """Rank-paired normalised MI of the generator's layer pairs, from num_tokens independent
    tokens (only the layers involved are sampled: cheap enough for 10^5 pairs per estimate)."""
    layers = sorted({l for a, b, _ in pairs for l in (a, b)})
    r = np.random.default_rng([seed, 3])  # common random numbers across calls
    topics = r.integers(logits.shape[1], size=num_tokens)
    ids = _sample_independent(logits[layers], num_tokens, top_k, r, topics)
    pos = {l: i for i, l in enumerate(layers)}
    return [crosslayer_nmi(rank_pair_counts(ids[:, pos[a]], ids[:, pos[b]], logits.shape[2]))
            for a, b, _ in pairs]


def fit_synthetic(dims: ModelDims, targets: SyntheticTargets, seed: int = 0,
                  sample_tokens: int = 3000) -> SyntheticModel:
    """Fit sigma (co-occurrence), the popularity correction and rho (reuse) to the targets."""
    rng = np.random.default_rng([seed, 2])
    L, E, K = dims.num_layers, dims.num_experts, dims.top_k
    z = rng.standard_normal((L, _TOPICS, E)).astype(np.float32)
    lp = np.log(targets.shares).astype(np.float32)

    def build(sigma: float) -> np.ndarray:
        return (lp[:, None, :] + sigma * z).astype(np.float32)

    sigma = 0.0
    if targets.nmi_pairs:
        want = float(np.mean([v for _, _, v in targets.nmi_pairs]))
        lo, hi = 0.0, 3.0
        for _ in range(7):  # bisection: the MI grows with sigma
            mid = 0.5 * (lo + hi)
            got = float(np.mean(_model_nmi(build(mid), targets.nmi_pairs, K, seed)))
            lo, hi = (mid, hi) if got < want else (lo, mid)
        sigma = 0.5 * (lo + hi)
    r = np.random.default_rng([seed, 4])
    for _ in range(3):  # undo Plackett-Luce flattening and topic mixing of the marginals
        topics = r.integers(_TOPICS, size=sample_tokens)
        sample = _sample_independent(build(sigma), sample_tokens, K, r, topics)
        got_shares = expert_shares(sample, E)
        lp = lp + 0.8 * np.log(targets.shares / np.maximum(got_shares, 1e-9)).astype(np.float32)
    logits = build(sigma)
    # rho: lag-1 reuse R1 = rho + (1 - rho) * R0' where R0' is the reuse without copying
    want_r1 = reuse_target(targets, K)
    rho = np.zeros(L)
    for _ in range(2):
        ids = _sample_stream(logits, rho, sample_tokens, K, np.random.default_rng([seed, 5]),
                             _TOPIC_STAY)
        r1 = reuse_curve([ids], E, max_lag=1)[0][:, 0]
        r_nocopy = (r1 - rho) / np.maximum(1.0 - rho, 1e-9)
        rho = np.clip((want_r1 - r_nocopy) / np.maximum(1.0 - r_nocopy, 1e-9), 0.0, 0.95)
    return SyntheticModel(logits=logits, rho=rho, topic_stay=_TOPIC_STAY, sigma=sigma,
                          targets=targets)


def _shared_data(rel: str) -> Path | None:
    from moespac_vllm.config import shared_data_dir

    root = shared_data_dir()
    if root is not None and (root / rel).is_file():
        return root / rel
    log.warning("synthetic trace: %s not found (set MOESPAC_DATA_DIR); running uncalibrated", rel)
    return None


@functools.lru_cache(maxsize=8)
def _fitted(dims: ModelDims, seed: int, stats: str | None, reuse: str | float | None,
            domain: str) -> SyntheticModel:
    """Fitting costs seconds; repeated traces of one configuration reuse the fit."""
    return fit_synthetic(dims, synthetic_targets(dims, seed, stats, reuse, domain), seed)


def synthetic_trace(
    dims: ModelDims = QWEN3_30B_A3B,
    num_steps: int = 512,
    k: int = 8,
    seed: int = 0,
    stats: str | Path | None = "auto",
    reuse: str | Path | Trace | float | None = "auto",
    acceptance: float | int = 0.8,
    draft_agreement: float | None = None,
    num_requests: int = 1,
    domain: str = "c4",
) -> Trace:
    """A SYNTHETIC trace at `dims` scale (default Qwen3-30B-A3B): an autoregressive stream per
    request from the calibrated generator (see the comment above `SyntheticTargets`), then
    verification windows of 1 + k tokens by `windows_from_autoregressive` (k = 0: plain decode).
    About `num_steps` steps in all. meta.synthetic is True and meta.notes holds the targets
    and what the generator achieved on this very trace.
    `stats` / `reuse` = "auto": the OLMoE routing stats and the Mixtral HumanEval decode trace
    from the shared data folder ($MOESPAC_DATA_DIR, else ../shared/data beside the checkout);
    when absent the generator runs uncalibrated (uniform popularity, no co-occurrence, no extra
    reuse), logs a warning and says so in meta.notes["sources"]."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps: must be a positive integer, got {num_steps!r}")
    if isinstance(num_requests, bool) or not isinstance(num_requests, int) or num_requests < 1:
        raise ValueError(f"num_requests: must be a positive integer, got {num_requests!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k: must be an integer >= 0, got {k!r}")
    if stats == "auto":
        stats = _shared_data("olmoe-mixtral-routing-stats/olmoe_1b_7b_0924_routing_stats.npz")
    if reuse == "auto":
        reuse = _shared_data("mixtral-8x7b-routing/humaneval_2_routing.jsonl")
    if isinstance(reuse, Trace):
        model = fit_synthetic(dims, synthetic_targets(dims, seed, stats, reuse, domain), seed)
    else:
        model = _fitted(dims, seed, None if stats is None else str(stats),
                        None if reuse is None else (float(reuse) if isinstance(reuse, (int, float))
                                                    else str(reuse)), domain)
    targets = model.targets
    rng = np.random.default_rng([seed, 5])
    if k == 0:
        tokens_per_step = 1.0
    elif isinstance(acceptance, int):
        tokens_per_step = acceptance + 1.0
    else:  # expected accepted drafts + the bonus token
        tokens_per_step = sum(acceptance ** i for i in range(k + 1))
    per_request = max(2, int(math.ceil(num_steps * tokens_per_step / num_requests)))
    rec = TraceRecorder(dims, source="synthetic-qwen3-scale", synthetic=True,
                        modelled=("all_routing",))
    streams = []
    for r in range(num_requests):
        ids = model.sample(per_request, dims.top_k, rng)
        streams.append(ids)
        for t in range(per_request):
            rec.add_step(StepKind.DECODE, ids[t:t + 1], seq_id=r,
                         token_modelled=np.ones(1, bool))
    base = rec.build()
    lag, within = reuse_curve(streams, dims.num_experts, max_lag=4)
    all_ids = np.concatenate(streams)
    # the MI estimate needs ~10^5 pairs: measured on the fitted model, not on this short trace
    got_nmi = _model_nmi(model.logits, targets.nmi_pairs, dims.top_k, seed + 1)
    got_shares = expert_shares(all_ids, dims.num_experts)
    notes = {
        "generator": {"topics": _TOPICS, "topic_stay": model.topic_stay, "sigma": model.sigma,
                      "rho_mean": float(model.rho.mean()), "seed": seed, "domain": domain},
        "sources": targets.sources,
        "target": {"skew_mean": float(targets.skew.mean()),
                   "reuse_lag1_mean": float(reuse_target(targets, dims.top_k).mean()),
                   "reuse_lag_1to4_mean": [float(reuse_target(targets, dims.top_k, d).mean())
                                           for d in range(1, 5)],
                   "nmi": [v for _, _, v in targets.nmi_pairs]},
        "achieved": {"skew_mean": float(share_skew(got_shares).mean()),
                     "reuse_lag1_mean": float(lag[:, 0].mean()),
                     "reuse_lag1_max_abs_dev": float(np.abs(
                         lag[:, 0] - reuse_target(targets, dims.top_k)).max()),
                     "reuse_lag_1to4_mean": [float(x) for x in lag.mean(axis=0)],
                     "reuse_within_1to4_mean": [float(x) for x in within.mean(axis=0)],
                     "nmi_model": got_nmi},
    }
    base = Trace(dims=base.dims, meta=TraceMeta(base.meta.source, True, ("all_routing",), notes),
                 kind=base.kind, seq_id=base.seq_id, num_accepted=base.num_accepted,
                 token_offsets=base.token_offsets, topk_ids=base.topk_ids,
                 token_modelled=base.token_modelled)
    if k == 0:
        return base
    return windows_from_autoregressive(base, k, acceptance, seed=seed,
                                       draft_agreement=draft_agreement)
