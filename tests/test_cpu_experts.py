"""CPU expert path: backends against the reference, the submit/wait split, the op-hook adapter.

The native kernel (csrc/cpu_experts.cpp) against the pure-torch reference `fused_experts_pairs`,
per (token, k) pair, relative to the pair's norm:
- float32: <= 1e-5 (fp32 summation order only);
- bfloat16 / float16: median pair <= 1e-5, every pair <= one unit in the last place of the dtype
  (2^-8 / 2^-11): the products and sums are fp32 as in the reference, but an activation that lands
  within fp32 round-off of a rounding boundary may round to the neighbouring bf16/fp16 value.
Pairs with ids < 0 are exact zeros on every backend."""
from __future__ import annotations

import json
import logging
import sys
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

try:
    from moespac_vllm.kernels import cpu_experts as ce
    from moespac_vllm.kernels import fused_experts as fe
except ModuleNotFoundError:  # an uninstalled checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kernels import cpu_experts as ce
    from kernels import fused_experts as fe


def _case(T=6, K=4, H=64, I=32, E=8, dtype=torch.float32, seed=0):
    return fe.make_inputs(T, K, H, I, E, dtype, "cpu", seed=seed)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


@pytest.fixture(params=["exact", "native"])
def pool(request):
    if request.param == "native" and not ce.native_available():
        pytest.skip("moespac_vllm._cpu_experts is not built")
    p = ce.CpuExpertPool(backend=request.param)
    yield p
    p.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_exact_backend_computes_each_pair_as_the_contract_says(dtype):
    """Pair by pair in float64 with the contract's one rounding (the activation to the input
    dtype); the exact backend batches an expert's pairs, so only fp32 GEMM order may differ."""
    x, w13, w2, ids, wts = _case(dtype=dtype, seed=1)
    ids[0, 2] = -1
    pairs = ce.pair_outputs_exact(x, w13, w2, ids, wts)
    assert pairs.dtype == torch.float32 and pairs.shape == (6, 4, 64)
    I = w13.shape[1] // 2
    for t in range(ids.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e < 0:
                assert not pairs[t, k].any()
                continue
            gu = w13[e].double() @ x[t].double()
            act = (torch.nn.functional.silu(gu[:I]) * gu[I:]).to(dtype).double()
            want = float(wts[t, k]) * (w2[e].double() @ act)
            torch.testing.assert_close(pairs[t, k].double(), want, atol=1e-4, rtol=1e-4)
    got = ce.sum_over_topk(pairs).to(dtype)
    assert torch.equal(got, fe.fused_experts_reference(x, w13, w2, ids, wts))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_torch_backend_is_within_its_documented_rounding(dtype, tol):
    x, w13, w2, ids, wts = _case(T=9, K=4, H=128, I=64, E=6, dtype=dtype, seed=2)
    got = ce.sum_over_topk(ce.pair_outputs_torch(x, w13, w2, ids, wts))
    want = fe.fused_experts_reference(x, w13, w2, ids, wts)
    assert _rel(got, want) < tol


@pytest.mark.parametrize("fn", [ce.pair_outputs_exact, ce.pair_outputs_torch])
def test_negative_ids_come_back_as_exact_zeros(fn):
    x, w13, w2, ids, wts = _case(seed=3)
    ids[:, 1] = -1
    pairs = fn(x, w13, w2, ids, wts)
    assert torch.all(pairs[:, 1] == 0)
    assert torch.all(pairs[:, 0].abs().sum(-1) > 0)
    assert torch.all(fn(x, w13, w2, torch.full_like(ids, -1), wts) == 0)


def test_cpu_and_device_halves_add_up_to_the_whole_layer(pool):
    # The offload invariant: split the pairs between the slot kernel and the CPU, add the halves.
    x, w13, w2, ids, wts = _case(T=8, K=4, E=8, seed=4)
    on_cpu = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    fut = pool.submit(x, w13, w2, torch.where(on_cpu, ids, -1), wts)
    device = fe.fused_experts_reference(x, w13, w2, torch.where(on_cpu, -1, ids), wts)
    whole = fe.fused_experts_reference(x, w13, w2, ids, wts)
    torch.testing.assert_close(device + pool.wait(fut), whole, rtol=1e-5, atol=1e-6)


def test_submit_returns_before_the_work_is_done():
    release = threading.Event()
    started = threading.Event()

    def slow_hook(hidden, w13, w2, ids, weights):
        started.set()
        assert release.wait(10)
        return ce.pair_outputs_exact(hidden, w13, w2, ids, weights)

    with ce.CpuExpertPool(backend="hook", hook=slow_hook) as p:
        fut = p.submit(*_case(seed=5))
        assert started.wait(10)
        assert not fut.done()  # the caller is free to launch device work now
        release.set()
        out = p.wait(fut)
    assert out.shape == (6, 64) and out.dtype == torch.float32


def test_jobs_complete_in_submission_order():
    finished: list[int] = []

    def tag_hook(hidden, w13, w2, ids, weights):
        finished.append(hidden.shape[0])
        return torch.zeros(hidden.shape[0], ids.shape[1], hidden.shape[1])

    with ce.CpuExpertPool(backend="hook", hook=tag_hook) as p:
        futs = [p.submit(*_case(T=t, seed=t)) for t in (3, 1, 2)]
        [p.wait(f) for f in futs]
    assert finished == [3, 1, 2]


def test_wait_reraises_the_workers_error():
    def broken(*args):
        raise RuntimeError("expert exploded")

    with ce.CpuExpertPool(backend="hook", hook=broken) as p:
        fut = p.submit(*_case())
        with pytest.raises(RuntimeError, match="expert exploded"):
            p.wait(fut)


def test_submit_after_close_is_refused():
    p = ce.CpuExpertPool()
    p.close()
    with pytest.raises(RuntimeError, match="close"):
        p.submit(*_case())


@pytest.mark.parametrize(
    "field,mutate",
    [
        ("hidden", lambda a: (a[0][None], *a[1:])),
        ("w13", lambda a: (a[0], a[1][:, :, :-1], *a[2:])),
        ("w2", lambda a: (a[0], a[1], a[2][:, :-1], *a[3:])),
        ("w2", lambda a: (a[0], a[1], a[2].double(), *a[3:])),
        ("ids", lambda a: (*a[:3], a[3].float(), a[4])),
        ("ids", lambda a: (*a[:3], a[3] + 50, a[4])),
        ("weights", lambda a: (*a[:4], a[4][:, :2])),
    ],
)
def test_bad_input_is_refused_at_submit_naming_the_field(pool, field, mutate):
    with pytest.raises(ValueError, match=f"^{field}"):
        pool.submit(*mutate(_case()))


@pytest.mark.parametrize(
    "kwargs,field",
    [({"num_threads": 0}, "num_threads"), ({"backend": "gpu"}, "backend"),
     ({"backend": "hook"}, "hook"), ({"backend": "exact", "hook": ce.pair_outputs_exact}, "hook")],
)
def test_bad_pool_settings_raise_valueerror_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        ce.CpuExpertPool(**kwargs)


# ---- the op hook, with a fake op that keeps the contract of vLLM's cpu_fused_moe --------------
def _fake_moe_op(out, x, w13p, w2p, topk_weights, topk_ids):
    """Top-K rows over "packed" (here: negated, to prove the packed copy is what is read)
    weights, computed in fp32 and written in the activation dtype."""
    w13, w2 = -w13p, -w2p
    pairs = ce.pair_outputs_exact(x, w13, w2, topk_ids.long(), topk_weights)
    out.copy_(ce.sum_over_topk(pairs).to(out.dtype))


def test_prepacked_hook_packs_each_weight_once_and_returns_per_pair_outputs():
    calls = []

    def prepack(w):
        calls.append(w.shape)
        return -w

    hook = ce.PrepackedMoeOpHook(prepack, _fake_moe_op)
    x, w13, w2, ids, wts = _case(dtype=torch.bfloat16, seed=6)
    ids[1, :] = -1
    with ce.CpuExpertPool(backend="hook", hook=hook) as p:
        a = p.submit(x, w13, w2, ids, wts).result()
        b = p.submit(x, w13, w2, ids, wts).result()
    assert len(calls) == 2  # w13 and w2, once each
    want = ce.pair_outputs_exact(x, w13, w2, ids, wts).to(torch.bfloat16).float()
    assert torch.equal(a, want) and torch.equal(b, want)
    assert torch.all(a[1] == 0)


@pytest.mark.vllm
def test_vllm_cpu_moe_op_through_the_hook_matches_the_reference():
    # vLLM's own loader: `vllm._C` is the AVX-512-BF16 build and dies with SIGILL on an AVX2-only
    # CPU (this VM on 2026-12-02); the platform imports the library built for this CPU's ISA
    cpu_platform = pytest.importorskip("vllm.platforms.cpu",
                                       reason="vLLM's CPU platform is not installed")
    cpu_platform.CpuPlatform.import_kernels()
    ops = torch.ops._C
    if not hasattr(ops, "cpu_fused_moe"):
        pytest.skip("this vLLM build has no cpu_fused_moe")

    def prepack(w):
        packed = torch.empty_like(w)
        ops.prepack_moe_weight(w, packed, "vec")
        return packed

    def moe_op(out, x, w13p, w2p, topk_weights, topk_ids):
        ops.cpu_fused_moe(out, x, w13p, w2p, None, None, topk_weights, topk_ids, False, "silu",
                          "vec")

    x, w13, w2, ids, wts = _case(T=5, K=4, H=256, I=128, E=8, dtype=torch.bfloat16, seed=7)
    ids[2, 1:] = -1  # the raw op segfaults on these; the hook must leave them out
    pairs = ce.PrepackedMoeOpHook(prepack, moe_op)(x, w13, w2, ids, wts)
    assert torch.all(pairs[2, 1:] == 0)
    assert _rel(ce.sum_over_topk(pairs), fe.fused_experts_reference(x, w13, w2, ids, wts)) < 2e-2


def test_empty_batch_gives_an_empty_partial(pool):
    x, w13, w2, ids, wts = _case()
    fut = pool.submit(x[:0], w13, w2, ids[:0], wts[:0])
    assert fut.result().shape == (0, 4, 64) and pool.wait(fut).shape == (0, 64)


# ---- the native kernel ---------------------------------------------------------------------------
needs_native = pytest.mark.skipif(not ce.native_available(),
                                  reason="moespac_vllm._cpu_experts is not built")
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-5, 2.0 ** -8),
       torch.float16: (1e-5, 2.0 ** -11)}  # (median pair, worst pair), relative to the pair


