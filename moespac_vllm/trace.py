"""Routing traces: per decoding step, per MoE layer, the experts every processed token routed to.

Shape legend: S steps, N tokens over all steps, L MoE layers, E experts, K top-k, D draft-phase
tokens over all steps.

A `Trace` is a handful of flat numpy arrays, steps concatenated along the token axis with offsets
(CSR style), so that the simulator and the benchmarks slice views instead of walking Python lists:

    kind          int8   [S]        StepKind: prefill / decode / verify
    seq_id        int32  [S]        the request (problem) the step belongs to
    num_accepted  int16  [S]        draft tokens accepted at a verify step (0 otherwise)
    token_offsets int64  [S+1]      step s processed tokens token_offsets[s]:token_offsets[s+1]
    topk_ids      int16  [N, L, K]  the target's routed experts, rank order (best first)
    topk_weights  f32    [N, L, K]  optional
    router_logits f16    [N, L, E]  optional
    token_modelled bool  [N]        True where the routing was modelled, not recorded
    draft_offsets int64  [S+1]      optional: the draft-phase signal that preceded step s ...
    draft_topk_ids int16 [D, L, K]  ... as top-k ids of the draft's routers
    draft_logits  f16    [D, L, E]  ... or as the draft's router logits

Convention for the draft signal: step s's draft rows are the draft model's forwards that produced
the k draft tokens verified at step s (inputs: the last accepted token and the first k-1 drafts).

Every trace carries `TraceMeta`: its source, whether it is synthetic, and which parts are
modelled rather than recorded. Anything built from a synthetic or partly modelled trace must
report that label (`Trace.label`).

Readers: `Trace.load` (our npz), `read_mixtral_jsonl` (the public Mixtral-8x7B routing JSONL of
shared/data/mixtral-8x7b-routing), `load_trace` (auto-detects either). Builders: `TraceRecorder`
(streaming, used by the vLLM recorder and the GPU harness), `windows_from_autoregressive`
(speculative verification windows from a plain decode trace, with an acceptance model) and
`synthetic_trace` (Qwen3-30B-A3B scale, calibrated on real statistics, labelled synthetic).
Statistics used for calibration and its tests: `expert_shares`, `share_skew`, `reuse_curve`,
`independent_reuse`, `crosslayer_nmi`.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class ModelDims:
    """The MoE dimensions that matter for offloading."""

    num_layers: int  # MoE layers (L)
    num_experts: int  # routed experts per layer (E)
    top_k: int  # K
    hidden_size: int  # H
    intermediate_size: int  # I (per expert)
    dtype_bytes: int = 2

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_experts", "top_k", "hidden_size", "intermediate_size",
                     "dtype_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: must be a positive integer, got {v!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k: {self.top_k} exceeds num_experts {self.num_experts}")

    @property
    def expert_bytes(self) -> int:
        """w13 [2I, H] + w2 [H, I] of one expert."""
        return 3 * self.hidden_size * self.intermediate_size * self.dtype_bytes

    @property
    def expert_flops_per_token(self) -> int:
        return 2 * 3 * self.hidden_size * self.intermediate_size


# Model configs (config.json of each checkpoint).
# Mixtral-8x7B: 32 layers, 8 experts, top-2, hidden 4096, intermediate 14336. The public traces
# were recorded on the FP8 checkpoint (router unquantised); the bf16 model is the usual deployment.
MIXTRAL_8X7B = ModelDims(32, 8, 2, 4096, 14336, 2)
# Qwen3-30B-A3B: 48 layers, 128 experts, top-8, hidden 2048, moe_intermediate_size 768.
QWEN3_30B_A3B = ModelDims(48, 128, 8, 2048, 768, 2)


class StepKind(IntEnum):
    PREFILL = 0
    DECODE = 1  # one token per request, no speculation
    VERIFY = 2  # the target verifies 1 + k tokens


@dataclass(frozen=True, slots=True)
class TraceMeta:
    """Where a trace came from. `modelled` names every part that was not recorded."""

    source: str
    synthetic: bool = False
    modelled: tuple[str, ...] = ()
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The tag every report built on this trace carries."""
        if self.synthetic:
            tag = "synthetic"
        elif self.modelled:
            tag = "real+modelled(" + ",".join(self.modelled) + ")"
        else:
            tag = "real"
        return f"{tag}:{self.source}"

    def to_json(self) -> str:
        return json.dumps({"source": self.source, "synthetic": self.synthetic,
                           "modelled": list(self.modelled), "notes": self.notes}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TraceMeta:
        d = json.loads(text)
        return cls(source=d["source"], synthetic=bool(d["synthetic"]),
                   modelled=tuple(d.get("modelled", ())), notes=dict(d.get("notes", {})))


@dataclass(frozen=True, slots=True)
class TraceStep:
    """One step, as views into the trace arrays."""

    index: int
    kind: StepKind
    seq_id: int
    num_accepted: int
    topk_ids: np.ndarray  # [T, L, K]
    topk_weights: np.ndarray | None  # [T, L, K]
    router_logits: np.ndarray | None  # [T, L, E]
    token_modelled: np.ndarray  # [T]
    draft_topk_ids: np.ndarray | None  # [W, L, K]
    draft_logits: np.ndarray | None  # [W, L, E]

    @property
    def num_tokens(self) -> int:
        return int(self.topk_ids.shape[0])

    def layer_ids(self, layer: int) -> np.ndarray:
        """[T, K] routed ids at one layer (what `engine.plan_layer` takes)."""
        return self.topk_ids[:, layer, :]


def _as(arr: Any, dtype: Any, name: str) -> np.ndarray:
    try:
        return np.ascontiguousarray(np.asarray(arr), dtype=dtype)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: cannot convert to {np.dtype(dtype)} ({e})") from None


def _as_ids(arr: Any, dims: ModelDims, name: str) -> np.ndarray:
    """Expert ids as int16 (int32 for E >= 2^15), range-checked BEFORE narrowing so that an
    out-of-range id cannot wrap into a valid one."""
    a = np.asarray(arr)
    if a.dtype.kind not in "iu":
        if a.size and a.dtype.kind == "f" and np.all(np.mod(a, 1) == 0):
            a = a.astype(np.int64)
        elif a.size:
            raise ValueError(f"{name}: expert ids must be integers, got dtype {a.dtype}")
    if a.size and (a.min() < 0 or a.max() >= dims.num_experts):
        raise ValueError(f"{name}: expert ids must lie in [0, {dims.num_experts})")
    return _as(a, np.int16 if dims.num_experts < 2**15 else np.int32, name)


def _check_offsets(name: str, offsets: np.ndarray, num_steps: int, total: int) -> None:
    if offsets.shape != (num_steps + 1,):
        raise ValueError(f"{name}: expected shape ({num_steps + 1},), got {offsets.shape}")
    if offsets[0] != 0 or offsets[-1] != total or np.any(np.diff(offsets) < 0):
        raise ValueError(f"{name}: must start at 0, end at {total} and never decrease")


def _check_ids(name: str, ids: np.ndarray, dims: ModelDims) -> None:
    if ids.ndim != 3 or ids.shape[1:] != (dims.num_layers, dims.top_k):
        raise ValueError(f"{name}: expected shape [*, {dims.num_layers}, {dims.top_k}], "
                         f"got {list(ids.shape)}")
    if ids.size and (ids.min() < 0 or ids.max() >= dims.num_experts):
        raise ValueError(f"{name}: expert ids must lie in [0, {dims.num_experts})")
    if ids.size and dims.top_k > 1:
        s = np.sort(ids, axis=-1)
        if np.any(s[..., 1:] == s[..., :-1]):
            raise ValueError(f"{name}: an expert appears twice in one token's top-k")


@dataclass(frozen=True, slots=True, eq=False)
class Trace:
    """A routing trace (layout in the module docstring). Immutable by convention: do not write
    into its arrays."""

    dims: ModelDims
    meta: TraceMeta
    kind: np.ndarray
    seq_id: np.ndarray
    num_accepted: np.ndarray
    token_offsets: np.ndarray
    topk_ids: np.ndarray
    topk_weights: np.ndarray | None = None
    router_logits: np.ndarray | None = None
    token_modelled: np.ndarray | None = None
    draft_offsets: np.ndarray | None = None
    draft_topk_ids: np.ndarray | None = None
    draft_logits: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.dims, ModelDims):
            raise ValueError(f"dims: expected ModelDims, got {type(self.dims).__name__}")
        if not isinstance(self.meta, TraceMeta):
            raise ValueError(f"meta: expected TraceMeta, got {type(self.meta).__name__}")
        d = self.dims
        seta = object.__setattr__
        kind = _as(self.kind, np.int8, "kind")
        if kind.ndim != 1:
            raise ValueError(f"kind: expected 1-D, got shape {kind.shape}")
        if kind.size and (kind.min() < 0 or kind.max() > max(StepKind)):
            raise ValueError("kind: values must be StepKind members")
        s = kind.shape[0]
        seta(self, "kind", kind)
        for name, dt in (("seq_id", np.int32), ("num_accepted", np.int16)):
            a = _as(getattr(self, name), dt, name)
            if a.shape != (s,):
                raise ValueError(f"{name}: expected shape ({s},), got {a.shape}")
            seta(self, name, a)
        if self.num_accepted.size and self.num_accepted.min() < 0:
            raise ValueError("num_accepted: must be >= 0")
        ids = _as_ids(self.topk_ids, d, "topk_ids")
        _check_ids("topk_ids", ids, d)
        seta(self, "topk_ids", ids)
        n = ids.shape[0]
        off = _as(self.token_offsets, np.int64, "token_offsets")
        _check_offsets("token_offsets", off, s, n)
        seta(self, "token_offsets", off)
        if self.topk_weights is not None:
            w = _as(self.topk_weights, np.float32, "topk_weights")
            if w.shape != ids.shape:
                raise ValueError(f"topk_weights: expected shape {list(ids.shape)}, "
                                 f"got {list(w.shape)}")
            seta(self, "topk_weights", w)
        if self.router_logits is not None:
            lg = _as(self.router_logits, np.float16, "router_logits")
            if lg.shape != (n, d.num_layers, d.num_experts):
                raise ValueError(f"router_logits: expected shape [{n}, {d.num_layers}, "
                                 f"{d.num_experts}], got {list(lg.shape)}")
            seta(self, "router_logits", lg)
        tm = (np.zeros(n, dtype=bool) if self.token_modelled is None
              else _as(self.token_modelled, bool, "token_modelled"))
        if tm.shape != (n,):
            raise ValueError(f"token_modelled: expected shape ({n},), got {tm.shape}")
        seta(self, "token_modelled", tm)
        has_draft = self.draft_topk_ids is not None or self.draft_logits is not None
        if has_draft != (self.draft_offsets is not None):
            raise ValueError("draft_offsets: give it exactly when a draft signal is given")
        if has_draft:
            nd = None
            if self.draft_topk_ids is not None:
                di = _as_ids(self.draft_topk_ids, d, "draft_topk_ids")
                _check_ids("draft_topk_ids", di, d)
                seta(self, "draft_topk_ids", di)
                nd = di.shape[0]
            if self.draft_logits is not None:
                dl = _as(self.draft_logits, np.float16, "draft_logits")
                if dl.ndim != 3 or dl.shape[1:] != (d.num_layers, d.num_experts):
                    raise ValueError(f"draft_logits: expected shape [*, {d.num_layers}, "
                                     f"{d.num_experts}], got {list(dl.shape)}")
                if nd is not None and dl.shape[0] != nd:
                    raise ValueError("draft_logits: row count differs from draft_topk_ids")
                seta(self, "draft_logits", dl)
                nd = dl.shape[0]
            doff = _as(self.draft_offsets, np.int64, "draft_offsets")
            _check_offsets("draft_offsets", doff, s, int(nd))
            seta(self, "draft_offsets", doff)

    # ---- views ----------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return int(self.kind.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.topk_ids.shape[0])

    @property
    def label(self) -> str:
        return self.meta.label

    @property
    def has_draft(self) -> bool:
        return self.draft_offsets is not None

    @property
    def tokens_per_step(self) -> np.ndarray:
        return np.diff(self.token_offsets)

    def step(self, s: int) -> TraceStep:
        if not 0 <= s < self.num_steps:
            raise ValueError(f"step: {s} out of range [0, {self.num_steps})")
        a, b = int(self.token_offsets[s]), int(self.token_offsets[s + 1])
        dti = dlg = None
        if self.draft_offsets is not None:
            da, db = int(self.draft_offsets[s]), int(self.draft_offsets[s + 1])
            dti = None if self.draft_topk_ids is None else self.draft_topk_ids[da:db]
            dlg = None if self.draft_logits is None else self.draft_logits[da:db]
        return TraceStep(
            index=s, kind=StepKind(int(self.kind[s])), seq_id=int(self.seq_id[s]),
            num_accepted=int(self.num_accepted[s]), topk_ids=self.topk_ids[a:b],
            topk_weights=None if self.topk_weights is None else self.topk_weights[a:b],
            router_logits=None if self.router_logits is None else self.router_logits[a:b],
            token_modelled=self.token_modelled[a:b], draft_topk_ids=dti, draft_logits=dlg)

    def steps(self) -> Iterable[TraceStep]:
        for s in range(self.num_steps):
            yield self.step(s)

    def step_of_token(self) -> np.ndarray:
        """[N] the step each token belongs to."""
        return np.repeat(np.arange(self.num_steps), self.tokens_per_step)

    def counts(self, layer: int) -> np.ndarray:
        """[S, E] int32: tokens of each step routed to each expert at `layer` (the estimator's
        per-window counts c[e]), for all steps at once."""
        return _step_counts(self.topk_ids[:, layer, :], self.token_offsets, self.dims.num_experts)

    def draft_counts(self, layer: int) -> np.ndarray:
        """[S, E] int32: per step, draft-phase tokens whose draft top-k contains each expert
        (from the draft top-k ids, else from the top-k of the draft logits)."""
        if self.draft_offsets is None:
            raise ValueError("draft_offsets: this trace has no draft signal")
        if self.draft_topk_ids is not None:
            ids = self.draft_topk_ids[:, layer, :]
        else:
            assert self.draft_logits is not None
            lg = self.draft_logits[:, layer, :].astype(np.float32)
            ids = np.argpartition(-lg, self.dims.top_k - 1, axis=1)[:, : self.dims.top_k]
        return _step_counts(ids, self.draft_offsets, self.dims.num_experts)

    def select(self, steps: np.ndarray | Sequence[int]) -> Trace:
        """A new trace made of the given steps, in the given order."""
        idx = np.asarray(steps, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_steps):
            raise ValueError("steps: index out of range")
        tok = _gather_ranges(self.token_offsets, idx)
        kw: dict[str, Any] = {}
        if self.draft_offsets is not None:
            dtok = _gather_ranges(self.draft_offsets, idx)
            kw["draft_offsets"] = _offsets(np.diff(self.draft_offsets)[idx])
            kw["draft_topk_ids"] = (None if self.draft_topk_ids is None
                                    else self.draft_topk_ids[dtok])
            kw["draft_logits"] = None if self.draft_logits is None else self.draft_logits[dtok]
        return Trace(
            dims=self.dims, meta=self.meta, kind=self.kind[idx], seq_id=self.seq_id[idx],
            num_accepted=self.num_accepted[idx],
            token_offsets=_offsets(self.tokens_per_step[idx]), topk_ids=self.topk_ids[tok],
            topk_weights=None if self.topk_weights is None else self.topk_weights[tok],
            router_logits=None if self.router_logits is None else self.router_logits[tok],
            token_modelled=self.token_modelled[tok], **kw)

    # ---- persistence ----------------------------------------------------------------------
    _ARRAYS = ("kind", "seq_id", "num_accepted", "token_offsets", "topk_ids", "topk_weights",
               "router_logits", "token_modelled", "draft_offsets", "draft_topk_ids",
               "draft_logits")

    def save(self, path: str | Path) -> Path:
        """Compressed npz; loads without pickle. Returns the path written."""
        p = Path(path)
        if p.suffix != ".npz":
            p = p.with_name(p.name + ".npz")
        d = self.dims
        arrays: dict[str, np.ndarray] = {
            "format_version": np.array(FORMAT_VERSION, dtype=np.int32),
            "dims": np.array([d.num_layers, d.num_experts, d.top_k, d.hidden_size,
                              d.intermediate_size, d.dtype_bytes], dtype=np.int64),
            "meta": np.array(self.meta.to_json()),
        }
        for name in self._ARRAYS:
            v = getattr(self, name)
            if v is not None:
                arrays[name] = v
        np.savez_compressed(p, **arrays)
        return p

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        p = Path(path)
        try:
            z = np.load(p, allow_pickle=False)
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise ValueError(f"path: {p} is not a moespac trace npz ({e})") from None
        with z:
            if "format_version" not in z.files:
                raise ValueError(f"path: {p} is an npz without 'format_version'; not a trace")
            ver = int(z["format_version"])
            if ver != FORMAT_VERSION:
                raise ValueError(f"format_version: {ver} not supported (this reader: "
                                 f"{FORMAT_VERSION})")
            dims = ModelDims(*(int(x) for x in z["dims"]))
            meta = TraceMeta.from_json(str(z["meta"]))
            kw = {n: z[n] for n in cls._ARRAYS if n in z.files}
        return cls(dims=dims, meta=meta, **kw)


