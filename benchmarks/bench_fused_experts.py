"""Benchmark `fused_experts`: Triton kernel vs torch reference at Qwen3-30B-A3B expert shapes.

    python benchmarks/bench_fused_experts.py --json [--quick] [--sweep] [--plot out.png]

On a CUDA GPU: per T (tokens) in 1..32, K=8, H=2048, I=768, S=128 slots, bf16: the reference's
eager time, the kernel's eager time (launcher included) and its CUDA-graph replay time (what vLLM
would see under graph capture; capture also proves the launcher has no host sync), with the weight
bytes of the distinct slots touched over the graph time (GB/s; decode is bound by streaming them).
`--sweep` adds a few tile configurations. Without CUDA: the reference only at the same shapes, and
the kernel under TRITON_INTERPRET=1 at a tiny shape if that variable is set; every line says so.

Self-contained for the lent GPU machine (no vLLM, no cvxpy/highspy, works from an uninstalled
checkout). Prints one JSON object per line, tagged with the device and the command.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

try:
    from moespac_vllm.kernels import fused_experts as fe
except ModuleNotFoundError:  # uninstalled checkout (the lent GPU machine)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kernels import fused_experts as fe

H, I, K = 2048, 768, 8  # Qwen3-30B-A3B


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu:{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def _graph_ms(inputs, config, iters: int = 50) -> float:
    """Median CUDA-graph replay time of the whole op (launcher + kernels + reduction)."""
    x, w13, w2, ids, wts = inputs
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fe.fused_experts(x, w13, w2, ids, wts, backend="triton", config=config)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fe.fused_experts(x, w13, w2, ids, wts, backend="triton", config=config)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="JSON lines only (default: also a table)")
    ap.add_argument("--quick", action="store_true", help="T in {1, 8, 32}, fewer iterations")
    ap.add_argument("--sweep", action="store_true", help="also time a few tile configurations")
    ap.add_argument("--slots", type=int, default=128)
    ap.add_argument("--plot", type=Path, default=None, help="write kernel-vs-reference plot here")
    args = ap.parse_args(argv)
    if args.slots < K:
        raise ValueError(f"slots: must be >= top-k {K}, got {args.slots}")

    cuda = torch.cuda.is_available()
    device = _device_name()
    command = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    tokens = [1, 8, 32] if args.quick else [1, 2, 4, 8, 16, 32]
    iters = (10 if args.quick else 30) if cuda else 3  # the CPU reference takes seconds at T=32
    rows: list[dict] = []

    def emit(row: dict) -> None:
        row = {"bench": "fused_experts", "device": device, "command": command, **row}
        rows.append(row)
        print(json.dumps(row), flush=True)

    configs = {"default": fe.DEFAULT_CONFIG}
    if args.sweep and cuda:
        configs.update({
            "n64_k64": fe.KernelConfig(16, 64, 64, 64, 4, 3),
            "n32_k256": fe.KernelConfig(16, 32, 64, 256, 4, 2),
            "n16_k128": fe.KernelConfig(16, 16, 32, 128, 4, 3),
            "n64_k128_w8": fe.KernelConfig(16, 64, 128, 128, 8, 3),
        })

    for dtype in ([torch.bfloat16] if cuda else [torch.bfloat16, torch.float32]):
        for T in tokens:
            inputs = fe.make_inputs(T, K, H, I, args.slots, dtype, "cuda" if cuda else "cpu",
                                    seed=T)
            ref = fe.benchmark("reference", inputs, iters=iters)
            emit({"face": "reference", "mode": "eager", **asdict(ref)})
            if not cuda:
                continue
            for name, cfg in configs.items():
                ker = fe.benchmark("triton", inputs, config=cfg, iters=iters)
                g_ms = _graph_ms(inputs, cfg, iters=iters * 2)
                err = float((fe.fused_experts(*inputs, backend="triton", config=cfg).float()
                             - fe.fused_experts_reference(*inputs).float()).norm()
                            / fe.fused_experts_reference(*inputs).float().norm())
                emit({"face": "triton", "config": name, **asdict(cfg), **asdict(ker),
                      "graph_ms": g_ms, "graph_weight_gbps": ker.weight_gb_read / (g_ms / 1e3),
                      "speedup_vs_reference_eager": ref.median_ms / ker.median_ms,
                      "speedup_vs_reference_graph": ref.median_ms / g_ms,
                      "rel_err_vs_reference": err})
    if not cuda:
        if fe.interpreter_active():
            inputs = fe.make_inputs(4, 2, 32, 16, 4, torch.float32, "cpu")
            t0 = time.perf_counter()
            fe.fused_experts(*inputs, backend="triton")
            emit({"face": "triton-interpreter", "note": "tiny shape T=4 K=2 H=32 I=16 S=4 fp32; "
                  "the interpreter's time says nothing about GPU speed",
                  "wall_ms": (time.perf_counter() - t0) * 1e3})
        else:
            emit({"face": "triton", "note": "no CUDA GPU: kernel not timed (reference only); run "
                  "on a GPU, or set TRITON_INTERPRET=1 for a tiny interpreted run"})

    if args.plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for face, key, label in (("reference", "median_ms", "torch reference (eager)"),
                                 ("triton", "median_ms", "Triton (eager)"),
                                 ("triton", "graph_ms", "Triton (CUDA graph)")):
            pts = [(r["tokens"], r[key]) for r in rows
                   if r["face"] == face and key in r and r.get("config", "default") == "default"
                   and r["dtype"] == "torch.bfloat16"]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xlabel("tokens T (top-8 each)")
        ax.set_ylabel("ms per MoE layer")
        ax.set_xscale("log", base=2)
        ax.set_title(f"fused_experts, H={H} I={I} S={args.slots} bf16\n{device}", fontsize=9)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
    if not args.json:
        for r in rows:
            print(f"{r['face']:>10} {r.get('config', ''):>12} T={r.get('tokens', '-'):>3} "
                  f"{r.get('median_ms', float('nan')):8.3f} ms eager  "
                  f"{r.get('graph_ms', float('nan')):8.3f} ms graph", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
