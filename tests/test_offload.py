"""The framework-neutral offloaded MoE layer (moespac_vllm/offload.py), on CPU tensors.

The engine here is a small fake that implements the `LayerEngine` protocol with a deterministic
slot policy (first experts to the device, fetching into the least recently used slot; the rest to
the CPU): it exercises every path of the layer (resident, fetched, CPU) without the core engine."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moespac_vllm.engine import LayerPlan
from moespac_vllm.offload import (
    ExpertStore,
    OffloadedExperts,
    SlotCache,
    StoreCopyMover,
    ThreadCpuExperts,
    experts_reference,
    slots_for,
)


class FakeEngine:
    """Per layer: `num_slots` slots; up to `device_share` of the routed experts of a forward run on
    the device (resident ones first, then fetched into LRU slots), the rest on the CPU."""

    def __init__(self, mover, num_slots: int, device_share: float = 0.5) -> None:
        self.mover = mover
        self.num_slots = num_slots
        self.device_share = device_share
        self.resident: dict[int, dict[int, int]] = {}  # layer -> expert -> slot
        self.lru: dict[int, list[int]] = {}  # layer -> slots, least recent first
        self.finished: list[tuple[int, np.ndarray]] = []
        self.timings: list[tuple[float, float, float]] = []

    def plan_layer(self, layer: int, topk_ids: np.ndarray) -> LayerPlan:
        res = self.resident.setdefault(layer, {})
        lru = self.lru.setdefault(layer, list(range(self.num_slots)))
        routed = [int(e) for e in np.unique(topk_ids)]
        budget = min(self.num_slots, max(1, int(round(self.device_share * len(routed)))))
        on_dev = [e for e in routed if e in res][:budget]
        fetches = []
        for e in routed:
            if len(on_dev) >= budget:
                break
            if e in on_dev:
                continue
            taken = {res[d] for d in on_dev}
            slot = next(s for s in lru if s not in taken)
            for old, s in list(res.items()):
                if s == slot:
                    del res[old]
            res[e] = slot
            self.mover.load(layer, e, slot)
            fetches.append((e, slot))
            on_dev.append(e)
        for e in on_dev:
            lru.remove(res[e])
            lru.append(res[e])
        slot_ids = np.full(topk_ids.shape, -1, dtype=np.int32)
        for e in on_dev:
            slot_ids[topk_ids == e] = res[e]
        cpu = tuple(e for e in routed if e not in on_dev)
        return LayerPlan(layer, slot_ids, slot_ids < 0, tuple(fetches), cpu, tuple(on_dev))

    def finish_layer(self, layer: int, topk_ids: np.ndarray) -> None:
        self.finished.append((layer, topk_ids.copy()))

    def resident_slots(self, layer: int) -> np.ndarray | None:
        return None  # never whole: every forward is planned

    def note_resident_forward(self, layer: int, topk_ids) -> None:
        raise AssertionError("resident_slots is always None: no plan-free forward")

    def note_streamed(self, layer: int, experts: int) -> None:
        raise AssertionError("no streamer here: nothing is streamed")

    def record_timing(self, stall_ms: float = 0.0, cpu_ms: float = 0.0,
                      gpu_ms: float = 0.0) -> None:
        self.timings.append((stall_ms, cpu_ms, gpu_ms))


def _weights(E: int, H: int, inter: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(E, 2 * inter, H, generator=g) / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, inter, generator=g) / inter**0.5).to(dtype)
    return w13, w2


def _routing(T: int, E: int, K: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    w, ids = torch.topk(torch.softmax(logits, -1), K, dim=-1)
    return ids.to(torch.int32), (w / w.sum(-1, keepdim=True))


def _dense_moe(x, w13, w2, ids, w):
    """Independent spec: token by token, k by k, the textbook SwiGLU expert."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    inter = w13.shape[1] // 2
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            gate = w13[e, :inter].double() @ x[t].double()
            up = w13[e, inter:].double() @ x[t].double()
            out[t] += float(w[t, k]) * (w2[e].double() @ (torch.nn.functional.silu(gate) * up))
    return out


def _layer(E=8, H=32, inter=16, num_slots=2, share=0.5, layers=(0,), cpu=None, seed=0):
    store = ExpertStore()
    for layer in layers:
        store.add_layer(layer, *_weights(E, H, inter, seed + layer))
    slots = SlotCache("cpu")
    for layer in layers:
        slots.add_layer(layer, num_slots, store.w13(layer), store.w2(layer))
    mover = StoreCopyMover(store, slots)
    engine = FakeEngine(mover, num_slots, share)
    mods = {layer: OffloadedExperts(store, engine, layer, "cpu", slots, mover, cpu_experts=cpu)
            for layer in layers}
    return store, slots, mover, engine, mods