def _isas(dtype: torch.dtype) -> list[str]:
    return [i for i in ce.native_isas() if i != "avx512bf16" or dtype == torch.bfloat16]


_MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}


def _one_flip_bound(x, w13, w2, ids, wts) -> torch.Tensor:
    """Per pair [T,K]: the most one activation rounded to its neighbour (one ulp of the dtype at
    its value, as the module docstring allows) can move the pair:
    |weight| * max_i ulp(act_i) * ||w2[e][:, i]||."""
    I = w13.shape[1] // 2
    bits = _MANTISSA_BITS[x.dtype]
    out = torch.zeros(ids.shape, dtype=torch.float32)
    for t in range(ids.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e < 0:
                continue
            gu = w13[e].double() @ x[t].double()
            act = (torch.nn.functional.silu(gu[:I]) * gu[I:]).abs() * (1 + 2.0 ** -bits)
            _, ex = torch.frexp(act)  # act in [2^(ex-1), 2^ex): spacing 2^(ex-1-bits)
            ulp = torch.pow(2.0, (ex - 1 - bits).double())
            out[t, k] = abs(float(wts[t, k])) * float((ulp * w2[e].double().norm(dim=0)).max())
    return out


def _assert_pairs_close(got: torch.Tensor, want: torch.Tensor, ids: torch.Tensor,
                        dtype: torch.dtype, inputs: tuple | None = None) -> None:
    """Pair errors within TOL; with `inputs` (x, w13, w2, ids, weights) the worst-pair bound
    also allows one activation per pair rounded to its neighbour (_one_flip_bound), which a
    pair of few intermediate rows, or one activation far above the rest, cannot absorb in its
    own norm."""
    assert got.dtype == torch.float32 and got.shape == want.shape
    off = ids < 0
    assert torch.all(got[off] == 0), "pairs with ids < 0 must be exact zeros"
    if not (~off).any():
        return
    diff, norm = (got - want).norm(dim=-1)[~off], want.norm(dim=-1)[~off]
    median_tol, worst_tol = TOL[dtype]
    err = diff / norm.clamp_min(1e-30)
    assert float(err.median()) <= median_tol, f"median pair error {float(err.median()):.2e}"
    # A pair whose gate/up sums cancel (tiny H, an output far below the batch's) carries the
    # round-off of its terms, not of its result: scale the worst case by the batch's median too.
    scale = torch.maximum(norm, norm.median())
    if inputs is not None:  # the flip's bound plus the fp32 round-off the tolerance allows
        diff = (diff - _one_flip_bound(*inputs)[~off]).clamp_min(0)
    worst = diff / scale.clamp_min(1e-30)
    assert float(worst.max()) <= worst_tol, f"worst pair error {float(worst.max()):.2e}"


def _native_case(T, K, H, I, E, dtype, seed):
    x, w13, w2, ids, wts = fe.make_inputs(T, K, H, I, max(E, K), dtype, "cpu", seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(-1, E, (T, K), generator=g, dtype=torch.int32)  # repeats, some -1
    return x, w13[:E].contiguous(), w2[:E].contiguous(), ids, wts


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_matches_the_reference_per_pair_on_every_isa(dtype, threads):
    shapes = [(1, 1, 64, 32, 4), (5, 4, 37, 19, 6), (16, 8, 130, 70, 9), (3, 8, 48, 1, 2)]
    for isa in _isas(dtype):
        with ce.CpuExpertPool(threads, backend="native", isa=isa) as p:
            for seed, (T, K, H, I, E) in enumerate(shapes):
                x, w13, w2, ids, wts = _native_case(T, K, H, I, E, dtype, seed)
                ids[0, 0] = -1
                got = p.submit(x, w13, w2, ids, wts).result()
                _assert_pairs_close(got, fe.fused_experts_pairs(x, w13, w2, ids, wts), ids,
                                    dtype)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_every_token_count_per_expert_on_rows_of_whole_blocks(dtype):
    """Rows a multiple of 16 elements take AVX2's pair tile (tiles of 1-4 tokens, 4 or 2 streams,
    token groups of 4): expert e gets e + 1 tokens, 1..9, so every tile shape and remainder runs;
    H = 96 is not a whole number of 64-byte lines at 16-bit weights."""
    T, H, I, E = 45, 96, 48, 9
    x, w13, w2, _, _ = fe.make_inputs(T, 1, H, I, E, dtype, "cpu", seed=3)
    ids = torch.cat([torch.full((e + 1,), e, dtype=torch.int32) for e in range(E)])[:, None]
    wts = torch.rand(T, 1, generator=torch.Generator().manual_seed(4)) + 0.5
    for isa in _isas(dtype):
        with ce.CpuExpertPool(2, backend="native", isa=isa) as p:
            got = p.submit(x, w13, w2, ids, wts).result()
        _assert_pairs_close(got, fe.fused_experts_pairs(x, w13, w2, ids, wts), ids, dtype,
                            (x, w13, w2, ids, wts))


@needs_native
@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 16), K=st.integers(1, 8), H=st.integers(1, 80), I=st.integers(1, 40),
       E=st.integers(1, 10), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       seed=st.integers(0, 1000))
