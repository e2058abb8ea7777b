"""Offline batch generation through vLLM with the moespac plugin: the runner behind `moespac generate`.

`run_generate(GenerateRequest) -> GenerateResult`: builds `vllm.LLM` (enforce_eager on CPU,
speculative_config for draft_model / ngram, additional_config={"moespac": {...}}), generates greedily
for a list of prompts, and reads back throughput, vLLM's spec-decode counters and the plugin's
stats line.

The plugin is switched by `VLLM_PLUGINS`, which vLLM reads when it first loads plugins, so
`plugin_env()` must be applied to os.environ before vLLM is imported (the CLI does that).
`VLLM_ENABLE_V1_MULTIPROCESSING=0` keeps the engine in this process (start ~10 s instead of ~26 s on
2 cores) and lets `stats_line()` read the plugin's statistics; with multiprocessing on, the engine
core runs elsewhere and the line reports only this process's view.

Prompt sources (`load_prompts`): a text file (one prompt per line) or JSONL (a "prompt", "question",
"instruction" or "turns" field), or a named data set read from the shared data folder
(`MOESPAC_DATA_DIR`, else `../shared/data` beside the checkout): spec-bench, humaneval, gsm8k,
alpaca, sharegpt. Nothing is copied into the repository.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moespac_vllm.config import shared_data_dir

PLUGIN_NAME = "moespac"
DATASETS: dict[str, tuple[str, str]] = {
    # name -> (relative path under the data dir, field holding the prompt)
    "spec-bench": ("spec-bench/question.jsonl", "turns"),
    "humaneval": ("humaneval/HumanEval.jsonl.gz", "prompt"),
    "gsm8k": ("gsm8k/test.jsonl", "question"),
    "alpaca": ("alpaca-eval/alpaca_eval_instructions.jsonl", "instruction"),
    "sharegpt": ("sharegpt-sample/sharegpt_v3_first_turns_2000.jsonl", "prompt"),
}
DEFAULT_PROMPTS = (
    "def fibonacci(n):",
    "The standard library module for regular expressions",
    "class Path:\n    \"\"\"",
    "Return the list of",
)
CPU_KV_CACHE_BYTES = 512 << 20
_PROMPT_FIELDS = ("prompt", "question", "instruction", "text", "turns")


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    model: str
    prompts: tuple[str, ...]
    draft: str | None = None  # draft model dir: speculative method draft_model
    ngram: bool = False  # speculative method ngram
    num_speculative_tokens: int = 3
    max_tokens: int = 32
    moespac: Mapping[str, Any] = field(default_factory=dict)  # additional_config["moespac"]
    seed: int = 0
    max_model_len: int = 1024
    # Bytes for the KV cache. On the CPU backend vLLM otherwise reserves gpu_memory_utilization
    # (0.92) of the node's memory and refuses to start on a shared machine; the tiny models need
    # a few MB. None: CPU_KV_CACHE_BYTES on CPU, vLLM's default on a GPU.
    kv_cache_memory_bytes: int | None = None

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model: a model directory or name is required")
        if not self.prompts:
            raise ValueError("prompts: no prompts to generate from")
        if self.draft and self.ngram:
            raise ValueError("draft: give either a draft model or --ngram, not both")
        if self.kv_cache_memory_bytes is not None and (
                isinstance(self.kv_cache_memory_bytes, bool)
                or not isinstance(self.kv_cache_memory_bytes, int)
                or self.kv_cache_memory_bytes < 1):
            raise ValueError(f"kv_cache_memory_bytes: must be a positive integer, got "
                             f"{self.kv_cache_memory_bytes!r}")
        for name in ("num_speculative_tokens", "max_tokens", "max_model_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: must be a positive integer, got {v!r}")
        if not isinstance(self.moespac, Mapping):
            raise ValueError(f"moespac_config: must be a JSON object, got {self.moespac!r}")

    @property
    def speculative_config(self) -> dict[str, Any] | None:
        if self.draft:
            return {"method": "draft_model", "model": self.draft,
                    "num_speculative_tokens": self.num_speculative_tokens}
        if self.ngram:
            return {"method": "ngram", "num_speculative_tokens": self.num_speculative_tokens,
                    "prompt_lookup_min": 1, "prompt_lookup_max": 4}
        return None


@dataclass(frozen=True, slots=True)
class Acceptance:
    """vLLM's spec-decode counters over the run (vllm:spec_decode_* metrics)."""

    num_drafts: int
    num_draft_tokens: int
    num_accepted_tokens: int

    @property
    def rate(self) -> float:
        """Accepted draft tokens / proposed draft tokens."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verification step: 1 + accepted per draft."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0


@dataclass(frozen=True, slots=True)
class GenerateResult:
    prompts: tuple[str, ...]
    texts: tuple[str, ...]
    output_token_ids: tuple[tuple[int, ...], ...]
    num_output_tokens: int
    elapsed_s: float
    acceptance: Acceptance | None  # None without speculative decoding
    plugin_line: str
    vllm_version: str

    @property
    def tokens_per_s(self) -> float:
        return self.num_output_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


# ---- environment -------------------------------------------------------------------------
def plugin_env(enabled: bool, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The VLLM_PLUGINS value that enables (adds `moespac` to the list) or disables (removes it)
    the plugin, keeping any other plugins the user named. Unset + disabled -> "" (vLLM reads that
    as an allow-list matching no plugin)."""
    env = os.environ if environ is None else environ
    raw = env.get("VLLM_PLUGINS")
    names = [n.strip() for n in raw.split(",") if n.strip()] if raw is not None else None
    if enabled:
        names = [PLUGIN_NAME] if names is None else [*names, PLUGIN_NAME]
    else:
        names = [] if names is None else [n for n in names if n != PLUGIN_NAME]
    return {"VLLM_PLUGINS": ",".join(dict.fromkeys(names))}