def test_reference_matches_textbook_moe():
    w13, w2 = _weights(6, 16, 8, seed=1)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    ids, w = _routing(5, 6, 2, seed=3)
    got = experts_reference(x, w13, w2, ids, w)
    torch.testing.assert_close(got.double(), _dense_moe(x, w13, w2, ids, w), atol=1e-5, rtol=1e-5)


def test_reference_skips_negative_ids():
    w13, w2 = _weights(4, 16, 8, seed=1)
    x = torch.randn(3, 16)
    ids = torch.tensor([[0, -1], [-1, -1], [2, 3]])
    w = torch.ones(3, 2)
    got = experts_reference(x, w13, w2, ids, w)
    assert torch.all(got[1] == 0)
    only0 = experts_reference(x[:1], w13, w2, torch.tensor([[0]]), torch.ones(1, 1))
    torch.testing.assert_close(got[:1], only0)


@settings(max_examples=15, deadline=None)
@given(
    T=st.integers(1, 9),
    K=st.integers(1, 3),
    num_slots=st.integers(1, 8),
    share=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
    seed=st.integers(0, 10_000),
)
def test_every_placement_computes_bit_identical_outputs(T, K, num_slots, share, seed):
    E, H = 8, 32
    store, slots, mover, engine, mods = _layer(E=E, num_slots=num_slots, share=share, seed=seed)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(seed))
    for step in range(3):  # residency carries over between forwards
        ids, w = _routing(T, E, K, seed=seed * 7 + step)
        got = mods[0].forward(x, ids, w)
        want = experts_reference(x, store.w13(0), store.w2(0), ids, w)
        assert torch.equal(got, want)  # bit-identical: placement changes where, never what
    plan = mods[0].last_plan
    assert plan is not None and not np.any(plan.cpu_mask & (plan.slot_ids >= 0))


def test_all_three_paths_run_and_pairs_are_computed_once():
    store, slots, mover, engine, mods = _layer(E=8, num_slots=2, share=0.5)
    x = torch.randn(6, 32)
    total_pairs = 0
    for step in range(4):
        ids, w = _routing(6, 8, 2, seed=step)
        mods[0].forward(x, ids, w)
        total_pairs += ids.numel()
    c = mods[0].counters
    assert c.cpu_pairs > 0 and c.device_pairs > 0 and c.fetches > 0
    assert c.cpu_pairs + c.device_pairs == total_pairs
    assert mover.bytes_moved == c.fetches * store.expert_bytes(0)
    assert len(engine.finished) == 4


def test_fetched_slot_holds_the_expert_weights():
    store, slots, mover, engine, mods = _layer(E=8, num_slots=3, share=1.0)
    ids, w = _routing(4, 8, 2, seed=5)
    mods[0].forward(torch.randn(4, 32), ids, w)
    for e, s in mods[0].last_plan.fetches:
        assert torch.equal(slots.w13(0)[s], store.w13(0)[e])
        assert torch.equal(slots.w2(0)[s], store.w2(0)[e])


def test_engine_sees_original_routing_not_slots():
    store, slots, mover, engine, mods = _layer(E=8, num_slots=2, share=1.0)
    ids, w = _routing(5, 8, 2, seed=9)
    before = ids.clone()
    mods[0].forward(torch.randn(5, 32), ids, w)
    assert torch.equal(ids, before)  # the router's tensor is not remapped in place
    assert np.array_equal(engine.finished[-1][1], before.numpy())


def test_threaded_cpu_experts_match_inline():
    pool = ThreadCpuExperts()
    try:
        _, _, _, _, threaded = _layer(E=8, num_slots=1, share=0.25, cpu=pool, seed=4)
        _, _, _, _, inline = _layer(E=8, num_slots=1, share=0.25, seed=4)
        x = torch.randn(7, 32)
        ids, w = _routing(7, 8, 2, seed=11)
        assert torch.equal(threaded[0].forward(x, ids, w), inline[0].forward(x, ids, w))
    finally:
        pool.close()


def test_bf16_activations_come_back_in_bf16():
    store = ExpertStore()
    store.add_layer(0, *_weights(4, 32, 16, seed=0, dtype=torch.bfloat16))
    slots = SlotCache("cpu")
    slots.add_layer(0, 2, store.w13(0), store.w2(0))
    mover = StoreCopyMover(store, slots)
    layer = OffloadedExperts(store, FakeEngine(mover, 2, 0.5), 0, "cpu", slots, mover)
    x = torch.randn(3, 32).to(torch.bfloat16)
    ids, w = _routing(3, 4, 2, seed=1)
    got = layer.forward(x, ids, w)
    assert got.dtype == torch.bfloat16
    want = experts_reference(x, store.w13(0), store.w2(0), ids, w).to(torch.bfloat16)
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)