def test_native_pairs_match_the_reference_on_random_problems(T, K, H, I, E, dtype, seed):
    x, w13, w2, ids, wts = _native_case(T, K, H, I, E, dtype, seed)
    with ce.CpuExpertPool(2, backend="native") as p:
        got = p.submit(x, w13, w2, ids, wts).result()
    _assert_pairs_close(got, fe.fused_experts_pairs(x, w13, w2, ids, wts), ids, dtype,
                        (x, w13, w2, ids, wts))


@needs_native
def test_native_repeated_expert_in_one_token_gives_each_pair_its_weight():
    x, w13, w2, _, _ = _native_case(2, 3, 64, 32, 4, torch.bfloat16, 0)
    ids = torch.tensor([[2, 2, 2], [1, -1, 1]], dtype=torch.int32)
    wts = torch.tensor([[0.5, 0.25, 0.25], [0.7, 0.2, 0.1]])
    with ce.CpuExpertPool(2) as p:
        got = p.submit(x, w13, w2, ids, wts).result()
    torch.testing.assert_close(got[0, 0], 2 * got[0, 1], rtol=0, atol=0)  # same expert, 2x weight
    torch.testing.assert_close(got[1, 0], 7 * got[1, 2], rtol=1e-6, atol=0)
    _assert_pairs_close(got, fe.fused_experts_pairs(x, w13, w2, ids, wts), ids, torch.bfloat16)


