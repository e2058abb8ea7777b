"""Fault injection through our own protocols (issue 14): a copy engine (`mover.Mover`) whose loads
fail, are lost in flight, are cancelled (a slot evicted while loading) or land late; a CPU expert
pool (`offload.CpuExperts`) whose worker raises; a stats file or trace whose disk fills up or
whose directory goes away. The runtime (moespac_vllm/runtime.py) is driven as the vLLM glue drives
it, on CPU tensors."""
from __future__ import annotations

import errno
import json
import logging
import shutil
from concurrent.futures import Future

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moespac_vllm.config import MoESpacConfig
from moespac_vllm.cost_model import ExpertCosts
from moespac_vllm.mover import FaultTolerantMover, MoverFault, SyncMover
from moespac_vllm.offload import experts_reference, pair_outputs
from moespac_vllm.runtime import OffloadRuntime
from moespac_vllm.stats import EngineStats, StatsWriter
from moespac_vllm.step_context import Phase, StepContext
from moespac_vllm.trace import load_trace

L, E, K, H, INTER = 3, 8, 2, 32, 16
# cheap copies, dear CPU experts: the balancer fetches and the engine prefetches
COSTS = ExpertCosts(gpu_fixed_ms=0.01, gpu_per_token_ms=0.001, cpu_fixed_ms=1.0,
                    cpu_per_token_ms=0.1, fetch_ms=0.05)

OK, FAIL, LOST, CANCEL, LATE = range(5)
FAULT_NAMES = ("ok", "fail", "lost", "cancel", "late")


class FaultyMover:
    """A `Mover` over a deferred `SyncMover` (copies land at `flush`, the step boundary, or at
    `wait`) that injects, per `load` in issue order, the fault `schedule[n % len]`: FAIL the load
    raises; LOST the copy fails in flight (`is_ready` and `wait` raise); CANCEL the copy is
    abandoned as when its slot is evicted while loading (`wait` refuses); LATE the copy misses
    the step boundary and lands only when waited for."""

    def __init__(self, inner: SyncMover, schedule: list[int]) -> None:
        self.inner = inner
        self.schedule = schedule or [OK]
        self.loads = 0
        self.injected = [0] * 5
        self._mode: dict[tuple[int, int], int] = {}

    def load(self, layer: int, expert: int, slot: int) -> None:
        mode = self.schedule[self.loads % len(self.schedule)]
        self.loads += 1
        self.injected[mode] += 1
        if mode == FAIL:
            raise OSError(errno.EIO, f"injected: copy of expert {expert} failed")
        self.inner.load(layer, expert, slot)
        if mode == CANCEL:
            self.inner.cancel(layer, slot)
        self._mode[(layer, slot)] = mode

    def is_ready(self, layer: int, slot: int) -> bool:
        if self._mode.get((layer, slot)) == LOST:
            raise OSError(errno.EIO, "injected: DMA error")
        return self.inner.is_ready(layer, slot)

    def ready_mask(self, layer: int, slots) -> list[bool]:
        return [self.is_ready(layer, s) for s in slots]  # a LOST slot raises, as is_ready does

    def wait(self, layer: int, slot: int) -> None:
        if self._mode.get((layer, slot)) == LOST:
            self.inner.cancel(layer, slot)
            raise OSError(errno.EIO, "injected: DMA error")
        self.inner.wait(layer, slot)

    def cancel(self, layer: int, slot: int) -> bool:
        return self.inner.cancel(layer, slot)

    def flush(self) -> None:
        """The step boundary: every pending copy lands except the LATE and LOST ones."""
        for (layer, slot), mode in list(self._mode.items()):
            if mode == OK:
                self.inner.wait(layer, slot)

    @property
    def bytes_moved(self) -> int:
        return self.inner.bytes_moved


