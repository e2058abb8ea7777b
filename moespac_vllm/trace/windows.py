"""Speculative verification windows (1 + k tokens) built from a plain autoregressive trace,
with an acceptance model; routing the target never produced (rejected drafts, an MoE draft's
routers) is modelled and labelled as such.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from moespac_vllm.trace.format import StepKind, Trace, TraceMeta, _offsets


def _replace_members(ids: np.ndarray, mask: np.ndarray, num_experts: int,
                     rng: np.random.Generator) -> np.ndarray:
    """Copy of ids [R, K] where each masked slot holds a uniformly random expert that is not
    already in its row."""
    out = ids.astype(np.int64, copy=True)
    k = out.shape[1]
    for j in range(k):
        todo = np.flatnonzero(mask[:, j])
        for _ in range(64):
            if todo.size == 0:
                break
            cand = rng.integers(num_experts, size=todo.size)
            clash = (out[todo] == cand[:, None]).any(axis=1)
            ok = todo[~clash]
            out[ok, j] = cand[~clash]
            todo = todo[clash]
        for r in todo:  # vanishingly rare: draw from the complement directly
            free = np.setdiff1d(np.arange(num_experts), out[r])
            out[r, j] = rng.choice(free)
    return out


def windows_from_autoregressive(
    trace: Trace,
    k: int,
    acceptance: float | int = 0.8,
    seed: int = 0,
    rejected: str = "resample",
    perturb_prob: float = 0.5,
    draft_agreement: float | None = None,
) -> Trace:
    """Speculative verification windows (1 + k tokens) built from a plain decode trace.

    For each request, the decode tokens t_0, t_1, ... are replayed: a window starts at the last
    accepted token p and holds p, p+1, ..., p+k. Of the k drafts, `a` are accepted (acceptance
    model below) and the next window starts at p + a + 1 (the bonus token).
    - Accepted drafts are the true next tokens in the same context: their routing is the
      recorded routing of p+1..p+a, exact.
    - Drafts after the first rejection are tokens the target never generated: their routing was
      never recorded and is MODELLED (`token_modelled`, meta.modelled "rejected_draft_routing"):
      `rejected="resample"` copies the routing (all layers) of a token drawn uniformly from
      elsewhere in the same request's stream; `"perturb"` takes the true next token's routing
      and replaces each expert with probability `perturb_prob` by a random other one.
    Acceptance: a float alpha in [0, 1] is a per-draft-token acceptance probability (the first
    rejection ends acceptance; seeded); an int in [0, k] is a fixed accepted count. Windows are
    truncated at the end of a request.

    `draft_agreement` (optional) adds a MODELLED draft routing signal for an MoE draft that
    mirrors the target's routers: the draft's forwards take the window's first k tokens as
    inputs, and each of their true routed experts is kept with probability `draft_agreement`,
    else replaced by a random other expert (meta.modelled "draft_routing").
    Prefill steps pass through unchanged; the input must have no verify steps."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k: must be an integer >= 0, got {k!r}")
    if isinstance(acceptance, bool):
        raise ValueError("acceptance: must be a float in [0, 1] or an int in [0, k], "
                         f"got {acceptance!r}")
    if isinstance(acceptance, int):
        if not 0 <= acceptance <= k:
            raise ValueError(f"acceptance: fixed accepted count must be in [0, {k}], "
                             f"got {acceptance}")
    elif isinstance(acceptance, float):
        if not 0.0 <= acceptance <= 1.0:
            raise ValueError(f"acceptance: probability must be in [0, 1], got {acceptance}")
    else:
        raise ValueError(f"acceptance: must be a float or an int, got {type(acceptance).__name__}")
    if rejected not in ("resample", "perturb"):
        raise ValueError(f"rejected: must be 'resample' or 'perturb', got {rejected!r}")
    if not 0.0 <= perturb_prob <= 1.0:
        raise ValueError(f"perturb_prob: must be in [0, 1], got {perturb_prob}")
    if draft_agreement is not None and not 0.0 <= draft_agreement <= 1.0:
        raise ValueError(f"draft_agreement: must be in [0, 1], got {draft_agreement}")
    if np.any(trace.kind == StepKind.VERIFY):
        raise ValueError("trace: already holds verify steps; give a plain decode trace")
    decode = trace.kind == StepKind.DECODE
    if np.any(trace.tokens_per_step[decode] != 1):
        raise ValueError("trace: decode steps must hold exactly one token (batch 1)")

    rng = np.random.default_rng(seed)
    E = trace.dims.num_experts
    src: list[np.ndarray] = []  # source token index per output token
    modelled_rows: list[np.ndarray] = []
    perturb_rows: list[np.ndarray] = []
    kinds: list[int] = []
    seqs: list[int] = []
    accepted: list[int] = []
    sizes: list[int] = []
    draft_src: list[np.ndarray] = []
    draft_sizes: list[int] = []
    any_rejected = False

    # requests in order of first appearance; prefill steps keep their place before decode
    order: list[int] = []
    for sid in trace.seq_id:
        if int(sid) not in order:
            order.append(int(sid))
    for sid in order:
        steps = np.flatnonzero(trace.seq_id == sid)
        for s in steps[trace.kind[steps] == StepKind.PREFILL]:
            a, b = trace.token_offsets[s], trace.token_offsets[s + 1]
            src.append(np.arange(a, b))
            modelled_rows.append(trace.token_modelled[a:b].copy())
            perturb_rows.append(np.zeros(b - a, bool))
            kinds.append(StepKind.PREFILL)
            seqs.append(sid)
            accepted.append(0)
            sizes.append(int(b - a))
            draft_sizes.append(0)
        toks = trace.token_offsets[steps[trace.kind[steps] == StepKind.DECODE]]
        n = len(toks)
        p = 0
        while p < n:
            k_eff = min(k, n - 1 - p)
            if isinstance(acceptance, int):
                acc = min(acceptance, k_eff)
            else:
                acc = 0
                while acc < k_eff and rng.random() < acceptance:
                    acc += 1
            idx = toks[p:p + k_eff + 1].copy()
            mod = np.zeros(k_eff + 1, bool)
            pert = np.zeros(k_eff + 1, bool)
            if acc < k_eff:
                any_rejected = True
                mod[acc + 1:] = True
                if rejected == "resample":
                    pool = np.concatenate([toks[:p], toks[p + k_eff + 1:]])
                    if pool.size == 0:
                        pool = toks
                    idx[acc + 1:] = pool[rng.integers(pool.size, size=k_eff - acc)]
                else:
                    pert[acc + 1:] = True
            src.append(idx)
            modelled_rows.append(mod | trace.token_modelled[idx])
            perturb_rows.append(pert)
            kinds.append(StepKind.VERIFY if k_eff > 0 else StepKind.DECODE)
            seqs.append(sid)
            accepted.append(acc)
            sizes.append(k_eff + 1)
            draft_sizes.append(k_eff if draft_agreement is not None else 0)
            p += acc + 1

    src_idx = np.concatenate(src) if src else np.zeros(0, np.int64)
    ids = trace.topk_ids[src_idx].astype(np.int64)
    pert_mask = np.concatenate(perturb_rows) if perturb_rows else np.zeros(0, bool)
    if pert_mask.any():
        rows = ids[pert_mask].reshape(-1, trace.dims.top_k)
        m = rng.random(rows.shape) < perturb_prob
        ids[pert_mask] = _replace_members(rows, m, E, rng).reshape(-1, *ids.shape[1:])
    modelled = list(trace.meta.modelled)
    tok_modelled = np.concatenate(modelled_rows) if modelled_rows else np.zeros(0, bool)
    if any_rejected and "rejected_draft_routing" not in modelled:
        modelled.append("rejected_draft_routing")
    offsets = _offsets(np.array(sizes, np.int64))
    kw: dict[str, Any] = {}
    if draft_agreement is not None:
        # draft forwards: inputs are the window's first k_eff tokens (last accepted + drafts)
        for s, sz in enumerate(draft_sizes):
            draft_src.append(np.arange(offsets[s], offsets[s] + sz))
        dsrc = np.concatenate(draft_src) if draft_src else np.zeros(0, np.int64)
        dids = ids[dsrc].reshape(-1, trace.dims.top_k)
        m = rng.random(dids.shape) >= draft_agreement
        dids = _replace_members(dids, m, E, rng).reshape(-1, trace.dims.num_layers,
                                                          trace.dims.top_k)
        kw = {"draft_offsets": _offsets(np.array(draft_sizes, np.int64)), "draft_topk_ids": dids}
        if "draft_routing" not in modelled:
            modelled.append("draft_routing")
    notes = dict(trace.meta.notes)
    notes["windows"] = {"k": k, "acceptance": acceptance, "seed": seed, "rejected": rejected,
                        "perturb_prob": perturb_prob if rejected == "perturb" else None,
                        "draft_agreement": draft_agreement}
    meta = TraceMeta(trace.meta.source, trace.meta.synthetic, tuple(modelled), notes)
    return Trace(
        dims=trace.dims, meta=meta, kind=np.array(kinds, np.int8), seq_id=np.array(seqs),
        num_accepted=np.array(accepted), token_offsets=offsets, topk_ids=ids,
        topk_weights=None if trace.topk_weights is None else trace.topk_weights[src_idx],
        router_logits=None if trace.router_logits is None else trace.router_logits[src_idx],
        token_modelled=tok_modelled, **kw)
