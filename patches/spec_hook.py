"""Step boundaries and the speculative signal: wraps vLLM's model runners, V1 and V2.

One engine step is `execute_model(scheduler_output)` (the target forward: prefill chunks, plain
decode, or verification of 1 + k draft tokens per request) followed by `sample_tokens(...)`, which
samples / rejection-samples and then runs the drafter. The two runners differ in how the drafter
is called:

- V1 (`vllm.v1.worker.gpu_model_runner.GPUModelRunner`, and the CPU runner that subclasses it):
  `sample_tokens` calls `self.propose_draft_token_ids(scheduler_output, sampled_token_ids, ...)`.
- V2 (`vllm.v1.worker.gpu.model_runner.GPUModelRunner`, vLLM's default for MoE models on CUDA, and
  `vllm.v1.worker.cpu.model_runner.CPUModelRunner` under `VLLM_USE_V2_MODEL_RUNNER=1`):
  `sample_tokens` calls `self.speculator.propose(input_batch, ...)`, whatever the method
  (draft_model, eagle/eagle3, mtp, ngram, ...: every speculator subclasses `BaseSpeculator`).

We wrap, on both classes (signatures checked at install against the installed vLLM):
- `execute_model`: a `StepContext` from the public `SchedulerOutput` (tokens and draft tokens per
  request) opens the step on the model's `OffloadRuntime`.
- the drafter (V1 `propose_draft_token_ids`; V2 `speculator.propose`, wrapped on the runner's own
  speculator instance when the runner is first bound): the verification is over, so the step is
  closed BEFORE the drafter runs (prefetch copies overlap the draft phase) and a DRAFT context is
  published; a draft model's MoE layers then feed their routing to the engine.
- `sample_tokens`: closes the step if the drafter did not run (no speculation, or it skipped).

Accepted-token counts without a host sync. Under async scheduling (vLLM's default) the sampled ids
are still on the device when the step closes; reading them there would stall the CPU on the GPU.
vLLM copies them to the host itself (`AsyncModelRunnerOutput.get_output()`: V1's
`AsyncGPUModelRunnerOutput`, V2's `AsyncOutput`), so the hook wraps `get_output` on the output
object `sample_tokens` returned and counts the accepted tokens there; a synchronous
`ModelRunnerOutput` is counted at once. A step's count is handed to the engine at the next step
boundary (`end_step(credited)`): totals are exact, attribution lags one step under async
scheduling. The same per-request counts feed the draft-length governor's acceptance estimate.

Draft length (`draft_length: adaptive`, V1 runner, synchronous scheduling): the drafter runs at
the governor's k for the step (`patches/draft_length.py`, which says how and where not).
"""
from __future__ import annotations

import functools
import inspect
import logging
import threading
import weakref
from typing import Any

import torch

from moespac_vllm.patches import draft_length
from moespac_vllm.step_context import Phase, StepContext

logger = logging.getLogger("moespac_vllm.spec_hook")

_installed = False
_lock = threading.Lock()
_RT_ATTR = "_moespac_runtime"
_MISSING = object()

V1_RUNNER = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"
V2_RUNNER = "vllm.v1.worker.gpu.model_runner:GPUModelRunner"
V2_SPECULATOR = "vllm.v1.worker.gpu.spec_decode.speculator:BaseSpeculator"
# (class, method, leading parameters the wrapper relies on)
V1_METHODS = (("execute_model", ("self", "scheduler_output")),
              ("propose_draft_token_ids", ("self", "scheduler_output", "sampled_token_ids")),
              ("sample_tokens", ("self",)))
V2_METHODS = (("execute_model", ("self", "scheduler_output")),
              ("sample_tokens", ("self",)))
V2_PROPOSE_PARAMS = ("self", "input_batch")


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
    `sampled` is a list of host id lists (ModelRunnerOutput.sampled_token_ids), or a [B, 1 + k]
    int tensor with -1 placeholders (tests; a device tensor would need a host sync)."""
    if sampled is None:
        return 0
    if isinstance(sampled, torch.Tensor):
        if sampled.numel() == 0:
            return 0
        valid = (sampled >= 0).sum(dim=-1) if sampled.dim() == 2 else (sampled >= 0).long()
        return int(torch.clamp(valid - 1, min=0).sum().item())
    return sum(max(len(ids) - 1, 0) for ids in sampled)


# ---- accepted counts, credited at the next boundary ------------------------------------------
_credit: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()
_credit_lock = threading.Lock()


def credit_accepted(rt: Any, n: int) -> None:
    """Add `n` accepted tokens (read on the host) for `rt`'s next step boundary."""
    if n:
        with _credit_lock:
            _credit[rt] = _credit.get(rt, 0) + int(n)


def take_credit(rt: Any) -> int:
    with _credit_lock:
        return _credit.pop(rt, 0)


def close_step(rt: Any) -> None:
    """End `rt`'s open step with the accepted tokens credited so far (kept for the next step
    when no step is open)."""
    if rt.step_open:
        rt.end_step(take_credit(rt))


def _count_on_host(rt: Any, out: Any, proposed: dict[str, int] | None = None) -> Any:
    """Count the accepted tokens of a runner output where vLLM has them on the host; with
    `proposed` (req_id -> drafts verified this step) also hand the governor each request's
    (proposed, accepted)."""
    from vllm.v1.outputs import AsyncModelRunnerOutput

    def feed(result: Any, ids: Any) -> None:
        credit_accepted(rt, accepted_tokens(ids))
        if proposed and isinstance(ids, list):
            rt.observe_drafts(draft_length.verified_drafts(result.req_ids, ids, proposed))

    if isinstance(out, AsyncModelRunnerOutput):
        get_output = out.get_output  # bound: V1 AsyncGPUModelRunnerOutput / V2 AsyncOutput

        def counted_get_output() -> Any:
            result = get_output()  # vLLM's own device->host copy (its event sync)
            feed(result, getattr(result, "sampled_token_ids", None))
            return result

        out.get_output = counted_get_output  # this object only
    else:
        ids = getattr(out, "sampled_token_ids", None)
        if isinstance(ids, list):
            feed(out, ids)
    return out


