"""`fused_experts`: routed experts over the device's expert slot cache, one op, three faces.

Shape legend: T tokens, K top-k, H hidden, I expert intermediate size, S expert slots, P = T*K
(token, k) pairs.

    fused_experts(hidden[T,H], w13[S,2I,H], w2[S,H,I], slot_ids[T,K], weights[T,K]) -> out[T,H]

    out[t] = sum_k weights[t,k] * w2[s] @ (silu(w13[s,:I] @ h[t]) * (w13[s,I:] @ h[t])),
             s = slot_ids[t,k], pairs with s < 0 skipped ("not on this device")

The kernel never knows about offloading: the engine hands it the resident slot buffers plus expert
ids already remapped to slots (the shape of vLLM PR #37190's weight provider). The CPU path
(`cpu_experts.py`) computes the pairs that are negative here, and the caller adds both partials.

Faces, one name everywhere:
- `fused_experts_reference`: pure torch. The spec in tests and the CPU fallback.
- the Triton kernels below with their launcher `_fused_experts_triton`.
- `benchmark(...)`: times one face at one shape (used by benchmarks/bench_fused_experts.py).
`fused_experts(..., backend=AUTO)` runs Triton on CUDA tensors and the reference elsewhere;
`backend=TRITON` on CPU tensors runs Triton's interpreter, which must have been switched on with
`TRITON_INTERPRET=1` before this module was imported (Triton reads it when `@triton.jit` runs).

Numerics contract (shared by every face and by `cpu_experts.py`):
1. gate/up GEMMs take the inputs' dtype and accumulate in fp32; SiLU(gate)*up in fp32;
2. the activation is rounded to the input dtype (as vLLM's fused_moe keeps its intermediate cache
   in the activation dtype), then the down GEMM accumulates in fp32;
3. each pair's fp32 output is scaled by its routing weight (in fp32);
4. pairs are summed over k in fp32 in the order k = 0, 1, ..., K-1 (`sum_over_topk`), and the sum
   is rounded once to the input dtype.
Faces differ only by the GEMMs' internal summation order (fp32 round-off).

Kernel structure (the known-good one of vLLM's fused_moe, reduced to decode), four launches:
1. `_align_kernel` (one program): the (token, k) pairs sorted by slot, each slot's run padded to
   BLOCK_M, and the slot of every BLOCK_M block; on the device with a fixed upper bound on the block
   count, so there is no host sync and the op is CUDA-graph capturable. Above
   ALIGN_KERNEL_MAX_PAIRS pairs (prefill) the same layout comes from torch ops
   (`_align_pairs_by_slot`).
2. `_gate_up_kernel`: per (block, BLOCK_N columns) program, gather the block's token rows, GEMM
   against both the gate and the up rows of the block's slot, write SiLU(gate)*up per pair.
3. `_down_kernel`: the same against w2, scaled by the routing weight, one fp32 row per pair.
4. `_sum_topk_kernel`: the in-order sum over k, skipped pairs never read, one cast.
Pairs sharing a slot share its weight tiles; that is the point of the sort at T > 1.

Per-pair path (`KernelConfig.gemv_max_tokens`, off by default until a GPU run has measured it
against the sorted path): for T <= gemv_max_tokens, two launches and no sort:
`_gemv_gate_up_kernel` per (pair, columns) and `_gemv_down_sum_kernel` per (token, columns), which
runs the token's K pairs in order and so also does step 4. Each pair streams its own slot's rows:
the same bytes as the sorted path when no two pairs share a slot (T=1), more otherwise.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from enum import Enum

import torch
import torch.nn.functional as F

try:  # triton is a declared dependency, but keep the reference usable without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class Backend(str, Enum):
    AUTO = "auto"  # Triton on CUDA tensors, else the reference
    TRITON = "triton"  # Triton; on CPU tensors only under TRITON_INTERPRET=1
    REFERENCE = "reference"  # pure torch


@dataclass(frozen=True, slots=True)
class KernelConfig:
    """Tile sizes. Sorted path: BLOCK_M >= 16 (tl.dot's minimum). Per-pair (GEMV) path, taken
    when T <= gemv_max_tokens: gemv_block_n_* rows of a weight per program, gemv_block_k wide."""

    block_m: int = 16
    block_n_gate_up: int = 64
    block_n_down: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3
    gemv_max_tokens: int = 0
    gemv_block_n_gate_up: int = 16
    gemv_block_n_down: int = 16
    gemv_block_k: int = 256

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n_gate_up", "block_n_down", "block_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 16 or v & (v - 1):
                raise ValueError(f"{name}: must be a power of two >= 16, got {v!r}")
        for name in ("gemv_block_n_gate_up", "gemv_block_n_down", "gemv_block_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 4 or v & (v - 1):
                raise ValueError(f"{name}: must be a power of two >= 4, got {v!r}")
        if not isinstance(self.gemv_max_tokens, int) or self.gemv_max_tokens < 0:
            raise ValueError(f"gemv_max_tokens: must be an int >= 0, got {self.gemv_max_tokens!r}")
        if not isinstance(self.num_warps, int) or self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps: must be one of 1, 2, 4, 8, 16, got {self.num_warps!r}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"num_stages: must be an int >= 1, got {self.num_stages!r}")


# Decode defaults. BLOCK_N 32 on the gate/up side doubles the programs at T=1 (8 pairs -> 8 blocks
# x I/32 columns); the down side has H >> I columns already. On an H100 (Qwen3 dims, bf16, CUDA
# graph) these were within 5 % of the best of 5 tile sets at every T in 1..32 (benchmarks/README).
# gemv_max_tokens stays 0: the per-pair path compiles for sm_90 and matches the reference under the
# interpreter, but has not been timed on a GPU yet (`bench_fused_experts.py --sweep` times it).
DEFAULT_CONFIG = KernelConfig(block_m=16, block_n_gate_up=32, block_n_down=64, block_k=128,
                              num_warps=4, num_stages=3)
INTERPRET_CONFIG = KernelConfig(block_m=16, block_n_gate_up=16, block_n_down=16, block_k=16,
                                num_warps=1, num_stages=1)


def replace_config(config: KernelConfig, **changes: int) -> KernelConfig:
    """A copy of `config` with some tiles changed (validated again)."""
    return replace(config, **changes)


# ---- validation -----------------------------------------------------------------------------
def _check_inputs(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    slot_ids: torch.Tensor,
    weights: torch.Tensor,
) -> tuple[int, int, int, int, int]:
    """Shapes/dtypes/devices; returns (T, H, I, S, K). Slot id values are checked on CPU only
    (on CUDA that would cost a host sync per layer); on CUDA an id >= S is the caller's bug."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden: expected [T, H], got shape {tuple(hidden.shape)}")
    if hidden.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"hidden: dtype must be bf16, fp16 or fp32, got {hidden.dtype}")
    T, H = hidden.shape
    if w13.dim() != 3 or w13.shape[2] != H or w13.shape[1] % 2:
        raise ValueError(f"w13: expected [S, 2I, H={H}], got shape {tuple(w13.shape)}")
    S, two_i, _ = w13.shape
    I = two_i // 2
    if w2.dim() != 3 or tuple(w2.shape) != (S, H, I):
        raise ValueError(f"w2: expected [S={S}, H={H}, I={I}], got shape {tuple(w2.shape)}")
    for name, t in (("w13", w13), ("w2", w2)):
        if t.dtype != hidden.dtype:
            raise ValueError(f"{name}: dtype {t.dtype} differs from hidden's {hidden.dtype}")
    if slot_ids.dim() != 2 or slot_ids.shape[0] != T:
        raise ValueError(f"slot_ids: expected [T={T}, K], got shape {tuple(slot_ids.shape)}")
    if slot_ids.dtype not in (torch.int32, torch.int64, torch.int16, torch.int8):
        raise ValueError(f"slot_ids: expected an integer dtype, got {slot_ids.dtype}")
    K = slot_ids.shape[1]
    if tuple(weights.shape) != (T, K):
        raise ValueError(f"weights: expected [T={T}, K={K}], got shape {tuple(weights.shape)}")
    if not weights.is_floating_point():
        raise ValueError(f"weights: expected a floating dtype, got {weights.dtype}")
    for name, t in (("w13", w13), ("w2", w2), ("slot_ids", slot_ids), ("weights", weights)):
        if t.device != hidden.device:
            raise ValueError(f"{name}: on {t.device}, hidden is on {hidden.device}")
    if slot_ids.device.type == "cpu" and slot_ids.numel() and int(slot_ids.max()) >= S:
        raise ValueError(f"slot_ids: id {int(slot_ids.max())} out of range for S={S} slots")
    return T, H, I, S, K


