"""fused_experts: the reference against a naive per-token loop, the Triton kernel against the
reference (under TRITON_INTERPRET=1 at tiny shapes; for real on a GPU at Qwen3-30B-A3B shapes).

Triton reads TRITON_INTERPRET when `@triton.jit` runs, i.e. when the kernel module is imported, so
the interpreted kernel runs in one child interpreter that has the variable set from the start; the
cases are built here, sent over in a file, and each test compares one case's result here."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

try:
    from moespac_vllm.kernels import fused_experts as fe
except ModuleNotFoundError:  # an uninstalled checkout (the lent GPU machine): import from the tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kernels import fused_experts as fe

REPO = Path(__file__).resolve().parents[1]


def naive_per_token(hidden, w13, w2, slot_ids, weights):
    """The formula written out, one (token, k) at a time, all in fp64."""
    T, H = hidden.shape
    I = w13.shape[1] // 2
    out = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for k in range(slot_ids.shape[1]):
            s = int(slot_ids[t, k])
            if s < 0:
                continue
            x = hidden[t].double()
            gate = w13[s, :I].double() @ x
            up = w13[s, I:].double() @ x
            out[t] += float(weights[t, k]) * (w2[s].double() @ (F.silu(gate) * up))
    return out


def _case(T, K, H, I, S, dtype=torch.float32, seed=0):
    return fe.make_inputs(T, K, H, I, S, dtype, "cpu", seed=seed)


# ---- the reference is the formula ------------------------------------------------------------
@pytest.mark.parametrize("T,K,H,I,S", [(1, 2, 16, 8, 4), (7, 3, 32, 24, 5), (16, 8, 64, 32, 12)])
def test_reference_matches_per_token_loop(T, K, H, I, S):
    x, w13, w2, ids, wts = _case(T, K, H, I, S, seed=T)
    ids[0, -1] = -1
    got = fe.fused_experts_reference(x, w13, w2, ids, wts)
    want = naive_per_token(x, w13, w2, ids, wts)
    assert got.dtype == torch.float32 and got.shape == (T, H)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_negative_ids_contribute_nothing_whatever_their_slot_holds():
    x, w13, w2, ids, wts = _case(6, 4, 32, 16, 8, seed=1)
    ids[:, 1] = -1
    ids[2, :] = -1
    a = fe.fused_experts_reference(x, w13, w2, ids, wts)
    wts2 = wts.clone()
    wts2[:, 1] = 123.0  # weights of skipped pairs must be ignored too
    b = fe.fused_experts_reference(x, w13, w2, ids, wts2)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.all(a[2] == 0)
    kept = ids.clone()
    kept[:, 1] = ids[:, 0]  # a real slot with zero weight gives the same answer as skipping
    wz = wts.clone()
    wz[:, 1] = 0.0
    torch.testing.assert_close(fe.fused_experts_reference(x, w13, w2, kept, wz), a)


def test_all_negative_ids_give_zeros():
    x, w13, w2, ids, wts = _case(3, 2, 16, 8, 4, dtype=torch.bfloat16)
    out = fe.fused_experts_reference(x, w13, w2, torch.full_like(ids, -1), wts)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 16) and torch.all(out == 0)


def test_duplicate_slot_in_one_row_adds_both_weights():
    x, w13, w2, ids, wts = _case(4, 2, 32, 16, 6, seed=2)
    ids[:, 1] = ids[:, 0]
    once = fe.fused_experts_reference(x, w13, w2, ids[:, :1], wts[:, :1] + wts[:, 1:])
    twice = fe.fused_experts_reference(x, w13, w2, ids, wts)
    torch.testing.assert_close(twice, once, rtol=1e-5, atol=1e-6)


def test_reference_rounds_the_activation_to_the_input_dtype():
    # The contract's step 2: a bf16 run equals the fp32 formula applied to bf16-rounded
    # activations, not to fp32 ones (which is what tells the two apart at bf16 precision).
    x, w13, w2, ids, wts = _case(8, 2, 64, 32, 4, dtype=torch.bfloat16, seed=3)
    got = fe.fused_experts_reference(x, w13, w2, ids, wts)
    I = 32
    want = torch.zeros(8, 64)
    for t in range(8):
        for k in range(2):
            s = int(ids[t, k])
            gu = w13[s].float() @ x[t].float()
            act = (F.silu(gu[:I]) * gu[I:]).to(torch.bfloat16).float()
            want[t] += float(wts[t, k]) * (w2[s].float() @ act)
    torch.testing.assert_close(got.float(), want.to(torch.bfloat16).float(), rtol=0.02, atol=0.02)


@pytest.mark.parametrize(
    "field,mutate",
    [
        ("hidden", lambda a: (a[0][None], *a[1:])),
        ("w13", lambda a: (a[0], a[1][:, :-1], *a[2:])),
        ("w2", lambda a: (a[0], a[1], a[2][:, :, :-1], *a[3:])),
        ("w13", lambda a: (a[0], a[1].half(), *a[2:])),
        ("slot_ids", lambda a: (*a[:3], a[3].float(), a[4])),
        ("slot_ids", lambda a: (*a[:3], a[3] + 100, a[4])),
        ("weights", lambda a: (*a[:4], a[4][:, :1])),
    ],
)
def test_bad_input_raises_valueerror_naming_the_field(field, mutate):
    args = mutate(_case(3, 2, 16, 8, 4))
    with pytest.raises(ValueError, match=f"^{field}"):
        fe.fused_experts(*args)


def test_triton_on_cpu_without_interpreter_is_refused():
    if fe.interpreter_active():
        pytest.skip("this process runs the interpreter")
    with pytest.raises(ValueError, match="^backend"):
        fe.fused_experts(*_case(2, 2, 16, 8, 4), backend="triton")
    with pytest.raises(ValueError, match="^backend"):
        fe.fused_experts(*_case(2, 2, 16, 8, 4), backend="cuda-please")


def test_auto_on_cpu_runs_the_reference():
    args = _case(3, 2, 16, 8, 4)
    torch.testing.assert_close(fe.fused_experts(*args), fe.fused_experts_reference(*args),
                               rtol=0, atol=0)


@pytest.mark.parametrize(
    "field,value",
    [("block_m", 8), ("block_k", 48), ("num_warps", 3), ("num_stages", 0),
     ("gemv_block_k", 2), ("gemv_max_tokens", -1)],
)
def test_kernel_config_rejects_bad_tiles(field, value):
    with pytest.raises(ValueError, match=f"^{field}"):
        fe.KernelConfig(**{field: value})


# ---- the sort by slot: every routed pair lands in exactly one block of its own slot ----------
@settings(max_examples=60, deadline=None)
@given(
    T=st.integers(1, 12), K=st.integers(1, 8), S=st.integers(1, 20),
    block_m=st.sampled_from([16, 32]), data=st.data(),
)
def test_align_places_each_routed_pair_once_in_a_block_of_its_slot(T, K, S, block_m, data):
    ids = torch.tensor(
        data.draw(st.lists(st.lists(st.integers(-1, S - 1), min_size=K, max_size=K),
                           min_size=T, max_size=T)),
        dtype=torch.int32,
    )
    sorted_pairs, block_slot = fe._align_pairs_by_slot(ids, S, block_m)
    P = T * K
    assert sorted_pairs.numel() == block_slot.numel() * block_m
    flat = ids.reshape(-1)
    real = sorted_pairs[sorted_pairs < P].tolist()
    assert sorted(real) == [p for p in range(P) if flat[p] >= 0]  # each routed pair exactly once
    for b, s in enumerate(block_slot.tolist()):
        rows = sorted_pairs[b * block_m:(b + 1) * block_m]
        rows = rows[rows < P]
        if s < 0:
            assert rows.numel() == 0  # blocks past the end hold only padding
        else:
            assert rows.numel() > 0 and torch.all(flat[rows.long()] == s)


# ---- the kernel under the interpreter --------------------------------------------------------
def _interpret_cases() -> dict[str, tuple[torch.Tensor, ...]]:
    cases = {
        "fp32": _case(5, 3, 32, 24, 6, seed=10),
        "fp16": _case(5, 3, 32, 24, 6, dtype=torch.float16, seed=11),
        "bf16": _case(4, 2, 32, 16, 4, dtype=torch.bfloat16, seed=12),
        "one_token": _case(1, 4, 48, 16, 8, seed=13),
        "odd_dims": _case(3, 2, 40, 20, 3, seed=14),  # H, I not multiples of the 16-wide tiles
        "slot_spans_blocks": _case(20, 2, 16, 16, 2, seed=15),  # 20 pairs per slot > BLOCK_M
    }
    x, w13, w2, ids, wts = _case(6, 4, 32, 16, 8, seed=16)
    ids[:, 1] = -1
    ids[2, :] = -1
    cases["negative_ids"] = (x, w13, w2, ids, wts)
    cases["all_negative"] = (x, w13, w2, torch.full_like(ids, -1), wts)
    x, w13, w2, ids, wts = _case(6, 3, 32, 16, 5, seed=17)
    ids[:, 2] = ids[:, 0]
    ids[3] = ids[0]
    cases["duplicate_slots"] = (x, w13, w2, ids, wts)
    # The per-pair (GEMV) path on the same inputs: the launcher takes it for T <= gemv_max_tokens.
    for name in ("fp32", "bf16", "odd_dims", "negative_ids", "all_negative", "duplicate_slots"):
        cases[f"gemv_{name}"] = cases[name]
    return cases


def _align_cases() -> list[tuple[torch.Tensor, int, int]]:
    g = torch.Generator().manual_seed(0)
    shapes = [(1, 8, 128, 16), (5, 3, 6, 16), (20, 2, 2, 16), (9, 8, 40, 32), (70, 2, 3, 16)]
    return [(torch.randint(-1, S, (T, K), generator=g, dtype=torch.int32), S, bm)
            for T, K, S, bm in shapes]


_CHILD = """
import sys, torch
sys.path.insert(0, sys.argv[3])
try:
    from moespac_vllm.kernels import fused_experts as fe