def _offsets(sizes: np.ndarray) -> np.ndarray:
    out = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=out[1:])
    return out


def _gather_ranges(offsets: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Row indices of the concatenation of ranges offsets[i]:offsets[i+1] for i in idx."""
    starts = offsets[idx]
    sizes = offsets[idx + 1] - starts
    if sizes.sum() == 0:
        return np.zeros(0, dtype=np.int64)
    rel = np.arange(int(sizes.sum())) - np.repeat(_offsets(sizes)[:-1], sizes)
    return np.repeat(starts, sizes) + rel


def _step_counts(ids: np.ndarray, offsets: np.ndarray, num_experts: int) -> np.ndarray:
    num_steps = len(offsets) - 1
    step = np.repeat(np.arange(num_steps), np.diff(offsets))
    flat = (step[:, None] * num_experts + ids.astype(np.int64)).ravel()
    return np.bincount(flat, minlength=num_steps * num_experts).reshape(
        num_steps, num_experts).astype(np.int32)


# ---- streaming recorder -------------------------------------------------------------------
class TraceRecorder:
    """Append steps, then `build()` or `save(path)`.

    Two ways in: `add_step(...)` with whole [T, L, K] arrays, or layer by layer as a forward
    runs: `begin_step(kind)`, `record_layer(layer, topk_ids[T, K], weights)` for every layer,
    `end_step(num_accepted)`. Draft-phase routing (`record_draft_layer`) recorded between two
    steps belongs to the step that follows (the verification of those drafts)."""

    def __init__(self, dims: ModelDims, source: str, synthetic: bool = False,
                 modelled: Sequence[str] = (), notes: dict[str, Any] | None = None) -> None:
        self.dims = dims
        self.meta = TraceMeta(source, synthetic, tuple(modelled), dict(notes or {}))
        self._steps: list[tuple[int, int, int]] = []  # (kind, seq_id, num_accepted)
        self._ids: list[np.ndarray] = []
        self._weights: list[np.ndarray | None] = []
        self._logits: list[np.ndarray | None] = []
        self._modelled: list[np.ndarray] = []
        self._draft_ids: list[np.ndarray | None] = []
        self._draft_logits: list[np.ndarray | None] = []
        self._open: dict[str, Any] | None = None
        self._pending_draft_ids: dict[int, np.ndarray] = {}
        self._pending_draft_logits: dict[int, np.ndarray] = {}

    @property
    def num_steps(self) -> int:
        return len(self._steps)

    @property
    def is_open(self) -> bool:
        """True between `begin_step` and `end_step` / `abort_step`."""
        return self._open is not None

    def abort_step(self) -> None:
        """Drop the open step (an aborted forward) without writing it; pending draft routing is
        kept for the next step."""
        self._open = None

    def add_step(self, kind: StepKind, topk_ids: np.ndarray, topk_weights: np.ndarray | None = None,
                 router_logits: np.ndarray | None = None, num_accepted: int = 0, seq_id: int = 0,
                 token_modelled: np.ndarray | None = None, draft_topk_ids: np.ndarray | None = None,
                 draft_logits: np.ndarray | None = None) -> None:
        d = self.dims
        ids = np.asarray(topk_ids)
        if ids.ndim != 3 or ids.shape[1:] != (d.num_layers, d.top_k):
            raise ValueError(f"topk_ids: expected [T, {d.num_layers}, {d.top_k}], "
                             f"got {list(ids.shape)}")
        t = ids.shape[0]
        self._steps.append((int(StepKind(kind)), int(seq_id), int(num_accepted)))
        self._ids.append(ids)
        self._weights.append(None if topk_weights is None else np.asarray(topk_weights))
        self._logits.append(None if router_logits is None else np.asarray(router_logits))
        self._modelled.append(np.zeros(t, bool) if token_modelled is None
                              else np.asarray(token_modelled, bool))
        self._draft_ids.append(None if draft_topk_ids is None else np.asarray(draft_topk_ids))
        self._draft_logits.append(None if draft_logits is None else np.asarray(draft_logits))

    def begin_step(self, kind: StepKind, seq_id: int = 0) -> None:
        if self._open is not None:
            raise ValueError("begin_step: the previous step was not ended")
        self._open = {"kind": kind, "seq_id": seq_id, "ids": {}, "weights": {}}

    def record_layer(self, layer: int, topk_ids: np.ndarray,
                     topk_weights: np.ndarray | None = None) -> None:
        if self._open is None:
            raise ValueError("record_layer: no step is open (call begin_step)")
        if not 0 <= layer < self.dims.num_layers:
            raise ValueError(f"layer: {layer} out of range [0, {self.dims.num_layers})")
        self._open["ids"][layer] = np.array(topk_ids, copy=True)
        if topk_weights is not None:
            self._open["weights"][layer] = np.array(topk_weights, dtype=np.float32, copy=True)

    def record_draft_layer(self, layer: int, topk_ids: np.ndarray | None = None,
                           router_logits: np.ndarray | None = None) -> None:
        """Draft routing of the draft tokens that the next `begin_step` will verify."""
        if not 0 <= layer < self.dims.num_layers:
            raise ValueError(f"layer: {layer} out of range [0, {self.dims.num_layers})")
        if topk_ids is not None:
            self._pending_draft_ids[layer] = np.array(topk_ids, copy=True)
        if router_logits is not None:
            self._pending_draft_logits[layer] = np.array(router_logits, dtype=np.float16)

    def end_step(self, num_accepted: int = 0) -> None:
        st = self._open
        if st is None:
            raise ValueError("end_step: no step is open")
        self._open = None
        L = self.dims.num_layers
        missing = [l for l in range(L) if l not in st["ids"]]
        if missing:
            raise ValueError(f"topk_ids: layers {missing[:5]} were not recorded in this step")
        ids = np.stack([st["ids"][l] for l in range(L)], axis=1)
        w = (np.stack([st["weights"][l] for l in range(L)], axis=1)
             if len(st["weights"]) == L else None)
        dids = dlg = None
        for name, pending in (("draft_topk_ids", self._pending_draft_ids),
                              ("draft_logits", self._pending_draft_logits)):
            if pending and len(pending) != L:
                missing = [l for l in range(L) if l not in pending]
                self._pending_draft_ids, self._pending_draft_logits = {}, {}
                raise ValueError(f"{name}: draft layers {missing[:5]} were not recorded")
        if self._pending_draft_ids:
            dids = np.stack([self._pending_draft_ids[l] for l in range(L)], axis=1)
        if self._pending_draft_logits:
            dlg = np.stack([self._pending_draft_logits[l] for l in range(L)], axis=1)
        self._pending_draft_ids, self._pending_draft_logits = {}, {}
        self.add_step(st["kind"], ids, w, None, num_accepted, st["seq_id"], None, dids, dlg)

    def build(self) -> Trace:
        if self._open is not None:
            raise ValueError("build: a step is still open (call end_step)")
        d = self.dims
        dt = np.int16 if d.num_experts < 2**15 else np.int32
        n_steps = len(self._steps)
        sizes = np.array([a.shape[0] for a in self._ids], dtype=np.int64)
        ids = (np.concatenate(self._ids).astype(dt) if self._ids
               else np.zeros((0, d.num_layers, d.top_k), dt))
        meta = np.array(self._steps, dtype=np.int64).reshape(n_steps, 3)

        def cat_optional(parts: list[np.ndarray | None], name: str) -> np.ndarray | None:
            have = [p is not None for p in parts]
            if not any(have):
                return None
            if not all(have):
                raise ValueError(f"{name}: recorded for some steps but not all")
            return np.concatenate(parts)  # type: ignore[arg-type]

        kw: dict[str, Any] = {}
        has_draft = any(p is not None for p in self._draft_ids + self._draft_logits)
        if has_draft:
            dsz = np.array([(a if a is not None else b).shape[0] if (a is not None or b is not None)
                            else 0 for a, b in zip(self._draft_ids, self._draft_logits)])
            kw["draft_offsets"] = _offsets(dsz)
            K, E, L = d.top_k, d.num_experts, d.num_layers
            if any(p is not None for p in self._draft_ids):
                kw["draft_topk_ids"] = np.concatenate(
                    [p if p is not None else np.zeros((0, L, K), dt) for p in self._draft_ids])
            if any(p is not None for p in self._draft_logits):
                kw["draft_logits"] = np.concatenate(
                    [p if p is not None else np.zeros((0, L, E), np.float16)
                     for p in self._draft_logits])
        return Trace(
            dims=d, meta=self.meta, kind=meta[:, 0], seq_id=meta[:, 1], num_accepted=meta[:, 2],
            token_offsets=_offsets(sizes), topk_ids=ids,
            topk_weights=cat_optional(self._weights, "topk_weights"),
            router_logits=cat_optional(self._logits, "router_logits"),
            token_modelled=(np.concatenate(self._modelled) if self._modelled
                            else np.zeros(0, bool)), **kw)

    def save(self, path: str | Path) -> Path:
        return self.build().save(path)


# ---- the public Mixtral JSONL format --------------------------------------------------------
def read_mixtral_jsonl(path: str | Path, dims: ModelDims = MIXTRAL_8X7B) -> Trace:
    """Read shared/data/mixtral-8x7b-routing/*routing*.jsonl into a plain decode trace.

    Rows: {"problem_id", "layer", "token_idx" | "token_pos", "experts", "gating_probs"}.
    - `token_idx` files (decode only): each problem is trimmed to the minimum token count over its
      layers (upstream numbered tokens per layer after dropping [0.5, 0.5] rows, so counts differ
      by up to 3); token i of every layer then forms decode step i.
    - `token_pos` files (prefill + decode): file order is exact. The prompt rows (token_pos
      0..P-1, per layer) become one PREFILL step holding the positions present in every layer;
      the decode rows come as one run of ascending layers per step, so a step ends where the
      layer number stops increasing; decode steps missing a layer are dropped. The dropped counts
      are in meta.notes.
    One step per token; `seq_id` is the problem id."""
    p = Path(path)
    rows: list[dict[str, Any]] = []
    with p.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"path: {p}:{lineno} is not JSON ({e.msg})") from None
            if not isinstance(r, dict) or "layer" not in r or "experts" not in r:
                raise ValueError(f"path: {p}:{lineno} lacks 'layer'/'experts'; not Mixtral JSONL")
            rows.append(r)
    if not rows:
        raise ValueError(f"path: {p} has no rows")
    if "token_pos" in rows[0]:
        return _read_prefill_decode(rows, dims, p)
    if "token_idx" not in rows[0]:
        raise ValueError(f"path: {p} rows have neither 'token_idx' nor 'token_pos'")
    rec = TraceRecorder(dims, source=f"mixtral-jsonl:{p.name}",
                        notes={"model": "Mixtral-8x7B-Instruct-v0.1-FP8 (vLLM, greedy)",
                               "alignment": "each problem trimmed to its min token count over "
                                            "layers"})
    L, K = dims.num_layers, dims.top_k
    by_problem: dict[int, dict[int, list[tuple[int, list[int], list[float]]]]] = {}
    for r in rows:
        layer = int(r["layer"])
        if not 0 <= layer < L:
            raise ValueError(f"layer: {layer} out of range [0, {L}) in {p.name}")
        by_problem.setdefault(int(r["problem_id"]), {}).setdefault(layer, []).append(
            (int(r["token_idx"]), r["experts"], r["gating_probs"]))
    trimmed: dict[str, int] = {}
    for pid in sorted(by_problem):
        layers = by_problem[pid]
        if len(layers) != L:
            raise ValueError(f"layer: problem {pid} has {len(layers)} of {L} layers")
        n = min(len(v) for v in layers.values())
        trimmed[str(pid)] = sum(len(v) - n for v in layers.values())
        ids = np.empty((n, L, K), np.int64)
        w = np.empty((n, L, K), np.float32)
        for layer, v in layers.items():
            v.sort(key=lambda x: x[0])
            ids[:, layer] = [x[1] for x in v[:n]]
            w[:, layer] = [x[2] for x in v[:n]]
        for t in range(n):
            rec.add_step(StepKind.DECODE, ids[t:t + 1], w[t:t + 1], seq_id=pid)
    rec.meta.notes["rows_trimmed_per_problem"] = trimmed
    return rec.build()


def _read_prefill_decode(rows: list[dict[str, Any]], dims: ModelDims, p: Path) -> Trace:
    L, K = dims.num_layers, dims.top_k
    pids = {int(r["problem_id"]) for r in rows}
    rec = TraceRecorder(dims, source=f"mixtral-jsonl:{p.name}",
                        modelled=("missing_rows_filled",),
                        notes={"model": "Mixtral-8x7B-Instruct-v0.1-FP8 (vLLM, greedy)",
                               "alignment": "prefill: token_pos; decode: file-order runs of "
                                            "ascending layers. Rows upstream dropped (exact "
                                            "[0.5, 0.5] ties) are filled with the same layer's "
                                            "routing of the previous token; such tokens are "
                                            "flagged in token_modelled"})
    filled: dict[str, Any] = {}
    for pid in sorted(pids):
        prows = [r for r in rows if int(r["problem_id"]) == pid]
        # the prompt block: per layer, token_pos strictly increasing from 0 (its first run)
        prompt: dict[int, dict[int, tuple[list[int], list[float]]]] = {}
        i = 0
        while i < len(prows):
            layer, pos = int(prows[i]["layer"]), int(prows[i]["token_pos"])
            run = prompt.get(layer)
            if run is not None and pos <= max(run):
                break  # a layer restarts: decode has begun
            prompt.setdefault(layer, {})[pos] = (prows[i]["experts"], prows[i]["gating_probs"])
            i += 1
        n_prompt = max((max(v) + 1 for v in prompt.values()), default=0)
        tokens: list[dict[int, tuple[list[int], list[float]]]] = [
            {l: prompt[l][q] for l in prompt if q in prompt[l]} for q in range(n_prompt)]
        # decode: one run of ascending layers per step
        cur: dict[int, tuple[list[int], list[float]]] = {}
        last = -1
        for r in prows[i:]:
            layer = int(r["layer"])
            if layer <= last:
                tokens.append(cur)
                cur = {}
            cur[layer] = (r["experts"], r["gating_probs"])
            last = layer
        if cur:
            tokens.append(cur)
        n = len(tokens)
        ids = np.zeros((n, L, K), np.int64)
        w = np.zeros((n, L, K), np.float32)
        have = np.zeros((n, L), bool)
        for t, tok in enumerate(tokens):
            for layer, (e, g) in tok.items():
                if not 0 <= layer < L:
                    raise ValueError(f"layer: {layer} out of range [0, {L}) in {p.name}")
                ids[t, layer], w[t, layer], have[t, layer] = e, g, True
        for layer in range(L):  # fill from the previous token (the next one for token 0)
            rows_ok = np.flatnonzero(have[:, layer])
            if rows_ok.size == 0:
                raise ValueError(f"layer: {layer} has no rows for problem {pid} in {p.name}")
            src = rows_ok[np.clip(np.searchsorted(rows_ok, np.arange(n), side="right") - 1,
                                  0, None)]
            ids[:, layer], w[:, layer] = ids[src, layer], w[src, layer]
        modelled = ~have.all(axis=1)
        if n_prompt:
            rec.add_step(StepKind.PREFILL, ids[:n_prompt], w[:n_prompt], seq_id=pid,
                         token_modelled=modelled[:n_prompt])
        for t in range(n_prompt, n):
            rec.add_step(StepKind.DECODE, ids[t:t + 1], w[t:t + 1], seq_id=pid,
                         token_modelled=modelled[t:t + 1])
        filled[str(pid)] = {"prompt_tokens": n_prompt, "decode_tokens": n - n_prompt,
                            "rows_filled": int((~have).sum()),
                            "tokens_with_a_filled_row": int(modelled.sum())}
    rec.meta.notes["filled"] = filled
    return rec.build()


def load_trace(path: str | Path, dims: ModelDims | None = None) -> Trace:
    """Our npz or the public Mixtral JSONL, auto-detected from the file's first bytes.
    `dims` overrides the Mixtral dims for JSONL (npz carries its own)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"path: {p} does not exist or is not a file")
    with p.open("rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        return Trace.load(p)
    if head.lstrip()[:1] == b"{":
        return read_mixtral_jsonl(p, dims or MIXTRAL_8X7B)
    raise ValueError(f"path: {p} is neither a trace npz nor Mixtral routing JSONL")


# ---- verification windows from autoregressive traces ----------------------------------------
def _replace_members(ids: np.ndarray, mask: np.ndarray, num_experts: int,
                     rng: np.random.Generator) -> np.ndarray:
    """Copy of ids [R, K] where each masked slot holds a uniformly random expert that is not
    already in its row."""
    out = ids.astype(np.int64, copy=True)
    k = out.shape[1]
    for j in range(k):
        todo = np.flatnonzero(mask[:, j])
        for _ in range(64):
            if todo.size == 0:
                break
            cand = rng.integers(num_experts, size=todo.size)
            clash = (out[todo] == cand[:, None]).any(axis=1)
            ok = todo[~clash]
            out[ok, j] = cand[~clash]
            todo = todo[clash]
        for r in todo:  # vanishingly rare: draw from the complement directly
            free = np.setdiff1d(np.arange(num_experts), out[r])
            out[r, j] = rng.choice(free)
    return out


def windows_from_autoregressive(
    trace: Trace,
    k: int,
    acceptance: float | int = 0.8,
    seed: int = 0,
    rejected: str = "resample",
    perturb_prob: float = 0.5,
    draft_agreement: float | None = None,
) -> Trace:
    """Speculative verification windows (1 + k tokens) built from a plain decode trace.

    For each request, the decode tokens t_0, t_1, ... are replayed: a window starts at the last
    accepted token p and holds p, p+1, ..., p+k. Of the k drafts, `a` are accepted (acceptance
    model below) and the next window starts at p + a + 1 (the bonus token).
    - Accepted drafts are the true next tokens in the same context: their routing is the
      recorded routing of p+1..p+a, exact.
    - Drafts after the first rejection are tokens the target never generated: their routing was
      never recorded and is MODELLED (`token_modelled`, meta.modelled "rejected_draft_routing"):
      `rejected="resample"` copies the routing (all layers) of a token drawn uniformly from
      elsewhere in the same request's stream; `"perturb"` takes the true next token's routing
      and replaces each expert with probability `perturb_prob` by a random other one.
    Acceptance: a float alpha in [0, 1] is a per-draft-token acceptance probability (the first
    rejection ends acceptance; seeded); an int in [0, k] is a fixed accepted count. Windows are
    truncated at the end of a request.

    `draft_agreement` (optional) adds a MODELLED draft routing signal for an MoE draft that
    mirrors the target's routers: the draft's forwards take the window's first k tokens as
    inputs, and each of their true routed experts is kept with probability `draft_agreement`,
    else replaced by a random other expert (meta.modelled "draft_routing").
    Prefill steps pass through unchanged; the input must have no verify steps."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k: must be an integer >= 0, got {k!r}")
    if isinstance(acceptance, bool):
        raise ValueError("acceptance: must be a float in [0, 1] or an int in [0, k], "
                         f"got {acceptance!r}")
    if isinstance(acceptance, int):
        if not 0 <= acceptance <= k:
            raise ValueError(f"acceptance: fixed accepted count must be in [0, {k}], "
                             f"got {acceptance}")
    elif isinstance(acceptance, float):
        if not 0.0 <= acceptance <= 1.0:
            raise ValueError(f"acceptance: probability must be in [0, 1], got {acceptance}")
    else:
        raise ValueError(f"acceptance: must be a float or an int, got {type(acceptance).__name__}")
    if rejected not in ("resample", "perturb"):
        raise ValueError(f"rejected: must be 'resample' or 'perturb', got {rejected!r}")
    if not 0.0 <= perturb_prob <= 1.0:
        raise ValueError(f"perturb_prob: must be in [0, 1], got {perturb_prob}")
    if draft_agreement is not None and not 0.0 <= draft_agreement <= 1.0:
        raise ValueError(f"draft_agreement: must be in [0, 1], got {draft_agreement}")
    if np.any(trace.kind == StepKind.VERIFY):
        raise ValueError("trace: already holds verify steps; give a plain decode trace")
    decode = trace.kind == StepKind.DECODE
    if np.any(trace.tokens_per_step[decode] != 1):
        raise ValueError("trace: decode steps must hold exactly one token (batch 1)")

    rng = np.random.default_rng(seed)
    E = trace.dims.num_experts
    src: list[np.ndarray] = []  # source token index per output token
    modelled_rows: list[np.ndarray] = []
    perturb_rows: list[np.ndarray] = []
    kinds: list[int] = []
    seqs: list[int] = []
    accepted: list[int] = []
    sizes: list[int] = []
    draft_src: list[np.ndarray] = []
    draft_sizes: list[int] = []
    any_rejected = False

    # requests in order of first appearance; prefill steps keep their place before decode
    order: list[int] = []
    for sid in trace.seq_id:
        if int(sid) not in order:
            order.append(int(sid))
    for sid in order:
        steps = np.flatnonzero(trace.seq_id == sid)
        for s in steps[trace.kind[steps] == StepKind.PREFILL]:
            a, b = trace.token_offsets[s], trace.token_offsets[s + 1]
            src.append(np.arange(a, b))
            modelled_rows.append(trace.token_modelled[a:b].copy())
            perturb_rows.append(np.zeros(b - a, bool))
            kinds.append(StepKind.PREFILL)
            seqs.append(sid)
            accepted.append(0)
            sizes.append(int(b - a))
            draft_sizes.append(0)
        toks = trace.token_offsets[steps[trace.kind[steps] == StepKind.DECODE]]
        n = len(toks)
        p = 0
        while p < n:
            k_eff = min(k, n - 1 - p)
            if isinstance(acceptance, int):
                acc = min(acceptance, k_eff)
            else:
                acc = 0
                while acc < k_eff and rng.random() < acceptance:
                    acc += 1
            idx = toks[p:p + k_eff + 1].copy()
            mod = np.zeros(k_eff + 1, bool)
            pert = np.zeros(k_eff + 1, bool)
            if acc < k_eff:
                any_rejected = True
                mod[acc + 1:] = True
                if rejected == "resample":
                    pool = np.concatenate([toks[:p], toks[p + k_eff + 1:]])
                    if pool.size == 0:
                        pool = toks
                    idx[acc + 1:] = pool[rng.integers(pool.size, size=k_eff - acc)]
                else:
                    pert[acc + 1:] = True
            src.append(idx)
            modelled_rows.append(mod | trace.token_modelled[idx])
            perturb_rows.append(pert)
            kinds.append(StepKind.VERIFY if k_eff > 0 else StepKind.DECODE)
            seqs.append(sid)
            accepted.append(acc)
            sizes.append(k_eff + 1)
            draft_sizes.append(k_eff if draft_agreement is not None else 0)
            p += acc + 1

    src_idx = np.concatenate(src) if src else np.zeros(0, np.int64)
    ids = trace.topk_ids[src_idx].astype(np.int64)
    pert_mask = np.concatenate(perturb_rows) if perturb_rows else np.zeros(0, bool)
    if pert_mask.any():
        rows = ids[pert_mask].reshape(-1, trace.dims.top_k)
        m = rng.random(rows.shape) < perturb_prob
        ids[pert_mask] = _replace_members(rows, m, E, rng).reshape(-1, *ids.shape[1:])
    modelled = list(trace.meta.modelled)
    tok_modelled = np.concatenate(modelled_rows) if modelled_rows else np.zeros(0, bool)
    if any_rejected and "rejected_draft_routing" not in modelled:
        modelled.append("rejected_draft_routing")
    offsets = _offsets(np.array(sizes, np.int64))
    kw: dict[str, Any] = {}
    if draft_agreement is not None:
        # draft forwards: inputs are the window's first k_eff tokens (last accepted + drafts)
        for s, sz in enumerate(draft_sizes):
            draft_src.append(np.arange(offsets[s], offsets[s] + sz))
        dsrc = np.concatenate(draft_src) if draft_src else np.zeros(0, np.int64)
        dids = ids[dsrc].reshape(-1, trace.dims.top_k)
        m = rng.random(dids.shape) >= draft_agreement
        dids = _replace_members(dids, m, E, rng).reshape(-1, trace.dims.num_layers,
                                                          trace.dims.top_k)
        kw = {"draft_offsets": _offsets(np.array(draft_sizes, np.int64)), "draft_topk_ids": dids}
        if "draft_routing" not in modelled:
            modelled.append("draft_routing")
    notes = dict(trace.meta.notes)
    notes["windows"] = {"k": k, "acceptance": acceptance, "seed": seed, "rejected": rejected,
                        "perturb_prob": perturb_prob if rejected == "perturb" else None,
                        "draft_agreement": draft_agreement}
    meta = TraceMeta(trace.meta.source, trace.meta.synthetic, tuple(modelled), notes)
    return Trace(
        dims=trace.dims, meta=meta, kind=np.array(kinds, np.int8), seq_id=np.array(seqs),
        num_accepted=np.array(accepted), token_offsets=offsets, topk_ids=ids,
        topk_weights=None if trace.topk_weights is None else trace.topk_weights[src_idx],
        router_logits=None if trace.router_logits is None else trace.router_logits[src_idx],
        token_modelled=tok_modelled, **kw)


# ---- routing statistics (calibration targets and their tests) -------------------------------
def expert_shares(topk_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, E] share of all routed (token, k) assignments per expert, per layer (rows sum to 1).
    topk_ids: [N, L, K]."""
    n, num_layers, _ = topk_ids.shape
    flat = (np.arange(num_layers)[None, :, None] * num_experts + topk_ids.astype(np.int64)).ravel()
    c = np.bincount(flat, minlength=num_layers * num_experts).reshape(num_layers, num_experts)
    return c / np.maximum(c.sum(axis=1, keepdims=True), 1)


def share_skew(shares: np.ndarray) -> np.ndarray:
    """Coefficient of variation (std / mean) of the per-expert shares, per layer; 0 is uniform."""
    s = np.atleast_2d(shares)
    return s.std(axis=1) / s.mean(axis=1)


def independent_reuse(shares: np.ndarray, top_k: int) -> np.ndarray:
    """[L] P(e in S_{t+d} | e in S_t) if tokens drew their experts independently with these
    popularities: sum(pi^2) / K with inclusion probabilities pi = K * share (clipped at 1)."""
    pi = np.clip(top_k * np.atleast_2d(shares), 0.0, 1.0)
    return (pi * pi).sum(axis=1) / top_k


def _stream_onehot(ids: np.ndarray, num_experts: int) -> np.ndarray:
    n, num_layers, _ = ids.shape
    oh = np.zeros((n, num_layers, num_experts), dtype=bool)
    np.put_along_axis(oh, ids.astype(np.int64), True, axis=2)
    return oh


def request_streams(trace: Trace) -> list[np.ndarray]:
    """Per request, the [n, L, K] routing of its non-prefill tokens in processing order."""
    out = []
    for sid in np.unique(trace.seq_id):
        steps = np.flatnonzero((trace.seq_id == sid) & (trace.kind != StepKind.PREFILL))
        rows = _gather_ranges(trace.token_offsets, steps)
        if rows.size:
            out.append(trace.topk_ids[rows])
    return out


def reuse_curve(streams: Trace | Sequence[np.ndarray], num_experts: int | None = None,
                max_lag: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Temporal reuse of an autoregressive stream, per layer.

    Returns (lagged [L, max_lag], within [L, max_lag]):
      lagged[l, d-1] = P(e in S_{t+d} | e in S_t)
      within[l, w-1] = P(e in S_{t+1} u ... u S_{t+w} | e in S_t)
    pooled over requests (never across a request boundary). `streams`: a plain decode Trace, or
    [n, L, K] arrays (then give num_experts)."""
    if isinstance(streams, Trace):
        num_experts = streams.dims.num_experts
        streams = request_streams(streams)
    if num_experts is None:
        raise ValueError("num_experts: required when streams are arrays")
    if not streams:
        raise ValueError("streams: empty")
    num_layers = streams[0].shape[1]
    hit_lag = np.zeros((num_layers, max_lag))
    hit_win = np.zeros((num_layers, max_lag))
    base = np.zeros((num_layers, max_lag))
    for ids in streams:
        oh = _stream_onehot(ids, num_experts)
        n = oh.shape[0]
        union = np.zeros_like(oh)
        for d in range(1, max_lag + 1):
            if d >= n:
                break
            src = oh[:-d]
            union[:-d] |= oh[d:]
            hit_lag[:, d - 1] += (src & oh[d:]).sum(axis=(0, 2))
            hit_win[:, d - 1] += (src & union[:-d]).sum(axis=(0, 2))
            base[:, d - 1] += src.sum(axis=(0, 2))
    base = np.maximum(base, 1)
    return hit_lag / base, hit_win / base


def _entropy_mm(counts: np.ndarray) -> float:
    """Miller-Madow corrected entropy (nats) of a histogram."""
    n = counts.sum()
    p = counts[counts > 0] / n
    return float(-(p * np.log(p)).sum() + (p.size - 1) / (2.0 * n))


def crosslayer_nmi(pair_counts: np.ndarray) -> float:
    """Normalised mutual information I(X;Y) / H(X) of a layer-to-layer count matrix [E, E]
    (entry [x, y]: (token, rank r) pairs with expert x at the first layer and y at the second),
    with Miller-Madow bias correction so that sample sizes of 10^5 pairs compare fairly."""
    m = np.asarray(pair_counts, dtype=np.float64)
    hx = _entropy_mm(m.sum(axis=1))
    mi = hx + _entropy_mm(m.sum(axis=0)) - _entropy_mm(m.ravel())
    return max(mi, 0.0) / hx if hx > 0 else 0.0


def rank_pair_counts(ids_a: np.ndarray, ids_b: np.ndarray, num_experts: int) -> np.ndarray:
    """[E, E] rank-paired layer-to-layer counts (the OLMoE stats' crosslayer layout) from two
    [N, K] top-k arrays of the same tokens."""
    flat = ids_a.astype(np.int64).ravel() * num_experts + ids_b.astype(np.int64).ravel()
    return np.bincount(flat, minlength=num_experts ** 2).reshape(num_experts, num_experts)


# ---- synthetic Qwen3-30B-A3B-scale traces ----------------------------------------------------
# Generative model (ours, documented as such). Each token has a latent "topic" c_t in {0..C-1}
# shared by all layers (it stays with probability `topic_stay` from token to token); at layer l
# the token's experts are the top-K of  log p_l + sigma * z[l, c_t] + Gumbel  (Plackett-Luce
# sampling without replacement), except that each of the previous token's experts is first kept
# with probability rho_l. The knobs are fitted to three targets:
#   popularity skew  p_l: OLMoE's sorted expert shares at layers 0/7/15 (of 16), resampled to E
#                    and interpolated in log space over depth (shared/data/olmoe-mixtral-routing-
#                    stats); corrected for Plackett-Luce flattening by re-weighting;
#   co-occurrence    sigma: the rank-paired normalised MI I(X;Y)/H(X) of OLMoE's layer pairs
#                    0->7 and 7->15, mapped by depth (one knob: fitted to their mean);
#   temporal reuse   rho_l: the lag-1 reuse LIFT over independent draws measured per layer in the
#                    Mixtral decode traces, lift = (R1 - R0) / (1 - R0), interpolated over depth
#                    and re-applied at the synthetic model's own independent baseline R0.
_TOPICS = 16
_TOPIC_STAY = 0.5
_STATS_LAYERS = (0, 7, 15)  # the layers the routing-stats files keep
# MoE layers of the model each stats file came from (OLMoE-1B-7B: 16, Mixtral-8x7B: 32)
_STATS_MODEL_LAYERS = {"olmoe": 16, "mixtral": 32}


@dataclass(frozen=True, slots=True)
class SyntheticTargets:
    """Calibration targets of the synthetic generator and where they came from."""

    shares: np.ndarray  # [L, E] target expert shares (rows sum to 1), expert ids permuted
    reuse_lift: np.ndarray  # [L] lag-1 reuse lift over independent draws (fitted)
    reuse_lift_lags: np.ndarray  # [L, 4] lift at lags 1..4 (lags 2..4: reported, not fitted)
    nmi_pairs: tuple[tuple[int, int, float], ...]  # (layer a, layer b, target I/H)
    sources: dict[str, Any]

    @property
    def skew(self) -> np.ndarray:
        return share_skew(self.shares)


def _resample_sorted(shares_sorted: np.ndarray, num_experts: int) -> np.ndarray:
    """Quantile-resample a descending share curve to num_experts points (sum 1)."""
    src = np.asarray(shares_sorted, dtype=np.float64)
    q_src = (np.arange(src.size) + 0.5) / src.size
    q_dst = (np.arange(num_experts) + 0.5) / num_experts
    out = np.exp(np.interp(q_dst, q_src, np.log(np.maximum(src, 1e-12))))
    return out / out.sum()


def _depth_interp(values: np.ndarray, src_depths: np.ndarray, num_layers: int) -> np.ndarray:
    """Linear interpolation over relative depth of per-source-layer rows, to num_layers rows."""
    dst = np.linspace(0.0, 1.0, num_layers) if num_layers > 1 else np.zeros(1)
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 1:
        return np.interp(dst, src_depths, v)
    return np.stack([np.interp(dst, src_depths, v[:, j]) for j in range(v.shape[1])], axis=1)


def _stats_file(stats: str | Path) -> Path:
    p = Path(stats)
    if p.is_dir():
        p = p / "olmoe_1b_7b_0924_routing_stats.npz"
    if not p.is_file():
        raise ValueError(f"stats: {p} not found (give the OLMoE routing-stats npz or its folder)")
    return p


def synthetic_targets(dims: ModelDims, seed: int = 0, stats: str | Path | None = None,
                      reuse: str | Path | Trace | float | None = None,
                      domain: str = "c4") -> SyntheticTargets:
    """The generator's targets. `stats`: OLMoE routing-stats npz (or folder); None = uniform
    popularity and no co-occurrence. `reuse`: a Mixtral routing JSONL / plain decode Trace to
    measure the lag-1 lift from, or the lift itself as a float; None = 0 (no reuse beyond
    popularity)."""
    rng = np.random.default_rng([seed, 1])
    L, E = dims.num_layers, dims.num_experts
    sources: dict[str, Any] = {}
    nmi_pairs: tuple[tuple[int, int, float], ...] = ()
    if stats is None:
        shares = np.full((L, E), 1.0 / E)
        sources["popularity"] = "uniform (no stats given or found)"
    else:
        path = _stats_file(stats)
        model_layers = [n for key, n in _STATS_MODEL_LAYERS.items() if key in path.name.lower()]
        if len(model_layers) != 1:
            raise ValueError(f"stats: cannot tell the source model of {path.name} (expected "
                             f"a name containing one of {sorted(_STATS_MODEL_LAYERS)})")
        src_depths = np.array(_STATS_LAYERS, float) / (model_layers[0] - 1)
        with np.load(path, allow_pickle=False) as z:
            key = f"expert_counts__{domain}"
            if key not in z.files:
                raise ValueError(f"domain: {domain!r} not in {path.name}")
            counts = z[key].astype(np.float64)
            cross = z[f"expert_counts_crosslayer__{domain}"].astype(np.float64)
        curves = np.stack([_resample_sorted(np.sort(c / c.sum())[::-1], E) for c in counts])
        log_curves = _depth_interp(np.log(curves), src_depths, L)
        shares = np.exp(log_curves)
        shares /= shares.sum(axis=1, keepdims=True)
        for l in range(L):
            shares[l] = shares[l][rng.permutation(E)]
        la = [int(round(d * (L - 1))) for d in src_depths]
        nmi_pairs = tuple((la[i], la[i + 1], crosslayer_nmi(cross[i])) for i in range(2))
        sources["popularity"] = (f"{path.name}:{key} layers {_STATS_LAYERS} of "
                                 f"{model_layers[0]}, interpolated over depth")
        sources["cooccurrence"] = f"{path.name}:expert_counts_crosslayer__{domain} (0->7, 7->15)"
    if reuse is None:
        lifts = np.zeros((L, 4))
        sources["reuse"] = "none given or found (lift 0)"
    elif isinstance(reuse, (int, float)) and not isinstance(reuse, bool):
        lifts = np.full((L, 4), np.nan)
        lifts[:, 0] = float(reuse)
        sources["reuse"] = f"given lag-1 lift {float(reuse)}"
    else:
        tr = reuse if isinstance(reuse, Trace) else load_trace(reuse)
        lag, _ = reuse_curve(tr, max_lag=4)
        r0 = independent_reuse(expert_shares(tr.topk_ids, tr.dims.num_experts), tr.dims.top_k)
        src_lift = (lag - r0[:, None]) / (1.0 - r0[:, None])
        lifts = _depth_interp(np.clip(src_lift, 0.0, 1.0),
                              np.linspace(0.0, 1.0, tr.dims.num_layers), L)
        sources["reuse"] = (f"lag-1..4 lifts measured on {tr.label} ({tr.num_tokens} tokens;"
                            " lag 1 fitted), "
                            "interpolated over depth")
    return SyntheticTargets(shares=shares, reuse_lift=lifts[:, 0], reuse_lift_lags=lifts,
                            nmi_pairs=nmi_pairs, sources=sources)


def reuse_target(targets: SyntheticTargets, top_k: int, lag: int = 1) -> np.ndarray:
    """[L] target reuse P(e in S_{t+lag} | e in S_t) for a model with these shares (lag 1..4)."""
    if not 1 <= lag <= targets.reuse_lift_lags.shape[1]:
        raise ValueError(f"lag: must be in [1, {targets.reuse_lift_lags.shape[1]}], got {lag}")
    r0 = independent_reuse(targets.shares, top_k)
    return r0 + targets.reuse_lift_lags[:, lag - 1] * (1.0 - r0)


def _topk_ranked(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest along the last axis, best first."""
    part = np.argpartition(-scores, k - 1, axis=-1)[..., :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=-1), axis=-1)
    return np.take_along_axis(part, order, axis=-1)


def _sample_independent(logits: np.ndarray, n: int, k: int, rng: np.random.Generator,
                        topics: np.ndarray) -> np.ndarray:
    """[n, L, K] tokens drawn independently given their topics (no temporal copying)."""
    num_layers = logits.shape[0]
    out = np.empty((n, num_layers, k), np.int64)
    for l in range(num_layers):
        sc = logits[l, topics] + rng.gumbel(size=(n, logits.shape[2])).astype(np.float32)
        out[:, l] = _topk_ranked(sc, k)
    return out


def _sample_stream(logits: np.ndarray, rho: np.ndarray, n: int, k: int,
                   rng: np.random.Generator, stay: float) -> np.ndarray:
    """[n, L, K] one autoregressive stream with topic persistence and expert copying."""
    num_layers, num_topics, num_experts = logits.shape
    out = np.empty((n, num_layers, k), np.int64)
    rows = np.arange(num_layers)[:, None]
    topic = int(rng.integers(num_topics))
    chunk = 256
    for t0 in range(0, n, chunk):
        m = min(chunk, n - t0)
        gum = rng.gumbel(size=(m, num_layers, num_experts)).astype(np.float32)
        keep_u = rng.random((m, num_layers, k))
        switch = rng.random(m) >= stay
        new_topics = rng.integers(num_topics, size=m)
        for i in range(m):
            t = t0 + i
            if switch[i]:
                topic = int(new_topics[i])
            sc = logits[:, topic, :] + gum[i]
            if t > 0:
                boosted = sc.copy()
                keep = keep_u[i] < rho[:, None]
                prev = out[t - 1]
                boosted[np.broadcast_to(rows, prev.shape)[keep], prev[keep]] += 1e4
                part = np.argpartition(-boosted, k - 1, axis=1)[:, :k]
            else:
                part = np.argpartition(-sc, k - 1, axis=1)[:, :k]
            order = np.argsort(-np.take_along_axis(sc, part, axis=1), axis=1)
            out[t] = np.take_along_axis(part, order, axis=1)
    return out


@dataclass(frozen=True, slots=True)
class SyntheticModel:
    """The fitted generator: logits [L, C, E], copy probabilities rho [L], topic persistence."""

    logits: np.ndarray
    rho: np.ndarray
    topic_stay: float
    sigma: float
    targets: SyntheticTargets

    def sample(self, num_tokens: int, top_k: int, rng: np.random.Generator) -> np.ndarray:
        """[num_tokens, L, top_k] one autoregressive stream."""
        return _sample_stream(self.logits, self.rho, num_tokens, top_k, rng, self.topic_stay)


def _model_nmi(logits: np.ndarray, pairs: Sequence[tuple[int, int, float]], top_k: int,
               seed: int, num_tokens: int = 20000) -> list[float]:
    """Rank-paired normalised MI of the generator's layer pairs, from num_tokens independent
    tokens (only the layers involved are sampled: cheap enough for 10^5 pairs per estimate)."""
    layers = sorted({l for a, b, _ in pairs for l in (a, b)})
    r = np.random.default_rng([seed, 3])  # common random numbers across calls
    topics = r.integers(logits.shape[1], size=num_tokens)
    ids = _sample_independent(logits[layers], num_tokens, top_k, r, topics)
    pos = {l: i for i, l in enumerate(layers)}
    return [crosslayer_nmi(rank_pair_counts(ids[:, pos[a]], ids[:, pos[b]], logits.shape[2]))
            for a, b, _ in pairs]


def fit_synthetic(dims: ModelDims, targets: SyntheticTargets, seed: int = 0,
                  sample_tokens: int = 3000) -> SyntheticModel:
    """Fit sigma (co-occurrence), the popularity correction and rho (reuse) to the targets."""
    rng = np.random.default_rng([seed, 2])
    L, E, K = dims.num_layers, dims.num_experts, dims.top_k
    z = rng.standard_normal((L, _TOPICS, E)).astype(np.float32)
    lp = np.log(targets.shares).astype(np.float32)

    def build(sigma: float) -> np.ndarray:
        return (lp[:, None, :] + sigma * z).astype(np.float32)

    sigma = 0.0
    if targets.nmi_pairs:
        want = float(np.mean([v for _, _, v in targets.nmi_pairs]))
        lo, hi = 0.0, 3.0
        for _ in range(7):  # bisection: the MI grows with sigma
            mid = 0.5 * (lo + hi)
            got = float(np.mean(_model_nmi(build(mid), targets.nmi_pairs, K, seed)))
            lo, hi = (mid, hi) if got < want else (lo, mid)
        sigma = 0.5 * (lo + hi)
    r = np.random.default_rng([seed, 4])
    for _ in range(3):  # undo Plackett-Luce flattening and topic mixing of the marginals
        topics = r.integers(_TOPICS, size=sample_tokens)
        sample = _sample_independent(build(sigma), sample_tokens, K, r, topics)
        got_shares = expert_shares(sample, E)
        lp = lp + 0.8 * np.log(targets.shares / np.maximum(got_shares, 1e-9)).astype(np.float32)
    logits = build(sigma)
    # rho: lag-1 reuse R1 = rho + (1 - rho) * R0' where R0' is the reuse without copying
    want_r1 = reuse_target(targets, K)
    rho = np.zeros(L)
    for _ in range(2):
        ids = _sample_stream(logits, rho, sample_tokens, K, np.random.default_rng([seed, 5]),
                             _TOPIC_STAY)
        r1 = reuse_curve([ids], E, max_lag=1)[0][:, 0]
        r_nocopy = (r1 - rho) / np.maximum(1.0 - rho, 1e-9)
        rho = np.clip((want_r1 - r_nocopy) / np.maximum(1.0 - r_nocopy, 1e-9), 0.0, 0.95)
    return SyntheticModel(logits=logits, rho=rho, topic_stay=_TOPIC_STAY, sigma=sigma,
                          targets=targets)


def _shared_data(rel: str) -> Path | None:
    from moespac_vllm.config import shared_data_dir

    root = shared_data_dir()
    if root is not None and (root / rel).is_file():
        return root / rel
    log.warning("synthetic trace: %s not found (set MOESPAC_DATA_DIR); running uncalibrated", rel)
    return None


@functools.lru_cache(maxsize=8)
def _fitted(dims: ModelDims, seed: int, stats: str | None, reuse: str | float | None,
            domain: str) -> SyntheticModel:
    """Fitting costs seconds; repeated traces of one configuration reuse the fit."""
    return fit_synthetic(dims, synthetic_targets(dims, seed, stats, reuse, domain), seed)


def synthetic_trace(
    dims: ModelDims = QWEN3_30B_A3B,
    num_steps: int = 512,
    k: int = 8,
    seed: int = 0,
    stats: str | Path | None = "auto",
    reuse: str | Path | Trace | float | None = "auto",
    acceptance: float | int = 0.8,
    draft_agreement: float | None = None,
    num_requests: int = 1,
    domain: str = "c4",
) -> Trace:
    """A SYNTHETIC trace at `dims` scale (default Qwen3-30B-A3B): an autoregressive stream per
    request from the calibrated generator (see the comment above `SyntheticTargets`), then
    verification windows of 1 + k tokens by `windows_from_autoregressive` (k = 0: plain decode).
    About `num_steps` steps in all. meta.synthetic is True and meta.notes holds the targets
    and what the generator achieved on this very trace.
    `stats` / `reuse` = "auto": the OLMoE routing stats and the Mixtral HumanEval decode trace
    from the shared data folder ($MOESPAC_DATA_DIR, else ../shared/data beside the checkout);
    when absent the generator runs uncalibrated (uniform popularity, no co-occurrence, no extra
    reuse), logs a warning and says so in meta.notes["sources"]."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps: must be a positive integer, got {num_steps!r}")
    if isinstance(num_requests, bool) or not isinstance(num_requests, int) or num_requests < 1:
        raise ValueError(f"num_requests: must be a positive integer, got {num_requests!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k: must be an integer >= 0, got {k!r}")
    if stats == "auto":
        stats = _shared_data("olmoe-mixtral-routing-stats/olmoe_1b_7b_0924_routing_stats.npz")
    if reuse == "auto":
        reuse = _shared_data("mixtral-8x7b-routing/humaneval_2_routing.jsonl")
    if isinstance(reuse, Trace):
        model = fit_synthetic(dims, synthetic_targets(dims, seed, stats, reuse, domain), seed)
    else:
        model = _fitted(dims, seed, None if stats is None else str(stats),
                        None if reuse is None else (float(reuse) if isinstance(reuse, (int, float))
                                                    else str(reuse)), domain)
    targets = model.targets
    rng = np.random.default_rng([seed, 5])
    if k == 0:
        tokens_per_step = 1.0
    elif isinstance(acceptance, int):
        tokens_per_step = acceptance + 1.0
    else:  # expected accepted drafts + the bonus token
        tokens_per_step = sum(acceptance ** i for i in range(k + 1))
    per_request = max(2, int(math.ceil(num_steps * tokens_per_step / num_requests)))
    rec = TraceRecorder(dims, source="synthetic-qwen3-scale", synthetic=True,
                        modelled=("all_routing",))
    streams = []
    for r in range(num_requests):
        ids = model.sample(per_request, dims.top_k, rng)
        streams.append(ids)
        for t in range(per_request):
            rec.add_step(StepKind.DECODE, ids[t:t + 1], seq_id=r,
                         token_modelled=np.ones(1, bool))
    base = rec.build()
    lag, within = reuse_curve(streams, dims.num_experts, max_lag=4)
    all_ids = np.concatenate(streams)
    # the MI estimate needs ~10^5 pairs: measured on the fitted model, not on this short trace
    got_nmi = _model_nmi(model.logits, targets.nmi_pairs, dims.top_k, seed + 1)
    got_shares = expert_shares(all_ids, dims.num_experts)
    notes = {
        "generator": {"topics": _TOPICS, "topic_stay": model.topic_stay, "sigma": model.sigma,
                      "rho_mean": float(model.rho.mean()), "seed": seed, "domain": domain},
        "sources": targets.sources,
        "target": {"skew_mean": float(targets.skew.mean()),
                   "reuse_lag1_mean": float(reuse_target(targets, dims.top_k).mean()),
                   "reuse_lag_1to4_mean": [float(reuse_target(targets, dims.top_k, d).mean())
                                           for d in range(1, 5)],
                   "nmi": [v for _, _, v in targets.nmi_pairs]},
        "achieved": {"skew_mean": float(share_skew(got_shares).mean()),
                     "reuse_lag1_mean": float(lag[:, 0].mean()),
                     "reuse_lag1_max_abs_dev": float(np.abs(
                         lag[:, 0] - reuse_target(targets, dims.top_k)).max()),
                     "reuse_lag_1to4_mean": [float(x) for x in lag.mean(axis=0)],
                     "reuse_within_1to4_mean": [float(x) for x in within.mean(axis=0)],
                     "nmi_model": got_nmi},
    }
    base = Trace(dims=base.dims, meta=TraceMeta(base.meta.source, True, ("all_routing",), notes),
                 kind=base.kind, seq_id=base.seq_id, num_accepted=base.num_accepted,
                 token_offsets=base.token_offsets, topk_ids=base.topk_ids,
                 token_modelled=base.token_modelled)
    if k == 0:
        return base
    return windows_from_autoregressive(base, k, acceptance, seed=seed,
                                       draft_agreement=draft_agreement)