def test_broken_plan_fails_loudly():
    class Liar(FakeEngine):
        def plan_layer(self, layer, topk_ids):
            p = super().plan_layer(layer, topk_ids)
            return LayerPlan(layer, p.slot_ids, np.zeros_like(p.cpu_mask), p.fetches,
                             p.cpu_experts, p.device_experts)

    store, slots, mover, _, _ = _layer(E=8, num_slots=1, share=0.25)
    layer = OffloadedExperts(store, Liar(mover, 1, 0.25), 0, "cpu", slots, mover)
    ids, w = _routing(4, 8, 2, seed=0)
    with pytest.raises(RuntimeError, match="cpu_mask"):
        layer.forward(torch.randn(4, 32), ids, w)


def test_bad_inputs_name_the_field():
    store = ExpertStore()
    with pytest.raises(ValueError, match="w2"):
        store.add_layer(0, torch.zeros(4, 8, 16), torch.zeros(4, 16, 5))
    store.add_layer(0, torch.zeros(4, 8, 16), torch.zeros(4, 16, 4))
    with pytest.raises(ValueError, match="layer"):
        store.add_layer(0, torch.zeros(4, 8, 16), torch.zeros(4, 16, 4))
    slots = SlotCache("cpu")
    with pytest.raises(ValueError, match="num_slots"):
        slots.add_layer(0, 0, store.w13(0), store.w2(0))
    with pytest.raises(ValueError, match="layer"):
        OffloadedExperts(store, None, 3, "cpu", slots, None)


@pytest.mark.parametrize("E,ratio,want", [(8, 0.25, 2), (8, 1.0, 8), (60, 0.17, 11), (4, 0.01, 1)])
def test_slots_for(E, ratio, want):
    assert slots_for(E, ratio) == want


def test_matches_the_kernels_reference():
    from moespac_vllm.kernels.fused_experts import fused_experts_reference

    w13, w2 = _weights(6, 32, 16, seed=3)
    x = torch.randn(9, 32, generator=torch.Generator().manual_seed(4))
    ids, w = _routing(9, 6, 3, seed=5)
    torch.testing.assert_close(experts_reference(x, w13, w2, ids, w),
                               fused_experts_reference(x, w13, w2, ids, w), atol=1e-6, rtol=1e-6)


