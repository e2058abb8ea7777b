"""bench_estimator: what the utility estimator costs, and how well it predicts hot experts.

Prints JSON lines tagged with the device and the command:

* `observe_latency`: µs per `UtilityEstimator.observe` at L=48, E=128 (Qwen3-30B-A3B shape), for
  the faithful rule and the window-scaled one.
* `hot_cold_accuracy`: the paper's Figure 4 metric (MOESPAC.md §2, definition [I]) on REAL routing:
  Mixtral-8x7B decode traces (/work/shared/data/mixtral-8x7b-routing/humaneval_2_routing.jsonl,
  E=8, top-2, 32 layers, 2 problems). Consecutive n-token windows stand in for verification
  windows of 1 + k tokens with every draft accepted (the traces are autoregressive). Before each
  window: predicted hot = level >= 1; actual hot = routed by >= 1 token of the window. Reported as
  the mean over layers and at the last layer, for the faithful rule (`fixed`, θ_up 5), the
  window-scaled rule (`window`), the fixed rule with θ_up 2 and 1, and three baselines: the
  previous window's experts, all hot, all cold.

* `window_prediction` (trace module's readers, per layer): window-to-window hot-set prediction on
  `trace.windows_from_autoregressive` verification windows of n = 1 + k tokens (k = 0: single
  autoregressive tokens; k = 3, 8: n = 4, 9). `acceptance=all` gives exact windows (every draft
  accepted, all routing recorded); `acceptance=0.7` replays the acceptance model, whose rejected
  drafts carry MODELLED routing (the record's `trace` label says so). Each request's first window
  (no history) is not scored. Predictors: `previous` (hot = routed in the previous window: the
  raw lookahead signal), `fixed` / `window` (the estimator, faithful / window-scaled θ_up, level
  >= 1), `window+draft` (window-scaled, fed a MODELLED mirrored-draft signal at 90 % agreement
  before each window), `all_hot` (its precision is the base rate: the share of experts a window
  routes). Per-layer precision / recall / accuracy lists plus their means. Traces: Mixtral
  humaneval_2 (real, E=8 top-2) and, labelled synthetic, the calibrated Qwen3-30B-A3B-scale
  generator (E=128 top-8) where a window touches a small share of the experts.

* `temporal_reuse`: per layer, P(e in S_{t+d} | e in S_t) for d = 1..8 and the "within w" form
  P(e in S_{t+1} u .. u S_{t+w}), on each real decode trace, with the lift over independent draws
  at the same popularity (the synthetic generator's reuse target).
* `synthetic_calibration`: the synthetic trace's targets and what it achieved (skew, lag-1..4
  reuse, cross-layer normalised MI), labelled synthetic.

Usage: python benchmarks/bench_estimator.py --json [--data-dir DIR] [--no-synthetic] [--plot PNG]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from moespac_vllm.config import EstimatorConfig, ThetaScale
from moespac_vllm.calibrate import describe_device
from moespac_vllm.estimator import UtilityEstimator, counts_from_topk
from moespac_vllm.trace import (
    QWEN3_30B_A3B,
    StepKind,
    Trace,
    expert_shares,
    independent_reuse,
    load_trace,
    reuse_curve,
    synthetic_trace,
    windows_from_autoregressive,
)


def load_mixtral(path: Path) -> list[list[np.ndarray]]:
    """Per problem, per layer: [T, 2] expert ids, trimmed to the problem's shortest layer."""
    by: dict[tuple[int, int], list[tuple[int, list[int]]]] = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            by.setdefault((r["problem_id"], r["layer"]), []).append((r["token_idx"], r["experts"]))
    out = []
    for p in sorted({p for p, _ in by}):
        layers = sorted(layer for q, layer in by if q == p)
        t = min(len(by[(p, layer)]) for layer in layers)
        out.append([np.array([e for _, e in sorted(by[(p, layer)])[:t]]) for layer in layers])
    return out


