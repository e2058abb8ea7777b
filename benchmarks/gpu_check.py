"""The GPU check suite (run by benchmarks/gpu_check.sh): the decode harness
(benchmarks/bench_gpu_decode.py, driving the library runtime vLLM's glue drives, routing computed
on the device) over one list of cases, one JSON file and a tok/s-vs-budget plot.

Cases (Qwen3-30B-A3B dims, 48 layers, random bf16 weights; `--cpu-smoke`: the same cases and code
at H=64, I=32, 4 layers, a few steps, on the CPU):

    ceiling            all experts on the device, no runtime, the step in a CUDA graph
    plugin-1.0-plain   the runtime at cache ratio 1.0 (resident path), plain decode
    plugin-R-plain     spac at the offload ratio R (default 0.17), plain decode
    spac-k3 / -k8      spac, SD windows of k draft tokens
    spac-adaptive      spac, k chosen before every step (engine.choose_draft_tokens), k <= 8
    lru / static       plain decode baselines;  sd-lru-k3 / -k8: the SD baseline
    prefill            one chunk of 2048 tokens (smoke: 64) through every layer, spac at R
    spac-k3-threads1   spac-k3 with one torch thread
    + the budget sweep: spac-adaptive and lru at each `--sweep` ratio (the plot's other points)

Per case: tok/s, hit rate, GB moved, syncs per layer forward, GPU time, host plan / launch / CPU
wait / readback ms, and the simulator's prediction for the same windows with the calibrated
profile (None with the reason where it has no such mode). `targets` compares them with issue 12's
goals. Every key is present in both modes (tests/test_gpu_check.py checks the smoke's).

    python benchmarks/gpu_check.py --out out/gpu-check [--cpu-smoke] [--profile cal.json]
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu_decode as gd  # noqa: E402  (a script beside this one)

from moespac_vllm.simulate import load_workload_trace  # noqa: E402

ROW_KEYS = ("case", "policy", "mode", "cache_ratio", "draft_tokens", "mean_draft_tokens",
            "threads", "steps", "tokens", "time_s", "tokens_per_s", "hit_rate", "gb_moved",
            "syncs_per_layer", "step_end_waits", "layer_forwards", "planned_forwards", "gpu_ms", "host_plan_ms", "launch_ms",
            "cpu_wait_ms", "readback_ms", "stall_ms", "cpu_ms", "sim_tokens_per_s", "sim_note",
            "graphed", "slots_per_layer", "streamed_experts")


def cases(ratio: float, prefill: int, sweep: list[float]) -> list[gd.Case]:
    C = gd.Case
    out = [C("ceiling", "all-resident", 1.0, "graphed"),
           C("plugin-1.0-plain", "spac", 1.0, "plain"),
           C(f"plugin-{ratio:g}-plain", "spac", ratio, "plain"),
           C("spac-k3", "spac", ratio, "sd", 3),
           C("spac-k8", "spac", ratio, "sd", 8),
           C("spac-adaptive", "spac", ratio, "adaptive", 8),
           C("lru", "lru", ratio, "plain"),
           C("static", "static", ratio, "plain"),
           C("sd-lru-k3", "sd-lru", ratio, "sd", 3),
           C("sd-lru-k8", "sd-lru", ratio, "sd", 8),
           C("prefill", "spac", ratio, "prefill", prefill),
           C("spac-k3-threads1", "spac", ratio, "sd", 3, threads=1)]
    for r in sweep:
        out += [C(f"spac-adaptive@{r:g}", "spac", r, "adaptive", 8), C(f"lru@{r:g}", "lru", r,
                                                                        "plain")]
    return out


def targets(rows: list[dict[str, Any]], ratio: float) -> dict[str, Any]:
    """Issue 12's goals, read off the rows (None where a row is missing)."""
    by = {r["case"]: r for r in rows}

    def tps(name: str) -> float | None:
        return by[name]["tokens_per_s"] if name in by else None

    ceiling, plugin = tps("ceiling"), tps("plugin-1.0-plain")
    base = [t for t in (tps("lru"), tps("static"), tps("sd-lru-k3"), tps("sd-lru-k8"))
            if t is not None]
    spac = tps("spac-adaptive")
    resident = by.get("plugin-1.0-plain")
    planned = [r for r in rows if r["mode"] != "graphed" and r["cache_ratio"] < 1.0]
    sim_err = {r["case"]: (r["tokens_per_s"] / r["sim_tokens_per_s"] - 1.0)
               for r in rows if r.get("sim_tokens_per_s")}
    return {
        "plugin_1.0_over_ceiling": plugin / ceiling if plugin and ceiling else None,
        "goal_plugin_1.0_over_ceiling": 0.95,
        "spac_adaptive_over_best_baseline": spac / max(base) if spac and base else None,
        "goal_spac_over_best_baseline": 1.3,
        "resident_syncs_per_layer": resident["syncs_per_layer"] if resident else None,
        "goal_resident_syncs_per_layer": 0.0,
        "max_planned_syncs_per_layer": max((r["syncs_per_layer"] for r in planned),
                                           default=None),
        "goal_planned_syncs_per_layer": 1.0,
        "sim_rel_error": sim_err,
        "goal_sim_rel_error": 0.2,
        "offload_ratio": ratio,
    }