def test_long_prefill_is_chunked_without_changing_the_result(monkeypatch):
    import moespac_vllm.offload as offload

    store, slots, mover, engine, mods = _layer(E=8, num_slots=2, share=0.5)
    x = torch.randn(37, 32)
    ids, w = _routing(37, 8, 2, seed=2)
    monkeypatch.setattr(offload, "PAIR_BUFFER_MAX_ELEMS", 2 * 32 * 5)  # 5 tokens per chunk
    got = mods[0].forward(x, ids, w)
    torch.testing.assert_close(got, experts_reference(x, store.w13(0), store.w2(0), ids, w),
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("policy", ["spac", "lru", "spac-faithful"])
def test_real_engine_with_deferred_mover_matches_reference(policy):
    """The core ExpertEngine and the kernels issue's SyncMover (deferred: copies land at wait)
    drive the layer; outputs stay bit-identical to the all-experts reference."""
    from moespac_vllm.config import MoESpacConfig
    from moespac_vllm.cost_model import ExpertCosts
    from moespac_vllm.engine import ExpertEngine
    from moespac_vllm.mover import SyncMover
    from moespac_vllm.step_context import Phase, StepContext
    from moespac_vllm.trace import ModelDims

    L, E, K, H, inter = 2, 8, 2, 32, 16
    store = ExpertStore()
    slots = SlotCache("cpu")
    for layer in range(L):
        store.add_layer(layer, *_weights(E, H, inter, seed=layer))
        slots.add_layer(layer, 2, store.w13(layer), store.w2(layer))
    mover = SyncMover(store, slots, deferred=True)
    cfg = MoESpacConfig.from_mapping({"cache_ratio": 0.25, "policy": policy})
    costs = ExpertCosts(gpu_fixed_ms=0.05, gpu_per_token_ms=0.01, cpu_fixed_ms=0.3,
                        cpu_per_token_ms=0.1, fetch_ms=0.5)

    class Clock:
        def now_ms(self) -> float:
            return 0.0

    engine = ExpertEngine(cfg, ModelDims(L, E, K, H, inter, 4), costs, mover, Clock())
    mods = [OffloadedExperts(store, engine, layer, "cpu", slots, mover) for layer in range(L)]
    gen = torch.Generator().manual_seed(0)
    for step in range(12):
        T = 8 if step == 0 else 4
        engine.begin_step(StepContext(step, Phase.PREFILL if step == 0 else Phase.VERIFY, T,
                                      (T,), 0 if step == 0 else 3))
        x = torch.randn(T, H, generator=gen)
        for layer in range(L):
            ids, w = _routing(T, E, K, seed=100 * step + layer)
            got = mods[layer].forward(x, ids, w)
            assert torch.equal(got, experts_reference(x, store.w13(layer), store.w2(layer),
                                                       ids, w))
        engine.end_step(1 if step else 0)
    s = engine.stats()
    assert s.device_experts > 0 and s.cpu_experts + s.fetched_experts > 0
    assert s.gpu_ms > 0 and s.stall_ms >= 0  # the layer reports its branch times
    if policy != "lru":
        assert s.cpu_ms > 0
    assert sum(m.counters.cpu_pairs for m in mods) + sum(m.counters.device_pairs for m in mods) \
        == 8 * K * L + 11 * 4 * K * L


# ---- host-fused mode: one kernel call over [store rows | slot rows] ------------------------------
class CountingKernel:
    """`kernels.fused_experts_reference` (the pure-torch HostFusedKernel), recording the rows each
    call was given."""

    def __init__(self, host_fused: bool = True) -> None:
        from moespac_vllm.kernels.fused_experts import fused_experts_reference

        self.ref = fused_experts_reference
        self.rows: list[torch.Tensor] = []
        self.weights_read: list[int] = []  # data_ptr of the w13 each call computed with
        self.host_fused = host_fused

    def __call__(self, hidden, w13, w2, rows, weights):
        if self.host_fused:  # the HostFusedKernel contract
            assert rows.dtype == torch.int32 and weights.dtype == torch.float32
        self.rows.append(rows.clone())
        self.weights_read.append(w13.data_ptr())
        return self.ref(hidden, w13, w2, rows, weights)


def _host_fused_layer(E=8, H=32, inter=16, num_slots=3, share=0.5, dtype=torch.bfloat16):
    store = ExpertStore()
    store.add_layer(0, *_weights(E, H, inter, seed=5, dtype=dtype), spare_rows=num_slots)
    slots = SlotCache("cpu")
    slots.attach_layer(0, *store.spare(0))
    mover = StoreCopyMover(store, slots)
    kernel = CountingKernel()
    layer = OffloadedExperts(store, FakeEngine(mover, num_slots, share), 0, "cpu", slots, mover,
                             host_fused=kernel)
    return store, slots, layer, kernel


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_host_fused_equals_one_call_over_the_store_in_bf16(share):
    """Whatever the plan, the output is bit-identical to the same kernel over the store alone
    (stock's single call): the row a pair reads changes where its weights live, not its value."""
    store, slots, layer, kernel = _host_fused_layer(share=share)
    w13, w2 = store.w13(0), store.w2(0)
    for step in range(6):
        x = torch.randn(5, 32, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16)
        ids, w = _routing(5, 8, 2, seed=10 + step)
        got = layer(x, ids, w)
        want = kernel.ref(x, w13, w2, ids, w.float())
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, want)
    rows = torch.cat(kernel.rows)
    if share > 0:  # device pairs really read the slot rows E..E+S-1
        assert int(rows.max()) >= 8 and layer.counters.device_pairs > 0
    if share < 1:
        assert int(rows.min()) < 8 and layer.counters.cpu_pairs > 0


def test_host_fused_reads_slot_contents():
    """A slot holding the wrong weights changes the output: the slot rows are what device pairs
    compute with, not a silent second copy of the store."""
    store, slots, layer, _ = _host_fused_layer(share=1.0)
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    ids, w = _routing(3, 8, 2, seed=1)
    good = layer(x, ids, w)
    slots.w13(0).mul_(2)
    assert not torch.equal(layer(x, ids, w), good)


def test_host_fused_requires_slots_in_the_spare_rows():
    store = ExpertStore()
    store.add_layer(0, *_weights(4, 16, 8, seed=0), spare_rows=2)
    slots = SlotCache("cpu")
    slots.add_layer(0, 2, store.w13(0), store.w2(0))  # separate buffers: not the spare rows
    with pytest.raises(ValueError, match="spare rows"):
        OffloadedExperts(store, None, 0, "cpu", slots, None, host_fused=CountingKernel())
    with pytest.raises(ValueError, match="without spare rows"):
        _store_without_spare().spare(0)


