"""The short soak (issue 14), one server start for three checks: `benchmarks/bench_soak.py` with
200 valid requests at concurrency 8 (completions, chat, streaming; repeated prompts compared with
stock vLLM's offline greedy), then bad requests (malformed JSON, negative / huge max_tokens,
prompts beyond max_model_len, unknown fields, wrong types) and 100 streams closed after their
first chunk, each followed by a valid request; then a SIGKILL mid-run and a restart on the same
port. rss_growth is only reported here (a 200-request run is too short to judge it)."""
from __future__ import annotations

import pytest

from conftest import load_benchmark

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_short_soak_bad_requests_and_restart(tmp_path, data_dir):
    from moespac_vllm.models.tiny import make_tiny_model

    bench_soak = load_benchmark("bench_soak")

    model = str(make_tiny_model(tmp_path / "qwen3", "qwen3_moe", draft=False,
                                moe_draft=True).target)
    work = tmp_path / "run"
    work.mkdir()
    row = bench_soak.soak(model, work, requests=200, concurrency=8, bad=True, restart=True)
    print(row)
    assert row["errors"] == 0, row
    assert row["repeated_requests"] == 20 and row["greedy_mismatches"] == 0, row
    assert row["stats_lines_valid"] and row["stats_lines"] > 0, row
    assert row["trace_valid"], row
    assert row["exit_code"] in (0, -15), row
    bad = row["bad_inputs"]
    assert all(v == 200 for k, v in bad.items() if k.endswith(":after")), bad
    for name in ("malformed_json", "not_an_object", "negative_max_tokens", "huge_max_tokens",
                 "prompt_beyond_max_model_len", "chat_beyond_max_model_len",
                 "wrong_type_prompt", "unknown_model", "bad_temperature"):
        assert 400 <= bad[name] < 500, (name, bad[name])
    assert row["disconnects_first_chunk"] == 100 and row["after_disconnects"] == 200, row
    assert row["killed_stats_valid"] and row["killed_trace_steps"] > 0, row
    assert row["restart_status"] == 200, row