def score_predictor(problems, n: int, predictor: str) -> dict:
    """Confusion totals per layer for one predictor over all problems."""
    num_layers = len(problems[0])
    e = 8
    conf = np.zeros((num_layers, 4), dtype=np.int64)  # tp fp tn fn
    for per_layer in problems:
        est = None
        if predictor.startswith(("fixed", "window")):
            name, _, theta = predictor.partition(":theta_up=")
            scale = ThetaScale.FIXED if name == "fixed" else ThetaScale.WINDOW
            cfg = EstimatorConfig(theta_scale=scale, theta_up=int(theta or 5))
            est = UtilityEstimator(num_layers, e, cfg)
        for layer, ids in enumerate(per_layer):
            prev = np.zeros(e, dtype=bool)
            for s in range(0, len(ids) - n + 1, n):
                c = counts_from_topk(ids[s:s + n], e)
                actual = c > 0
                if est is not None:
                    pred = est.hot_mask(layer, 1)
                    est.observe(layer, c, num_tokens=n)
                elif predictor == "previous":
                    pred = prev
                elif predictor == "all_hot":
                    pred = np.ones(e, dtype=bool)
                else:
                    pred = np.zeros(e, dtype=bool)
                prev = actual
                conf[layer] += [np.sum(pred & actual), np.sum(pred & ~actual),
                                np.sum(~pred & ~actual), np.sum(~pred & actual)]
    tp, fp, tn, fn = conf.T.astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = (tp + tn) / (tp + fp + tn + fn)
        prec = tp / (tp + fp)
        rec = tp / (tp + fn)
    return {"accuracy_mean": float(np.mean(acc)), "precision_mean": float(np.nanmean(prec))
            if np.any(tp + fp) else None, "recall_mean": float(np.mean(rec)),
            "accuracy_last_layer": float(acc[-1])}