class FailingCpuExperts:
    """A `CpuExperts` pool whose worker raises on call number `fail_at` (0-based); the others
    compute the reference pairs."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at = fail_at
        self.calls = 0

    def submit(self, hidden, w13, w2, ids, weights) -> Future:
        fut: Future = Future()
        n, self.calls = self.calls, self.calls + 1
        if n == self.fail_at:
            fut.set_exception(MemoryError("injected: worker out of memory"))
        else:
            fut.set_result(pair_outputs(hidden, w13, w2, ids, weights))
        return fut


def _weights(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(E, 2 * INTER, H, generator=g) / H**0.5,
            torch.randn(E, H, INTER, generator=g) / INTER**0.5)


BANKS = [_weights(layer) for layer in range(L)]


def _runtime(cfg: MoESpacConfig, draft: bool = False, **kw) -> OffloadRuntime:
    """With `draft`, a draft model with as many MoE layers (the draft+verify signal: spac
    prefetches from the draft's routing)."""
    rt = OffloadRuntime(cfg, "cpu", costs=COSTS, model_name="faults", **kw)
    for layer in range(L):
        rt.add_target_layer(f"model.layers.{layer}.mlp.experts", num_experts=E, top_k=K,
                            model_layer=layer)
    if draft:
        rt.spec_method, rt.num_spec_tokens = "draft_model", 3
        for layer in range(L):
            rt.add_draft_layer(f"draft.layers.{layer}.mlp.experts", num_experts=E)
    for layer in range(L):
        rt.weights_loaded(layer, *BANKS[layer])
    return rt


def _workload(seed: int, steps: int) -> list[tuple[torch.Tensor, list]]:
    """Per step: x [T,H] and per layer (ids, weights) from a skewed router (a few hot experts, so
    the engine's predictions and prefetches have something to go on)."""
    g = torch.Generator().manual_seed(seed)
    bias = torch.linspace(2.0, -2.0, E)
    out = []
    for step in range(steps):
        T = 6 if step == 0 else 1 + step % 3
        x = torch.randn(T, H, generator=g)
        layers = []
        for _ in range(L):
            w, ids = torch.topk(torch.softmax(torch.randn(T, E, generator=g) + bias, -1), K, -1)
            layers.append((ids, w / w.sum(-1, keepdim=True)))
        out.append((x, layers))
    return out


def _run(rt: OffloadRuntime, work, between=None) -> list[torch.Tensor]:
    """Every step of `work`; with a draft model (rt.spec_method), a draft phase before each step
    after the first whose routing is that step's (a draft that guesses right)."""
    outs = []
    for step, (x, layers) in enumerate(work):
        if step and rt.spec_method is not None:
            rt.mark_draft_phase()
            for layer, (ids, _) in enumerate(layers):
                rt.observe_draft(layer, ids)
        if between is not None and rt.mover is not None:
            between()
        T = x.shape[0]
        phase = Phase.PREFILL if step == 0 else (
            Phase.VERIFY if rt.spec_method is not None else Phase.DECODE)
        rt.begin_step(StepContext(rt.next_step_index(), phase, T, (T,), 0), explicit=True)
        for layer, (ids, w) in enumerate(layers):
            outs.append(rt.forward(layer, x, w, ids))
        rt.end_step(0)
    return outs


TOTALS = {"schedules": 0, "loads": 0, "faults": 0, "prefetches": 0, **{n: 0 for n in FAULT_NAMES}}


def _faulty_runtime(cfg: MoESpacConfig, schedule: list[int], draft: bool = False
                    ) -> tuple[OffloadRuntime, list]:
    made: list[FaultyMover] = []

    def factory(store, slots):
        made.append(FaultyMover(SyncMover(store, slots, deferred=True), schedule))
        return made[-1]

    return _runtime(cfg, draft=draft, mover=factory), made


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=st.lists(st.sampled_from(range(5)), min_size=1, max_size=48),
       seed=st.integers(0, 2**16), policy=st.sampled_from(["spac", "lru", "hybrimoe"]),
       draft=st.booleans())
def test_failed_late_or_cancelled_copies_never_change_a_layer_output(schedule, seed, policy,
                                                                      draft):
    """Every layer output of every step under a random fault schedule equals the fault-free
    run's bit for bit (the pairs of a failed copy are fetched again or run on the CPU, with the
    same per-pair arithmetic), and the runtime never raises."""
    cfg = MoESpacConfig().replace(cache_ratio=0.25, policy=policy)
    work = _workload(seed, steps=10)
    clean, clean_mover = _faulty_runtime(cfg, [OK], draft)
    want = _run(clean, work, between=lambda: clean_mover[0].flush())
    rt, faulty = _faulty_runtime(cfg, schedule, draft)
    got = _run(rt, work, between=lambda: faulty[0].flush())
    assert len(got) == len(want) == 10 * L
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"step {i // L} layer {i % L} differs under faults {schedule}"
    # and both equal the all-on-CPU reference
    for i, (x, layers) in enumerate(work):
        for layer, (ids, w) in enumerate(layers):
            torch.testing.assert_close(got[i * L + layer],
                                       experts_reference(x, *BANKS[layer], ids, w),
                                       atol=1e-5, rtol=1e-5)
    m = faulty[0]
    assert isinstance(rt.mover, FaultTolerantMover) and rt.mover.inner is m
    s = rt.summary()
    assert s["cpu_pairs"] + s["device_pairs"] == sum(x.shape[0] for x, _ in work) * L * K
    TOTALS["schedules"] += 1
    TOTALS["loads"] += m.loads
    TOTALS["faults"] += m.loads - m.injected[OK]
    TOTALS["prefetches"] += s["prefetch_issued"]
    for n, c in zip(FAULT_NAMES, m.injected):
        TOTALS[n] += c
    rt.close()
    clean.close()


