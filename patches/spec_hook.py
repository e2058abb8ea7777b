"""Step boundaries and the speculative signal: wraps three methods of vLLM's model runner.

vLLM v1 runs one engine step as `execute_model(scheduler_output)` (the target forward: prefill
chunks, plain decode, or verification of 1 + k draft tokens per request) followed by
`sample_tokens(...)`, which samples / rejection-samples and then calls
`propose_draft_token_ids(...)` (the drafter: a draft model's forwards, or n-gram lookup). We wrap:

- `execute_model`: build a `StepContext` from the scheduler output (tokens per request, draft
  tokens per request: public `SchedulerOutput` fields, never attention-metadata internals) and open
  the step on the model's `OffloadRuntime` (engine.begin_step, StepBoard publish).
- `propose_draft_token_ids`: the verification is over and the accepted counts are known (the
  sampled ids it receives): close the step (engine.end_step(num_accepted)) BEFORE the drafter runs,
  so prefetch copies overlap the draft phase; publish a DRAFT context. A draft model's MoE layers
  then feed their routing to the engine (routed_experts.py, `observe_draft`).
- `sample_tokens`: after it returns, close the step if the drafter did not run (no speculation,
  or the drafter skipped this step), with the accepted count from the runner output.

The same hook serves `draft_model`, `ngram` and, where the runner calls the same methods, `eagle`/
`mtp`. Without speculation the engine sees DECODE steps and the estimator runs autoregressively.
Each wrapper calls the original unchanged and fails loudly at install time if vLLM renamed it.
"""
from __future__ import annotations

import functools
import inspect
import logging
import threading
from typing import Any

import torch

from moespac_vllm.step_context import Phase, StepContext

logger = logging.getLogger("moespac_vllm.spec_hook")

_installed = False
_lock = threading.Lock()
_RT_ATTR = "_moespac_runtime"
_MISSING = object()


def step_context_from(scheduler_output: Any, step: int) -> StepContext | None:
    """StepContext of one scheduler step (None when nothing is scheduled)."""
    total = int(scheduler_output.total_num_scheduled_tokens)
    if total <= 0:
        return None
    per_req = scheduler_output.num_scheduled_tokens  # req_id -> tokens this step
    spec = scheduler_output.scheduled_spec_decode_tokens or {}  # req_id -> draft token ids
    tokens = tuple(int(n) for n in per_req.values())
    k = max((len(v) for v in spec.values()), default=0)
    prefill = decode = verify = 0
    for req_id, n in per_req.items():
        drafts = len(spec.get(req_id, ()))
        if n > 1 + drafts:
            prefill += 1  # a prompt (chunk): more tokens than 1 + its drafts
        elif drafts:
            verify += 1
        else:
            decode += 1
    if prefill and (decode or verify):
        phase = Phase.MIXED
    elif prefill:
        phase = Phase.PREFILL
    elif verify:
        phase = Phase.VERIFY
    else:
        phase = Phase.DECODE
    return StepContext(step=step, phase=phase, num_tokens=total, tokens_per_request=tokens,
                       num_draft_tokens=k)


def accepted_tokens(sampled: Any) -> int:
    """Accepted draft tokens in one step: per request, valid sampled ids minus the bonus one.
    `sampled` is [B, 1 + k] int tensor with -1 (or < 0) placeholders, or a list of id lists."""
    if sampled is None:
        return 0
    if isinstance(sampled, torch.Tensor):
        if sampled.numel() == 0:
            return 0
        valid = (sampled >= 0).sum(dim=-1) if sampled.dim() == 2 else (sampled >= 0).long()
        return int(torch.clamp(valid - 1, min=0).sum().item())
    return sum(max(len(ids) - 1, 0) for ids in sampled)


def _runtime(runner: Any) -> Any:
    rt = runner.__dict__.get(_RT_ATTR, _MISSING)
    if rt is _MISSING:
        from moespac_vllm.patches.routed_experts import runtime_of_model

        model = getattr(runner, "model", None)
        if model is None:
            return None  # not loaded yet: look again next time
        rt = runtime_of_model(model)
        runner.__dict__[_RT_ATTR] = rt
        if rt is not None:
            spec = getattr(runner, "speculative_config", None)
            if spec is not None:
                rt.spec_method = str(spec.method)
                rt.num_spec_tokens = int(spec.num_speculative_tokens or 0)
    return rt


def _wrap(cls: type, name: str, params: tuple[str, ...], make: Any) -> None:
    original = cls.__dict__.get(name)
    if original is None or not callable(original):
        raise AttributeError(f"moespac: vllm {cls.__name__}.{name} is gone; update "
                             "patches/spec_hook.py")
    have = tuple(inspect.signature(original).parameters)
    if have[: len(params)] != params:
        raise TypeError(f"moespac: vllm {cls.__name__}.{name}{have} no longer starts with "
                        f"{params}; update patches/spec_hook.py")
    if getattr(original, "_moespac_wrapped", False):
        return
    wrapper = functools.wraps(original)(make(original))
    wrapper._moespac_wrapped = True  # type: ignore[attr-defined]
    setattr(cls, name, wrapper)


def _execute_model(original: Any) -> Any:
    def execute_model(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        rt = _runtime(self)
        if rt is not None:
            ctx = step_context_from(scheduler_output, rt.next_step_index())
            if ctx is not None:
                rt.begin_step(ctx, explicit=True)
        return original(self, scheduler_output, *args, **kwargs)

    return execute_model


def _propose_draft_token_ids(original: Any) -> Any:
    def propose_draft_token_ids(self: Any, scheduler_output: Any, sampled_token_ids: Any,
                                *args: Any, **kwargs: Any) -> Any:
        rt = _runtime(self)
        if rt is not None:
            rt.end_step(accepted_tokens(sampled_token_ids))
            rt.mark_draft_phase()
        return original(self, scheduler_output, sampled_token_ids, *args, **kwargs)

    return propose_draft_token_ids


def _sample_tokens(original: Any) -> Any:
    def sample_tokens(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        rt = _runtime(self)
        if rt is not None:
            rt.end_step(accepted_tokens(getattr(out, "sampled_token_ids", None)))
        return out

    return sample_tokens


def install() -> None:
    """Wrap the runner methods once per process (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        _wrap(GPUModelRunner, "execute_model", ("self", "scheduler_output"), _execute_model)
        _wrap(GPUModelRunner, "propose_draft_token_ids",
              ("self", "scheduler_output", "sampled_token_ids"), _propose_draft_token_ids)
        _wrap(GPUModelRunner, "sample_tokens", ("self",), _sample_tokens)
        _installed = True


__all__ = ["accepted_tokens", "install", "step_context_from"]