def plot(rows: list[dict[str, Any]], path: Path) -> str | None:
    """tok/s against the cache ratio per (policy, mode); the ceiling as a line. None (and the
    JSON says so) where matplotlib is absent."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r["mode"] == "graphed":
            ax.axhline(r["tokens_per_s"], ls="--", color="k", label="ceiling (graphed)")
        elif r["mode"] != "prefill" and r["threads"] == "all":
            label = f"{r['policy']} {r['mode']}" + (f" k={r['draft_tokens']}"
                                                    if r["mode"] == "sd" else "")
            series.setdefault(label, []).append((r["cache_ratio"], r["tokens_per_s"]))
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xlabel("expert cache ratio (slots / experts per layer)")
    ax.set_ylabel("decode tokens/s (measured, log)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for gpu_check.json and the plot")
    p.add_argument("--trace", default=None,
                   help="trace npz/JSONL or synthetic[:N] (default synthetic:400; needs the "
                        "shared data folder, else pass a saved one)")
    p.add_argument("--write-trace", default=None,
                   help="only save the (synthetic) trace to this npz and exit")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny dims on the CPU (H=64, I=32, 4 layers, few steps): CI")
    p.add_argument("--profile", default="calibrate",
                   help="cost profile JSON (moespac calibrate's) or 'calibrate' (measure here)")
    p.add_argument("--layers", type=int, default=None, help="default 48 (smoke: 4)")
    p.add_argument("--steps", type=int, default=None, help="steps per case (default 48; smoke 4)")
    p.add_argument("--run-seconds", type=float, default=None,
                   help="stop a case after this long (default 8; smoke 20)")
    p.add_argument("--ratio", type=float, default=0.17, help="the offload case's cache ratio")
    p.add_argument("--sweep", default=None,
                   help="more ratios for the plot, comma-separated ('' none; default 0.35,0.6; "
                        "smoke 0.5)")
    p.add_argument("--prefill-tokens", type=int, default=None, help="default 2048 (smoke 64)")
    p.add_argument("--acceptance", type=float, default=0.8)
    p.add_argument("--cpu-path", default="native", choices=("native", "torch", "exact", "layer"))
    p.add_argument("--distinct-layers", action="store_true",
                   help="one random host bank per layer (58 GB at Qwen3 dims; slow to fill)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    smoke = a.cpu_smoke
    a.layers = a.layers if a.layers is not None else (4 if smoke else 48)
    a.steps = a.steps if a.steps is not None else (4 if smoke else 48)
    a.run_seconds = a.run_seconds if a.run_seconds is not None else (20.0 if smoke else 8.0)
    a.sweep = a.sweep if a.sweep is not None else ("0.5" if smoke else "0.35,0.6")
    a.prefill_tokens = a.prefill_tokens if a.prefill_tokens is not None else (
        64 if smoke else 2048)
    for name in ("layers", "steps", "prefill_tokens"):
        if getattr(a, name) < 1:
            raise ValueError(f"{name.replace('_', '-')}: must be >= 1")
    if not 0.0 < a.ratio <= 1.0:
        raise ValueError(f"ratio: must be in (0, 1], got {a.ratio}")
    a.command = "python benchmarks/gpu_check.py " + " ".join(
        shlex.quote(x) for x in (sys.argv[1:] if argv is None else argv))
    return a


def harness_args(a: argparse.Namespace) -> argparse.Namespace:
    """The decode harness's own options for the same run."""
    return gd.parse_args(["--trace", "unused", "--layers", str(a.layers), "--steps", str(a.steps),
                          "--run-seconds", str(a.run_seconds), "--draft-tokens", "8",
                          "--acceptance", str(a.acceptance), "--profile", a.profile,
                          "--cpu-path", a.cpu_path, "--kernel", "auto" if not a.cpu_smoke
                          else "reference", "--seed", str(a.seed), "--out", a.out]
                         + (["--tiny"] if a.cpu_smoke else [])
                         + (["--distinct-layers"] if a.distinct_layers else []))