def sum_over_topk(pair_out: torch.Tensor) -> torch.Tensor:
    """[T, K, H] fp32 -> [T, H] fp32, adding k = 0..K-1 in order (the contract's summation order;
    torch's sum(dim) may reorder)."""
    out = pair_out[:, 0].clone()
    for k in range(1, pair_out.shape[1]):
        out += pair_out[:, k]
    return out


# ---- the reference ----------------------------------------------------------------------------
def fused_experts_pairs(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    slot_ids: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """The reference before its k-sum: fp32 [T, K, H], pair (t, k) = weights[t,k] * expert
    slot_ids[t,k] applied to hidden[t], exact zeros where slot_ids < 0. One dense pass per distinct
    slot over the pairs routed to it, pairs in row-major order, so a pair's value does not depend
    on which other pairs share the call (offload.py adds a device and a CPU buffer of these).
    No input checks: callers on the hot path (offload.py) check once."""
    T, H = hidden.shape
    K = slot_ids.shape[1]
    I = w13.shape[1] // 2
    pair_out = torch.zeros(T * K, H, dtype=torch.float32, device=hidden.device)
    if T == 0:
        return pair_out.view(T, K, H)
    flat = slot_ids.reshape(-1).long()
    w_flat = weights.reshape(-1).float()
    for s in torch.unique(flat[flat >= 0]).tolist():
        pairs = torch.nonzero(flat == s).squeeze(1)
        x = hidden[pairs // K].float()
        gate_up = x @ w13[s].float().t()
        act = (F.silu(gate_up[:, :I]) * gate_up[:, I:]).to(hidden.dtype)
        y = act.float() @ w2[s].float().t()
        pair_out[pairs] = y * w_flat[pairs, None]
    return pair_out.view(T, K, H)


def fused_experts_reference(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    slot_ids: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """Pure torch, the spec: `fused_experts_pairs`, summed over k in order, one cast."""
    _check_inputs(hidden, w13, w2, slot_ids, weights)
    return sum_over_topk(fused_experts_pairs(hidden, w13, w2, slot_ids, weights)).to(hidden.dtype)


# ---- the Triton kernels ---------------------------------------------------------------------
def _align_pairs_by_slot(
    slot_ids: torch.Tensor, num_slots: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the P = T*K pairs by slot, each slot's run padded to a multiple of block_m.

    Returns (sorted_pairs[num_blocks * block_m] int32, block_slot[num_blocks] int32): pair index
    (t*K + k) at each sorted position, P for padding; the slot of each block, -1 for blocks past
    the end. num_blocks is an upper bound known without looking at the ids (no host sync):
    ceil((P + U*(block_m-1)) / block_m) with U = min(S, P) slots in use at most.
    Negative ids (not on this device) are left out."""
    device = slot_ids.device
    flat = slot_ids.reshape(-1).long()
    P = flat.numel()
    used = min(num_slots, P)
    num_blocks = max(1, (P + used * (block_m - 1) + block_m - 1) // block_m)
    key = torch.where(flat >= 0, flat, torch.full_like(flat, num_slots))
    counts = torch.zeros(num_slots + 1, dtype=torch.long, device=device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    counts = counts[:num_slots]
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    count_start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(key, stable=True)
    skey = key[order]
    valid = skey < num_slots
    skey_c = skey.clamp(max=num_slots - 1)
    rank = torch.arange(P, device=device) - count_start[skey_c]
    trash = num_blocks * block_m  # where the skipped pairs land, sliced off below
    dest = torch.where(valid, pad_start[skey_c] + rank, torch.full_like(rank, trash))
    sorted_pairs = torch.full((trash + 1,), P, dtype=torch.int32, device=device)
    sorted_pairs.scatter_(0, dest, order.to(torch.int32))
    block_start = torch.arange(num_blocks, device=device) * block_m
    block_slot = torch.searchsorted(pad_end, block_start, right=True)
    block_slot = torch.where(block_slot < num_slots, block_slot, torch.full_like(block_slot, -1))
    return sorted_pairs[:trash], block_slot.to(torch.int32)


if triton is not None:

    @triton.jit
    def _gate_up_kernel(
        hidden_ptr, w13_ptr, act_ptr, sorted_pairs_ptr, block_slot_ptr,
        num_pairs, top_k, H, I,
        stride_ht, stride_hh, stride_ws, stride_wn, stride_wk, stride_ap, stride_an,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        UPCAST: tl.constexpr, IEEE: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        slot = tl.load(block_slot_ptr + pid_m)
        if slot < 0:
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_pairs_ptr + offs_m)
        row_ok = pair < num_pairs
        tok = pair // top_k
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < I
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = hidden_ptr + tok[:, None].to(tl.int64) * stride_ht + offs_k[None, :] * stride_hh
        g_ptrs = (w13_ptr + slot.to(tl.int64) * stride_ws
                  + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk)
        u_ptrs = g_ptrs + I * stride_wn
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, tl.cdiv(H, BLOCK_K)):
            k_ok = offs_k < H - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            u = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:  # the interpreter mis-computes bf16: compute in fp32 there
                a = a.to(tl.float32)
                g = g.to(tl.float32)
                u = u.to(tl.float32)
            if IEEE:
                acc_g = tl.dot(a, g, acc_g, input_precision="ieee")
                acc_u = tl.dot(a, u, acc_u, input_precision="ieee")
            else:
                acc_g = tl.dot(a, g, acc_g)
                acc_u = tl.dot(a, u, acc_u)
            a_ptrs += BLOCK_K * stride_hh
            g_ptrs += BLOCK_K * stride_wk
            u_ptrs += BLOCK_K * stride_wk
        act = acc_g * tl.sigmoid(acc_g) * acc_u
        out_ptrs = act_ptr + pair[:, None].to(tl.int64) * stride_ap + offs_n[None, :] * stride_an
        tl.store(out_ptrs, act.to(act_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _down_kernel(
        act_ptr, w2_ptr, out_ptr, weights_ptr, sorted_pairs_ptr, block_slot_ptr,
        num_pairs, H, I,
        stride_ap, stride_an, stride_ws, stride_wn, stride_wk, stride_op, stride_on,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        UPCAST: tl.constexpr, IEEE: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        slot = tl.load(block_slot_ptr + pid_m)
        if slot < 0:
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_pairs_ptr + offs_m)
        row_ok = pair < num_pairs
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < H
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = act_ptr + pair[:, None].to(tl.int64) * stride_ap + offs_k[None, :] * stride_an
        b_ptrs = (w2_ptr + slot.to(tl.int64) * stride_ws
                  + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, tl.cdiv(I, BLOCK_K)):
            k_ok = offs_k < I - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K * stride_an
            b_ptrs += BLOCK_K * stride_wk
        w = tl.load(weights_ptr + pair, mask=row_ok, other=0.0)
        acc = acc * w[:, None]
        out_ptrs = out_ptr + pair[:, None].to(tl.int64) * stride_op + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc, mask=row_ok[:, None] & n_ok[None, :])


if triton is not None:

    @triton.jit
    def _align_kernel(
        ids_ptr, scratch_ptr, sorted_pairs_ptr, block_slot_ptr,
        num_pairs, num_sorted, num_blocks,
        BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
    ):
        """`_align_pairs_by_slot` in one program, O(P^2) compares (P <= ALIGN_KERNEL_MAX_PAIRS):
        rank[p] = #{q < p: id[q] == id[p]}, count[p] = #{q: id[q] == id[p]}; a slot's padded
        start = sum of ceil(count/BLOCK_M)*BLOCK_M over the first pairs (rank 0) of smaller
        slots. Same layout as the torch version (a stable sort by slot)."""
        offs = tl.arange(0, CHUNK)
        for c in range(0, tl.cdiv(num_sorted, CHUNK)):  # padding everywhere first
            o = c * CHUNK + offs
            tl.store(sorted_pairs_ptr + o, tl.full((CHUNK,), 0, tl.int32) + num_pairs,
                     mask=o < num_sorted)
        for c in range(0, tl.cdiv(num_blocks, CHUNK)):
            o = c * CHUNK + offs
            tl.store(block_slot_ptr + o, tl.full((CHUNK,), -1, tl.int32), mask=o < num_blocks)
        for cp in range(0, tl.cdiv(num_pairs, CHUNK)):  # pass 1: rank and count of every pair
            p = cp * CHUNK + offs
            idp = tl.load(ids_ptr + p, mask=p < num_pairs, other=-1).to(tl.int32)
            rank = tl.zeros((CHUNK,), tl.int32)
            count = tl.zeros((CHUNK,), tl.int32)
            for cq in range(0, tl.cdiv(num_pairs, CHUNK)):
                q = cq * CHUNK + offs
                idq = tl.load(ids_ptr + q, mask=q < num_pairs, other=-1).to(tl.int32)
                same = (idq[None, :] == idp[:, None]) & (idq[None, :] >= 0)
                count += tl.sum(same.to(tl.int32), axis=1)
                rank += tl.sum((same & (q[None, :] < p[:, None])).to(tl.int32), axis=1)
            tl.store(scratch_ptr + p, rank, mask=p < num_pairs)
            tl.store(scratch_ptr + num_pairs + p, count, mask=p < num_pairs)
        tl.debug_barrier()
        for cp in range(0, tl.cdiv(num_pairs, CHUNK)):  # pass 2: padded start, place the pair
            p = cp * CHUNK + offs
            p_ok = p < num_pairs
            idp = tl.load(ids_ptr + p, mask=p_ok, other=-1).to(tl.int32)
            rank = tl.load(scratch_ptr + p, mask=p_ok, other=0)
            start = tl.zeros((CHUNK,), tl.int32)
            for cq in range(0, tl.cdiv(num_pairs, CHUNK)):
                q = cq * CHUNK + offs
                q_ok = q < num_pairs
                idq = tl.load(ids_ptr + q, mask=q_ok, other=-1).to(tl.int32)
                rq = tl.load(scratch_ptr + q, mask=q_ok, other=1)
                cntq = tl.load(scratch_ptr + num_pairs + q, mask=q_ok, other=0)
                padded = (cntq + BLOCK_M - 1) // BLOCK_M * BLOCK_M
                first_of_smaller = ((rq[None, :] == 0) & (idq[None, :] >= 0)
                                    & (idq[None, :] < idp[:, None]))
                start += tl.sum(tl.where(first_of_smaller, padded[None, :], 0), axis=1)
            dest = start + rank
            ok = p_ok & (idp >= 0)
            tl.store(sorted_pairs_ptr + dest, p.to(tl.int32), mask=ok)
            tl.store(block_slot_ptr + dest // BLOCK_M, idp, mask=ok & (rank % BLOCK_M == 0))

    @triton.jit
    def _sum_topk_kernel(
        pair_out_ptr, ids_ptr, out_ptr, top_k, H,
        BLOCK_H: tl.constexpr,
    ):
        """out[t] = sum_{k=0..K-1, in order} pair_out[t*K + k] over routed pairs (fp32), cast once.
        Skipped pairs are never read, so pair_out needs no zero fill."""
        t = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        h_ok = offs < H
        acc = tl.zeros((BLOCK_H,), tl.float32)
        for k in range(0, top_k):
            pair = t * top_k + k
            slot = tl.load(ids_ptr + pair).to(tl.int32)
            routed = (tl.zeros((BLOCK_H,), tl.int32) + slot) >= 0  # a vector mask (interpreter)
            acc += tl.load(pair_out_ptr + pair.to(tl.int64) * H + offs, mask=h_ok & routed,
                           other=0.0)
        tl.store(out_ptr + t.to(tl.int64) * H + offs, acc.to(out_ptr.dtype.element_ty), mask=h_ok)


    @triton.jit
    def _gemv_gate_up_kernel(
        hidden_ptr, w13_ptr, act_ptr, ids_ptr,
        top_k, H, I,
        stride_ht, stride_hh, stride_ws, stride_wn, stride_wk, stride_ap, stride_an,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """Per-pair path, one (pair, BLOCK_N columns) per program: no sort, no tl.dot (M=1).
        Each pair streams its slot's rows itself, which at T=1 is every slot exactly once."""
        pair = tl.program_id(0)
        slot = tl.load(ids_ptr + pair).to(tl.int64)
        if slot < 0:
            return
        tok = pair // top_k
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < I
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = hidden_ptr + tok.to(tl.int64) * stride_ht + offs_k * stride_hh
        g_ptrs = (w13_ptr + slot * stride_ws
                  + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk)
        u_ptrs = g_ptrs + I * stride_wn
        acc_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for kb in range(0, tl.cdiv(H, BLOCK_K)):
            k_ok = offs_k < H - kb * BLOCK_K
            x = tl.load(x_ptrs, mask=k_ok, other=0.0).to(tl.float32)
            m = n_ok[:, None] & k_ok[None, :]
            g = tl.load(g_ptrs, mask=m, other=0.0).to(tl.float32)
            u = tl.load(u_ptrs, mask=m, other=0.0).to(tl.float32)
            acc_g += tl.sum(g * x[None, :], axis=1)
            acc_u += tl.sum(u * x[None, :], axis=1)
            x_ptrs += BLOCK_K * stride_hh
            g_ptrs += BLOCK_K * stride_wk
            u_ptrs += BLOCK_K * stride_wk
        act = acc_g * tl.sigmoid(acc_g) * acc_u
        tl.store(act_ptr + pair.to(tl.int64) * stride_ap + offs_n * stride_an,
                 act.to(act_ptr.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _gemv_down_sum_kernel(
        act_ptr, w2_ptr, out_ptr, ids_ptr, weights_ptr,
        top_k, H, I,
        stride_ap, stride_an, stride_ws, stride_wn, stride_wk, stride_ot, stride_oh,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """Per-pair path, down GEMM and the sum over k in one: a (token, BLOCK_N columns) program
        runs its K pairs in order k = 0..K-1, scales each by its weight, adds, casts once."""
        t = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < H
        offs_k = tl.arange(0, BLOCK_K)
        out = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k in range(0, top_k):
            pair = t * top_k + k
            slot = tl.load(ids_ptr + pair).to(tl.int64)
            if slot >= 0:
                a_ptrs = act_ptr + pair.to(tl.int64) * stride_ap + offs_k * stride_an
                b_ptrs = (w2_ptr + slot * stride_ws + offs_n[:, None] * stride_wn
                          + offs_k[None, :] * stride_wk)
                y = tl.zeros((BLOCK_N,), dtype=tl.float32)
                for kb in range(0, tl.cdiv(I, BLOCK_K)):
                    k_ok = offs_k < I - kb * BLOCK_K
                    a = tl.load(a_ptrs, mask=k_ok, other=0.0).to(tl.float32)
                    b = tl.load(b_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                    y += tl.sum(b.to(tl.float32) * a[None, :], axis=1)
                    a_ptrs += BLOCK_K * stride_an
                    b_ptrs += BLOCK_K * stride_wk
                out += y * tl.load(weights_ptr + pair)
        tl.store(out_ptr + t.to(tl.int64) * stride_ot + offs_n * stride_oh,
                 out.to(out_ptr.dtype.element_ty), mask=n_ok)


# Above this many (token, k) pairs the one-program align kernel's O(P^2) compares cost more than
# the ~35 small torch launches of `_align_pairs_by_slot` (prefill); below it, one launch wins.
ALIGN_KERNEL_MAX_PAIRS = 2048


def align_pairs_by_slot(
    slot_ids: torch.Tensor, num_slots: int, block_m: int, *, use_kernel: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sort by slot the kernels need (see `_align_pairs_by_slot`): one Triton launch for
    decode-sized P on CUDA (or under the interpreter when asked), the torch ops otherwise."""
    P = slot_ids.numel()
    if use_kernel is None:
        use_kernel = slot_ids.is_cuda and triton is not None and 0 < P <= ALIGN_KERNEL_MAX_PAIRS
    if not use_kernel:
        return _align_pairs_by_slot(slot_ids, num_slots, block_m)
    used = min(num_slots, P)
    num_blocks = max(1, (P + used * (block_m - 1) + block_m - 1) // block_m)
    dev = slot_ids.device
    flat = slot_ids.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    scratch = torch.empty(2 * P, dtype=torch.int32, device=dev)
    sorted_pairs = torch.empty(num_blocks * block_m, dtype=torch.int32, device=dev)
    block_slot = torch.empty(num_blocks, dtype=torch.int32, device=dev)
    _align_kernel[(1,)](flat, scratch, sorted_pairs, block_slot, P, num_blocks * block_m,
                        num_blocks, BLOCK_M=block_m, CHUNK=64)
    return sorted_pairs, block_slot


def interpreter_active() -> bool:
    """True when this module's kernels were built by Triton's interpreter (TRITON_INTERPRET=1 was
    set before import)."""
    return triton is not None and type(_gate_up_kernel).__name__ == "InterpretedFunction"


def _fused_experts_triton(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    slot_ids: torch.Tensor,
    weights: torch.Tensor,
    config: KernelConfig,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    T, H, I, S, K = _check_inputs(hidden, w13, w2, slot_ids, weights)
    P = T * K
    if P == 0:
        return torch.zeros(T, H, dtype=out_dtype, device=hidden.device)
    interp = interpreter_active()
    if T <= config.gemv_max_tokens:
        return _fused_experts_gemv(hidden, w13, w2, slot_ids, weights, config, T, H, I, K,
                                   out_dtype)
    # Decode launches 4 kernels (align, gate/up, down, sum over k): at T=1 on an H100 the ~45
    # small torch ops this replaced cost more than the two GEMM kernels.
    sorted_pairs, block_slot = align_pairs_by_slot(
        slot_ids, S, config.block_m,
        use_kernel=(hidden.is_cuda or interp) and P <= ALIGN_KERNEL_MAX_PAIRS)
    num_blocks = block_slot.numel()
    act = torch.empty(P, I, dtype=hidden.dtype, device=hidden.device)
    out_pairs = torch.empty(P, H, dtype=torch.float32, device=hidden.device)
    w_flat = weights.reshape(-1).to(torch.float32).contiguous()
    ids_flat = slot_ids.reshape(-1).contiguous()
    ieee = hidden.dtype == torch.float32
    launch = {} if interp else {"num_warps": config.num_warps, "num_stages": config.num_stages}
    grid = (num_blocks, triton.cdiv(I, config.block_n_gate_up))
    _gate_up_kernel[grid](
        hidden, w13, act, sorted_pairs, block_slot,
        P, K, H, I,
        hidden.stride(0), hidden.stride(1), w13.stride(0), w13.stride(1), w13.stride(2),
        act.stride(0), act.stride(1),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n_gate_up, BLOCK_K=config.block_k,
        UPCAST=interp, IEEE=ieee, **launch,
    )
    grid = (num_blocks, triton.cdiv(H, config.block_n_down))
    _down_kernel[grid](
        act, w2, out_pairs, w_flat, sorted_pairs, block_slot,
        P, H, I,
        act.stride(0), act.stride(1), w2.stride(0), w2.stride(1), w2.stride(2),
        out_pairs.stride(0), out_pairs.stride(1),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n_down, BLOCK_K=config.block_k,
        UPCAST=interp, IEEE=ieee, **launch,
    )
    out = torch.empty(T, H, dtype=out_dtype, device=hidden.device)
    block_h = 256 if not interp else 32
    _sum_topk_kernel[(T, triton.cdiv(H, block_h))](out_pairs, ids_flat, out, K, H, BLOCK_H=block_h)
    return out


def _fused_experts_gemv(hidden, w13, w2, slot_ids, weights, config, T, H, I, K, out_dtype):
    """Two launches, no sort and no per-pair output buffer: the tiny-T path."""
    P = T * K
    act = torch.empty(P, I, dtype=hidden.dtype, device=hidden.device)
    out = torch.empty(T, H, dtype=out_dtype, device=hidden.device)
    ids_flat = slot_ids.reshape(-1).contiguous()
    w_flat = weights.reshape(-1).to(torch.float32).contiguous()
    launch = {} if interpreter_active() else {"num_warps": config.num_warps}
    _gemv_gate_up_kernel[(P, triton.cdiv(I, config.gemv_block_n_gate_up))](
        hidden, w13, act, ids_flat, K, H, I,
        hidden.stride(0), hidden.stride(1), w13.stride(0), w13.stride(1), w13.stride(2),
        act.stride(0), act.stride(1),
        BLOCK_N=config.gemv_block_n_gate_up, BLOCK_K=config.gemv_block_k, **launch,
    )
    _gemv_down_sum_kernel[(T, triton.cdiv(H, config.gemv_block_n_down))](
        act, w2, out, ids_flat, w_flat, K, H, I,
        act.stride(0), act.stride(1), w2.stride(0), w2.stride(1), w2.stride(2),
        out.stride(0), out.stride(1),
        BLOCK_N=config.gemv_block_n_down, BLOCK_K=config.gemv_block_k, **launch,
    )
    return out


def fused_experts(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    slot_ids: torch.Tensor,
    weights: torch.Tensor,
    *,
    backend: Backend | str = Backend.AUTO,
    config: KernelConfig | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The routed experts of this device's slots: see the module docstring for shapes and the
    numerics contract. Pairs with slot_ids < 0 contribute nothing (all negative -> zeros).
    `out_dtype=torch.float32` returns the fp32 sum over k before its one rounding (rule 4), so a
    caller adding another fp32 partial (the CPU experts') rounds once, after the add."""
    if out_dtype not in (None, torch.float32):
        raise ValueError(f"out_dtype: None (the input dtype) or torch.float32, got {out_dtype}")
    try:
        backend = Backend(backend)
    except ValueError:
        raise ValueError(f"backend: expected one of {[b.value for b in Backend]}, got {backend!r}")
    on_cuda = hidden.is_cuda
    if backend is Backend.AUTO:
        backend = Backend.TRITON if on_cuda and triton is not None else Backend.REFERENCE
    if backend is Backend.REFERENCE:
        if out_dtype is torch.float32:
            _check_inputs(hidden, w13, w2, slot_ids, weights)
            return sum_over_topk(fused_experts_pairs(hidden, w13, w2, slot_ids, weights))
        return fused_experts_reference(hidden, w13, w2, slot_ids, weights)
    if triton is None:
        raise ValueError("backend: 'triton' asked for but triton is not installed")
    if not on_cuda and not interpreter_active():
        raise ValueError(
            "backend: 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before this module "
            "is imported"
        )
    if config is None:
        config = INTERPRET_CONFIG if interpreter_active() else DEFAULT_CONFIG
    return _fused_experts_triton(hidden, w13, w2, slot_ids, weights, config,
                                 out_dtype or hidden.dtype)


# ---- benchmark hook -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class BenchResult:
    backend: str
    tokens: int
    top_k: int
    hidden: int
    intermediate: int
    slots: int
    distinct_slots: int
    dtype: str
    median_ms: float
    weight_gb_read: float  # weight bytes of the distinct slots touched (the decode floor)
    weight_gbps: float  # weight_gb_read / median time


def make_inputs(
    tokens: int, top_k: int, hidden: int, intermediate: int, slots: int,
    dtype: torch.dtype, device: str | torch.device, seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    """Random inputs at one shape: weights scaled like a trained layer (std 1/sqrt(fan_in)) so
    activations stay O(1); each token routes to top_k distinct slots, softmax-normalised weights."""
    if top_k > slots:
        raise ValueError(f"top_k: {top_k} exceeds slots={slots}")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(slots, 2 * intermediate, hidden, generator=g) / math.sqrt(hidden)
    w2 = torch.randn(slots, hidden, intermediate, generator=g) / math.sqrt(intermediate)
    ids = torch.stack([torch.randperm(slots, generator=g)[:top_k] for _ in range(tokens)])
    wts = torch.softmax(torch.randn(tokens, top_k, generator=g), dim=-1)
    return (x.to(device, dtype), w13.to(device, dtype), w2.to(device, dtype),
            ids.to(device, torch.int32), wts.to(device, torch.float32))


def benchmark(
    backend: Backend | str,
    inputs: tuple[torch.Tensor, ...],
    *,
    config: KernelConfig | None = None,
    warmup: int = 3,
    iters: int = 20,
) -> BenchResult:
    """Median wall time of one face over `iters` calls (CUDA-synchronised around each call)."""
    hidden, w13, w2, ids, wts = inputs
    sync = torch.cuda.synchronize if hidden.is_cuda else (lambda: None)
    for _ in range(warmup):
        fused_experts(hidden, w13, w2, ids, wts, backend=backend, config=config)
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fused_experts(hidden, w13, w2, ids, wts, backend=backend, config=config)
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    med_s = times[len(times) // 2]
    distinct = int(torch.unique(ids[ids >= 0]).numel())
    T, H = hidden.shape
    S, two_i, _ = w13.shape
    gb = distinct * 3 * (two_i // 2) * H * hidden.element_size() / 1e9
    return BenchResult(
        backend=Backend(backend).value, tokens=T, top_k=ids.shape[1], hidden=H,
        intermediate=two_i // 2, slots=S, distinct_slots=distinct, dtype=str(hidden.dtype),
        median_ms=med_s * 1e3, weight_gb_read=gb, weight_gbps=gb / med_s,
    )
