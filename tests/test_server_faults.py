"""A CPU expert worker error inside `moespac serve` (issue 14 item 2): the request whose step failed
is answered with an error naming nothing of ours to the client but logged with the layer, its
experts and the cause; the server keeps serving, and the next answers equal the ones before.

The fault is injected from outside the code under test: a `sitecustomize` on PYTHONPATH (every
vLLM process imports it) wraps the host expert kernel the offloaded layer calls
(`patches.routed_experts.StockCpuExpertsKernel`, stock's CPU experts on this CPU-only engine) so
that its next call raises MemoryError once a trigger file exists, and removes the file."""
from __future__ import annotations

import os
import re
import textwrap
import urllib.request

import pytest

from conftest import load_benchmark

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

INJECT = textwrap.dedent('''
    import importlib.abc, importlib.machinery, os, sys

    TRIGGER = os.environ["INJECT_CPU_FAULT_TRIGGER"]
    NAME = "moespac_vllm.patches.routed_experts"

    def _patch(module):
        cls = module.StockCpuExpertsKernel
        call = cls.__call__

        def failing_call(self, *args, **kwargs):
            if os.path.exists(TRIGGER):
                try:
                    os.remove(TRIGGER)
                except FileNotFoundError:
                    pass
                else:
                    raise MemoryError("injected: CPU expert worker out of memory")
            return call(self, *args, **kwargs)

        cls.__call__ = failing_call

    class _Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != NAME:
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None:
                return None
            exec_module = spec.loader.exec_module

            def run(module):
                exec_module(module)
                _patch(module)

            spec.loader.exec_module = run
            return spec

    sys.meta_path.insert(0, _Hook())
''')


def test_a_cpu_worker_error_fails_that_request_and_the_server_serves_on(tmp_path, monkeypatch):
    from moespac_vllm.models.tiny import make_tiny_model

    soak = load_benchmark("bench_soak")
    model = str(make_tiny_model(tmp_path / "qwen3", "qwen3_moe", draft=False,
                                moe_draft=True).target)
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(INJECT)
    trigger = tmp_path / "fail-next-call"
    monkeypatch.setenv("INJECT_CPU_FAULT_TRIGGER", str(trigger))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(inject)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    work = tmp_path / "run"
    work.mkdir()
    prompt = "def fibonacci(n):"
    server = soak.Server(model, soak.free_port(), work)
    code = None
    try:
        server.wait_healthy()
        before = soak.request(server.base, model, "completions", prompt)
        assert before[0] == 200 and before[1], before
        trigger.touch()
        failed = soak.request(server.base, model, "completions", prompt)
        assert not trigger.exists(), "the injected fault did not fire"
        assert failed[0] == 500, failed
        after = [soak.request(server.base, model, kind, prompt)
                 for kind in ("completions", "stream", "chat")]
        assert [a[0] for a in after] == [200, 200, 200], after
        assert after[0][1] == before[1] and after[1][1] == before[1], (before, after)
        with urllib.request.urlopen(server.base + "/health", timeout=10) as r:
            assert r.status == 200
        # what the server logged while serving (vLLM may log EngineDeadError while it shuts
        # down on SIGTERM; that is not the failed step)
        log = server.log_path.read_text()
    finally:
        code = server.stop()
    lines = [ln for ln in log.splitlines() if "a step failed and its" in ln]
    assert len(lines) == 1, lines
    assert re.search(r"request\(s\) were answered with an error; the engine serves on\. "
                     r"moespac: the CPU experts of MoE layer \d+ failed \(experts \[[\d, ]+\]\): "
                     r"MemoryError: injected: CPU expert worker out of memory", lines[0]), lines[0]
    assert "EngineDeadError" not in log and "EngineCore encountered a fatal error" not in log
    assert code in (0, -15), code