def test_the_property_run_injected_every_kind_of_fault():
    """Runs after the property test (file order): the schedules really injected faults of every
    kind, and copies were issued ahead of need (prefetches) as well as on demand."""
    if TOTALS["schedules"] == 0:
        pytest.skip("run with the property test")
    print(f"\nfault schedules: {TOTALS}")
    assert TOTALS["schedules"] >= 20
    for n in FAULT_NAMES[1:]:
        assert TOTALS[n] > 0, n
    assert TOTALS["prefetches"] > 0
    cfg = MoESpacConfig().replace(cache_ratio=0.25, policy="spac")
    rt, made = _faulty_runtime(cfg, [OK], draft=True)
    _run(rt, _workload(1, steps=10), between=lambda: made[0].flush())
    assert rt.signal_source == "draft+verify"
    assert rt.stats().prefetch_issued > 0 and rt.stats().fetched_experts > 0
    rt.close()


def test_a_mover_that_always_fails_leaves_every_pair_on_the_cpu_with_the_same_output(caplog):
    cfg = MoESpacConfig().replace(cache_ratio=0.25, policy="lru")
    work = _workload(7, steps=6)
    clean, cm = _faulty_runtime(cfg, [OK])
    want = _run(clean, work, between=lambda: cm[0].flush())
    with caplog.at_level(logging.WARNING, logger="moespac_vllm.offload"):
        rt, m = _faulty_runtime(cfg, [FAIL])
        got = _run(rt, work, between=lambda: m[0].flush())
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    s = rt.summary()
    assert s["device_pairs"] == 0 and s["cpu_pairs"] > 0
    assert rt.mover.faults > 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "its pairs run on the CPU" in warnings[0].getMessage()


def test_fault_tolerant_mover_keeps_a_failed_slot_unready_until_a_good_copy():
    store_w13 = torch.randn(4, 2 * INTER, H)
    store_w2 = torch.randn(4, H, INTER)
    from moespac_vllm.mover import ExpertWeights

    host = ExpertWeights([store_w13], [store_w2])
    slots = ExpertWeights.allocate(1, 2, H, INTER, torch.float32, "cpu")
    inner = FaultyMover(SyncMover(host, slots), [FAIL, OK])
    m = FaultTolerantMover(inner)
    m.load(0, 3, 1)  # raises inside: remembered, not propagated
    assert not m.is_ready(0, 1) and m.faults == 1
    with pytest.raises(MoverFault, match="layer 0 slot 1"):
        m.wait(0, 1)
    m.load(0, 3, 1)
    assert m.is_ready(0, 1)
    m.wait(0, 1)
    assert torch.equal(slots.w13[0][1], store_w13[3])


def test_fault_tolerant_ready_mask_puts_a_lost_copy_on_its_own_slot_as_is_ready_does():
    """One slot's copy lost in flight makes the inner mover's batched answer raise; the wrapper
    still answers every slot, records the fault on that slot only, and agrees with is_ready."""
    from moespac_vllm.mover import ExpertWeights

    host = ExpertWeights([torch.randn(4, 2 * INTER, H)], [torch.randn(4, H, INTER)])
    answers = []
    for batched in (True, False):
        slots = ExpertWeights.allocate(1, 3, H, INTER, torch.float32, "cpu")
        m = FaultTolerantMover(FaultyMover(SyncMover(host, slots, deferred=True),
                                           [OK, LOST, OK]))
        for s in range(3):
            m.load(0, s, s)
        m.inner.inner.wait(0, 0)  # copy 0 landed; 1 is lost; 2 is still in flight
        answers.append((m.ready_mask(0, [0, 1, 2]) if batched
                        else [m.is_ready(0, s) for s in (0, 1, 2)], m.faults))
        assert m.ready_mask(0, [1, 0]) == [False, True] and m.faults == 1  # remembered
    assert answers[0] == answers[1] == ([True, False, False], 1)


def test_a_cpu_worker_error_fails_that_step_naming_layer_and_experts_and_the_next_step_runs():
    cfg = MoESpacConfig().replace(cache_ratio=0.25, policy="lru")
    pool = FailingCpuExperts(fail_at=4)
    rt = _runtime(cfg, cpu_experts=pool)
    work = _workload(3, steps=8)
    failed_step = None
    outs: dict[tuple[int, int], torch.Tensor] = {}
    for step, (x, layers) in enumerate(work):
        T = x.shape[0]
        rt.begin_step(StepContext(rt.next_step_index(), Phase.PREFILL if step == 0
                                  else Phase.DECODE, T, (T,), 0), explicit=True)
        try:
            for layer, (ids, w) in enumerate(layers):
                outs[(step, layer)] = rt.forward(layer, x, w, ids)
        except RuntimeError as e:
            assert failed_step is None, "only one call fails"
            failed_step = step
            msg = str(e)
            assert "MoE layer" in msg and "experts [" in msg and "MemoryError" in msg
            assert "worker out of memory" in msg
            assert isinstance(e.__cause__, MemoryError)
        rt.end_step(0)
    assert failed_step is not None and pool.calls > 4
    # every step after the failed one ran all its layers, each equal to the reference
    for step in range(failed_step + 1, len(work)):
        x, layers = work[step]
        for layer, (ids, w) in enumerate(layers):
            torch.testing.assert_close(outs[(step, layer)],
                                       experts_reference(x, *BANKS[layer], ids, w),
                                       atol=1e-5, rtol=1e-5)
    rt.close()