# ---- prompts ---------------------------------------------------------------------------------
data_dir = shared_data_dir  # where the prompt sets are read from


def _prompt_of(row: Any, path: Path, lineno: int, key: str | None) -> str:
    if isinstance(row, str):
        return row
    if not isinstance(row, dict):
        raise ValueError(f"prompts: {path}:{lineno}: expected a JSON object or string")
    keys = (key,) if key else _PROMPT_FIELDS
    for k in keys:
        v = row.get(k)
        if isinstance(v, list) and v and isinstance(v[0], str):
            return v[0]  # spec-bench "turns": the first turn
        if isinstance(v, str):
            return v
    raise ValueError(f"prompts: {path}:{lineno}: no prompt field (looked for {', '.join(keys)})")


def _read_prompt_file(path: Path, key: str | None, limit: int) -> list[str]:
    if not path.is_file():
        raise ValueError(f"prompts: {path} is not a file")
    opener = gzip.open if path.suffix == ".gz" else open
    jsonl = path.name.endswith((".jsonl", ".jsonl.gz", ".json"))
    out: list[str] = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if jsonl:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"prompts: {path}:{lineno}: not JSON ({e.msg})") from None
                out.append(_prompt_of(row, path, lineno, key))
            else:
                out.append(line.rstrip("\n").replace("\\n", "\n"))
            if len(out) >= limit:
                break
    if not out:
        raise ValueError(f"prompts: {path} holds no prompts")
    return out


def load_prompts(prompts_file: str | None = None, dataset: str | None = None,
                 limit: int = 8) -> tuple[str, ...]:
    """Prompts from a file, a named data set, or DEFAULT_PROMPTS; at most `limit`."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"num_prompts: must be a positive integer, got {limit!r}")
    if prompts_file and dataset:
        raise ValueError("prompts: give either --prompts FILE or --dataset NAME, not both")
    if prompts_file:
        return tuple(_read_prompt_file(Path(prompts_file), None, limit))
    if dataset:
        if dataset not in DATASETS:
            raise ValueError(f"dataset: unknown {dataset!r}; expected one of: "
                             f"{', '.join(DATASETS)}")
        root = data_dir()
        if root is None:
            raise ValueError("dataset: shared data folder not found; set MOESPAC_DATA_DIR")
        rel, key = DATASETS[dataset]
        return tuple(_read_prompt_file(root / rel, key, limit))
    return DEFAULT_PROMPTS[:limit]


# ---- the run ---------------------------------------------------------------------------------
def _acceptance(metrics: list[Any]) -> Acceptance:
    """The speculative-decoding counters of `LLM.get_metrics()` (vllm.v1.metrics.reader: every
    metric has a name; the three wanted ones are Counters, with a value)."""
    from vllm.v1.metrics.reader import Counter

    wanted = {"vllm:spec_decode_num_drafts": 0, "vllm:spec_decode_num_draft_tokens": 0,
              "vllm:spec_decode_num_accepted_tokens": 0}
    for m in metrics:
        if isinstance(m, Counter) and m.name in wanted:
            wanted[m.name] += int(m.value)
    return Acceptance(wanted["vllm:spec_decode_num_drafts"],
                      wanted["vllm:spec_decode_num_draft_tokens"],
                      wanted["vllm:spec_decode_num_accepted_tokens"])


def build_llm(req: GenerateRequest) -> Any:
    """The `vllm.LLM` for a request (imports vLLM)."""
    import torch
    from vllm import LLM

    kwargs: dict[str, Any] = dict(
        model=req.model,
        seed=req.seed,
        max_model_len=req.max_model_len,
        enforce_eager=not torch.cuda.is_available(),
        disable_log_stats=False,  # spec-decode acceptance comes from the stat loggers
        additional_config={PLUGIN_NAME: dict(req.moespac)},
    )
    if req.kv_cache_memory_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = req.kv_cache_memory_bytes
    elif not torch.cuda.is_available():
        kwargs["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
    if req.speculative_config is not None:
        kwargs["speculative_config"] = req.speculative_config
    return LLM(**kwargs)


def run_generate(req: GenerateRequest, llm: Any | None = None) -> GenerateResult:
    """Generate greedily for `req.prompts`; reuse `llm` if given (tests share one engine)."""
    from vllm import SamplingParams
    from vllm.version import __version__ as vllm_version

    engine = build_llm(req) if llm is None else llm
    params = SamplingParams(temperature=0.0, max_tokens=req.max_tokens, ignore_eos=True)
    before = _acceptance(engine.get_metrics())
    start = time.perf_counter()
    outputs = engine.generate(list(req.prompts), params, use_tqdm=False)
    elapsed_s = time.perf_counter() - start
    after = _acceptance(engine.get_metrics())
    acc = None
    if req.speculative_config is not None:
        acc = Acceptance(after.num_drafts - before.num_drafts,
                         after.num_draft_tokens - before.num_draft_tokens,
                         after.num_accepted_tokens - before.num_accepted_tokens)
    # The engine this call built ends with it: close the plugin's runtime now (final stats line,
    # trace, stats file) so nothing prints after the caller's report. A caller's engine lives on:
    # only write the trace recorded so far.
    _finish_recording(close=llm is None)
    texts = tuple(o.outputs[0].text for o in outputs)
    ids = tuple(tuple(o.outputs[0].token_ids) for o in outputs)
    return GenerateResult(
        prompts=req.prompts, texts=texts, output_token_ids=ids,
        num_output_tokens=sum(len(t) for t in ids), elapsed_s=elapsed_s, acceptance=acc,
        plugin_line=plugin_line(engine.llm_engine.vllm_config),
        vllm_version=str(vllm_version),
    )


def _finish_recording(close: bool) -> None:
    """Save the routing recorded so far (`record_trace`); with `close`, end the runtime. (The
    runtime also closes at interpreter exit, which is too late for output that must come last.)"""
    import sys

    if "moespac_vllm.patches.routed_experts" not in sys.modules:
        return
    from moespac_vllm.patches.routed_experts import latest_runtime

    rt = latest_runtime()
    if rt is None:
        return
    if close:
        rt.close()
    else:
        rt.save_trace()


def plugin_line(vllm_config: Any | None = None) -> str:
    """The plugin's stats line in this process, or why there is none."""
    import sys

    if "moespac_vllm.patches.plugin" not in sys.modules:
        return "moespac: plugin not loaded (VLLM_PLUGINS excludes moespac)"
    from moespac_vllm.patches import plugin

    return plugin.stats_line(vllm_config)


