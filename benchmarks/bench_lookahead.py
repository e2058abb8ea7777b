"""bench_lookahead: does cross-layer router lookahead earn a place as a prefetch signal?
(issue #13 item 3)

The signal: layer l's router applied to layer l-1's MoE input, top-k, recorded by the plugin as
the trace's `lookahead_ids` while `record_trace` is on (trace/format.py's convention; layer 0 has
none). It predicts layer l's experts one layer before layer l runs. Recording the traces (the
trained pair, draft_model k=3, one request at a time so that consecutive rows of the trace are
consecutive tokens of one request):

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv/bin/python benchmarks/bench_acceptance.py \\
        .models/trained-qwen3-moe --draft draft --k 3 --datasets humaneval --num-prompts 16 \\
        --max-num-seqs 1 --moespac-config '{"record_trace": "/tmp/la/he.npz"}' \\
        --results /tmp/la/acceptance.jsonl
    .venv/bin/python benchmarks/bench_lookahead.py --json /tmp/la/he.npz [/tmp/la/gsm.npz ...]

vLLM's warm-up forwards at the start of a trace are dropped (`drop_warmup`). Per trace, per
phase (`prefill` tokens, `decode` = decode + verify tokens, `all`), one JSON line per predictor
(`bench: lookahead`), scored per token at layers 1..L-1 against the K experts the layer really
routed (|P & R| / |P| precision, |P & R| / K recall, averaged over tokens, then over layers;
per-layer lists too). Scored tokens: those with at least one earlier token in their request, so
that every predictor has something to go on.

  lookahead     the recorded lookahead (K experts)
  prev_token    the same layer's routing of the request's previous token (K experts)
  window_union  the union of the same layer's routing over the previous W tokens (W = --window)
  frequency     the K experts the same layer routed most often over the previous F tokens
  random        K experts drawn uniformly (the base rate, K / E; expected value, not drawn)

Then the adoption question on the simulator side, without the engine (`bench: lookahead_lru`):
each layer an LRU cache of round(ratio x E) slots over the trace's steps, demand = the union of
the step's routed experts at that layer. `coverage_upper_bound` is the share of the plain LRU's
misses at layers 1..L-1 that a prefetch of the step's lookahead union (issued one layer ahead)
would have covered, with the plain LRU's residency (prefetches neither evict nor arrive late:
an upper bound). `lru+lookahead` runs the prefetch for real (prefetched experts enter the LRU
before the layer runs and evict like any other) and counts misses (a stall or a CPU fallback)
and transfers (misses + prefetches) next to the plain LRU. Layer 0 has no lookahead and is left
out of both counts.

Prints JSON lines (--json) tagged with the device and the command, else a short table.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moespac_vllm.calibrate import describe_device  # noqa: E402
from moespac_vllm.trace import StepKind, Trace, load_trace  # noqa: E402


def stream_starts(trace: Trace) -> np.ndarray:
    """[N] bool: the row has no earlier row of its request. With one request at a time the trace
    is one request after another: a request begins at a prefill step that follows a decode or
    verify step (or at row 0); a prefill step that follows a prefill step continues it (chunked
    prefill, or vLLM's warm-up runs before the first request)."""
    starts = np.zeros(trace.num_tokens, dtype=bool)
    prev = None
    for s in range(trace.num_steps):
        k = StepKind(int(trace.kind[s]))
        if k is StepKind.PREFILL and prev is not StepKind.PREFILL:
            a = int(trace.token_offsets[s])
            if a < trace.num_tokens:
                starts[a] = True
        prev = k
    if trace.num_tokens:
        starts[0] = True
    return starts


def drop_warmup(trace: Trace) -> tuple[Trace, int]:
    """The trace without vLLM's warm-up / profiling forwards (the plugin records them too: a
    prefill of max_num_batched_tokens dummy tokens that all route alike): the steps before the
    prefill that opens the first request, i.e. before the last prefill step ahead of the first
    decode / verify step. Returns (trace, steps dropped)."""
    dec = np.flatnonzero(trace.kind != StepKind.PREFILL)
    if dec.size == 0 or dec[0] == 0:
        return trace, 0
    first = int(dec[0]) - 1  # the first request's prefill (one step: prompts are not chunked)
    return trace.select(np.arange(first, trace.num_steps)), first


def check_one_request_at_a_time(trace: Trace) -> None:
    """Decode / verify steps of one request have 1 + k tokens at most; more means a batch of
    requests, whose rows interleave (the 'previous token' baselines would be wrong)."""
    k = int(trace.meta.notes.get("num_spec_tokens", 0) or 0)
    dec = trace.kind != StepKind.PREFILL
    if dec.any() and int(trace.tokens_per_step[dec].max()) > 1 + k:
        raise SystemExit(f"{trace.label}: decode steps of up to "
                         f"{int(trace.tokens_per_step[dec].max())} tokens (k={k}): record with "
                         "--max-num-seqs 1 (one request at a time)")


def _mask(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """[N, L, K] ids -> [N, L, E] bool."""
    m = np.zeros((*ids.shape[:2], num_experts), dtype=bool)
    np.put_along_axis(m, ids.astype(np.int64), True, axis=2)
    return m


def history_index(starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N] index of each row's request start, and [N] its position in the request."""
    start_row = np.maximum.accumulate(np.where(starts, np.arange(starts.size), 0))
    return start_row, np.arange(starts.size) - start_row


def predictors(trace: Trace, window: int, freq_window: int) -> dict[str, np.ndarray]:
    """[N, L, E] bool predicted sets per predictor (rows without history: all False)."""
    E, K = trace.dims.num_experts, trace.dims.top_k
    real = _mask(trace.topk_ids, E)
    starts = stream_starts(trace)
    start_row, pos = history_index(starts)
    N = trace.num_tokens
    prev = np.zeros_like(real)
    prev[1:] = real[:-1]
    prev[pos == 0] = False
    union = np.zeros_like(real)
    for d in range(1, window + 1):
        shifted = np.zeros_like(real)
        if d < N:
            shifted[d:] = real[:-d]
        shifted[pos < d] = False
        union |= shifted
    cum = np.concatenate([np.zeros((1, *real.shape[1:]), np.int32),
                          np.cumsum(real, axis=0, dtype=np.int32)])
    lo = np.maximum(np.arange(N) - freq_window, start_row)
    counts = cum[np.arange(N)] - cum[lo]  # tokens [lo, n) of the request
    # top-K by count, ties broken towards the most recent use (then the lower id); a row with
    # history has >= K experts of count >= 1 (its previous token's), so all K picked have one
    last = np.maximum.accumulate(np.where(real, np.arange(N)[:, None, None], -1), axis=0)
    last_before = np.full_like(last, -1)
    last_before[1:] = last[:-1]
    rank = counts.astype(np.int64) * (N + 2) + (last_before + 1)
    freq = _mask(np.argsort(-rank, axis=2, kind="stable")[..., :K], E)
    freq[pos == 0] = False
    out = {"prev_token": prev, "window_union": union, "frequency": freq}
    if trace.lookahead_ids is not None:
        la = np.zeros_like(real)
        la[:, 1:] = _mask(trace.lookahead_ids[:, 1:], E)
        out = {"lookahead": la, **out}
    return out


def score(pred: np.ndarray, real: np.ndarray, rows: np.ndarray) -> dict:
    """Per token precision / recall at layers 1..L-1, averaged over tokens, then layers."""
    p, r = pred[rows, 1:], real[rows, 1:]
    hit = (p & r).sum(axis=2).astype(np.float64)
    size = p.sum(axis=2)
    prec = np.where(size > 0, hit / np.maximum(size, 1), 0.0).mean(axis=0)
    rec = (hit / r.sum(axis=2)).mean(axis=0)
    exact = np.all(p == r, axis=2).mean(axis=0)
    return {"precision": round(float(prec.mean()), 4), "recall": round(float(rec.mean()), 4),
            "exact_set": round(float(exact.mean()), 4),
            "mean_predicted": round(float(size.mean()), 3),
            "per_layer_precision": [round(float(x), 4) for x in prec],
            "per_layer_recall": [round(float(x), 4) for x in rec]}


def lru_rows(trace: Trace, ratios: list[float]) -> list[dict]:
    """Plain LRU vs LRU + lookahead prefetch per layer over the steps (module docstring)."""
    E, L = trace.dims.num_experts, trace.dims.num_layers
    real = _mask(trace.topk_ids, E)
    la = _mask(trace.lookahead_ids, E) if trace.lookahead_ids is not None else None
    assert la is not None
    la[:, 0] = False
    off = trace.token_offsets
    demand = np.stack([real[off[s]:off[s + 1]].any(axis=0) for s in range(trace.num_steps)])
    ahead = np.stack([la[off[s]:off[s + 1]].any(axis=0) for s in range(trace.num_steps)])
    decode = trace.kind != StepKind.PREFILL
    rows = []
    for ratio in ratios:
        C = max(1, int(round(ratio * E)))
        tot = {ph: dict(misses_lru=0, covered=0, wasted=0, misses_la=0, prefetches_la=0,
                        demand=0) for ph in ("prefill", "decode")}
        for layer in range(1, L):
            plain: list[int] = []  # LRU order, most recent last
            withla: list[int] = []
            for s in range(trace.num_steps):
                t = tot["decode" if decode[s] else "prefill"]
                d = np.flatnonzero(demand[s, layer]).tolist()
                p = np.flatnonzero(ahead[s, layer]).tolist()
                res = set(plain)
                miss = [e for e in d if e not in res]
                t["demand"] += len(d)
                t["misses_lru"] += len(miss)
                t["covered"] += sum(e in p for e in miss)
                t["wasted"] += sum(e not in res and e not in d for e in p)
                _touch(plain, d, C)
                res_b = set(withla)
                fetch = [e for e in p if e not in res_b]
                t["prefetches_la"] += len(fetch)
                _touch(withla, p, C)  # the prefetch lands before the layer runs
                res_b = set(withla)
                t["misses_la"] += sum(e not in res_b for e in d)
                _touch(withla, d, C)
        for ph, t in tot.items():
            rows.append({"cache_ratio": ratio, "slots": C, "phase": ph,
                         "layers_scored": f"1..{L - 1}", "demand": t["demand"],
                         "misses_lru": t["misses_lru"], "covered_by_lookahead": t["covered"],
                         "coverage_upper_bound": round(t["covered"] / t["misses_lru"], 4)
                         if t["misses_lru"] else None,
                         "lookahead_prefetches_unused_upper": t["wasted"],
                         "misses_lru_plus_lookahead": t["misses_la"],
                         "transfers_lru": t["misses_lru"],
                         "transfers_lru_plus_lookahead": t["misses_la"] + t["prefetches_la"],
                         "miss_rate_lru": round(t["misses_lru"] / t["demand"], 4)
                         if t["demand"] else None,
                         "miss_rate_lru_plus_lookahead": round(t["misses_la"] / t["demand"], 4)
                         if t["demand"] else None})
    return rows


def _touch(lru: list[int], experts: list[int], capacity: int) -> None:
    """Move `experts` to the most-recent end (inserting the absent ones), evict down to
    `capacity` from the least-recent end."""
    for e in experts:
        if e in lru:
            lru.remove(e)
        lru.append(e)
    del lru[: max(0, len(lru) - capacity)]


def analyse(path: str, window: int, freq_window: int, ratios: list[float]) -> list[dict]:
    trace = load_trace(path)
    if trace.lookahead_ids is None:
        raise SystemExit(f"{path}: no lookahead_ids; record it with a plugin that has "
                         "cross-layer lookahead (record_trace on)")
    trace, warmup = drop_warmup(trace)
    check_one_request_at_a_time(trace)
    E, K, L = trace.dims.num_experts, trace.dims.top_k, trace.dims.num_layers
    real = _mask(trace.topk_ids, E)
    preds = predictors(trace, window, freq_window)
    _, pos = history_index(stream_starts(trace))
    tok_kind = trace.kind[trace.step_of_token()]
    is_pre = tok_kind == StepKind.PREFILL
    base = {"trace": str(path), "label": trace.label,
            "model": trace.meta.notes.get("model", ""),
            "spec": f"{trace.meta.notes.get('spec_method', '?')} "
                    f"k={trace.meta.notes.get('num_spec_tokens', '?')}",
            "E": E, "top_k": K, "num_layers": L, "steps": trace.num_steps,
            "tokens": trace.num_tokens, "warmup_steps_dropped": warmup}
    out = []
    for phase, sel in (("prefill", is_pre), ("decode", ~is_pre), ("all", np.ones_like(is_pre))):
        rows = np.flatnonzero(sel & (pos > 0))
        if rows.size == 0:
            continue
        for name, pred in preds.items():
            out.append({"bench": "lookahead", **base, "phase": phase,
                        "scored_tokens": int(rows.size), "predictor": name,
                        **({"window": window} if name == "window_union" else {}),
                        **({"window": freq_window} if name == "frequency" else {}),
                        **score(pred, real, rows)})
        out.append({"bench": "lookahead", **base, "phase": phase, "scored_tokens": int(rows.size),
                    "predictor": "random", "precision": round(K / E, 4),
                    "recall": round(K / E, 4)})
        if phase != "all":
            continue
        # the lookahead needs no history: also over every token, request starts included
        every = np.flatnonzero(sel)
        out.append({"bench": "lookahead", **base, "phase": "all_with_request_starts",
                    "scored_tokens": int(every.size), "predictor": "lookahead",
                    **score(preds["lookahead"], real, every)})
    for row in lru_rows(trace, ratios):
        out.append({"bench": "lookahead_lru", **base, **row})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("traces", nargs="+", help="npz traces recorded with record_trace")
    ap.add_argument("--json", action="store_true", help="JSON lines (default: a short table)")
    ap.add_argument("--window", type=int, default=4, help="window_union's W (tokens)")
    ap.add_argument("--freq-window", type=int, default=16, help="frequency's F (tokens)")
    ap.add_argument("--cache-ratios", default="0.25,0.5")
    ap.add_argument("--results", default=None, help="also append the JSON lines to this file")
    args = ap.parse_args(argv)
    if args.window < 1 or args.freq_window < 1:
        raise SystemExit("--window / --freq-window: must be >= 1")
    ratios = [float(x) for x in args.cache_ratios.split(",")]
    host = {"device": describe_device(),
            "command": " ".join([Path(sys.executable).name, *map(shlex.quote, sys.argv)])}
    lines = []
    for path in args.traces:
        lines += [{**host, **r} for r in analyse(path, args.window, args.freq_window, ratios)]
    for r in lines:
        if args.json:
            print(json.dumps(r))
        elif r["bench"] == "lookahead":
            print(f"{Path(r['trace']).name:24s} {r['phase']:24s} {r['predictor']:13s} "
                  f"P {r['precision']:.3f} R {r['recall']:.3f}  n={r['scored_tokens']}")
        else:
            print(f"{Path(r['trace']).name:24s} LRU {r['cache_ratio']:.2f} {r['phase']:8s} "
                  f"misses {r['misses_lru']} -> {r['misses_lru_plus_lookahead']} with lookahead "
                  f"(upper bound covered {r['coverage_upper_bound']}), transfers "
                  f"{r['transfers_lru']} -> {r['transfers_lru_plus_lookahead']}")
    if args.results:
        with open(args.results, "a") as f:
            for r in lines:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
