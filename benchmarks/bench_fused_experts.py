"""Benchmark `fused_experts`: Triton kernel vs torch reference at Qwen3-30B-A3B expert shapes.

    python benchmarks/bench_fused_experts.py --json [--quick] [--sweep] [--plot out.png]

On a CUDA GPU: per T (tokens) in 1..32, K=8, H=2048, I=768, S=128 slots, bf16: the reference's
eager time, the kernel's eager time (launcher included) and its CUDA-graph replay time (what vLLM
would see under graph capture; capture also proves the launcher has no host sync), with the weight
bytes of the distinct slots touched over the graph time (GB/s; decode is bound by streaming them).
`--sweep` adds a few tile configurations. Without CUDA: the reference only at the same shapes, and
the kernel under TRITON_INTERPRET=1 at a tiny shape if that variable is set; every line says so.

Real routing (`--windows W.npz`, made here by `--export-windows W.npz --trace <Mixtral JSONL>`,
since the data does not travel to the GPU machine): windows of W consecutive decode tokens of one
layer of the real Mixtral-8x7B trace (the target routing a 1+k verify window sees when all drafts
are accepted), replayed at Mixtral dims (H=4096, I=14336, E=8=S, K=2, bf16) through one captured
CUDA graph per W; also the measured pinned host->device copy rate, i.e. the PCIe cost of fetching
one expert instead of computing it where it is.

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


MIXTRAL_H, MIXTRAL_I, MIXTRAL_E, MIXTRAL_K = 4096, 14336, 8, 2
WINDOW_SIZES = (1, 4, 8)


def export_windows(trace_path: Path, out: Path, per_size: int = 256, seed: int = 0) -> dict:
    """Sample `per_size` (layer, start) windows of W consecutive decode tokens per W from a real
    trace; save ids/weights as int16/f32 [n, W, K] per W. Needs moespac_vllm.trace (runs here)."""
    import numpy as np

    from moespac_vllm.trace import load_trace

    tr = load_trace(trace_path)
    if tr.topk_weights is None:
        raise ValueError(f"trace: {trace_path} has no routing weights")
    rng = np.random.default_rng(seed)
    arrays, N, L = {}, tr.num_tokens, tr.dims.num_layers
    for W in WINDOW_SIZES:
        starts = rng.integers(0, N - W + 1, per_size)
        layers = rng.integers(0, L, per_size)
        idx = starts[:, None] + np.arange(W)[None, :]
        arrays[f"ids_w{W}"] = tr.topk_ids[idx, layers[:, None]].astype(np.int16)
        arrays[f"weights_w{W}"] = tr.topk_weights[idx, layers[:, None]].astype(np.float32)
    np.savez_compressed(out, source=str(trace_path.name), **arrays)
    return {k: v.shape for k, v in arrays.items()}


def h2d_gbps(nbytes: int = 1 << 30) -> float:
    """Pinned host -> device copy rate (the PCIe link as torch sees it)."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dev.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return nbytes / sorted(times)[2] / 1e9