@pytest.fixture
def tuning():
    """Set the native kernel's process-wide knobs for one test; restored afterwards."""
    from moespac_vllm import _cpu_experts

    saved = _cpu_experts._tuning()
    yield _cpu_experts._set_tuning
    _cpu_experts._set_tuning(*saved)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_stream_layouts_and_prefetch_match_the_reference(tuning, dtype):
    # 1..9 tokens per expert (4 streams per GEMV up to 4 tokens, 2 above), H and I not multiples
    # of the vector width nor of 4 (tails; odd gate/up chunks and down chunks with rows % 4 left
    # over). Prefetching changes no arithmetic: bit-identical results with it and without.
    H, I, E = 70, 37, 3
    for isa in _isas(dtype):
        with ce.CpuExpertPool(2, isa=isa) as p:
            for ntok in range(1, 10):
                x, w13, w2, _, wts = _native_case(ntok, 2, H, I, E, dtype, seed=ntok)
                ids = torch.tensor([[0, 2]] * ntok, dtype=torch.int32)
                want = fe.fused_experts_pairs(x, w13, w2, ids, wts)
                by_setting = {}
                for s4_max_tokens, prefetch_bytes in [(0, 0), (4, 0), (4, -1), (4, 4096), (2, 64)]:
                    tuning(s4_max_tokens, prefetch_bytes)
                    got = p.submit(x, w13, w2, ids, wts).result()
                    _assert_pairs_close(got, want, ids, dtype)
                    by_setting[s4_max_tokens, prefetch_bytes] = got
                assert torch.equal(by_setting[4, 0], by_setting[4, -1])
                assert torch.equal(by_setting[4, 0], by_setting[4, 4096])


