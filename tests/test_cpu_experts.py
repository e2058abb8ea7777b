"""CPU expert path: backends against the reference, the submit/wait split, the op-hook adapter."""
from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
import torch

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


@pytest.fixture
def pool():
    p = ce.CpuExpertPool(backend="exact")
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
def test_native_backend_is_within_its_documented_rounding(dtype, tol):
    x, w13, w2, ids, wts = _case(T=9, K=4, H=128, I=64, E=6, dtype=dtype, seed=2)
    got = ce.sum_over_topk(ce.pair_outputs_native(x, w13, w2, ids, wts))
    want = fe.fused_experts_reference(x, w13, w2, ids, wts)
    assert _rel(got, want) < tol


@pytest.mark.parametrize("fn", [ce.pair_outputs_exact, ce.pair_outputs_native])
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
    pytest.importorskip("vllm._C", reason="vLLM's CPU ops are not installed")
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
