"""Expert slot table: which expert of one MoE layer sits in which device slot, and who is evicted.

One `SlotTable` per MoE layer (the engine keeps a list). S slots hold at most S of the layer's E
experts. Every slot is in one of four states:

    FREE ──admit──▶ LOADING ──mark_ready──▶ READY ──pin──▶ IN_USE ──unpin──▶ READY
      ▲                │                      │
      └────evict───────┴──────────evict───────┘        (an IN_USE slot is never evicted)

Paired verbs, after nano-vllm's block manager: `can_admit` / `admit`, `evict`, `pin` / `unpin`,
`slot_of`. `admit` picks a free slot or, when none is left, the victim chosen by the table's
`EvictionOrder`:

- `LRU`: least recently `touch`ed first (ties: lowest expert id).
- `LFU`: fewest `touch`es first (counted over the whole run, surviving eviction; ties: least
  recent, then lowest id).
- `UTILITY`: lowest utility score first, ties lowest id (the reference code's ordered set of
  (score, eid)); with a `threshold`, a resident whose score is >= threshold is protected, so a
  newcomer replaces the lowest-score resident only if that resident is below the threshold.
- `BELADY`: the resident whose next use is farthest in the future (needs `next_use`; the oracle).

Invariants (property-tested in tests/test_cache.py): at most S residents; slot<->expert is a
bijection over occupied slots; an IN_USE (pinned) or LOADING slot is never chosen as a victim.
Pure: numpy only.

Storage: every field is a numpy array the table owns (slot states as int8 codes `STATE_CODES`,
the LOADING count in a one-element array), never reassigned after construction, so the native
planner (`plan_native.py`, `csrc/plan.cpp`) can work on the very same memory: a table is the same
object whichever path planned the last forward.
"""
from __future__ import annotations

from enum import Enum

import numpy as np


class SlotState(str, Enum):
    FREE = "free"
    LOADING = "loading"  # a copy into the slot is in flight; its data is not yet valid
    READY = "ready"  # holds a valid copy of its expert
    IN_USE = "in-use"  # READY and pinned by a layer plan in flight


# int8 code of each state in `SlotTable._state` (shared with csrc/plan.cpp)
FREE, LOADING, READY, IN_USE = 0, 1, 2, 3
_STATES = (SlotState.FREE, SlotState.LOADING, SlotState.READY, SlotState.IN_USE)
STATE_CODES = {st: i for i, st in enumerate(_STATES)}


class EvictionOrder(str, Enum):
    LRU = "lru"
    LFU = "lfu"
    UTILITY = "utility"
    BELADY = "belady"