def run_windows(path: Path, emit, iters_ref: int = 3) -> None:
    """Replay real routing windows at Mixtral dims, all 8 experts resident (S = E)."""
    import numpy as np

    data = np.load(path)
    g = torch.Generator(device="cuda").manual_seed(0)
    H_, I_ = MIXTRAL_H, MIXTRAL_I
    w13 = (torch.randn(MIXTRAL_E, 2 * I_, H_, device="cuda", generator=g, dtype=torch.bfloat16)
           / H_ ** 0.5)
    w2 = (torch.randn(MIXTRAL_E, H_, I_, device="cuda", generator=g, dtype=torch.bfloat16)
          / I_ ** 0.5)
    expert_gb = 3 * H_ * I_ * 2 / 1e9
    link = h2d_gbps()
    emit({"face": "pcie", "h2d_gbps": link, "expert_gb": expert_gb,
          "fetch_ms_per_expert": expert_gb / link * 1e3, "dims": "mixtral-8x7b"})
    paths = {"sorted": fe.replace_config(fe.DEFAULT_CONFIG, gemv_max_tokens=0),
             "per_pair": fe.replace_config(fe.DEFAULT_CONFIG, gemv_max_tokens=1 << 20)}
    for (W, (path, cfg)) in ((w, p) for w in WINDOW_SIZES for p in paths.items()):
        ids_all = torch.from_numpy(data[f"ids_w{W}"].astype(np.int32)).cuda()
        wts_all = torch.from_numpy(data[f"weights_w{W}"]).cuda()
        x = torch.randn(W, H_, device="cuda", generator=g, dtype=torch.bfloat16)
        ids, wts = ids_all[0].clone(), wts_all[0].clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fe.fused_experts(x, w13, w2, ids, wts, backend="triton", config=cfg)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fe.fused_experts(x, w13, w2, ids, wts, backend="triton", config=cfg)
        times, distinct, errs = [], [], []
        for n in range(ids_all.shape[0]):
            ids.copy_(ids_all[n])
            wts.copy_(wts_all[n])
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
            distinct.append(int(torch.unique(ids_all[n]).numel()))
            if n < iters_ref:
                ref = fe.fused_experts_reference(x, w13, w2, ids, wts).float()
                errs.append(float((out.float() - ref).norm() / ref.norm()))
        ref_t = []
        for n in range(iters_ref):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fe.fused_experts_reference(x, w13, w2, ids_all[n], wts_all[n])
            torch.cuda.synchronize()
            ref_t.append((time.perf_counter() - t0) * 1e3)
        t = np.array(times)
        d = np.array(distinct)
        emit({"face": "triton", "mode": "graph", "path": path,
              "routing": f"real: {data['source']}",
              "dims": "mixtral-8x7b", "window_tokens": W, "windows": len(times),
              "mean_distinct_experts": float(d.mean()), "mean_ms": float(t.mean()),
              "median_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90)),
              "weight_gbps": float((d * expert_gb).sum() / (t.sum() / 1e3)),
              "ms_per_distinct_expert": float(t.sum() / d.sum()),
              "reference_eager_ms_median": float(np.median(ref_t)),
              "fetch_ms_if_all_fetched": float(d.mean() * expert_gb / link * 1e3),
              "max_rel_err_vs_reference": max(errs)})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="JSON lines only (default: also a table)")
    ap.add_argument("--quick", action="store_true", help="T in {1, 8, 32}, fewer iterations")
    ap.add_argument("--sweep", action="store_true", help="also time a few tile configurations")
    ap.add_argument("--slots", type=int, default=128)
    ap.add_argument("--plot", type=Path, default=None, help="write kernel-vs-reference plot here")
    ap.add_argument("--trace", type=Path, default=None, help="Mixtral routing JSONL (export)")
    ap.add_argument("--export-windows", type=Path, default=None,
                    help="write real routing windows from --trace here, then exit")
    ap.add_argument("--windows", type=Path, default=None,
                    help="replay these real routing windows (GPU) instead of random routing")
    args = ap.parse_args(argv)
    if args.export_windows is not None:
        if args.trace is None:
            raise ValueError("trace: --export-windows needs --trace <Mixtral routing JSONL>")
        print(json.dumps({"exported": str(args.export_windows),
                          "shapes": {k: list(v) for k, v in
                                     export_windows(args.trace, args.export_windows).items()}}))
        return 0
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

    if args.windows is not None:
        if not cuda:
            raise ValueError("windows: replaying real routing windows needs a CUDA GPU")
        run_windows(args.windows, emit)
        return 0

    configs = {"default": fe.DEFAULT_CONFIG}
    if args.sweep and cuda:
        configs.update({
            "n64_k64": fe.KernelConfig(16, 64, 64, 64, 4, 3),
            "n32_k256": fe.KernelConfig(16, 32, 64, 256, 4, 2),
            "n16_k128": fe.KernelConfig(16, 16, 32, 128, 4, 3),
            "n64_k128_w8": fe.KernelConfig(16, 64, 128, 128, 8, 3),
        })
        base = fe.replace_config(fe.DEFAULT_CONFIG, gemv_max_tokens=1 << 20)
        configs.update({
            "sorted": fe.replace_config(fe.DEFAULT_CONFIG, gemv_max_tokens=0),
            "gemv_n16_k256_w4": base,
            "gemv_n8_k512_w4": fe.replace_config(base, gemv_block_n_gate_up=8,
                                                 gemv_block_n_down=8, gemv_block_k=512),
            "gemv_n32_k128_w4": fe.replace_config(base, gemv_block_n_gate_up=32,
                                                  gemv_block_n_down=32, gemv_block_k=128),
            "gemv_n16_k256_w8": fe.replace_config(base, num_warps=8),
            "gemv_n8_k256_w2": fe.replace_config(base, gemv_block_n_gate_up=8,
                                                 gemv_block_n_down=8, num_warps=2),
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