except ModuleNotFoundError:
    from kernels import fused_experts as fe
assert fe.interpreter_active(), "TRITON_INTERPRET=1 did not reach the kernel module"
cases = torch.load(sys.argv[1])
FP32_OUT_CASES = ("bf16", "gemv_bf16", "fp16")
gemv = fe.KernelConfig(16, 16, 16, 16, 1, 1, gemv_max_tokens=1 << 20, gemv_block_n_gate_up=8,
                      gemv_block_n_down=8, gemv_block_k=16)
outs = {k: fe.fused_experts(*v, backend="triton", config=gemv if k.startswith("gemv_") else None)
        for k, v in cases.items() if k != "align"}
for k in FP32_OUT_CASES:
    outs["fp32_out_" + k] = fe.fused_experts(*cases[k], backend="triton",
                                             config=gemv if k.startswith("gemv_") else None,
                                             out_dtype=torch.float32)
outs["align"] = [fe.align_pairs_by_slot(ids, s, bm, use_kernel=True)
                 for ids, s, bm in cases["align"]]
torch.save(outs, sys.argv[2])
"""


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Every case's kernel output, computed once in a child running the Triton interpreter."""
    pytest.importorskip("triton")
    d = tmp_path_factory.mktemp("interpret")
    cases = _interpret_cases()
    cases["align"] = _align_cases()
    torch.save(cases, d / "cases.pt")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(d / "cases.pt"), str(d / "out.pt"), str(REPO)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    if proc.returncode != 0 and _interpreter_breaks_on_numpy() and (
            "only 0-dimensional arrays can be converted" in proc.stderr):
        pytest.skip("Triton < 3.9's interpreter calls int() on 1-element arrays in range(), "
                    "which NumPy >= 2.4 refuses (triton-lang/triton#9171)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cases, torch.load(d / "out.pt")


def _interpreter_breaks_on_numpy() -> bool:
    """Triton 3.6 + NumPy 2.5 (the lent GPU machine's image) is such a pair; Triton 3.9 is fixed."""
    import numpy as np
    import triton

    def ver(v: str) -> tuple[int, int]:
        major, minor = v.split(".")[:2]
        return int(major), int("".join(c for c in minor if c.isdigit()) or 0)

    return ver(triton.__version__) < (3, 9) and ver(np.__version__) >= (2, 4)


@pytest.mark.interpret
@pytest.mark.parametrize("name", sorted(_interpret_cases()))
def test_interpreted_kernel_matches_reference(interpreted, name):
    cases, outs = interpreted
    args = cases[name]
    got, want = outs[name], fe.fused_experts_reference(*args)
    assert got.dtype == want.dtype and got.shape == want.shape
    # fp32 differs from the reference only by GEMM summation order; fp16/bf16 also by the
    # rounding of the activation that order can flip (one ulp, propagated through w2).
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[want.dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    if name.endswith("all_negative"):
        assert torch.all(got == 0)
    if name.endswith("negative_ids"):
        assert torch.all(got[2] == 0)


@pytest.mark.interpret
@pytest.mark.parametrize("name", ["bf16", "gemv_bf16", "fp16"])
def test_interpreted_kernel_fp32_out_is_the_sum_before_its_one_rounding(interpreted, name):
    # out_dtype=float32 (the offloaded layer adds the CPU partial to it): both launch paths
    # return the fp32 sum over k, not a bf16/fp16 value widened, so the layer rounds once.
    cases, outs = interpreted
    args = cases[name]
    got = outs["fp32_out_" + name]
    want = fe.fused_experts(*args, backend="reference", out_dtype=torch.float32)
    assert got.dtype == torch.float32 == want.dtype and got.shape == want.shape
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2}[args[0].dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert (got.to(args[0].dtype).float() != got).any(), "the fp32 output was rounded already"
    torch.testing.assert_close(got.to(args[0].dtype).float(), outs[name].float(), rtol=tol,
                               atol=tol)


def test_reference_fp32_out_is_the_unrounded_sum_and_other_dtypes_are_refused():
    x, w13, w2, ids, wts = _case(4, 2, 32, 16, 4, dtype=torch.bfloat16, seed=3)
    got = fe.fused_experts(x, w13, w2, ids, wts, backend="reference", out_dtype=torch.float32)
    want = fe.sum_over_topk(fe.fused_experts_pairs(x, w13, w2, ids, wts))
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert torch.equal(got.to(torch.bfloat16), fe.fused_experts_reference(x, w13, w2, ids, wts))
    with pytest.raises(ValueError, match="out_dtype"):
        fe.fused_experts(x, w13, w2, ids, wts, out_dtype=torch.float16)


@pytest.mark.interpret
def test_interpreted_align_kernel_gives_the_torch_layout(interpreted):
    # The one-program align kernel (decode) and the torch ops (prefill) must agree exactly: a
    # stable sort by slot, each slot's run padded to BLOCK_M, the same block -> slot map.
    _, outs = interpreted
    for (ids, S, bm), (pairs_k, slots_k) in zip(_align_cases(), outs["align"]):
        pairs_t, slots_t = fe._align_pairs_by_slot(ids, S, bm)
        assert torch.equal(pairs_k, pairs_t) and torch.equal(slots_k, slots_t), (ids.shape, S, bm)


# ---- every kernel lowers to Hopper machine code, no GPU needed ------------------------------
def _hopper_signatures() -> list[tuple[object, list[str], dict, dict]]:
    bf, i32 = "*bf16", "i32"
    sorted_c = {"BLOCK_M": 16, "UPCAST": False, "IEEE": False}
    return [
        (fe._gate_up_kernel, [bf, bf, bf, "*i32", "*i32"] + [i32] * 11,
         {**sorted_c, "BLOCK_N": 32, "BLOCK_K": 128}, {"num_warps": 4, "num_stages": 3}),
        (fe._down_kernel, [bf, bf, "*fp32", "*fp32", "*i32", "*i32"] + [i32] * 10,
         {**sorted_c, "BLOCK_N": 64, "BLOCK_K": 128}, {"num_warps": 4, "num_stages": 3}),
        (fe._align_kernel, ["*i32"] * 4 + [i32] * 3, {"BLOCK_M": 16, "CHUNK": 64}, {}),
        (fe._sum_topk_kernel, ["*fp32", "*i32", bf, i32, i32], {"BLOCK_H": 256}, {}),
        (fe._gemv_gate_up_kernel, [bf, bf, bf, "*i32"] + [i32] * 10,
         {"BLOCK_N": 16, "BLOCK_K": 256}, {"num_warps": 4}),
        (fe._gemv_down_sum_kernel, [bf, bf, bf, "*i32", "*fp32"] + [i32] * 10,
         {"BLOCK_N": 16, "BLOCK_K": 256}, {"num_warps": 4}),
    ]


def test_every_kernel_compiles_for_hopper_sm90():
    """Triton's ahead-of-time compile to an sm_90 cubin with its bundled ptxas: catches kernels
    that only the interpreter accepts (the interpreter runs Python, not the compiler)."""
    triton = pytest.importorskip("triton")
    if fe.interpreter_active():
        pytest.skip("this process runs the interpreter")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this Triton has no ahead-of-time compile API")
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this Triton build ships no ptxas")
    for kernel, types, constexprs, options in _hopper_signatures():
        names = [a for a in kernel.arg_names if a not in constexprs]
        assert len(names) == len(types), kernel.arg_names
        sig = dict(zip(names, types)) | {k: "constexpr" for k in constexprs}
        src = ASTSource(fn=kernel, signature=sig,
                        constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        assert len(compiled.asm["cubin"]) > 0


# ---- the kernel on a GPU at Qwen3-30B-A3B shapes ---------------------------------------------
QWEN3_H, QWEN3_I, QWEN3_K = 2048, 768, 8


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30))


SORTED = fe.replace_config(fe.DEFAULT_CONFIG, gemv_max_tokens=0)
PER_PAIR = fe.replace_config(fe.DEFAULT_CONFIG, gemv_max_tokens=1 << 20)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 2, 8, 32])
@pytest.mark.parametrize("S", [16, 128])
@pytest.mark.parametrize("path", ["sorted", "per_pair"])
def test_kernel_matches_reference_on_gpu_bf16(T, S, path):
    args = fe.make_inputs(T, QWEN3_K, QWEN3_H, QWEN3_I, S, torch.bfloat16, "cuda", seed=T + S)
    got = fe.fused_experts(*args, backend="triton", config=SORTED if path == "sorted" else PER_PAIR)
    want = fe.fused_experts_reference(*args)
    assert got.dtype == torch.bfloat16 and got.shape == (T, QWEN3_H)
    assert _rel_err(got, want) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.float32, 1e-5)])
