"""With the plugin installed but not enabled, the server's /metrics carries no `moespac_` series
(the enabled case is checked in tests/test_server.py against the stats file)."""
from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from test_server import REPO, _free_port, _post, tiny_model, wait_healthy  # noqa: F401

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_not_enabled_server_exports_no_moespac_series(tiny_model, tmp_path):  # noqa: F811
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOESPAC_")}
    env["MOESPAC_ENABLE"] = "0"
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "moespac"), "serve", tiny_model, "--port",
             str(port), "--enforce-eager", "--dtype", "float32", "--max-model-len", "256",
             "--max-num-seqs", "2"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(server, base, log_path, 300)
        status, _ = _post(base + "/v1/completions", {"model": tiny_model, "prompt": "def f(x):",
                                                     "max_tokens": 4, "temperature": 0.0})
        assert status == 200
        with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
            text = r.read().decode()
        assert "vllm:" in text  # vLLM's own series are there (through the multiprocess dir)
        assert "moespac_" not in text
        log_text = log_path.read_text()
        assert "moespac: installed, not enabled" in log_text
        assert "moespac: offloading" not in log_text
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        finally:
            if server.poll() is None:
                server.kill()