@needs_native
def test_native_tuning_refuses_bad_values_naming_the_field(tuning):
    with pytest.raises(ValueError, match="^s4_max_tokens"):
        tuning(5, -1)
    with pytest.raises(ValueError, match="^prefetch_bytes"):
        tuning(4, -2)


@needs_native
def test_native_reads_a_store_slice_with_its_expert_stride():
    # The host store's tensors may be views whose experts sit further apart than one expert
    # (here every other expert of a bigger bank): read in place, rows contiguous.
    x, w13, w2, ids, wts = _native_case(4, 4, 48, 24, 10, torch.float32, 3)
    w13v, w2v = w13[::2], w2[::2]
    ids = ids.clamp(max=4)
    with ce.CpuExpertPool(1) as p:
        got = p.submit(x, w13v, w2v, ids, wts).result()
    _assert_pairs_close(got, fe.fused_experts_pairs(x, w13v, w2v, ids, wts), ids, torch.float32)


@needs_native
def test_native_submits_queue_in_order_and_each_wait_returns_its_own_job():
    cases = [_native_case(T, 8, 96, 40, 12, torch.bfloat16, seed=T) for T in (1, 7, 16, 3)]
    with ce.CpuExpertPool(2) as p:
        futs = [p.submit(*c) for c in cases]  # all queued before any wait
        outs = [p.wait(f) for f in reversed(futs)][::-1]
        assert all(f.done() for f in futs)
    for c, out in zip(cases, outs):
        want = fe.sum_over_topk(fe.fused_experts_pairs(*c))
        assert out.shape == want.shape and _rel(out, want) < 1e-4


@needs_native
def test_native_cpu_and_device_halves_add_up_to_the_whole_layer():
    x, w13, w2, ids, wts = _case(T=8, K=4, E=8, dtype=torch.bfloat16, seed=4)
    on_cpu = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    with ce.CpuExpertPool(2) as p:
        cpu = p.submit(x, w13, w2, torch.where(on_cpu, ids, -1), wts).result()
    device = fe.fused_experts_pairs(x, w13, w2, torch.where(on_cpu, -1, ids), wts)
    whole = fe.fused_experts_pairs(x, w13, w2, ids, wts)
    _assert_pairs_close(device + cpu, whole, ids, torch.bfloat16)


@needs_native
def test_native_pool_is_the_default_and_leaves_torch_threads_alone():
    before = torch.get_num_threads()
    with ce.CpuExpertPool(num_threads=1) as p:
        assert p.backend is ce.CpuBackend.NATIVE and p.num_threads == 1
    assert torch.get_num_threads() == before


@needs_native
def test_native_refuses_what_it_cannot_run_naming_the_field():
    x, w13, w2, ids, wts = _case()
    with ce.CpuExpertPool(1) as p:
        with pytest.raises(ValueError, match="^hidden"):
            p.submit(x.double(), w13.double(), w2.double(), ids, wts)
    with pytest.raises(ValueError, match="^isa"):
        ce.CpuExpertPool(1, isa="sse9")
    with pytest.raises(ValueError, match="^isa"):
        ce.CpuExpertPool(1, backend="torch", isa="scalar")