def window_prediction(work: Trace, predictor: str) -> dict:
    """Per-layer confusion of one predictor over a windowed trace (see the module docstring)."""
    num_layers, e = work.dims.num_layers, work.dims.num_experts
    conf = np.zeros((num_layers, 4), dtype=np.int64)  # tp fp tn fn
    decode = np.flatnonzero(work.kind != StepKind.PREFILL)
    n_tok = work.tokens_per_step
    for layer in range(num_layers):
        counts = work.counts(layer)
        dcounts = work.draft_counts(layer) if predictor == "window+draft" else None
        for sid in np.unique(work.seq_id[decode]):
            steps = decode[work.seq_id[decode] == sid]
            est = None
            if predictor in ("fixed", "window", "window+draft"):
                scale = ThetaScale.FIXED if predictor == "fixed" else ThetaScale.WINDOW
                est = UtilityEstimator(num_layers, e, EstimatorConfig(theta_scale=scale))
            prev = None
            for s in steps:
                c = counts[s]
                actual = c > 0
                if est is not None:
                    if dcounts is not None and work.draft_offsets[s + 1] > work.draft_offsets[s]:
                        est.observe_draft(layer, dcounts[s], num_tokens=int(
                            work.draft_offsets[s + 1] - work.draft_offsets[s]))
                    pred = est.hot_mask(layer, 1)
                elif predictor == "previous":
                    pred = prev
                else:  # all_hot
                    pred = np.ones(e, dtype=bool)
                if prev is not None:  # the first window has no history: not scored
                    conf[layer] += [np.sum(pred & actual), np.sum(pred & ~actual),
                                    np.sum(~pred & ~actual), np.sum(~pred & actual)]
                if est is not None:
                    est.observe(layer, c, num_tokens=int(n_tok[s]))
                prev = actual
    tp, fp, tn, fn = conf.T.astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = (tp + tn) / (tp + fp + tn + fn)
        prec = tp / (tp + fp)
        rec = tp / (tp + fn)

    def r(x: np.ndarray) -> list:
        return [None if np.isnan(v) else round(float(v), 4) for v in x]

    return {"precision_mean": None if np.all(np.isnan(prec)) else float(np.nanmean(prec)),
            "recall_mean": float(np.nanmean(rec)), "accuracy_mean": float(np.nanmean(acc)),
            "precision_pooled": (float(tp.sum() / (tp.sum() + fp.sum()))
                                 if (tp + fp).sum() else None),
            "precision_per_layer": r(prec), "recall_per_layer": r(rec),
            "accuracy_per_layer": r(acc),
            "windows_scored": int(conf[0].sum() // e)}


WINDOW_PREDICTORS = ("previous", "fixed", "window", "window+draft", "all_hot")


def run_window_prediction(emit, trace: Trace, what: str, seed: int = 0) -> list[dict]:
    rows = []
    for k in (0, 3, 8):
        for acceptance in (("all",) if k == 0 else ("all", 0.7)):
            acc = k if acceptance == "all" else acceptance
            # the same windows (same seed); only `window+draft` reads the modelled draft signal,
            # so only its rows carry the draft_routing label
            plain = windows_from_autoregressive(trace, k, acc, seed=seed)
            drafted = windows_from_autoregressive(trace, k, acc, seed=seed, draft_agreement=0.9)
            for predictor in WINDOW_PREDICTORS:
                if predictor == "window+draft" and k == 0:
                    continue
                work = drafted if predictor == "window+draft" else plain
                res = window_prediction(work, predictor)
                row = {"routing": what, "trace": work.label, "synthetic": work.meta.synthetic,
                       "window_tokens": k + 1, "acceptance": acceptance, "predictor": predictor,
                       "E": trace.dims.num_experts, "top_k": trace.dims.top_k, **res}
                emit("window_prediction", **row)
                rows.append(row)
    return rows


def plot_window_prediction(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    routings = sorted({r["routing"] for r in rows})
    fig, axes = plt.subplots(1, len(routings), figsize=(6 * len(routings), 4), squeeze=False)
    for ax, routing in zip(axes[0], routings):
        for r in rows:
            if r["routing"] != routing or r["acceptance"] != "all":
                continue
            if r["predictor"] not in ("previous", "all_hot"):
                continue
            style = "-" if r["predictor"] == "previous" else ":"
            ys = [np.nan if v is None else v for v in r["precision_per_layer"]]
            ax.plot(ys, style, label=f"{r['predictor']} n={r['window_tokens']}")
        ax.set_title(routing, fontsize=8)
        ax.set_xlabel("layer")
        ax.set_ylabel("hot-set precision (window t -> t+1)")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print JSON lines (the only output mode)")
    ap.add_argument("--data-dir", type=Path,
                    default=Path(os.environ.get("MOESPAC_DATA_DIR",
                                                Path(__file__).resolve().parents[2] / "shared"
                                                / "data")))
    ap.add_argument("--no-synthetic", action="store_true",
                    help="skip the synthetic Qwen3-scale trace (its fit takes ~10 s)")
    ap.add_argument("--plot", type=Path, default=None, help="write a per-layer precision plot")
    args = ap.parse_args()
    base = {"device": describe_device(), "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "python": platform.python_version()}

    def emit(kind: str, **fields) -> None:
        fields.update(base)
        fields["loadavg_1m"] = os.getloadavg()[0]
        print(json.dumps({"bench": "estimator", "kind": kind, **fields}), flush=True)

    rng = np.random.default_rng(0)
    windows = rng.integers(0, 9, size=(2000, 128))
    for scale in ThetaScale:
        est = UtilityEstimator(48, 128, EstimatorConfig(theta_scale=scale))
        gc.collect()
        gc.disable()
        ts = []
        for i, c in enumerate(windows):
            t0 = time.perf_counter_ns()
            est.observe(i % 48, c, num_tokens=9)
            ts.append(time.perf_counter_ns() - t0)
        gc.enable()
        us = np.array(ts) / 1e3
        emit("observe_latency", shape="L=48 E=128", theta_scale=scale.value, calls=len(us),
             p50_us=float(np.percentile(us, 50)), p99_us=float(np.percentile(us, 99)))

    path = args.data_dir / "mixtral-8x7b-routing" / "humaneval_2_routing.jsonl"
    problems = load_mixtral(path)
    for n in (1, 2, 4, 9):
        for predictor in ("fixed", "window", "fixed:theta_up=2", "fixed:theta_up=1", "previous",
                          "all_hot", "all_cold"):
            emit("hot_cold_accuracy", routing="mixtral-8x7b humaneval_2 decode (real), E=8 top-2",
                 window_tokens=n, predictor=predictor, **score_predictor(problems, n, predictor))

    for reuse_path in (path, path.parent / "humaneval0_prefill_decode_routing_raw.jsonl"):
        tr = load_trace(reuse_path)
        lag, within = reuse_curve(tr, max_lag=8)
        r0 = independent_reuse(expert_shares(tr.topk_ids, tr.dims.num_experts), tr.dims.top_k)
        emit("temporal_reuse", trace=tr.label, tokens=int((tr.kind != StepKind.PREFILL).sum()),
             lag_1to8_mean=[round(float(x), 4) for x in lag.mean(axis=0)],
             within_1to8_mean=[round(float(x), 4) for x in within.mean(axis=0)],
             independent_mean=round(float(r0.mean()), 4),
             lift_1to8_mean=[round(float(x), 4) for x in
                             ((lag - r0[:, None]) / (1 - r0[:, None])).mean(axis=0)],
             lag1_per_layer=[round(float(x), 4) for x in lag[:, 0]])
    rows = run_window_prediction(emit, load_trace(path), "mixtral-8x7b humaneval_2 decode (real)")
    if not args.no_synthetic:
        syn = synthetic_trace(QWEN3_30B_A3B, num_steps=1500, k=0, seed=0,
                              stats=args.data_dir / "olmoe-mixtral-routing-stats",
                              reuse=path)
        emit("synthetic_calibration", trace=syn.label, synthetic=True,
             target=syn.meta.notes["target"], achieved=syn.meta.notes["achieved"],
             generator=syn.meta.notes["generator"], sources=syn.meta.notes["sources"])
        rows += run_window_prediction(emit, syn, "qwen3-30b-a3b-scale SYNTHETIC (calibrated)")
    if args.plot is not None:
        plot_window_prediction(rows, args.plot)


if __name__ == "__main__":
    main()
