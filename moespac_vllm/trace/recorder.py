"""`TraceRecorder`: builds a `Trace` step by step (the vLLM recorder, the GPU harness and the
readers feed it).

In: per step the [T, L, K] routed ids (whole, or layer by layer as a forward runs), optional
weights / logits, the draft-phase signal and the cross-layer router lookahead; out: one validated
`Trace` (`build`) or its npz (`save`).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moespac_vllm.trace.format import (
    NO_LOOKAHEAD,
    ModelDims,
    StepKind,
    Trace,
    TraceMeta,
    _offsets,
)


class TraceRecorder:
    """Append steps, then `build()` or `save(path)`.

    Two ways in: `add_step(...)` with whole [T, L, K] arrays, or layer by layer as a forward
    runs: `begin_step(kind)`, `record_layer(layer, topk_ids[T, K], weights)` for every layer,
    `end_step(num_accepted)`. Draft-phase routing (`record_draft_layer`) recorded between two
    steps belongs to the step that follows (the verification of those drafts). The lookahead
    (`record_lookahead(layer, ids)`, layers 1..L-1, format.py's convention) is all or nothing per
    step: a step that records it for one layer must record it for every layer but 0."""

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
        self._lookahead: list[np.ndarray | None] = []
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
                 draft_logits: np.ndarray | None = None,
                 lookahead_ids: np.ndarray | None = None) -> None:
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
        self._lookahead.append(None if lookahead_ids is None else np.asarray(lookahead_ids))

    def begin_step(self, kind: StepKind, seq_id: int = 0) -> None:
        if self._open is not None:
            raise ValueError("begin_step: the previous step was not ended")
        self._open = {"kind": kind, "seq_id": seq_id, "ids": {}, "weights": {}, "lookahead": {}}

    def record_layer(self, layer: int, topk_ids: np.ndarray,
                     topk_weights: np.ndarray | None = None) -> None:
        if self._open is None:
            raise ValueError("record_layer: no step is open (call begin_step)")
        if not 0 <= layer < self.dims.num_layers:
            raise ValueError(f"layer: {layer} out of range [0, {self.dims.num_layers})")
        self._open["ids"][layer] = np.array(topk_ids, copy=True)
        if topk_weights is not None:
            self._open["weights"][layer] = np.array(topk_weights, dtype=np.float32, copy=True)

    def record_lookahead(self, layer: int, topk_ids: np.ndarray) -> None:
        """[T, K] top-k of layer `layer`'s router applied to layer `layer`-1's MoE input, for the
        open step's tokens (layer 0 has no lookahead; it is filled with NO_LOOKAHEAD)."""
        if self._open is None:
            raise ValueError("record_lookahead: no step is open (call begin_step)")
        if not 1 <= layer < self.dims.num_layers:
            raise ValueError(f"layer: {layer} out of range [1, {self.dims.num_layers}) for a "
                             "lookahead")
        self._open["lookahead"][layer] = np.array(topk_ids, copy=True)

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
        la = None
        if st["lookahead"]:
            missing = [l for l in range(1, L) if l not in st["lookahead"]]
            if missing:
                raise ValueError(f"lookahead_ids: layers {missing[:5]} were not recorded in this "
                                 "step")
            la = np.full(ids.shape, NO_LOOKAHEAD, dtype=np.int64)
            for l in range(1, L):
                got = st["lookahead"][l]
                if got.shape != la[:, l].shape:
                    raise ValueError(f"lookahead_ids: layer {l} has shape {list(got.shape)}, "
                                     f"expected {list(la[:, l].shape)}")
                la[:, l] = got
        self.add_step(st["kind"], ids, w, None, num_accepted, st["seq_id"], None, dids, dlg, la)

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
            lookahead_ids=cat_optional(self._lookahead, "lookahead_ids"),
            token_modelled=(np.concatenate(self._modelled) if self._modelled
                            else np.zeros(0, bool)), **kw)

    def save(self, path: str | Path) -> Path:
        """Write the npz atomically: into a temporary file beside it, then renamed over it, so
        a failed or interrupted save (a full disk, a kill) leaves the previous file whole. The
        steps recorded so far (an open step is left out) go in; recording can go on after."""
        p = Path(path)
        if p.suffix != ".npz":
            p = p.with_name(p.name + ".npz")
        open_step, self._open = self._open, None
        try:
            trace = self.build()
        finally:
            self._open = open_step
        tmp = p.with_name(f".{p.name}.{os.getpid()}.partial.npz")
        try:
            trace.save(tmp)
            os.replace(tmp, p)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return p
