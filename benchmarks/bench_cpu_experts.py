"""Benchmark the CPU expert path at Qwen3-30B-A3B expert dims (H=2048, I=768) against this
machine's measured read bandwidth.

    python benchmarks/bench_cpu_experts.py --json [--quick] [--threads N] [--dtypes bfloat16]
                                          [--isas] [--no-vllm] [--plot out.png]

One call = one layer's CPU work: 8 experts x n tokens per expert (n = 1, 2, 4, 8, 16; every token
routed to the same 8 experts), per-pair outputs as `CpuExpertPool` returns them. Backends, one row
each per n:
- `native`:  CpuExpertPool(backend="native") submit + result (csrc/cpu_experts.cpp; what the
             layer runs, Python overhead included); with --isas also `native:<isa>` for every
             other instruction set the kernel has on this CPU (e.g. bf16 widened to fp32 FMAs);
- `torch`:   kernels.cpu_experts.pair_outputs_torch (oneDNN GEMMs in the dtype), called directly;
- `vllm-op`: vLLM's torch.ops._C.cpu_fused_moe, prepacked weights, standard top-8 layout (the op
             alone: k-summed output, no per-pair outputs) -- only where vLLM's CPU ops import.
Weights are never served from cache: the experts come from a bank of --bank experts (default 64,
i.e. 604 MB at bf16, against a 32 MiB L3 here) and successive calls take successive groups of 8,
so a call's weights were last read 7 calls (~530 MB of other weights) earlier.
Each row: median_ms / min_ms over the calls, ms_per_expert, gbps (the 8 experts' weight bytes,
3*H*I*bytes each, over the median time) and read_bandwidth_ratio = gbps / read_gbps. read_gbps
is this machine's read bandwidth, measured STREAM-like in the same run and interleaved with the
row's calls (a probe sample before every call, so both see the same load on a shared machine;
the row reports the median of each, kernel and probe, over the same repetitions): the native
module's read probe, on a pool of its own with the same thread count as the kernel's (neither
pinned: the kernel's threads are not), sums a 128 MiB slice (slices cycle through a --probe-gib
GiB buffer from torch's allocator, like the bank) in 4 MiB chunks with 512-bit loads, as 1, 2
and 4 sequential streams per chunk, each without and with the kernel's software prefetch (2 KiB
ahead into L2); read_gbps is the best of these six variants' medians over the row, so the
reference gets every trick the kernel uses. paired_ratio_median is the median over the calls of
each call's gbps over the best variant of the probe sample just before it (the VM's read
bandwidth swings 2x between rows; pairing cancels the slow swings, not the fast ones). Also per row: rel_err_vs_reference against the pure-torch
reference's fp32 k-sum (kernels.fused_experts.fused_experts_pairs + sum_over_topk; an op that
returns the activation dtype shows that rounding, ~2e-3 at bf16) and the 1-minute load average.
An `overlap` line submits to the native pool and sleeps as long as the CPU work takes (standing in
for a device kernel): overlap_fraction 1 means the two ran fully side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
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
from moespac_vllm.calibrate import describe_device

H, I, E_CALL = 2048, 768, 8
STREAMS = (1, 2, 4)  # read-probe streams per chunk
PREFETCH_BYTES = (0, 2048)  # read-probe prefetch distances (the kernel's, at 3+ tokens)
PROBES = tuple((s, pf) for s in STREAMS for pf in PREFETCH_BYTES)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _vllm_ops():
    try:  # vLLM's loader picks the build for this CPU (`vllm._C` alone is AVX-512-BF16 only)
        from vllm.platforms.cpu import CpuPlatform
    except ImportError:
        return None
    CpuPlatform.import_kernels()  # registers torch.ops._C
    ops = torch.ops._C
    return ops if hasattr(ops, "cpu_fused_moe") else None  # with it: prepack_moe_weight


class ReadProbe:
    """The machine's read bandwidth, GB/s, by the native read probe with `threads` threads over
    a `gib` GiB buffer from torch's allocator (as the expert bank): a sample reads the next
    `slice_mib` MiB slice (slices cycle through the whole buffer, so none is in cache), once for
    each of 1, 2 and 4 sequential streams per chunk (a core may pull more from several streams
    than from one; the kernel reads 2 or 4) without and with software prefetch."""

    def __init__(self, threads: int, gib: float, slice_mib: int = 128) -> None:
        from moespac_vllm import _cpu_experts

        mib = 1 << 20
        self.slice_bytes = slice_mib * mib
        self.nbytes = max(self.slice_bytes, int(gib * (1 << 30)) // self.slice_bytes
                          * self.slice_bytes)
        self.buf = torch.ones(self.nbytes + 64, dtype=torch.uint8)
        self.off = (-self.buf.data_ptr()) % 64
        self.pool = _cpu_experts.Pool(threads)
        self.samples: dict[tuple[int, int], list[float]] = {p: [] for p in PROBES}
        self._next = 0
        self.pool.read(self.buf.data_ptr() + self.off, self.nbytes).wait()  # warm the threads

    def sample(self) -> None:
        for streams, pf in PROBES:
            start = self.off + self._next * self.slice_bytes
            self._next = (self._next + 1) % (self.nbytes // self.slice_bytes)
            t0 = time.perf_counter()
            self.pool.read(self.buf.data_ptr() + start, self.slice_bytes, streams=streams,
                           prefetch_bytes=pf).wait()
            self.samples[streams, pf].append(self.slice_bytes / (time.perf_counter() - t0) / 1e9)

    def mark(self) -> int:
        return len(self.samples[PROBES[0]])

    def last_gbps(self) -> float:
        """The best variant of the latest sample."""
        return max(v[-1] for v in self.samples.values())

    def gbps(self, since: int = 0) -> float:
        """The best variant's median over the samples since `mark()` returned `since`."""
        return max(statistics.median(v[since:]) for v in self.samples.values())

    def close(self) -> None:
        self.pool.close()


