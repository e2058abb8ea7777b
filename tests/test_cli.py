"""The `moespac` CLI's make-tiny-model / generate / serve sections, without starting vLLM: bad input is
one line naming the field, prompts come from files and the shared data sets, the plugin switch and
the serve defaults are what the README says."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moespac_vllm.cli import main
from moespac_vllm.patches.generate import (
    DATASETS,
    GenerateRequest,
    load_prompts,
    plugin_env,
)
from moespac_vllm.patches.serve import DEFAULT_HOST, serve_argv


def _one_line_error(capsys, argv: list[str]) -> str:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("argv, needle", [
    (["generate", "--moespac-config", '{"cache_ratio": 0}'], "cache_ratio: must be in (0, 1]"),
    (["generate", "--moespac-config", '{"cache_ratio": 1.5}'], "cache_ratio:"),
    (["generate", "--moespac-config", '{"gpu_expert_budget_gb": -1}'], "gpu_expert_budget_gb:"),
    (["generate", "--moespac-config", '{"policy": "fifo"}'], "policy: unknown value 'fifo'"),
    (["generate", "--moespac-config", '{"cache_size": 3}'], "cache_size: unknown moespac setting"),
    (["generate", "--moespac-config", "[1]"], "moespac_config: must be a JSON object"),
    (["generate", "--moespac-config", "{nope"], "moespac_config: not valid JSON"),
    (["generate", "--model", "./no/such/dir", "--no-spec"], "model: ./no/such/dir is not a dir"),
    (["generate", "--draft", "x", "--ngram"], "not allowed with argument --draft"),
    (["generate", "--dataset", "imagenet"], "dataset: unknown 'imagenet'"),
    (["generate", "--max-tokens", "ten"], "invalid int value"),
    (["make-tiny-model", "/tmp/x", "--arch", "llama"], "arch: unknown architecture 'llama'"),
    (["make-tiny-model"], "required: dir"),
    (["serve"], "required: model"),
    (["bogus"], "invalid choice"),
])
def test_bad_input_is_one_line(capsys, argv, needle):
    assert needle in _one_line_error(capsys, argv)


def test_bad_model_fails_before_vllm_is_imported():
    code = ("import sys\nfrom moespac_vllm.cli import main\n"
            "rc = main(['generate', '--model', './missing', '--no-spec'])\n"
            "print(rc, 'vllm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["2", "False"], out.stderr


def test_generate_request_validates_fields():
    with pytest.raises(ValueError, match="^prompts:"):
        GenerateRequest(model="m", prompts=())
    with pytest.raises(ValueError, match="^num_speculative_tokens:"):
        GenerateRequest(model="m", prompts=("a",), num_speculative_tokens=0)
    with pytest.raises(ValueError, match="^kv_cache_memory_bytes:"):
        GenerateRequest(model="m", prompts=("a",), kv_cache_memory_bytes=0)
    r = GenerateRequest(model="m", prompts=("a",), draft="d", num_speculative_tokens=5)
    assert r.speculative_config == {"method": "draft_model", "model": "d",
                                    "num_speculative_tokens": 5}
    assert GenerateRequest(model="m", prompts=("a",)).speculative_config is None
    assert GenerateRequest(model="m", prompts=("a",), ngram=True).speculative_config["method"] \
        == "ngram"


@pytest.mark.parametrize("before, enabled, after", [
    (None, True, "moespac"),
    ("other", True, "other,moespac"),
    ("moespac,other", True, "moespac,other"),
    (None, False, ""),
    ("moespac,other", False, "other"),
])
def test_plugin_env_adds_or_removes_only_moespac(before, enabled, after):
    env = {} if before is None else {"VLLM_PLUGINS": before}
    assert plugin_env(enabled, env) == {"VLLM_PLUGINS": after}


def test_prompts_from_text_and_jsonl_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first\n\nsecond line\\nwith newline\nthird\n")
    assert load_prompts(str(txt), limit=2) == ("first", "second line\nwith newline")
    jl = tmp_path / "p.jsonl"
    jl.write_text(json.dumps({"question": "q1"}) + "\n" + json.dumps({"turns": ["t1", "t2"]})
                  + "\n")
    assert load_prompts(str(jl)) == ("q1", "t1")
    jl.write_text(json.dumps({"id": 3}) + "\n")
    with pytest.raises(ValueError, match="^prompts: .*no prompt field"):
        load_prompts(str(jl))
    with pytest.raises(ValueError, match="^prompts: .* is not a file"):
        load_prompts(str(tmp_path / "missing.txt"))


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_prompts_from_each_shared_data_set(data_dir, monkeypatch, name):
    monkeypatch.setenv("MOESPAC_DATA_DIR", str(data_dir))
    prompts = load_prompts(dataset=name, limit=3)
    assert len(prompts) == 3
    assert all(isinstance(p, str) and len(p) > 10 for p in prompts)
    assert len(set(prompts)) == 3


def test_serve_defaults_to_localhost_and_cpu_safe_memory():
    argv = serve_argv("/m", ["--port", "9000"], cuda=False)
    assert argv[:3] == ["/m", "--port", "9000"]
    assert argv[argv.index("--host") + 1] == DEFAULT_HOST
    assert "--kv-cache-memory-bytes" in argv
    assert "--enforce-eager" not in argv  # vLLM's compile path stays: the plugin makes it safe
    assert serve_argv("/m", [], cuda=True) == ["/m", "--host", DEFAULT_HOST]


def test_serve_keeps_what_the_user_said():
    argv = serve_argv("/m", ["--host=0.0.0.0", "--gpu-memory-utilization", "0.5",
                             "--no-enforce-eager"], cuda=False)
    assert argv == ["/m", "--host=0.0.0.0", "--gpu-memory-utilization", "0.5",
                    "--no-enforce-eager"]
    with pytest.raises(ValueError, match="^model:"):
        serve_argv("--port", [], cuda=False)


def test_make_tiny_model_reports_built_then_cached(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["make-tiny-model", str(out), "--arch", "mixtral"]) == 0
    assert "built mixtral" in capsys.readouterr().out
    assert main(["make-tiny-model", str(out), "--arch", "mixtral"]) == 0
    assert "cached mixtral" in capsys.readouterr().out


def test_readme_lists_every_config_key_and_the_serve_spellings():
    from pathlib import Path

    from moespac_vllm.config import FLAT_KEYS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [k for k in FLAT_KEYS if f"`{k}`" not in readme]
    assert not missing, f"README.md does not document config keys: {missing}"
    for spelling in ("moespac serve MODEL", "VLLM_PLUGINS=moespac vllm serve MODEL",
                     "vllm serve MODEL --plugin moespac", "make demo", "make test"):
        assert spelling in readme
