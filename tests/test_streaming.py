"""Prefill streaming (moespac_vllm/streaming.py): when a layer's tokens make streaming cheaper than
CPU compute, its CPU-planned experts run on the device from two buffers refilled in turn; the
output is the same sum, the CPU path is never called, and a buffer is refilled only after the
compute that read it. Ordering shown on a CPU with a logging CopyStreams."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_async_path import E, H, K, LogEngine, _weights

from moespac_vllm.cost_model import ExpertCosts
from moespac_vllm.offload import (ExpertStore, OffloadedExperts, SlotCache, StoreCopyMover,
                                  experts_reference)
from moespac_vllm.staging import ImmediateEvent
from moespac_vllm.stats import format_log_line
from moespac_vllm.streaming import CopyStreams, PrefillStreamer

CPU_SLOW = ExpertCosts(gpu_fixed_ms=0.01, gpu_per_token_ms=0.001, cpu_fixed_ms=0.3,
                       cpu_per_token_ms=0.05, fetch_ms=0.2)


class Tagged(ImmediateEvent):
    def __init__(self, tag: str) -> None:
        self.tag = tag


class LogStreams(CopyStreams):
    def __init__(self, log: list[str]) -> None:
        super().__init__(torch.device("cpu"))
        self.log, self.n = log, 0

    def copy(self, dst, src, after):
        self.n += 1
        self.log.append(f"copy {self.n} after {after.tag if after is not None else '-'}")
        super().copy(dst, src, None)
        return Tagged(f"copy{self.n}")

    def compute_waits(self, ev):
        self.log.append(f"compute waits {ev.tag}")

    def compute_event(self):
        self.n += 1
        self.log.append(f"compute done c{self.n}")
        return Tagged(f"c{self.n}")


class NoCpu:
    def submit(self, *args):
        raise AssertionError("a streamed layer must not call the CPU path")


def test_should_stream_follows_the_cost_model_and_the_token_floor():
    s = PrefillStreamer("cpu", CPU_SLOW, min_tokens=64)
    counts = np.full(50, 20)
    assert s.should_stream(2048, counts)
    assert not s.should_stream(63, counts)  # decode / verify windows: the plan stands
    cheap_cpu = ExpertCosts(0.01, 0.001, 0.01, 0.0001, fetch_ms=5.0)
    assert not PrefillStreamer("cpu", cheap_cpu).should_stream(2048, counts)
    with pytest.raises(ValueError, match="min_tokens"):
        PrefillStreamer("cpu", CPU_SLOW, min_tokens=0)


def test_streamed_layer_matches_the_reference_and_orders_its_buffers():
    log: list[str] = []
    store = ExpertStore()
    w13, w2 = _weights(0)
    store.add_layer(0, w13, w2)
    slots = SlotCache("cpu")
    slots.add_layer(0, E // 2, w13, w2)
    mover = StoreCopyMover(store, slots)
    engine = LogEngine([], False, mover)  # even experts on the device, odd ones on the CPU
    streamer = PrefillStreamer("cpu", CPU_SLOW, min_tokens=16, streams=LogStreams(log))
    mod = OffloadedExperts(store, engine, 0, "cpu", slots, mover, cpu_experts=NoCpu(),
                           device_kernel=experts_reference, streamer=streamer)
    g = torch.Generator().manual_seed(9)
    T = 40
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.softmax(torch.randn(T, K, generator=g), -1)
    out = mod(x, ids, w)
    want = experts_reference(x, w13, w2, ids, w)
    torch.testing.assert_close(out, want.to(out.dtype), atol=1e-5, rtol=1e-5)
    odd = int((ids % 2 == 1).sum())
    assert mod.counters.streamed_pairs == odd and mod.counters.cpu_pairs == 0
    assert streamer.counters.experts == E // 2 and streamer.counters.pairs == odd
    # the engine's books hear that the CPU-planned experts ran streamed (not on the CPU)
    assert [line for line in engine.log if line.startswith("streamed")] == [
        f"streamed 0 {E // 2}"]
    # each expert: two copies (w13, w2); expert i+2 reuses expert i's buffer only after expert i's
    # compute; the compute of expert i waits for its own copy
    fills = [line for line in log if line.startswith("copy")]
    assert len(fills) == 2 * (E // 2)
    computes = [line.split()[-1] for line in log if line.startswith("compute done")]
    w13_fills = fills[0::2]
    assert w13_fills[0].endswith("after -") and w13_fills[1].endswith("after -")
    for i in range(2, E // 2):
        assert w13_fills[i].endswith(f"after {computes[i - 2]}")
    waits = [line for line in log if line.startswith("compute waits")]
    assert len(waits) == E // 2
    for i, line in enumerate(waits):  # waits on the w2 copy (the later one) of its expert
        assert log.index(line) > log.index(fills[2 * i + 1])


def test_a_short_forward_keeps_the_plan():
    store = ExpertStore()
    w13, w2 = _weights(0)
    store.add_layer(0, w13, w2)
    slots = SlotCache("cpu")
    slots.add_layer(0, E // 2, w13, w2)
    mover = StoreCopyMover(store, slots)
    engine = LogEngine([], False, mover)
    streamer = PrefillStreamer("cpu", CPU_SLOW, min_tokens=16)
    mod = OffloadedExperts(store, engine, 0, "cpu", slots, mover,
                           device_kernel=experts_reference, streamer=streamer)
    x = torch.randn(3, H)
    ids = torch.tensor([[1, 2], [3, 4], [5, 0]])
    mod(x, ids, torch.full((3, K), 0.5))
    assert streamer.counters.layers == 0 and mod.counters.cpu_pairs == 3


def test_streamed_experts_leave_the_engines_cpu_count():
    from moespac_vllm.config import MoESpacConfig
    from moespac_vllm.engine import ExpertEngine
    from moespac_vllm.simulate import SimClock, SimMover
    from moespac_vllm.step_context import Phase, StepContext
    from moespac_vllm.trace import ModelDims

    dims = ModelDims(num_layers=1, num_experts=8, top_k=2, hidden_size=16, intermediate_size=8)
    costs = ExpertCosts(gpu_fixed_ms=0.1, gpu_per_token_ms=0.0, cpu_fixed_ms=0.1,
                        cpu_per_token_ms=0.0, fetch_ms=100.0)  # copies too dear: CPU experts
    clock = SimClock()
    engine = ExpertEngine(MoESpacConfig().replace(policy="lru", cache_ratio=0.25), dims, costs,
                          SimMover(clock, costs.fetch_ms, 1), clock)
    ids = np.array([[0, 1], [2, 3], [4, 5], [6, 7]])
    # a wide verify step (the books count decode/verify steps; prefill is not in them)
    engine.begin_step(StepContext(step=0, phase=Phase.VERIFY, num_tokens=4, num_draft_tokens=3))
    plan = engine.plan_layer(0, ids)
    engine.finish_layer(0, ids)
    engine.end_step(0)
    before = engine.stats()
    assert before.cpu_experts == len(plan.cpu_experts) > 0 and before.streamed_experts == 0
    engine.note_streamed(0, len(plan.cpu_experts))
    after = engine.stats()
    assert after.cpu_experts == 0 and after.streamed_experts == len(plan.cpu_experts)
    assert "streamed: " in format_log_line(after) and "streamed" not in format_log_line(before)