# ---- binding a runner to its runtime ---------------------------------------------------------
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
            speculator = getattr(runner, "speculator", None)  # V2 runners only
            if spec is not None:
                rt.spec_method = str(spec.method)
                rt.num_spec_tokens = int(spec.num_speculative_tokens or 0)
                v2 = speculator is not None
                draft_length.bind(runner, rt, method=rt.spec_method, k_max=rt.num_spec_tokens,
                                  v2=v2, async_scheduling=not v2 and bool(
                                      runner.use_async_scheduling))
            if speculator is not None:  # V2: the drafter of every method is `speculator.propose`
                _wrap_propose(speculator, rt)
    return rt


def _wrap_propose(speculator: Any, rt: Any) -> None:
    """Close the step before a V2 speculator drafts (wraps this instance's bound method)."""
    original = speculator.propose
    if getattr(original, "_moespac_wrapped", False):
        return
    have = tuple(inspect.signature(type(speculator).propose).parameters)
    if have[: len(V2_PROPOSE_PARAMS)] != V2_PROPOSE_PARAMS:
        raise TypeError(f"moespac: vllm {type(speculator).__name__}.propose{have} no longer "
                        f"starts with {V2_PROPOSE_PARAMS}; update patches/spec_hook.py")

    @functools.wraps(original)
    def propose(*args: Any, **kwargs: Any) -> Any:
        close_step(rt)
        rt.mark_draft_phase()
        return original(*args, **kwargs)

    propose._moespac_wrapped = True  # type: ignore[attr-defined]
    speculator.propose = propose


def _wrap(cls: type, name: str, params: tuple[str, ...], make: Any) -> None:
    original = cls.__dict__.get(name)
    if original is None or not callable(original):
        raise AttributeError(f"moespac: vllm {cls.__module__}.{cls.__name__}.{name} is gone; "
                             "update patches/spec_hook.py")
    have = tuple(inspect.signature(original).parameters)
    if have[: len(params)] != params:
        raise TypeError(f"moespac: vllm {cls.__module__}.{cls.__name__}.{name}{have} no longer "
                        f"starts with {params}; update patches/spec_hook.py")
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
            seam = draft_length.seam_of(self)
            if seam is not None:
                seam.begin(scheduler_output, ctx)
        return original(self, scheduler_output, *args, **kwargs)

    return execute_model


def _propose_draft_token_ids(original: Any) -> Any:
    def propose_draft_token_ids(self: Any, scheduler_output: Any, sampled_token_ids: Any,
                                *args: Any, **kwargs: Any) -> Any:
        rt = _runtime(self)
        if rt is not None:
            close_step(rt)  # never reads sampled_token_ids: a device tensor
            rt.mark_draft_phase()
            seam = draft_length.seam_of(self)
            if seam is not None:  # the drafter at the governor's k
                return seam.propose(original, self, scheduler_output, sampled_token_ids, args,
                                    kwargs)
        return original(self, scheduler_output, sampled_token_ids, *args, **kwargs)

    return propose_draft_token_ids


def _sample_tokens(original: Any) -> Any:
    def sample_tokens(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        rt = _runtime(self)
        if rt is not None:
            close_step(rt)  # the drafter did not run (or skipped this step)
            if out is not None:
                seam = draft_length.seam_of(self)
                _count_on_host(rt, out, seam.proposed if seam is not None else None)
        return out

    return sample_tokens


def _import(qualname: str) -> type:
    import importlib

    module, _, name = qualname.partition(":")
    return getattr(importlib.import_module(module), name)


def runner_classes() -> dict[str, type]:
    """The runner classes hooked in the installed vLLM ("v1", and "v2" where it exists)."""
    out = {"v1": _import(V1_RUNNER)}
    try:
        out["v2"] = _import(V2_RUNNER)
    except ImportError as e:  # vLLM without Model Runner V2 (not 0.32/0.33)
        logger.debug("moespac: no Model Runner V2 in this vLLM (%s)", e)
    return out


def install() -> None:
    """Wrap the runner methods once per process (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        classes = runner_classes()
        # the draft-length seam reads vLLM's Dynamic SD field: check it before wrapping
        draft_length.check_vllm(classes["v1"])
        for name, params in V1_METHODS:
            make = {"execute_model": _execute_model, "sample_tokens": _sample_tokens,
                    "propose_draft_token_ids": _propose_draft_token_ids}[name]
            _wrap(classes["v1"], name, params, make)
        if "v2" in classes:
            for name, params in V2_METHODS:
                make = {"execute_model": _execute_model, "sample_tokens": _sample_tokens}[name]
                _wrap(classes["v2"], name, params, make)
            base = _import(V2_SPECULATOR)
            have = tuple(inspect.signature(base.propose).parameters)
            if have[: len(V2_PROPOSE_PARAMS)] != V2_PROPOSE_PARAMS:
                raise TypeError(f"moespac: vllm BaseSpeculator.propose{have} no longer starts "
                                f"with {V2_PROPOSE_PARAMS}; update patches/spec_hook.py")
        _installed = True


__all__ = ["accepted_tokens", "close_step", "credit_accepted", "install", "runner_classes",
           "step_context_from", "take_credit"]
