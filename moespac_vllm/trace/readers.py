"""Readers: the public Mixtral-8x7B routing JSONL (shared/data/mixtral-8x7b-routing) and
`load_trace`, which auto-detects that or our npz.

Out: a plain prefill/decode `Trace` (one token per decode step, `seq_id` = problem id); what the
reader had to trim or fill is in `meta.notes` / `meta.modelled`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from moespac_vllm.trace.format import MIXTRAL_8X7B, ModelDims, StepKind, Trace
from moespac_vllm.trace.recorder import TraceRecorder


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
