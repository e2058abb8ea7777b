"""Benchmark the CPU expert path at Qwen3-30B-A3B expert dims (H=2048, I=768).

    python benchmarks/bench_cpu_experts.py --json [--quick] [--threads N] [--plot out.png]

For n tokens per expert in 1..16 (T = n tokens, each routed to the same 8 experts, so 8 experts x n
tokens per call), bf16 and fp32, it times one call of each way to compute those pairs:
- `exact`:   kernels.cpu_experts.pair_outputs_exact (the reference arithmetic, fp32 upcast);
- `native`:  kernels.cpu_experts.pair_outputs_native (torch GEMMs in the dtype: oneDNN);
- `vllm-op`: vLLM's torch.ops._C.cpu_fused_moe, standard top-8 layout, prepacked weights
             (the op alone: no per-pair outputs, no negative ids) -- when vLLM's CPU ops import;
- `vllm-hook`: the same op through kernels.cpu_experts.PrepackedMoeOpHook (per-pair outputs);
- `pool-native`: CpuExpertPool(native) submit + wait, i.e. `native` plus the thread round trip.
An `overlap` line submits to the pool and sleeps as long as the CPU work takes (standing in for
waiting on a device kernel): overlap_fraction 1 means the two ran fully side by side.
Each line gives ms, GFLOP/s (2 * 3 * H * I FLOP per pair) and GB/s (the 8 experts' weight bytes
per call, read once), and the machine's estimated peaks (how estimated: the `peak_note` field) and
a measured copy bandwidth. The machine is shared with other workers: the load average at start is
printed; numbers are medians and are noisy on a loaded machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

try:
    from moespac_vllm.kernels import cpu_experts as ce
    from moespac_vllm.kernels import fused_experts as fe
except ModuleNotFoundError:  # uninstalled checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kernels import cpu_experts as ce
    from kernels import fused_experts as fe

H, I, E_RUN = 2048, 768, 8


def cpu_model() -> tuple[str, str, int, int]:
    """(model name, vendor, family, model) from /proc/cpuinfo."""
    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if ":" in line:
                k, v = (s.strip() for s in line.split(":", 1))
                info.setdefault(k, v)
    except OSError:
        pass
    return (info.get("model name", platform.processor()), info.get("vendor_id", "?"),
            int(info.get("cpu family", 0) or 0), int(info.get("model", 0) or 0))


def peak_estimate(threads: int) -> dict:
    """cores x GHz x FLOP/cycle. GHz: the TSC rate (BogoMIPS / 2; no boost assumed).
    FLOP/cycle per core: AMD Zen 4 (family 25, AVX-512 on two 256-bit FMA pipes): fp32 2x8x2 =
    32, bf16 (VDPBF16PS, two bf16 products per fp32 lane) 64. Intel AVX-512 with two 512-bit FMA
    units: fp32 64, bf16 128. Other CPUs: AVX2, two 256-bit FMA units: fp32 32, bf16 = fp32."""
    name, vendor, fam, _ = cpu_model()
    ghz = 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("bogomips"):
                ghz = float(line.split(":")[1]) / 2 / 1000
                break
    except OSError:
        pass
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    avx512 = "avx512f" in flags
    bf16 = "avx512_bf16" in flags
    if vendor == "AuthenticAMD" and fam == 25:
        fp32, bf = 32, (64 if bf16 else 32)
        how = "Zen4: AVX-512 double-pumped on 2x256-bit FMA pipes"
    elif vendor == "GenuineIntel" and avx512:
        fp32, bf = 64, (128 if bf16 else 64)
        how = "Intel AVX-512, 2 FMA units"
    else:
        fp32, bf = 32, 32
        how = "AVX2, 2x256-bit FMA"
    return {"cpu": name, "threads": threads, "ghz_est": round(ghz, 3),
            "peak_fp32_gflops": threads * ghz * fp32, "peak_bf16_gflops": threads * ghz * bf,
            "peak_note": f"{threads} cores x {ghz:.2f} GHz (BogoMIPS/2) x {fp32} fp32 / {bf} bf16 "
                         f"FLOP/cycle ({how})"}


def copy_gbps(nbytes: int = 256 << 20) -> float:
    """Memory bandwidth seen by torch: a large copy, bytes read + written over time."""
    a = torch.empty(nbytes, dtype=torch.uint8)
    a.fill_(1)
    b = torch.empty_like(a)
    b.copy_(a)
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        b.copy_(a)
        ts.append(time.perf_counter() - t0)
    return 2 * nbytes / sorted(ts)[2] / 1e9


def _time(fn, iters: int) -> tuple[float, float]:
    """(median, min) ms. On a shared machine the min is the closest to the uncontended cost."""
    fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2] * 1e3, ts[0] * 1e3


def _vllm_ops():
    try:
        import vllm._C  # noqa: F401  (registers torch.ops._C)
    except ImportError:
        return None
    ops = torch.ops._C
    return ops if hasattr(ops, "cpu_fused_moe") else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="JSON lines only (default: also a table)")
    ap.add_argument("--quick", action="store_true", help="n in {1, 4, 16}, 3 iterations")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--no-vllm", action="store_true", help="skip vLLM's op even if importable")
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"threads: must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    command = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    peak = peak_estimate(threads)
    device = f"cpu:{peak['cpu']} x{threads} threads"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    ns = [1, 4, 16] if args.quick else [1, 2, 4, 8, 16]
    iters = 3 if args.quick else 7
    ops = None if args.no_vllm else _vllm_ops()
    rows: list[dict] = []

    def emit(row: dict) -> None:
        row = {"bench": "cpu_experts", "device": device, "command": command, **row}
        rows.append(row)
        print(json.dumps(row), flush=True)

    emit({"kind": "machine", **peak, "copy_gbps": copy_gbps(), "loadavg_1m": load,
          "mkldnn": torch.backends.mkldnn.is_available(),
          "cpu_capability": torch.backends.cpu.get_cpu_capability(),
          "vllm_op": ops is not None})

    pool = ce.CpuExpertPool(backend="native")
    for dtype in (torch.bfloat16, torch.float32):
        # E_RUN experts in the store, each token routed to all of them: n tokens per expert.
        x, w13, w2, _, _ = fe.make_inputs(max(ns), E_RUN, H, I, E_RUN, dtype, "cpu", seed=0)
        packed = None
        if ops is not None:
            def prepack(w):
                p = torch.empty_like(w)
                ops.prepack_moe_weight(w, p, "vec")
                return p

            def moe_op(out, xx, w13p, w2p, tw, ti):
                ops.cpu_fused_moe(out, xx, w13p, w2p, None, None, tw, ti, False, "silu", "vec")

            try:
                hook = ce.PrepackedMoeOpHook(prepack, moe_op)
                packed = (hook.packed(w13), hook.packed(w2))
            except RuntimeError as e:  # e.g. a dtype the op does not take
                emit({"kind": "note", "dtype": str(dtype), "backend": "vllm-op",
                      "note": f"vLLM op refused: {str(e).splitlines()[0][:200]}"})
        weight_gb = E_RUN * 3 * H * I * x.element_size() / 1e9
        for n in ns:
            xs = x[:n].contiguous()
            ids = torch.arange(E_RUN, dtype=torch.int32).repeat(n, 1)
            wts = torch.softmax(torch.randn(n, E_RUN), dim=-1)
            ways = {
                "exact": lambda: ce.pair_outputs_exact(xs, w13, w2, ids, wts),
                "native": lambda: ce.pair_outputs_native(xs, w13, w2, ids, wts),
                "pool-native": lambda: pool.wait(pool.submit(xs, w13, w2, ids, wts)),
            }
            if packed is not None:
                out = torch.empty(n, H, dtype=dtype)
                ways["vllm-op"] = lambda: moe_op(out, xs, packed[0], packed[1], wts, ids)
                ways["vllm-hook"] = lambda: hook(xs, w13, w2, ids, wts)
            want = fe.fused_experts_reference(xs, w13, w2, ids, wts).float()
            for name, fn in ways.items():
                try:
                    ms, min_ms = _time(fn, iters)
                except RuntimeError as e:
                    emit({"kind": "note", "dtype": str(dtype), "backend": name,
                          "note": str(e).splitlines()[0][:200]})
                    continue
                res = fn()
                if res is None:  # the raw op fills `out`
                    got = out
                else:
                    got = ce.sum_over_topk(res) if res.dim() == 3 else res
                err = float((got.float() - want).norm() / want.norm())
                gflop = 2 * 3 * H * I * n * E_RUN / 1e9
                pk = peak["peak_bf16_gflops" if dtype == torch.bfloat16 else "peak_fp32_gflops"]
                emit({"kind": "result", "backend": name, "dtype": str(dtype),
                      "tokens_per_expert": n, "experts": E_RUN, "hidden": H, "intermediate": I,
                      "median_ms": ms, "min_ms": min_ms, "ms_per_expert": ms / E_RUN,
                      "min_ms_per_expert": min_ms / E_RUN,
                      "gflops": gflop / (ms / 1e3), "pct_of_peak": 100 * gflop / (ms / 1e3) / pk,
                      "weight_gbps": weight_gb / (ms / 1e3), "rel_err_vs_reference": err,
                      "loadavg_1m": os.getloadavg()[0]})
    # Overlap: while the pool computes, the caller sleeps as it would while waiting on a GPU
    # kernel. With the GIL released by torch, wall ~= max(cpu, other) rather than the sum.
    x, w13, w2, _, _ = fe.make_inputs(1, E_RUN, H, I, E_RUN, torch.bfloat16, "cpu", seed=1)
    ids = torch.arange(E_RUN, dtype=torch.int32)[None]
    wts = torch.full((1, E_RUN), 1.0 / E_RUN)
    cpu_ms, _ = _time(lambda: pool.wait(pool.submit(x, w13, w2, ids, wts)), iters)
    walls = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fut = pool.submit(x, w13, w2, ids, wts)
        time.sleep(cpu_ms / 1e3)  # the "device" work, as long as the CPU work
        pool.wait(fut)
        walls.append((time.perf_counter() - t0) * 1e3)
    wall = sorted(walls)[len(walls) // 2]
    emit({"kind": "overlap", "backend": "pool-native", "dtype": "torch.bfloat16",
          "tokens_per_expert": 1, "experts": E_RUN, "cpu_ms": cpu_ms, "other_ms": cpu_ms,
          "wall_ms": wall, "serial_ms": 2 * cpu_ms,
          "overlap_fraction": max(0.0, (2 * cpu_ms - wall) / cpu_ms),
          "loadavg_1m": os.getloadavg()[0]})
    pool.close()

    if args.plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        for ax, dt in zip(axes, ("torch.bfloat16", "torch.float32")):
            for name in ("exact", "native", "pool-native", "vllm-op", "vllm-hook"):
                pts = [(r["tokens_per_expert"], r["ms_per_expert"]) for r in rows
                       if r.get("backend") == name and r.get("dtype") == dt
                       and r["kind"] == "result"]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=name)
            ax.set_title(f"{dt.split('.')[-1]}: H={H} I={I}", fontsize=9)
            ax.set_xlabel("tokens per expert")
            ax.set_xscale("log", base=2)
        axes[0].set_ylabel("ms per expert")
        axes[0].legend()
        fig.suptitle(device, fontsize=9)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
    if not args.json:
        for r in rows:
            if r["kind"] == "result":
                print(f"{r['backend']:>12} {r['dtype']:>15} n={r['tokens_per_expert']:>2} "
                      f"{r['ms_per_expert']:8.2f} ms/expert {r['gflops']:7.1f} GFLOP/s "
                      f"{r['weight_gbps']:6.1f} GB/s err {r['rel_err_vs_reference']:.1e}",
                      file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
