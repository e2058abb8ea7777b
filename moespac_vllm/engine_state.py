"""The engine's mutable per-forward state, kept in numpy arrays it owns.

`ExpertEngine` (engine.py, the reference implementation) and the native planner
(`plan_native.py` over `csrc/plan.cpp`) work on the same memory: the Python engine reads and
writes these arrays through the small views below, the native planner through raw pointers. So
either path can plan any forward, and a state reached by one is the state the other continues
from (what tests/test_plan_native.py compares).

Shapes: L MoE layers, E experts per layer.

- `ExpertSet` over one row of an [L, E] bool array: the set operations the engine uses
  (`in`, `add`, `discard`, `remove`, iteration in ascending expert order, truth = non-empty).
- `Counters`: the engine's books (hits, misses, ...) as one int64 array, read and written by name.
- `ArrayField`: a float or int attribute of the engine stored in one element of an array
  (NaN reads as None for optional times).
- The timeline (`LINK_FREE_MS` ... `END_MS`, float64) and clock (`TICK`, `STEP`, `DECODING`,
  int64) slot indices; `DECODING` holds the phase the plan depends on (decode/verify vs
  prefill), so the native planner needs no argument for it.

Pure: numpy only.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import numpy as np

# the order of the engine's counters in `Counters.values` (shared with csrc/plan.cpp)
COUNTER_NAMES = ("steps", "tokens", "hits", "misses", "fetched_experts", "device_experts",
                 "cpu_experts", "prefetch_issued", "prefetch_used", "prefetch_wasted",
                 "prefetch_late")
_INDEX = {name: i for i, name in enumerate(COUNTER_NAMES)}

# slots of the engine's float64 timeline array and int64 clock array (shared with csrc/plan.cpp);
# clock[DECODING] is 1 while the step is a decode/verify one (or none began yet), 0 in prefill
LINK_FREE_MS, BEGIN_MS, GAP_MS, END_MS = 0, 1, 2, 3
TICK, STEP, DECODING = 0, 1, 2


class ExpertSet:
    """A set of expert ids stored as one bool row (`mask[e]` = member)."""

    __slots__ = ("mask",)

    def __init__(self, mask: np.ndarray) -> None:
        self.mask = mask

    def __contains__(self, e: object) -> bool:
        return bool(self.mask[e])

    def __bool__(self) -> bool:
        return bool(self.mask.any())

    def __len__(self) -> int:
        return int(np.count_nonzero(self.mask))

    def __iter__(self) -> Iterator[int]:
        return iter(np.flatnonzero(self.mask).tolist())

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        out = np.flatnonzero(self.mask)
        return out if dtype is None else out.astype(dtype)

    def add(self, e: int) -> None:
        self.mask[e] = True

    def discard(self, e: int) -> None:
        self.mask[e] = False

    def remove(self, e: int) -> None:
        if not self.mask[e]:
            raise KeyError(e)
        self.mask[e] = False

    def assign(self, experts: Iterable[int]) -> None:
        """Make the set exactly `experts`."""
        self.mask[:] = False
        self.mask[np.asarray(list(experts), dtype=np.int64)] = True


class Counters:
    """The engine's books by name over one int64 array (`values`, order `COUNTER_NAMES`)."""

    __slots__ = ("values",)

    def __init__(self) -> None:
        self.values = np.zeros(len(COUNTER_NAMES), dtype=np.int64)

    def __getitem__(self, name: str) -> int:
        return int(self.values[_INDEX[name]])

    def __setitem__(self, name: str, value: int) -> None:
        self.values[_INDEX[name]] = value


class ArrayField:
    """Descriptor: attribute stored in element `index` of the owner's array `array`;
    `optional` reads NaN as None and writes None as NaN."""

    def __init__(self, array: str, index: int, optional: bool = False) -> None:
        self.array, self.index, self.optional = array, index, optional

    def __get__(self, obj: object, owner: type | None = None) -> object:
        if obj is None:
            return self
        v = getattr(obj, self.array)[self.index].item()
        if self.optional and math.isnan(v):
            return None
        return v

    def __set__(self, obj: object, value: object) -> None:
        getattr(obj, self.array)[self.index] = math.nan if value is None else value


__all__ = ["BEGIN_MS", "COUNTER_NAMES", "DECODING", "END_MS", "GAP_MS", "LINK_FREE_MS", "STEP",
           "TICK", "ArrayField", "Counters", "ExpertSet"]