def _times_ms(fn, calls: int, probe: ReadProbe | None = None,
              refs: list[float] | None = None) -> list[float]:
    """Wall ms of calls 1..calls (call 0 warms up); with a probe, a probe sample before each
    call, so kernel and probe see the same load on a shared machine (`refs` gets each call's
    own reference: the best variant of the sample just before it)."""
    fn(0)  # warm-up (its weights are re-read from DRAM later: the bank cycles)
    ts = []
    for i in range(1, calls + 1):
        if probe is not None:
            probe.sample()
            if refs is not None:
                refs.append(probe.last_gbps())
        t0 = time.perf_counter()
        fn(i)
        ts.append((time.perf_counter() - t0) * 1e3)
    return ts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="JSON lines only (default: also a table)")
    ap.add_argument("--quick", action="store_true", help="n in {1, 4, 16}, fewer calls")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for every backend and the probe (default: all CPUs)")
    ap.add_argument("--dtypes", default="bfloat16", help="comma-separated: bfloat16,float16,float32")
    ap.add_argument("--bank", type=int, default=64, help="distinct experts cycled (>= 8)")
    ap.add_argument("--probe-gib", type=float, default=1.0, help="read-probe buffer size")
    ap.add_argument("--probe-slice-mib", type=int, default=128, help="bytes per probe sample")
    ap.add_argument("--isas", action="store_true", help="also a row per other native ISA")
    ap.add_argument("--no-vllm", action="store_true", help="skip vLLM's op even if importable")
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args(argv)
    threads = args.threads if args.threads is not None else len(os.sched_getaffinity(0))
    if threads < 1:
        raise ValueError(f"threads: must be >= 1, got {threads}")
    if args.bank < E_CALL or args.bank % E_CALL:
        raise ValueError(f"bank: must be a multiple of {E_CALL}, got {args.bank}")
    if args.probe_gib <= 0:
        raise ValueError(f"probe_gib: must be > 0, got {args.probe_gib}")
    dtypes = []
    for name in args.dtypes.split(","):
        if name not in DTYPES:
            raise ValueError(f"dtypes: expected names from {sorted(DTYPES)}, got {name!r}")
        dtypes.append(DTYPES[name])
    if not ce.native_available():
        raise RuntimeError("moespac_vllm._cpu_experts is not built: reinstall the package")
    torch.set_num_threads(threads)
    command = shlex.join(["python", "benchmarks/bench_cpu_experts.py",
                          *(sys.argv[1:] if argv is None else argv)])
    device = describe_device()
    ns = [1, 4, 16] if args.quick else [1, 2, 4, 8, 16]
    calls = args.bank // E_CALL * (1 if args.quick else 2)  # each bank group once / twice
    ops = None if args.no_vllm else _vllm_ops()
    rows: list[dict] = []

    def emit(row: dict) -> None:
        row = {"bench": "cpu_experts", "device": device, "command": command, **row}
        rows.append(row)
        print(json.dumps(row), flush=True)

    if args.probe_slice_mib < 1:
        raise ValueError(f"probe_slice_mib: must be >= 1, got {args.probe_slice_mib}")
    probe = ReadProbe(threads, args.probe_gib, args.probe_slice_mib)
    pools = {"native": ce.CpuExpertPool(threads, backend="native")}
    if args.isas:
        for isa in ce.native_isas():
            pools[f"native:{isa}"] = ce.CpuExpertPool(threads, backend="native", isa=isa)
    for _ in range(3):
        probe.sample()
    emit({"kind": "machine", "threads": threads, "read_gbps": probe.gbps(),
          "probe_bytes": probe.nbytes, "probe_slice_bytes": probe.slice_bytes, "native_isas": list(ce.native_isas()),
          "cpu_capability": torch.backends.cpu.get_cpu_capability(),
          "vllm_op": ops is not None, "loadavg_1m": os.getloadavg()[0]})

    for dtype in dtypes:
        g = torch.Generator().manual_seed(0)
        w13 = (torch.randn(args.bank, 2 * I, H, generator=g) / H ** 0.5).to(dtype)
        w2 = (torch.randn(args.bank, H, I, generator=g) / I ** 0.5).to(dtype)
        weight_gb = E_CALL * 3 * H * I * w13.element_size() / 1e9
        packed = None
        if ops is not None:
            try:
                packed = []
                for w in (w13, w2):
                    p = torch.empty_like(w)
                    ops.prepack_moe_weight(w, p, "vec")
                    packed.append(p)
            except RuntimeError as e:  # e.g. a dtype the op does not take
                packed = None
                emit({"kind": "note", "dtype": str(dtype), "backend": "vllm-op",
                      "note": f"vLLM op refused: {str(e).splitlines()[0][:200]}"})
        names = [k for k in pools if k == "native" or dtype == torch.bfloat16
                 or not k.endswith("avx512bf16")]
        for n in ns:
            x = torch.randn(n, H, generator=g).to(dtype)
            wts = torch.softmax(torch.randn(n, E_CALL, generator=g), dim=-1)
            groups = [torch.arange(E_CALL, dtype=torch.int32).add(E_CALL * i).repeat(n, 1)
                      for i in range(args.bank // E_CALL)]
            out = torch.empty(n, H, dtype=dtype)

            def ids_of(i):
                return groups[i % len(groups)]

            ways = {name: (lambda i, p=pools[name]: p.submit(x, w13, w2, ids_of(i), wts).result())
                    for name in names}
            ways["torch"] = lambda i: ce.pair_outputs_torch(x, w13, w2, ids_of(i), wts)
            if packed is not None:
                def vllm_op(i):
                    ops.cpu_fused_moe(out, x, packed[0], packed[1], None, None, wts, ids_of(i),
                                      False, "silu", "vec")
                    return out
                ways["vllm-op"] = vllm_op
            want = fe.sum_over_topk(fe.fused_experts_pairs(x, w13, w2, ids_of(0), wts))
            for name, fn in ways.items():
                res = fn(0)
                got = ce.sum_over_topk(res) if res.dim() == 3 else res.float()
                err = float((got.float() - want).norm() / want.norm())
                since = probe.mark()
                refs: list[float] = []
                ts = _times_ms(fn, calls, probe, refs)
                bw = probe.gbps(since)
                ms = statistics.median(ts)
                gbps = weight_gb / (ms / 1e3)
                paired = statistics.median(weight_gb / (t / 1e3) / r for t, r in zip(ts, refs))
                row = {"kind": "result", "backend": name, "dtype": str(dtype).split(".")[-1],
                       "tokens_per_expert": n, "experts": E_CALL, "bank_experts": args.bank,
                       "hidden": H, "intermediate": I, "threads": threads, "calls": calls,
                       "median_ms": ms, "min_ms": min(ts), "ms_per_expert": ms / E_CALL,
                       "gbps": gbps, "read_gbps": bw, "read_bandwidth_ratio": gbps / bw,
                       "paired_ratio_median": paired,
                       "rel_err_vs_reference": err, "loadavg_1m": os.getloadavg()[0]}
                if name.startswith("native"):
                    row["isa"] = name.split(":")[1] if ":" in name else \
                        _native_isa(dtype)
                emit(row)
        del w13, w2, packed

    # Overlap: while the pool computes, the caller sleeps as it would while waiting on a device
    # kernel; the native threads run without the GIL, so wall ~= max(cpu, other), not the sum.
    pool = pools["native"]
    x, w13, w2, _, _ = fe.make_inputs(1, E_CALL, H, I, E_CALL, torch.bfloat16, "cpu", seed=1)
    ids = torch.arange(E_CALL, dtype=torch.int32)[None]
    wts = torch.full((1, E_CALL), 1.0 / E_CALL)
    cpu_ms = statistics.median(_times_ms(lambda i: pool.wait(pool.submit(x, w13, w2, ids, wts)),
                                         9))
    walls = []
    for _ in range(9):
        t0 = time.perf_counter()
        fut = pool.submit(x, w13, w2, ids, wts)
        time.sleep(cpu_ms / 1e3)  # the "device" work, as long as the CPU work
        pool.wait(fut)
        walls.append((time.perf_counter() - t0) * 1e3)
    wall = statistics.median(walls)
    emit({"kind": "overlap", "backend": "native", "dtype": "bfloat16", "tokens_per_expert": 1,
          "experts": E_CALL, "cpu_ms": cpu_ms, "other_ms": cpu_ms, "wall_ms": wall,
          "serial_ms": 2 * cpu_ms, "overlap_fraction": max(0.0, (2 * cpu_ms - wall) / cpu_ms),
          "loadavg_1m": os.getloadavg()[0]})
    for (streams, pf), samples in probe.samples.items():
        emit({"kind": "read_bandwidth", "threads": threads, "streams": streams,
              "prefetch_bytes": pf, "samples": len(samples), "median_gbps": statistics.median(samples),
              "max_gbps": max(samples), "min_gbps": min(samples)})
    for p in pools.values():
        p.close()
    probe.close()

    if args.plot is not None:
        _plot(rows, args.plot, device)
    if not args.json:
        for r in rows:
            if r["kind"] == "result":
                print(f"{r['backend']:>18} {r['dtype']:>9} n={r['tokens_per_expert']:>2} "
                      f"{r['ms_per_expert']:7.3f} ms/expert {r['gbps']:6.1f} GB/s "
                      f"(read {r['read_gbps']:5.1f}: {r['read_bandwidth_ratio']:.2f}) "
                      f"err {r['rel_err_vs_reference']:.1e}", file=sys.stderr)
    return 0


def _native_isa(dtype: torch.dtype) -> str:
    from moespac_vllm import _cpu_experts

    return _cpu_experts.best_isa(str(dtype).split(".")[-1])


def _plot(rows: list[dict], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = [r for r in rows if r["kind"] == "result"]
    dts = sorted({r["dtype"] for r in res})
    fig, axes = plt.subplots(1, len(dts), figsize=(5 * len(dts), 4), squeeze=False)
    for ax, dt in zip(axes[0], dts):
        for name in dict.fromkeys(r["backend"] for r in res if r["dtype"] == dt):
            pts = [(r["tokens_per_expert"], r["read_bandwidth_ratio"]) for r in res
                   if r["backend"] == name and r["dtype"] == dt]
            ax.plot(*zip(*pts), marker="o", label=name)
        ax.axhline(0.75, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{dt}: 8 experts, H={H} I={I}", fontsize=9)
        ax.set_xlabel("tokens per expert")
        ax.set_xscale("log", base=2)
        ax.set_ylabel("weight GB/s / measured read GB/s")
        ax.legend(fontsize=8)
    fig.suptitle(device, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
