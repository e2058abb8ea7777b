"""Slot table: paired verbs, eviction orders, and the invariants under random operation sequences."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moespac_vllm.cache import EvictionOrder, SlotState, SlotTable


def _fill(table: SlotTable, experts: list[int]) -> None:
    for tick, e in enumerate(experts):
        table.admit(e)
        table.mark_ready(e)
        table.touch(e, tick)


def test_admit_uses_free_slots_then_evicts_lru():
    t = SlotTable(2, 8, EvictionOrder.LRU)
    _fill(t, [3, 5])
    t.touch(3, 10)  # 5 is now least recent
    slot, evicted = t.admit(7)
    assert evicted == 5 and t.slot_of(5) == -1 and t.slot_of(7) == slot
    assert t.state(slot) is SlotState.LOADING


def test_lfu_evicts_least_frequent():
    t = SlotTable(2, 8, EvictionOrder.LFU)
    _fill(t, [1, 2])
    t.touch(1, 5)
    t.touch(1, 6)
    t.touch(2, 7)  # 2 is more recent but used less
    assert t.victim() == 2


def test_evicts_lowest_utility_first_ties_lowest_id():
    t = SlotTable(3, 8, EvictionOrder.UTILITY)
    _fill(t, [6, 2, 4])
    scores = np.array([0, 0, 1, 0, 1, 0, 3, 0])
    assert t.victim(scores) == 2  # 2 and 4 tie at 1; lowest id wins


def test_utility_threshold_protects_residents():
    t = SlotTable(2, 8, EvictionOrder.UTILITY)
    _fill(t, [0, 1])
    scores = np.array([2, 1, 0, 0, 0, 0, 0, 0])
    assert t.victim(scores, threshold=1) == -1
    assert not t.can_admit(scores, threshold=1)
    with pytest.raises(ValueError, match="expert"):
        t.admit(5, scores, threshold=1)
    assert t.victim(scores, threshold=2) == 1


def test_belady_evicts_farthest_next_use():
    t = SlotTable(3, 8, EvictionOrder.BELADY)
    _fill(t, [0, 1, 2])
    next_use = np.array([5, 100, 7, 0, 0, 0, 0, 0])
    assert t.victim(next_use=next_use) == 1


def test_pinned_and_loading_are_never_victims():
    t = SlotTable(2, 4, EvictionOrder.LRU)
    t.admit(0)  # loading
    t.admit(1)
    t.mark_ready(1)
    t.pin(1)
    assert t.victim() == -1 and not t.can_admit()
    with pytest.raises(ValueError, match="pinned"):
        t.evict(1)
    t.unpin(1)
    assert t.victim() == 1


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="num_slots"):
        SlotTable(9, 8)
    with pytest.raises(ValueError, match="num_experts"):
        SlotTable(1, 0)
    t = SlotTable(1, 4)
    with pytest.raises(ValueError, match="expert"):
        t.pin(2)
    with pytest.raises(ValueError, match="expert"):
        t.admit(4)


_ops = st.lists(
    st.tuples(st.sampled_from(["admit", "ready", "evict", "pin", "unpin", "touch", "pin_many",
                               "unpin_many"]),
              st.integers(0, 11)),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 12), st.sampled_from(list(EvictionOrder)), _ops,
       st.lists(st.integers(0, 5), min_size=12, max_size=12))
def test_invariants_hold_under_any_operation_sequence(slots, order, ops, raw_scores):
    t = SlotTable(slots, 12, order)
    scores = np.array(raw_scores, dtype=float)
    next_use = scores * 3 + np.arange(12)
    pinned: dict[int, int] = {}
    for tick, (op, e) in enumerate(ops):
        before_pinned = {x for x, n in pinned.items() if n > 0}
        try:
            if op == "admit":
                if t.slot_of(e) < 0:
                    threshold = 2 if order is EvictionOrder.UTILITY else None
                    ok = t.can_admit(scores, threshold, next_use)
                    if ok:
                        _, evicted = t.admit(e, scores, threshold, next_use)
                        assert evicted not in before_pinned
                        if threshold is not None and evicted >= 0:
                            assert scores[evicted] < threshold
                    else:
                        with pytest.raises(ValueError):
                            t.admit(e, scores, threshold, next_use)
            elif op == "ready" and t.slot_of(e) >= 0:
                t.mark_ready(e)
            elif op == "evict" and t.slot_of(e) >= 0 and not t.is_pinned(e):
                t.evict(e)
            elif op == "pin" and t.is_ready(e):
                t.pin(e)
                pinned[e] = pinned.get(e, 0) + 1
            elif op == "unpin" and pinned.get(e, 0) > 0:
                t.unpin(e)
                pinned[e] -= 1
            elif op == "touch":
                t.touch(e, tick)
            elif op == "pin_many":  # the engine's fast path: a layer's routed experts at once
                group = sorted(x for x in {e, (e + 5) % 12} if t.is_ready(x))
                t.pin_many(np.array(group, dtype=np.int64))
                for x in group:
                    pinned[x] = pinned.get(x, 0) + 1
            elif op == "unpin_many":
                group = sorted(x for x in {e, (e + 5) % 12} if pinned.get(x, 0) > 0)
                t.unpin_many(np.array(group, dtype=np.int64))
                for x in group:
                    pinned[x] -= 1
        finally:
            t.check()
        # pinned experts never leave
        for x, n in pinned.items():
            if n > 0:
                assert t.is_pinned(x)
        assert len(t.residents()) <= slots



def test_pin_many_refuses_a_loading_or_absent_expert_and_changes_nothing():
    t = SlotTable(3, 6)
    t.admit(0)
    t.mark_ready(0)
    t.admit(1)  # still LOADING
    with pytest.raises(ValueError, match="expert: 1 is not ready"):
        t.pin_many(np.array([0, 1]))
    with pytest.raises(ValueError, match="expert: 4 is not ready"):
        t.pin_many(np.array([0, 4]))
    assert not t.is_pinned(0)
    with pytest.raises(ValueError, match="pinned"):
        t.unpin_many(np.array([0]))
    t.pin_many(np.array([0]))
    assert t.is_pinned(0) and t.ready_mask().tolist() == [True] + [False] * 5
    assert t.num_loading == 1 and t.slots_of(np.array([0, 1, 2])).tolist()[2] == -1
    t.unpin_many(np.array([0]))
    assert not t.is_pinned(0)
    t.check()
