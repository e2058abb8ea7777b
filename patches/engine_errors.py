"""A failed offloaded layer fails its step's requests, not the engine.

vLLM 0.32/0.33 treats any exception out of `execute_model` as fatal: the engine core dies and
`vllm serve` stops answering. An offloaded layer can fail for a reason that belongs to one step
(its CPU expert worker raised, e.g. out of memory), and the layer then raises one RuntimeError
whose text starts with `FAILED_LAYER_MARKER` and names the layer, its experts and the cause
(`offload.OffloadedExperts`). This module wraps `EngineCore.step` / `step_with_batch_queue`
(LEDGER): such an error finishes exactly the requests of the failed batch with vLLM's own
`RequestStatus.FINISHED_ERROR` (the API answers them 500, as it does for a failed KV load), logs
the error once per failed step, and the engine serves the next requests. Every other exception
is re-raised untouched.

How the failed batch is known: vLLM runs the model inside `EngineCore.log_error_detail(
scheduler_output)`, a context manager around exactly the execution that raised; its wrapper keeps
that scheduler output for the step wrapper. The worker process survives the error (vLLM's
multiprocess executor turns it into a FAILURE reply whose text is the error's), and the next
scheduler output tells it to drop the finished requests. With a batch queue (async scheduling),
a batch already queued behind the failed one ran with the failed requests in it; their results
are ignored by the scheduler because those requests are finished.
"""
from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from moespac_vllm.offload import FAILED_LAYER_MARKER

logger = logging.getLogger("moespac_vllm.layer")
_FAILED_ATTR = "_moespac_failed_batch"
_installed = False


def is_failed_layer(err: BaseException) -> bool:
    """True for the offloaded layer's own step failure, directly or as the text of a worker
    process's FAILURE reply (vLLM wraps it in a RuntimeError quoting it)."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        if FAILED_LAYER_MARKER in str(e):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def scheduled_request_ids(scheduler_output: Any) -> list[str]:
    """The ids of every request a SchedulerOutput ran (new and cached)."""
    ids = [r.req_id for r in scheduler_output.scheduled_new_reqs]
    ids += list(scheduler_output.scheduled_cached_reqs.req_ids)
    return ids


def fail_batch(core: Any, scheduler_output: Any, err: BaseException) -> dict[int, Any]:
    """Finish the failed batch's requests with FINISHED_ERROR; returns the step's outputs
    ({client_index: EngineCoreOutputs}) carrying their ERROR finish."""
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason
    from vllm.v1.request import RequestStatus

    ids = scheduled_request_ids(scheduler_output)
    by_client: dict[int, list[str]] = {}
    for rid in ids:
        req = core.scheduler.requests.get(rid)
        if req is not None and not req.is_finished():
            by_client.setdefault(req.client_index, []).append(rid)
    failed = [r for v in by_client.values() for r in v]
    core.scheduler.finish_requests(failed, RequestStatus.FINISHED_ERROR)
    logger.error("moespac: a step failed and its %d request(s) were answered with an error; the "
                 "engine serves on. %s", len(failed), _first_line(err))
    return {client: EngineCoreOutputs(
        outputs=[EngineCoreOutput(rid, [], finish_reason=FinishReason.ERROR) for rid in rids],
        finished_requests=set(rids)) for client, rids in by_client.items()}


def _first_line(err: BaseException) -> str:
    e: BaseException | None = err
    while e is not None:
        for line in str(e).splitlines():
            i = line.find(FAILED_LAYER_MARKER)
            if i >= 0:
                return line[i:].rstrip("'\" ")
        e = e.__cause__ or e.__context__
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def install() -> bool:
    """Wrap EngineCore.log_error_detail, step and step_with_batch_queue once (LEDGER). Fails
    loudly if their signatures moved."""
    global _installed
    if _installed:
        return False
    from vllm.v1.engine.core import EngineCore

    expected = {"log_error_detail": ("self", "scheduler_output"), "step": ("self",),
                "step_with_batch_queue": ("self",)}
    for name, params in expected.items():
        got = tuple(inspect.signature(getattr(EngineCore, name)).parameters)
        if got != params:
            raise RuntimeError(f"moespac: vllm EngineCore.{name}{got} changed upstream (expected "
                               f"{params}); update patches/engine_errors.py")
    log_error_detail = EngineCore.log_error_detail
    step, step_bq = EngineCore.step, EngineCore.step_with_batch_queue

    @contextmanager
    def wrapped_log_error_detail(self: Any, scheduler_output: Any) -> Iterator[None]:
        try:
            with log_error_detail(self, scheduler_output):
                yield
        except Exception as e:
            if is_failed_layer(e):
                setattr(self, _FAILED_ATTR, scheduler_output)
            raise

    def failed_batch_fails_its_requests(original: Any) -> Any:
        def wrapped(self: Any) -> Any:
            try:
                return original(self)
            except Exception as e:
                batch = self.__dict__.pop(_FAILED_ATTR, None)
                if batch is None or not is_failed_layer(e):
                    raise
                return fail_batch(self, batch, e), True

        return wrapped

    EngineCore.log_error_detail = wrapped_log_error_detail
    EngineCore.step = failed_batch_fails_its_requests(step)
    EngineCore.step_with_batch_queue = failed_batch_fails_its_requests(step_bq)
    _installed = True
    return True