# ---- stats file and trace: full disk, removed directory ------------------------------------------
class FillingStream:
    """A text stream that takes `room` characters, then fails like a full disk (after writing
    what fits of the call that overflowed)."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.text = ""

    def write(self, s: str) -> int:
        if len(self.text) + len(s) > self.room:
            self.text += s[: self.room - len(self.text)]
            raise OSError(errno.ENOSPC, "No space left on device")
        self.text += s
        return len(s)

    def flush(self) -> None:
        return None


def test_stats_writer_on_a_full_disk_warns_once_and_keeps_the_lines_before(caplog):
    stream = FillingStream(room=1500)
    w = StatsWriter(stream)
    with caplog.at_level(logging.WARNING, logger="moespac_vllm.stats"):
        for i in range(20):
            w.write(EngineStats(steps=i, hits=i), signal="verify")
    assert w.failed and w.dropped > 0
    assert len([r for r in caplog.records if "write failed" in r.getMessage()]) == 1
    lines = stream.text.split("\n")
    whole = [json.loads(line) for line in lines[:-1]]
    assert len(whole) >= 3 and [r["steps"] for r in whole] == list(range(len(whole)))
    with pytest.raises(json.JSONDecodeError):  # the one cut short, at the end
        json.loads(lines[-1])


def test_runtime_with_stats_file_on_a_full_device_serves_on_with_one_warning(caplog):
    cfg = MoESpacConfig().replace(cache_ratio=0.25, policy="lru", stats_file="/dev/full",
                                  stats_interval_steps=1)
    rt = _runtime(cfg)
    work = _workload(5, steps=6)
    with caplog.at_level(logging.WARNING, logger="moespac_vllm"):
        outs = _run(rt, work)
        rt.close()
    assert len(outs) == 6 * L
    assert len([r for r in caplog.records if "stats_file" in r.getMessage()]) == 1


def test_trace_save_on_a_full_disk_keeps_the_last_complete_trace(tmp_path, caplog, monkeypatch):
    path = tmp_path / "run" / "trace.npz"
    path.parent.mkdir()
    cfg = MoESpacConfig().replace(cache_ratio=0.25, policy="lru", record_trace=str(path))
    rt = _runtime(cfg)
    work = _workload(9, steps=8)
    _run(rt, work[:3])
    assert rt.save_trace() == str(path)  # a checkpoint: 3 steps on disk
    assert load_trace(path).num_steps == 3

    real = np.savez_compressed

    def full_disk(file, **arrays):  # writes part of the file, then the disk is full
        with open(file, "wb") as f:
            f.write(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", full_disk)
    with caplog.at_level(logging.WARNING, logger="moespac_vllm"):
        _run(rt, work[3:6])
        assert rt.save_trace() is None
        assert rt.save_trace() is None
    assert len([r for r in caplog.records if "record_trace" in r.getMessage()]) == 1
    assert load_trace(path).num_steps == 3  # the last complete save, whole
    assert [p.name for p in path.parent.iterdir()] == ["trace.npz"]  # no partial left behind
    monkeypatch.setattr(np, "savez_compressed", real)
    _run(rt, work[6:])
    rt.close()  # the disk has room again: the final save has every step
    assert load_trace(path).num_steps == 8


def test_trace_directory_removed_while_serving_warns_once_and_close_returns(tmp_path, caplog):
    path = tmp_path / "gone" / "trace.npz"
    path.parent.mkdir()
    cfg = MoESpacConfig().replace(cache_ratio=0.25, policy="lru", record_trace=str(path),
                                  stats_file=str(tmp_path / "gone" / "stats.jsonl"),
                                  stats_interval_steps=1)
    rt = _runtime(cfg)
    work = _workload(11, steps=6)
    _run(rt, work[:3])
    shutil.rmtree(path.parent)
    with caplog.at_level(logging.WARNING, logger="moespac_vllm"):
        _run(rt, work[3:])
        rt.close()
    assert len([r for r in caplog.records if "record_trace" in r.getMessage()]) == 1
    assert not path.exists()