def result_record(req: GenerateRequest, res: GenerateResult,
                  command: list[str] | None = None) -> dict[str, Any]:
    """One JSON-serialisable record of a run (device, command, numbers) for benchmark tables."""
    from moespac_vllm.calibrate import describe_device

    device = describe_device()
    acc = res.acceptance
    return {
        "bench": "moespac-generate", "device": device, "vllm": res.vllm_version,
        "command": command, "model": req.model, "draft": req.draft, "ngram": req.ngram,
        "k": req.num_speculative_tokens if req.speculative_config else 0,
        "moespac": dict(req.moespac), "num_prompts": len(req.prompts),
        "max_tokens": req.max_tokens, "output_tokens": res.num_output_tokens,
        "elapsed_s": round(res.elapsed_s, 4), "tokens_per_s": round(res.tokens_per_s, 3),
        "acceptance_rate": None if acc is None else round(acc.rate, 4),
        "mean_accepted_length": None if acc is None else round(acc.mean_accepted_length, 4),
        "plugin": res.plugin_line,
        # identical outputs plugin on vs off are the contract: compare this across runs
        "output_sha256": hashlib.sha256(json.dumps(res.output_token_ids).encode()).hexdigest(),
    }


def format_report(req: GenerateRequest, res: GenerateResult, show: int = 3) -> str:
    """What `moespac generate` prints: a few generations, tokens/s, acceptance, the stats line."""
    lines: list[str] = []
    for i, (p, t) in enumerate(zip(res.prompts[:show], res.texts[:show])):
        lines.append(f"--- prompt {i}: {p[:80]!r}")
        lines.append(f"    output: {t[:200]!r}")
    lines.append(f"generated {res.num_output_tokens} tokens for {len(res.prompts)} prompts in "
                 f"{res.elapsed_s:.2f} s: {res.tokens_per_s:.1f} tokens/s "
                 f"(vLLM {res.vllm_version})")
    if res.acceptance is None:
        lines.append("speculative decoding: off")
    else:
        a = res.acceptance
        method = "draft_model" if req.draft else "ngram"
        lines.append(f"speculative decoding ({method}, k={req.num_speculative_tokens}): acceptance "
                     f"{a.rate:.3f} ({a.num_accepted_tokens}/{a.num_draft_tokens} draft tokens), "
                     f"mean accepted length {a.mean_accepted_length:.2f} over {a.num_drafts} drafts")
    lines.append(res.plugin_line)
    return "\n".join(lines)


__all__ = [
    "Acceptance",
    "DATASETS",
    "GenerateRequest",
    "GenerateResult",
    "build_llm",
    "format_report",
    "load_prompts",
    "plugin_env",
    "plugin_line",
    "result_record",
    "run_generate",
]
