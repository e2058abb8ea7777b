"""The trace format: model dims, step kinds, provenance and the `Trace` arrays themselves.

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
    lookahead_ids int16  [N, L, K]  optional: cross-layer router lookahead (below)

Convention for the draft signal: step s's draft rows are the draft model's forwards that produced
the k draft tokens verified at step s (inputs: the last accepted token and the first k-1 drafts).

Convention for the lookahead: lookahead_ids[n, l] is the top-k of layer l's router applied to the
MoE input of layer l-1 for the same token n, i.e. a prediction of topk_ids[n, l] that exists
before layer l runs (same rank order, best first). Layer 0 has no layer before it: its row is
NO_LOOKAHEAD (-1) in every slot, and -1 appears nowhere else.

Every trace carries `TraceMeta`: its source, whether it is synthetic, and which parts are
modelled rather than recorded. Anything built from a synthetic or partly modelled trace must
report that label (`Trace.label`). `Trace.save` / `Trace.load` write and read our npz.
"""
from __future__ import annotations

import json
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np


FORMAT_VERSION = 1
# lookahead_ids at layer 0 (no earlier layer to predict it from)
NO_LOOKAHEAD = -1


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
    lookahead_ids: np.ndarray | None = None  # [T, L, K], NO_LOOKAHEAD at layer 0

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


def _as_lookahead(arr: Any, dims: ModelDims, num_tokens: int) -> np.ndarray:
    """lookahead_ids [N, L, K]: NO_LOOKAHEAD everywhere at layer 0, expert ids (no repeats per
    token) at layers 1..L-1; range-checked before narrowing."""
    name = "lookahead_ids"
    a = np.asarray(arr)
    if a.size and a.dtype.kind not in "iu":
        raise ValueError(f"{name}: expert ids must be integers, got dtype {a.dtype}")
    shape = (num_tokens, dims.num_layers, dims.top_k)
    if a.shape != shape:
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(a.shape)}")
    if a.size and np.any(a[:, 0] != NO_LOOKAHEAD):
        raise ValueError(f"{name}: layer 0 has no earlier layer and must be {NO_LOOKAHEAD} "
                         "throughout")
    rest = a[:, 1:]
    if rest.size and (rest.min() < 0 or rest.max() >= dims.num_experts):
        raise ValueError(f"{name}: expert ids at layers 1..{dims.num_layers - 1} must lie in "
                         f"[0, {dims.num_experts})")
    if rest.size and dims.top_k > 1:
        srt = np.sort(rest, axis=-1)
        if np.any(srt[..., 1:] == srt[..., :-1]):
            raise ValueError(f"{name}: an expert appears twice in one token's top-k")
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
    lookahead_ids: np.ndarray | None = None

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
        if self.lookahead_ids is not None:
            seta(self, "lookahead_ids", _as_lookahead(self.lookahead_ids, d, n))
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
    def has_lookahead(self) -> bool:
        return self.lookahead_ids is not None

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
            token_modelled=self.token_modelled[a:b], draft_topk_ids=dti, draft_logits=dlg,
            lookahead_ids=None if self.lookahead_ids is None else self.lookahead_ids[a:b])

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
            token_modelled=self.token_modelled[tok],
            lookahead_ids=None if self.lookahead_ids is None else self.lookahead_ids[tok], **kw)

    # ---- persistence ----------------------------------------------------------------------
    _ARRAYS = ("kind", "seq_id", "num_accepted", "token_offsets", "topk_ids", "topk_weights",
               "router_logits", "token_modelled", "draft_offsets", "draft_topk_ids",
               "draft_logits", "lookahead_ids")

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
