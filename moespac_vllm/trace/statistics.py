"""Routing statistics of traces: expert popularity and its skew, temporal reuse, cross-layer
mutual information. The synthetic generator is calibrated on them and its tests check them.

Shapes: topk_ids [N, L, K]; shares [L, E]; reuse curves [L, max_lag]; pair counts [E, E].
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moespac_vllm.trace.format import StepKind, Trace, _gather_ranges


def expert_shares(topk_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, E] share of all routed (token, k) assignments per expert, per layer (rows sum to 1).
    topk_ids: [N, L, K]."""
    n, num_layers, _ = topk_ids.shape
    flat = (np.arange(num_layers)[None, :, None] * num_experts + topk_ids.astype(np.int64)).ravel()
    c = np.bincount(flat, minlength=num_layers * num_experts).reshape(num_layers, num_experts)
    return c / np.maximum(c.sum(axis=1, keepdims=True), 1)


def share_skew(shares: np.ndarray) -> np.ndarray:
    """Coefficient of variation (std / mean) of the per-expert shares, per layer; 0 is uniform."""
    s = np.atleast_2d(shares)
    return s.std(axis=1) / s.mean(axis=1)


def independent_reuse(shares: np.ndarray, top_k: int) -> np.ndarray:
    """[L] P(e in S_{t+d} | e in S_t) if tokens drew their experts independently with these
    popularities: sum(pi^2) / K with inclusion probabilities pi = K * share (clipped at 1)."""
    pi = np.clip(top_k * np.atleast_2d(shares), 0.0, 1.0)
    return (pi * pi).sum(axis=1) / top_k


def _stream_onehot(ids: np.ndarray, num_experts: int) -> np.ndarray:
    n, num_layers, _ = ids.shape
    oh = np.zeros((n, num_layers, num_experts), dtype=bool)
    np.put_along_axis(oh, ids.astype(np.int64), True, axis=2)
    return oh


def request_streams(trace: Trace) -> list[np.ndarray]:
    """Per request, the [n, L, K] routing of its non-prefill tokens in processing order."""
    out = []
    for sid in np.unique(trace.seq_id):
        steps = np.flatnonzero((trace.seq_id == sid) & (trace.kind != StepKind.PREFILL))
        rows = _gather_ranges(trace.token_offsets, steps)
        if rows.size:
            out.append(trace.topk_ids[rows])
    return out


def reuse_curve(streams: Trace | Sequence[np.ndarray], num_experts: int | None = None,
                max_lag: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Temporal reuse of an autoregressive stream, per layer.

    Returns (lagged [L, max_lag], within [L, max_lag]):
      lagged[l, d-1] = P(e in S_{t+d} | e in S_t)
      within[l, w-1] = P(e in S_{t+1} u ... u S_{t+w} | e in S_t)
    pooled over requests (never across a request boundary). `streams`: a plain decode Trace, or
    [n, L, K] arrays (then give num_experts)."""
    if isinstance(streams, Trace):
        num_experts = streams.dims.num_experts
        streams = request_streams(streams)
    if num_experts is None:
        raise ValueError("num_experts: required when streams are arrays")
    if not streams:
        raise ValueError("streams: empty")
    num_layers = streams[0].shape[1]
    hit_lag = np.zeros((num_layers, max_lag))
    hit_win = np.zeros((num_layers, max_lag))
    base = np.zeros((num_layers, max_lag))
    for ids in streams:
        oh = _stream_onehot(ids, num_experts)
        n = oh.shape[0]
        union = np.zeros_like(oh)
        for d in range(1, max_lag + 1):
            if d >= n:
                break
            src = oh[:-d]
            union[:-d] |= oh[d:]
            hit_lag[:, d - 1] += (src & oh[d:]).sum(axis=(0, 2))
            hit_win[:, d - 1] += (src & union[:-d]).sum(axis=(0, 2))
            base[:, d - 1] += src.sum(axis=(0, 2))
    base = np.maximum(base, 1)
    return hit_lag / base, hit_win / base


def _entropy_mm(counts: np.ndarray) -> float:
    """Miller-Madow corrected entropy (nats) of a histogram."""
    n = counts.sum()
    p = counts[counts > 0] / n
    return float(-(p * np.log(p)).sum() + (p.size - 1) / (2.0 * n))


def crosslayer_nmi(pair_counts: np.ndarray) -> float:
    """Normalised mutual information I(X;Y) / H(X) of a layer-to-layer count matrix [E, E]
    (entry [x, y]: (token, rank r) pairs with expert x at the first layer and y at the second),
    with Miller-Madow bias correction so that sample sizes of 10^5 pairs compare fairly."""
    m = np.asarray(pair_counts, dtype=np.float64)
    hx = _entropy_mm(m.sum(axis=1))
    mi = hx + _entropy_mm(m.sum(axis=0)) - _entropy_mm(m.ravel())
    return max(mi, 0.0) / hx if hx > 0 else 0.0


def rank_pair_counts(ids_a: np.ndarray, ids_b: np.ndarray, num_experts: int) -> np.ndarray:
    """[E, E] rank-paired layer-to-layer counts (the OLMoE stats' crosslayer layout) from two
    [N, K] top-k arrays of the same tokens."""
    flat = ids_a.astype(np.int64).ravel() * num_experts + ids_b.astype(np.int64).ravel()
    return np.bincount(flat, minlength=num_experts ** 2).reshape(num_experts, num_experts)