class SlotTable:
    """The slots of one MoE layer. Experts are 0..num_experts-1, slots 0..num_slots-1."""

    __slots__ = ("num_slots", "num_experts", "order", "_slot_of", "_expert_in", "_state",
                 "_pins", "_last_use", "_uses", "_ready", "_ready_view", "_meta")

    def __init__(self, num_slots: int, num_experts: int,
                 order: EvictionOrder = EvictionOrder.LRU) -> None:
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts: must be a positive integer, got {num_experts!r}")
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"num_slots: must be a positive integer, got {num_slots!r}")
        if num_slots > num_experts:
            raise ValueError(f"num_slots: {num_slots} exceeds num_experts {num_experts}")
        if not isinstance(order, EvictionOrder):
            raise ValueError(f"order: expected EvictionOrder, got {order!r}")
        self.num_slots = num_slots
        self.num_experts = num_experts
        self.order = order
        self._slot_of = np.full(num_experts, -1, dtype=np.int64)
        self._expert_in = np.full(num_slots, -1, dtype=np.int64)
        self._state = np.zeros(num_slots, dtype=np.int8)  # FREE / LOADING / READY / IN_USE
        self._pins = np.zeros(num_slots, dtype=np.int64)
        self._last_use = np.full(num_experts, -1, dtype=np.int64)
        self._uses = np.zeros(num_experts, dtype=np.int64)
        # Kept alongside the per-slot states for the engine's per-forward fast path (numpy masks
        # instead of one Python call per routed expert: ~170 -> ~40 us per layer, measured in
        # benchmarks/README.md): experts holding valid data (READY or IN_USE), LOADING count.
        self._ready = np.zeros(num_experts, dtype=bool)
        self._ready_view = self._ready.view()
        self._ready_view.flags.writeable = False
        self._meta = np.zeros(1, dtype=np.int64)  # [number of LOADING slots]

    # ---- queries ---------------------------------------------------------------------------
    def slot_of(self, expert: int) -> int:
        """The expert's slot (LOADING, READY or IN_USE), or -1 when it is not resident."""
        return int(self._slot_of[expert])

    def expert_in(self, slot: int) -> int:
        return int(self._expert_in[slot])

    def state(self, slot: int) -> SlotState:
        return _STATES[self._state[slot]]

    def is_ready(self, expert: int) -> bool:
        """Resident with valid data (READY or IN_USE)."""
        s = self._slot_of[expert]
        return bool(s >= 0 and self._state[s] >= READY)

    def is_loading(self, expert: int) -> bool:
        s = self._slot_of[expert]
        return bool(s >= 0 and self._state[s] == LOADING)

    def is_pinned(self, expert: int) -> bool:
        s = self._slot_of[expert]
        return bool(s >= 0 and self._state[s] == IN_USE)

    def ready_mask(self) -> np.ndarray:
        """[E] bool, read-only: experts that are READY or IN_USE (`is_ready` for all at once)."""
        return self._ready_view

    @property
    def num_loading(self) -> int:
        return int(self._meta[0])

    def slots_of(self, experts: np.ndarray) -> np.ndarray:
        """`slot_of` for an array of experts (-1 where not resident)."""
        return self._slot_of[experts]

    def residents(self) -> list[int]:
        """Experts holding a slot (any non-free state), by slot."""
        return [int(e) for e in self._expert_in if e >= 0]

    @property
    def num_free(self) -> int:
        return int(np.count_nonzero(self._state == FREE))

    def num_evictable(self, scores: np.ndarray | None = None,
                      threshold: float | None = None) -> int:
        """Slots a newcomer could take now: free ones plus READY residents the order may evict."""
        n = self.num_free
        for slot, st in enumerate(self._state.tolist()):
            if st == READY and self._may_evict(int(self._expert_in[slot]), scores, threshold):
                n += 1
        return n

    # ---- bookkeeping for LRU / LFU ---------------------------------------------------------
    def touch(self, expert: int, tick: int) -> None:
        """Record a use of `expert` at time `tick` (any monotone counter)."""
        self._last_use[expert] = tick
        self._uses[expert] += 1

    def touch_many(self, experts: np.ndarray, tick: int) -> None:
        """`touch` each of `experts` (distinct ids) at `tick`."""
        self._last_use[experts] = tick
        self._uses[experts] += 1

    # ---- victim selection ------------------------------------------------------------------
    def _may_evict(self, expert: int, scores: np.ndarray | None,
                   threshold: float | None) -> bool:
        if threshold is None or self.order is not EvictionOrder.UTILITY:
            return True
        if scores is None:
            raise ValueError("scores: the utility order needs per-expert scores")
        return bool(scores[expert] < threshold)

    def victim(self, scores: np.ndarray | None = None, threshold: float | None = None,
               next_use: np.ndarray | None = None) -> int:
        """The expert `admit` would evict now, or -1 when no READY resident may be evicted.

        scores:   [E] utility (UTILITY order); threshold: protect residents scoring >= it.
        next_use: [E] time of each expert's next use, larger = later (BELADY order)."""
        best_key: tuple | None = None
        best = -1
        for slot, st in enumerate(self._state.tolist()):
            if st != READY:
                continue
            e = int(self._expert_in[slot])
            if not self._may_evict(e, scores, threshold):
                continue
            key = self._key(e, scores, next_use)
            if best_key is None or key < best_key:
                best_key, best = key, e
        return best

    def _key(self, e: int, scores: np.ndarray | None, next_use: np.ndarray | None) -> tuple:
        if self.order is EvictionOrder.LRU:
            return (int(self._last_use[e]), e)
        if self.order is EvictionOrder.LFU:
            return (int(self._uses[e]), int(self._last_use[e]), e)
        if self.order is EvictionOrder.UTILITY:
            if scores is None:
                raise ValueError("scores: the utility order needs per-expert scores")
            return (float(scores[e]), e)
        if next_use is None:
            raise ValueError("next_use: the belady order needs each expert's next use")
        return (-float(next_use[e]), e)

    # ---- verbs -----------------------------------------------------------------------------
    def can_admit(self, scores: np.ndarray | None = None, threshold: float | None = None,
                  next_use: np.ndarray | None = None) -> bool:
        return self.num_free > 0 or self.victim(scores, threshold, next_use) >= 0

    def admit(self, expert: int, scores: np.ndarray | None = None,
              threshold: float | None = None, next_use: np.ndarray | None = None,
              ) -> tuple[int, int]:
        """Give `expert` a slot in state LOADING. Returns (slot, evicted expert or -1).

        Raises ValueError if the expert already holds a slot or no slot can be freed."""
        self._check_expert(expert)
        if self._slot_of[expert] >= 0:
            raise ValueError(f"expert: {expert} is already resident in slot "
                             f"{int(self._slot_of[expert])}")
        evicted = -1
        free = np.flatnonzero(self._state == FREE)
        slot = int(free[0]) if free.size else -1
        if slot < 0:
            evicted = self.victim(scores, threshold, next_use)
            if evicted < 0:
                raise ValueError("expert: no slot can be freed (all pinned, loading or protected)")
            slot = self.evict(evicted)
        self._slot_of[expert] = slot
        self._expert_in[slot] = expert
        self._state[slot] = LOADING
        self._meta[0] += 1
        return slot, evicted

    def mark_ready(self, expert: int) -> None:
        """The copy into the expert's slot completed."""
        s = self._resident_slot(expert)
        if self._state[s] == LOADING:
            self._state[s] = READY
            self._ready[expert] = True
            self._meta[0] -= 1

    def evict(self, expert: int) -> int:
        """Free the expert's slot (READY or LOADING: the caller cancels the copy). Returns it."""
        s = self._resident_slot(expert)
        if self._state[s] == IN_USE:
            raise ValueError(f"expert: {expert} is pinned (in use) and cannot be evicted")
        if self._state[s] == LOADING:
            self._meta[0] -= 1
        self._slot_of[expert] = -1
        self._expert_in[s] = -1
        self._state[s] = FREE
        self._ready[expert] = False
        return s

    def pin(self, expert: int) -> int:
        """READY -> IN_USE (re-entrant: counted). Returns the slot."""
        s = self._resident_slot(expert)
        if self._state[s] == LOADING:
            raise ValueError(f"expert: {expert} is still loading and cannot be pinned")
        self._pins[s] += 1
        self._state[s] = IN_USE
        return s

    def unpin(self, expert: int) -> None:
        s = self._resident_slot(expert)
        if self._pins[s] <= 0:
            raise ValueError(f"expert: {expert} is not pinned")
        self._pins[s] -= 1
        if self._pins[s] == 0:
            self._state[s] = READY

    def pin_many(self, experts: np.ndarray) -> None:
        """`pin` each of `experts` (distinct ids, all READY or IN_USE)."""
        experts = np.asarray(experts, dtype=np.int64)
        if experts.size == 0:
            return
        if experts.min() < 0 or experts.max() >= self.num_experts:
            raise ValueError(f"experts: ids out of range 0..{self.num_experts - 1}")
        if not self._ready[experts].all():
            bad = int(experts[~self._ready[experts]][0])
            raise ValueError(f"expert: {bad} is not ready (absent or still loading) and cannot "
                             "be pinned")
        slots = self._slot_of[experts]
        self._pins[slots] += 1
        self._state[slots] = IN_USE

    def unpin_many(self, experts: np.ndarray) -> None:
        """`unpin` each of `experts` (distinct ids, all pinned)."""
        experts = np.asarray(experts, dtype=np.int64)
        if experts.size == 0:
            return
        slots = self._slot_of[experts]
        if (slots < 0).any() or (self._pins[np.maximum(slots, 0)] <= 0).any():
            raise ValueError("experts: every expert to unpin must be resident and pinned")
        self._pins[slots] -= 1
        self._state[slots[self._pins[slots] == 0]] = READY

    def _resident_slot(self, expert: int) -> int:
        self._check_expert(expert)
        s = int(self._slot_of[expert])
        if s < 0:
            raise ValueError(f"expert: {expert} is not resident")
        return s

    def _check_expert(self, expert: int) -> None:
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert: {expert} out of range 0..{self.num_experts - 1}")

    def check(self) -> None:
        """Assert the invariants (used by the property tests)."""
        occupied = [(s, int(e)) for s, e in enumerate(self._expert_in) if e >= 0]
        assert len(occupied) <= self.num_slots
        for s, e in occupied:
            assert self._slot_of[e] == s, (s, e)
            assert self._state[s] != FREE
        assert int((self._slot_of >= 0).sum()) == len(occupied)
        for s, st in enumerate(self._state.tolist()):
            assert (st == IN_USE) == (self._pins[s] > 0)
            if st == FREE:
                assert self._expert_in[s] == -1
        for e in range(self.num_experts):
            assert self._ready[e] == self.is_ready(e), e
        assert self._meta[0] == int(np.count_nonzero(self._state == LOADING))

    def snapshot(self) -> tuple[np.ndarray, ...]:
        """Copies of every field (slot of each expert, expert in each slot, state codes, pins,
        last use, uses, ready mask, LOADING count): two tables are in the same state iff their
        snapshots are equal (the native-vs-Python property test compares them)."""
        return (self._slot_of.copy(), self._expert_in.copy(), self._state.copy(),
                self._pins.copy(), self._last_use.copy(), self._uses.copy(), self._ready.copy(),
                self._meta.copy())


__all__ = ["STATE_CODES", "EvictionOrder", "SlotState", "SlotTable"]