@pytest.mark.parametrize("path", ["sorted", "per_pair"])
def test_kernel_matches_reference_on_gpu_other_dtypes(dtype, tol, path):
    args = fe.make_inputs(8, QWEN3_K, QWEN3_H, QWEN3_I, 64, dtype, "cuda", seed=5)
    cfg = SORTED if path == "sorted" else PER_PAIR
    got = fe.fused_experts(*args, backend="triton", config=cfg)
    assert _rel_err(got, fe.fused_experts_reference(*args)) < tol


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["sorted", "per_pair"])
def test_kernel_skips_negative_and_sums_duplicates_on_gpu(path):
    cfg = SORTED if path == "sorted" else PER_PAIR
    x, w13, w2, ids, wts = fe.make_inputs(16, QWEN3_K, QWEN3_H, QWEN3_I, 32, torch.bfloat16,
                                          "cuda", seed=7)
    ids[:, 3] = -1
    ids[5, :] = -1
    ids[:, 7] = ids[:, 0]
    got = fe.fused_experts(x, w13, w2, ids, wts, backend="triton", config=cfg)
    want = fe.fused_experts_reference(x, w13, w2, ids, wts)
    assert torch.all(got[5] == 0)
    assert _rel_err(got, want) < 1e-2
    zeros = fe.fused_experts(x, w13, w2, torch.full_like(ids, -1), wts, backend="triton",
                             config=cfg)
    assert torch.all(zeros == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["sorted", "per_pair"])
def test_kernel_reads_only_the_slots_it_is_given_on_gpu(path):
    # Poisoning every slot nobody routes to must not change the output.
    cfg = SORTED if path == "sorted" else PER_PAIR
    x, w13, w2, ids, wts = fe.make_inputs(4, QWEN3_K, QWEN3_H, QWEN3_I, 64, torch.bfloat16,
                                          "cuda", seed=9)
    a = fe.fused_experts(x, w13, w2, ids, wts, backend="triton", config=cfg)
    unused = torch.ones(64, dtype=torch.bool, device="cuda")
    unused[ids.reshape(-1).long()] = False
    w13[unused] = math.nan
    w2[unused] = math.nan
    b = fe.fused_experts(x, w13, w2, ids, wts, backend="triton", config=cfg)
    assert torch.equal(a, b)


def test_empty_batch_gives_an_empty_output():
    x, w13, w2, ids, wts = _case(2, 2, 16, 8, 4, dtype=torch.bfloat16)
    out = fe.fused_experts(x[:0], w13, w2, ids[:0], wts[:0])
    assert out.shape == (0, 16) and out.dtype == torch.bfloat16
