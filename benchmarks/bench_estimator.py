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

Usage: python benchmarks/bench_estimator.py --json [--data-dir DIR]
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
from moespac_vllm.estimator import UtilityEstimator, counts_from_topk


def device_tag() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"cpu: {platform.processor() or platform.machine()}"


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print JSON lines (the only output mode)")
    ap.add_argument("--data-dir", type=Path,
                    default=Path(os.environ.get("MOESPAC_DATA_DIR",
                                                Path(__file__).resolve().parents[2] / "shared"
                                                / "data")))
    args = ap.parse_args()
    base = {"device": device_tag(), "command": shlex.join([Path(sys.executable).name, *sys.argv]),
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


if __name__ == "__main__":
    main()
