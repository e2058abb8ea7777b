"""The layer's host <-> device crossings (offload.Staging): on a CPU a logging Staging shows their
ORDER (the ids' readback is waited on before the engine plans, once per planned forward; the
resident path never waits inside a forward and the runtime settles once per step, before the
engine reads its books); on a GPU `torch.cuda.set_sync_debug_mode("error")` proves that the
resident path and the uploads make no synchronizing call (skipped without CUDA)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from moespac_vllm.config import MoESpacConfig
from moespac_vllm.engine import LayerPlan
from moespac_vllm.offload import (ExpertStore, ImmediateEvent, OffloadedExperts, SlotCache,
                                  Staging, StoreCopyMover, experts_reference)
from moespac_vllm.runtime import OffloadRuntime
from moespac_vllm.step_context import Phase, StepContext

E, H, INTER, K = 8, 16, 8, 2


class LogEvent(ImmediateEvent):
    def __init__(self, log: list[str], n: int) -> None:
        self.log, self.n = log, n

    def record(self) -> None:
        self.log.append(f"record {self.n}")

    def synchronize(self) -> None:
        self.log.append(f"sync {self.n}")


class LogStaging(Staging):
    """A CPU Staging whose events and crossings write to a shared log."""

    def __init__(self, log: list[str]) -> None:
        super().__init__("cpu")
        self.log = log
        self.events = 0

    def event(self) -> LogEvent:
        self.events += 1
        return LogEvent(self.log, self.events)

    def to_host(self, *tensors):
        self.log.append(f"to_host x{len(tensors)}")
        return super().to_host(*tensors)

    def to_device(self, host):
        self.log.append("to_device")
        return super().to_device(host)


class LogEngine:
    """LayerEngine: whole-layer (resident) or half-on-device plans, logging what it is asked."""

    def __init__(self, log: list[str], resident: bool, mover) -> None:
        self.log, self.resident, self.mover = log, resident, mover
        self.stash: list = []
        self.table = np.arange(E)[::-1].copy()  # slot E-1-e holds e (fixed, as the engine's)

    def plan_layer(self, layer: int, topk_ids: np.ndarray) -> LayerPlan:
        self.log.append("plan")
        slot_ids = np.where(topk_ids % 2 == 0, topk_ids // 2, -1).astype(np.int32)
        for e in np.unique(topk_ids[topk_ids % 2 == 0]):
            self.mover.load(layer, int(e), int(e) // 2)
        cpu = tuple(int(e) for e in np.unique(topk_ids[topk_ids % 2 == 1]))
        return LayerPlan(layer, slot_ids, slot_ids < 0, (), cpu, ())

    def finish_layer(self, layer: int, topk_ids: np.ndarray) -> None:
        self.log.append("finish")

    def resident_slots(self, layer: int):
        return self.table if self.resident else None

    def note_resident_forward(self, layer: int, topk_ids) -> None:
        self.log.append("note")
        self.stash.append(topk_ids)

    def note_streamed(self, layer: int, experts: int) -> None:
        self.log.append(f"streamed {layer} {experts}")

    def record_timing(self, stall_ms: float = 0.0, cpu_ms: float = 0.0,
                      gpu_ms: float = 0.0) -> None:
        pass


def _weights(seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(E, 2 * INTER, H, generator=g) / H**0.5,
            torch.randn(E, H, INTER, generator=g) / INTER**0.5)


def _layer(resident: bool):
    log: list[str] = []
    store = ExpertStore()
    w13, w2 = _weights(0)
    store.add_layer(0, w13, w2)
    slots = SlotCache("cpu")
    slots.add_layer(0, E, w13, w2)
    mover = StoreCopyMover(store, slots)
    if resident:  # slot E-1-e holds expert e
        for e in range(E):
            mover.load(0, e, E - 1 - e)
    engine = LogEngine(log, resident, mover)
    staging = LogStaging(log)
    mod = OffloadedExperts(store, engine, 0, "cpu", slots, mover, device_kernel=experts_reference,
                           staging=staging)
    return log, store, engine, staging, mod


def _inputs(T: int = 3):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.softmax(torch.randn(T, K, generator=g), -1)
    return x, ids, w


def test_planned_forward_waits_once_for_its_readback_before_the_plan():
    log, store, _, staging, mod = _layer(resident=False)
    x, ids, w = _inputs()
    out = mod(x, ids, w)
    # one readback of ids + hidden + weights, its event waited on, THEN the plan; the uploads
    # (slot ids, then the CPU partial) come after the plan
    assert log[:4] == ["to_host x3", "record 1", "sync 1", "plan"]
    assert log[4:] == ["to_device", "to_device", "finish"]
    assert staging.waits == 1 and mod.counters.planned == 1
    want = experts_reference(x, store.w13(0), store.w2(0), ids, w)
    torch.testing.assert_close(out, want.to(out.dtype), atol=1e-5, rtol=1e-5)
    assert mod.counters.plan_ms >= 0 and mod.counters.readback_ms >= 0


def test_resident_forward_never_waits_and_remaps_on_the_device_side():
    log, store, engine, staging, mod = _layer(resident=True)
    x, ids, w = _inputs()
    for _ in range(3):
        out = mod(x, ids, w)
    # the slot map is uploaded once (the table did not change); per forward only the ids'
    # non-blocking readback for the books, recorded, never waited on inside the forward
    assert log.count("to_device") == 1
    assert log.count("to_host x1") == 3 and not any(e.startswith("sync") for e in log)
    assert staging.waits == 0 and "plan" not in log
    want = experts_reference(x, store.w13(0), store.w2(0), ids, w)
    torch.testing.assert_close(out, want.to(out.dtype), atol=1e-5, rtol=1e-5)
    # the books get the router's ORIGINAL ids, not the slot ids
    assert all(torch.equal(t, ids) for t in engine.stash)
    staging.settle()  # what the runtime does when the step ends: one wait for all of them
    assert log[-1] == f"sync {staging.events}" and staging.settles == 1
    staging.settle()  # nothing pending: no second wait
    assert staging.settles == 1


def test_runtime_settles_once_per_step_before_the_engine_reads_the_books():
    cfg = MoESpacConfig().replace(policy="sd-lru", cache_ratio=1.0)
    rt = OffloadRuntime(cfg, "cpu", device_kernel=experts_reference)
    for i in range(2):
        rt.add_target_layer(f"l{i}", num_experts=E, top_k=K, model_layer=i)
    for i in range(2):
        rt.weights_loaded(i, *_weights(i))
    rt.build()
    log: list[str] = []
    staging = LogStaging(log)
    rt.staging = staging
    for m in rt.experts.values():
        m.staging = staging
    x, ids, w = _inputs(1)
    ends = []
    real_end = rt.engine.end_step
    rt.engine.end_step = lambda n: (ends.append(len(log)), real_end(n))[1]
    for step in range(2):
        rt.begin_step(StepContext(step, Phase.DECODE, 1, (1,), 0), explicit=True)
        for i in range(2):
            rt.forward(i, x, w, ids)
        rt.end_step(0)
    assert staging.waits == 0 and staging.settles == 2  # one per step, none per layer
    for n in ends:  # the settle's wait is the last thing logged before each engine end_step
        assert log[n - 1].startswith("sync")
    assert rt.stats().hit_rate == 1.0
    rt.close()


def test_staging_on_a_cpu_copies_nothing():
    st = Staging("cpu")
    t = torch.arange(6)
    (h,), ev = st.to_host(t)
    st.wait(ev)
    assert h.data_ptr() == t.data_ptr() and st.to_device(t) is t and st.waits == 1


# ---- on a GPU: no synchronizing call where none is claimed -------------------------------------
def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    return torch.device("cuda")


@pytest.mark.gpu
def test_gpu_staging_upload_and_readback_make_no_sync():
    dev = _cuda()
    st = Staging(dev)
    ids = torch.randint(0, E, (4, K), device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        (h,), ev = st.to_host(ids)
        back = st.to_device(torch.arange(8))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    st.wait(ev)
    assert torch.equal(h, ids.cpu()) and torch.equal(back.cpu(), torch.arange(8))


@pytest.mark.gpu
def test_gpu_resident_forward_makes_no_sync():
    dev = _cuda()
    store = ExpertStore(pin_memory=True)
    w13, w2 = _weights(0)
    store.add_layer(0, w13.bfloat16(), w2.bfloat16())
    slots = SlotCache(dev)
    slots.add_layer(0, E, store.w13(0), store.w2(0))
    mover = StoreCopyMover(store, slots)
    for e in range(E):
        mover.load(0, e, E - 1 - e)
    log: list[str] = []
    engine = LogEngine(log, True, mover)
    mod = OffloadedExperts(store, engine, 0, dev, slots, mover, device_kernel=experts_reference)
    x, ids, w = _inputs()
    x, ids, w = x.to(dev, torch.bfloat16), ids.to(dev), w.to(dev)
    mod(x, ids, w)  # first forward uploads the slot map (once per table)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = mod(x, ids, w)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    mod.staging.settle()
    want = experts_reference(x.float(), store.w13(0).float().to(dev), store.w2(0).float().to(dev),
                             ids, w)
    torch.testing.assert_close(out.float(), want, atol=3e-2, rtol=3e-2)
    assert torch.equal(engine.stash[-1], ids.cpu())


def test_draft_signal_is_read_once_per_draft_phase_when_deferred():
    """'per-phase' readback (what a CUDA runtime does): the draft layers' ids stay on the device
    until the step boundary, then one readback and one engine.observe_draft per layer with every
    draft token; 'immediate' (a CPU runtime) observes each call at once. Same engine input."""
    def runtime(mode: str):
        cfg = MoESpacConfig().replace(policy="spac", cache_ratio=0.5)
        rt = OffloadRuntime(cfg, "cpu", device_kernel=experts_reference)
        for i in range(2):
            rt.add_target_layer(f"l{i}", num_experts=E, top_k=K, model_layer=i)
            rt.add_draft_layer(f"d{i}", num_experts=E)
        for i in range(2):
            rt.weights_loaded(i, *_weights(i))
        rt.spec_method = "draft_model"
        rt.build()
        rt.draft_readback = mode
        seen: list[tuple[int, np.ndarray]] = []
        real = rt.engine.observe_draft
        rt.engine.observe_draft = lambda layer, ids: (seen.append((layer, ids.copy())),
                                                      real(layer, ids))[1]
        return rt, seen

    g = torch.Generator().manual_seed(3)
    drafts = [torch.stack([torch.randperm(E, generator=g)[:K]]) for _ in range(3)]
    results = {}
    for mode in ("immediate", "per-phase"):
        rt, seen = runtime(mode)
        assert rt.signal_source == "draft+verify"
        rt.begin_step(StepContext(0, Phase.DECODE, 1, (1,), 0), explicit=True)
        x, ids, w = _inputs(1)
        for i in range(2):
            rt.forward(i, x, w, ids)
        rt.mark_draft_phase()
        for d in drafts:
            for i in range(2):
                rt.observe_draft(i, d)
        if mode == "per-phase":
            assert seen == [] and rt.draft_reads == 0  # nothing read back inside the phase
        rt.end_step(0)
        results[mode] = (seen, rt.draft_reads)
        rt.close()
    seen_now, reads_now = results["immediate"]
    seen_late, reads_late = results["per-phase"]
    assert reads_now == 0 and reads_late == 1
    assert len(seen_now) == 6 and [layer for layer, _ in seen_late] == [0, 1]
    for layer, ids in seen_late:  # all three draft tokens, in order, in one [3, K] call
        want = np.concatenate([i for lay, i in seen_now if lay == layer])
        np.testing.assert_array_equal(ids, want)