@needs_native
def test_native_empty_batch_gives_an_empty_partial():
    x, w13, w2, ids, wts = _case()
    with ce.CpuExpertPool(2) as p:
        fut = p.submit(x[:0], w13, w2, ids[:0], wts[:0])
        assert fut.result().shape == (0, 4, 64) and p.wait(fut).shape == (0, 64)
        allneg = p.submit(x, w13, w2, torch.full_like(ids, -1), wts).result()
    assert torch.all(allneg == 0)


def test_missing_native_module_falls_back_to_torch_with_one_log_line(monkeypatch, caplog):
    monkeypatch.setattr(ce, "_native", None)
    with caplog.at_level(logging.WARNING, logger=ce.log.name):
        p = ce.CpuExpertPool(backend="native")
    try:
        assert p.backend is ce.CpuBackend.TORCH
        assert len([r for r in caplog.records if "_cpu_experts" in r.getMessage()]) == 1
        x, w13, w2, ids, wts = _case()
        assert _rel(p.wait(p.submit(x, w13, w2, ids, wts)),
                    fe.fused_experts_reference(x, w13, w2, ids, wts)) < 1e-5
    finally:
        p.close()


@needs_native
def test_read_probe_sums_every_word_of_the_buffer():
    from moespac_vllm import _cpu_experts

    buf = torch.arange(3 << 21, dtype=torch.int64)  # 48 MiB: several 4 MiB chunks and a tail
    pool = _cpu_experts.Pool(2)
    try:
        for streams in (1, 2, 4):
            for pf in (0, 2048):  # prefetching past the buffer's end must not fault
                job = pool.read(buf.data_ptr(), buf.numel() * 8 - 64, streams=streams,
                                prefetch_bytes=pf)  # an odd tail
                assert job.wait()
                assert job.checksum == int(buf[:-8].sum())
        with pytest.raises(ValueError, match="^buffer"):
            pool.read(buf.data_ptr() + 8, 64)
        with pytest.raises(ValueError, match="^streams"):
            pool.read(buf.data_ptr(), 64, streams=3)
        with pytest.raises(ValueError, match="^prefetch_bytes"):
            pool.read(buf.data_ptr(), 64, prefetch_bytes=-1)
    finally:
        pool.close()


@needs_native
@pytest.mark.parametrize("spare_rows", [0, 3])
def test_native_reads_the_expert_store_in_place(spare_rows):
    # offload.ExpertStore's own tensors (rows 0..E-1 of an [E+S] bank when it has spare rows),
    # driven through the layer's CpuExperts protocol: submit(...).result() is fp32 [T,K,H].
    from moespac_vllm.offload import ExpertStore

    x, w13, w2, ids, wts = _native_case(6, 4, 96, 40, 8, torch.bfloat16, 7)
    store = ExpertStore()
    store.add_layer(0, w13, w2, spare_rows=spare_rows)
    with ce.CpuExpertPool(2) as p:
        got = p.submit(x, store.w13(0), store.w2(0), ids, wts).result()
    _assert_pairs_close(got, fe.fused_experts_pairs(x, w13, w2, ids, wts), ids, torch.bfloat16)


@needs_native
def test_bench_cpu_experts_rows_carry_the_bandwidth_ratio(monkeypatch, capsys):
    from conftest import load_benchmark

    bench = load_benchmark("bench_cpu_experts")
    monkeypatch.setattr(bench, "H", 64)
    monkeypatch.setattr(bench, "I", 32)
    assert bench.main(["--json", "--quick", "--bank", "16", "--probe-gib", "0.01",
                       "--probe-slice-mib", "2", "--no-vllm"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    results = [r for r in rows if r["kind"] == "result"]
    assert {r["backend"] for r in results} == {"native", "torch"}
    assert {r["tokens_per_expert"] for r in results} == {1, 4, 16}
    for r in results:
        assert r["device"] and r["gbps"] > 0 and r["read_gbps"] > 0
        assert r["read_bandwidth_ratio"] == pytest.approx(r["gbps"] / r["read_gbps"])
        assert r["paired_ratio_median"] > 0
        assert r["ms_per_expert"] == pytest.approx(r["median_ms"] / 8)
    assert all(r["rel_err_vs_reference"] < 1e-4 for r in results if r["backend"] == "native")
    probes = {(r["streams"], r["prefetch_bytes"]) for r in rows if r["kind"] == "read_bandwidth"}
    assert probes == {(s, pf) for s in (1, 2, 4) for pf in (0, 2048)}