def workload_trace(spec: str, seed: int, data_dir: Any = "auto") -> Any:
    """`--trace`'s trace. `synthetic[:N]` on a machine without the shared data folder (a lent
    GPU machine gets only the working tree; carry `.device/qwen3_synthetic.npz` to avoid this):
    the generator UNCALIBRATED (uniform popularity, no co-occurrence or extra reuse), said in the
    trace's notes and on stderr, so that the check still runs instead of failing at start.
    `data_dir`: the shared data folder ("auto": `config.shared_data_dir()`; None: absent)."""
    from moespac_vllm.config import shared_data_dir

    if data_dir == "auto":
        data_dir = shared_data_dir()
    if not spec.startswith("synthetic") or data_dir is not None:
        return load_workload_trace(spec, seed=seed, data_dir=data_dir)
    from moespac_vllm.trace import synthetic_trace

    _, _, n = spec.partition(":")
    print("gpu_check: no shared data folder here: the synthetic trace runs UNCALIBRATED "
          "(carry .device/qwen3_synthetic.npz for the calibrated one)", file=sys.stderr)
    return synthetic_trace(num_steps=int(n) if n else 400, k=0, seed=seed, stats=None,
                           reuse=None)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    trace = workload_trace(a.trace or "synthetic:400", seed=a.seed)
    if a.write_trace:
        trace.save(a.write_trace)
        print(json.dumps({"trace": trace.label, "saved": a.write_trace}))
        return 0
    device = torch.device("cpu" if a.cpu_smoke or not torch.cuda.is_available() else "cuda")
    if not a.cpu_smoke and device.type != "cuda":
        raise ValueError("device: no CUDA device here; run with --cpu-smoke")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    hargs = harness_args(a)
    hargs.command = a.command
    t0 = time.perf_counter()
    b, setup, close = gd.make_bench(hargs, trace, device)
    print(json.dumps(setup), flush=True)
    sweep = [float(r) for r in a.sweep.split(",") if r.strip()]
    rows = []
    for case in cases(a.ratio, a.prefill_tokens, sweep):
        row = gd.run_case(b, case)
        row["device"] = setup["device"]
        rows.append(row)
        print(json.dumps({k: row[k] for k in ROW_KEYS}), flush=True)
    close()
    result = {"bench": "gpu_check", "mode": "cpu-smoke" if a.cpu_smoke else "gpu",
              "command": a.command, "setup": setup, "cases": rows,
              "targets": targets(rows, a.ratio), "wall_s": time.perf_counter() - t0,
              "torch": torch.__version__}
    result["plot"] = plot(rows, out / "gpu_check.png")
    result["plot_note"] = None if result["plot"] else "matplotlib absent: no plot"
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    print(table(rows), file=sys.stderr)
    return 0


def table(rows: list[dict[str, Any]]) -> str:
    f = gd.cell
    return gd.markdown_table(
        ["case", "ratio", "tok/s", "sim", "hit", "GB", "syncs/layer", "GPU ms", "plan ms",
         "launch ms", "CPU wait ms"],
        [[r["case"], f"{r['cache_ratio']:g}", f"{r['tokens_per_s']:.1f}",
          f(r["sim_tokens_per_s"], ".1f"), f(r["hit_rate"], ".3f"), f"{r['gb_moved']:.2f}",
          f"{r['syncs_per_layer']:.2f}", f(r["gpu_ms"], ".0f"), f"{r['host_plan_ms']:.1f}",
          f(r["launch_ms"], ".1f"), f"{r['cpu_wait_ms']:.1f}"] for r in rows])


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as e:
        print(f"gpu_check: error: {e}", file=sys.stderr)
        sys.exit(2)