def _store_without_spare():
    store = ExpertStore()
    store.add_layer(0, *_weights(4, 16, 8, seed=0))
    return store


def test_spare_rows_start_zeroed_and_store_rows_are_the_weights():
    w13, w2 = _weights(4, 16, 8, seed=3)
    store = ExpertStore()
    store.add_layer(0, w13, w2, spare_rows=3)
    assert torch.equal(store.w13(0), w13) and torch.equal(store.w2(0), w2)
    s13, s2 = store.spare(0)
    assert s13.shape == (3, 16, 16) and s2.shape == (3, 16, 8)
    assert not s13.any() and not s2.any()
    assert store.rows(0)[0].shape[0] == 7
    with pytest.raises(ValueError, match="spare_rows"):
        ExpertStore().add_layer(0, w13, w2, spare_rows=-1)


@pytest.mark.parametrize("mode", ["host_fused", "device_kernel"])
def test_full_layer_runs_without_a_plan_and_computes_the_same(mode):
    """With the real engine at cache_ratio 1.0, a layer whose experts are all resident takes the
    plan-free path (no LayerPlan) and its output is still bit-identical to one call over the
    store: host-fused (CPU-only engines) or through a slot-cache kernel (as on a GPU, here the
    reference kernel on CPU slots)."""
    from moespac_vllm.config import MoESpacConfig
    from moespac_vllm.cost_model import ExpertCosts
    from moespac_vllm.engine import ExpertEngine
    from moespac_vllm.mover import SyncMover
    from moespac_vllm.step_context import Phase, StepContext
    from moespac_vllm.trace import ModelDims

    E, H, inter = 8, 32, 16
    store = ExpertStore()
    slots = SlotCache("cpu")
    if mode == "host_fused":
        store.add_layer(0, *_weights(E, H, inter, seed=9, dtype=torch.bfloat16), spare_rows=E)
        slots.attach_layer(0, *store.spare(0))
    else:
        store.add_layer(0, *_weights(E, H, inter, seed=9, dtype=torch.bfloat16))
        slots.add_layer(0, E, store.w13(0), store.w2(0))
    mover = SyncMover(store, slots)
    dims = ModelDims(num_layers=1, num_experts=E, top_k=2, hidden_size=H,
                     intermediate_size=inter, dtype_bytes=2)
    engine = ExpertEngine(MoESpacConfig().replace(cache_ratio=1.0), dims,
                          ExpertCosts(0.01, 0.001, 0.1, 0.01, 0.05), mover, _Clock(), num_slots=E)
    kernel = CountingKernel(host_fused=mode == "host_fused")
    if mode == "host_fused":
        layer = OffloadedExperts(store, engine, 0, "cpu", slots, mover, host_fused=kernel)
    else:
        layer = OffloadedExperts(store, engine, 0, "cpu", slots, mover, device_kernel=kernel)
    planned = 0
    for step in range(8):
        engine.begin_step(StepContext(step, Phase.DECODE if step else Phase.PREFILL, 8, (8,), 0))
        x = torch.randn(8, H, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16)
        ids = torch.arange(16, dtype=torch.int32).reshape(8, 2) % E if step == 0 else \
            _routing(8, E, 2, seed=step)[0]
        w = _routing(8, E, 2, seed=step)[1]
        got = layer(x, ids, w)
        planned += layer.last_plan is not None
        assert torch.equal(got, kernel.ref(x, store.w13(0), store.w2(0), ids, w.float()))
        engine.end_step(0)
    assert engine.resident_slots(0) is not None and planned == 1
    # after the first (planned) forward every call computed from the slot buffers themselves
    assert set(kernel.weights_read[1:]) == {slots.w13(0).data_ptr()}
    assert layer.counters.cpu_pairs == 0 and layer.counters.forwards == 8
    assert engine.stats().hits > 0 and engine.stats().misses == 0
    # routing outside [0, E) is named by the time the step ends (like stock, the kernel trusts
    # the router; the reference kernel itself refuses E)
    ids = torch.zeros(8, 2, dtype=torch.int32)
    ids[3, 1] = -1
    engine.begin_step(StepContext(9, Phase.DECODE, 8, (8,), 0))
    layer(x, ids, w)
    with pytest.raises(ValueError, match="topk_ids: layer 0 routed to ids outside"):
        engine.end_step(0)


class _Clock:
    def now_ms(self) -> float:
        import time

        return time.perf_counter() * 1e3
