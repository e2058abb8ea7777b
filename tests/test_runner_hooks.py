"""The step hooks bind to the installed vLLM's real runner classes (V1 and Model Runner V2, and the
CPU runners that subclass them), check their signatures, close the step before any V2
speculator drafts, and count accepted tokens where vLLM has them on the host (async outputs too).

The runtime here is a recording fake of the runtime's step protocol (begin_step / end_step /
mark_draft_phase / next_step_index / step_open); the runner and output classes are vLLM's."""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.vllm]

pytest.importorskip("vllm")

from vllm.v1.outputs import AsyncModelRunnerOutput, ModelRunnerOutput  # noqa: E402
from vllm.v1.worker.gpu.spec_decode.speculator import BaseSpeculator  # noqa: E402

from moespac_vllm.patches import spec_hook  # noqa: E402


class StepRecorder:
    """The runtime's step protocol, recording calls."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.step_open = False
        self._open = False
        self._n = 0

    def next_step_index(self) -> int:
        self._n += 1
        return self._n - 1

    def begin_step(self, ctx, explicit: bool) -> None:
        self.calls.append(("begin", ctx.phase.value, explicit))
        self.step_open = self._open = True

    def end_step(self, num_accepted: int) -> None:
        if self.step_open:
            self.calls.append(("end", num_accepted))
        self.step_open = self._open = False

    def mark_draft_phase(self) -> None:
        self.calls.append(("draft",))


def test_hooks_bind_to_both_runner_classes_of_the_installed_vllm():
    from vllm.v1.worker.cpu.model_runner import CPUModelRunner as CpuV2
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner as CpuV1

    spec_hook.install()
    classes = spec_hook.runner_classes()
    assert set(classes) == {"v1", "v2"}
    assert classes["v1"].__module__ == "vllm.v1.worker.gpu_model_runner"
    assert classes["v2"].__module__ == "vllm.v1.worker.gpu.model_runner"
    for name, _ in spec_hook.V1_METHODS:
        assert getattr(classes["v1"].__dict__[name], "_moespac_wrapped", False), name
    for name, _ in spec_hook.V2_METHODS:
        assert getattr(classes["v2"].__dict__[name], "_moespac_wrapped", False), name
    # the CPU runners inherit the wrapped methods (neither overrides them)
    assert CpuV1.execute_model is classes["v1"].execute_model
    assert CpuV2.sample_tokens is classes["v2"].sample_tokens


def test_a_changed_upstream_signature_fails_at_install():
    class Runner:
        def execute_model(self, sched_out):  # renamed parameter
            return None

    with pytest.raises(TypeError, match="no longer starts with"):
        spec_hook._wrap(Runner, "execute_model", ("self", "scheduler_output"),
                        spec_hook._execute_model)
    with pytest.raises(AttributeError, match="is gone"):
        spec_hook._wrap(Runner, "sample_tokens", ("self",), spec_hook._sample_tokens)


class CountingSpeculator(BaseSpeculator):
    """A V2 speculator (vLLM's ABC) whose propose records that it ran."""

    def __init__(self, rt: StepRecorder) -> None:
        self.rt = rt

    def propose(self, input_batch, *args, **kwargs):
        self.rt.calls.append(("propose", input_batch))
        return torch.zeros(1, 3, dtype=torch.int64)

    def load_model(self, *args, **kwargs):  # pragma: no cover - not used
        pass

    def init_cudagraph_manager(self, cudagraph_mode):  # pragma: no cover - not used
        pass

    def capture(self):  # pragma: no cover - not used
        pass


def test_v2_speculator_propose_closes_the_step_before_drafting():
    rt = StepRecorder()
    spec = CountingSpeculator(rt)
    spec_hook._wrap_propose(spec, rt)
    spec_hook._wrap_propose(spec, rt)  # idempotent
    rt.step_open = rt._open = True
    spec_hook.credit_accepted(rt, 5)
    spec.propose("batch")
    assert rt.calls == [("end", 5), ("draft",), ("propose", "batch")]


class HostCopiedOutput(AsyncModelRunnerOutput):
    """vLLM's async-output ABC: get_output() is where vLLM copies the sampled ids to the host."""

    def __init__(self, sampled: list[list[int]]) -> None:
        self.sampled = sampled
        self.copies = 0

    def get_output(self) -> ModelRunnerOutput:
        self.copies += 1
        return ModelRunnerOutput(req_ids=[str(i) for i in range(len(self.sampled))],
                                 req_id_to_index={str(i): i for i in range(len(self.sampled))},
                                 sampled_token_ids=self.sampled)


def test_accepted_counts_survive_async_scheduling_without_a_host_sync():
    rt = StepRecorder()
    out = HostCopiedOutput([[5, 6, 7], [8], [1, 2]])  # 2 + 0 + 1 accepted
    assert spec_hook._count_on_host(rt, out) is out
    assert spec_hook.take_credit(rt) == 0  # nothing read before vLLM's own copy
    result = out.get_output()
    assert out.copies == 1 and result.sampled_token_ids == [[5, 6, 7], [8], [1, 2]]
    # credited at the next boundary, not lost because the step had closed already
    spec_hook.close_step(rt)
    assert rt.calls == [] and spec_hook.take_credit(rt) == 3
    spec_hook.credit_accepted(rt, 3)
    rt.step_open = rt._open = True
    spec_hook.close_step(rt)
    assert rt.calls == [("end", 3)]


def test_a_synchronous_output_is_counted_at_once():
    rt = StepRecorder()
    out = ModelRunnerOutput(req_ids=["a"], req_id_to_index={"a": 0},
                            sampled_token_ids=[[1, 2, 3, 4]])
    spec_hook._count_on_host(rt, out)
    assert spec_hook.take_credit(rt) == 3
