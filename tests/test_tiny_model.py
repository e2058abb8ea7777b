"""The offline tiny checkpoints: deterministic bytes, cached rebuilds, a real tokenizer with a chat
template, loadable by transformers and accepted by vLLM's model config; the draft agrees with the
target often enough for speculative decoding, and the experts still matter."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moespac_vllm.models.tiny import (
    SPECIAL_TOKENS,
    STAMP_NAME,
    build_tokenizer,
    make_tiny_model,
    stdlib_corpus,
)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "qwen3"
    paths = make_tiny_model(out, "qwen3_moe", draft=True, moe_draft=True, seed=0)
    assert paths.built
    return out


def test_same_arguments_give_the_same_bytes(tiny, tmp_path):
    again = tmp_path / "again"
    make_tiny_model(again, "qwen3_moe", draft=True, moe_draft=True, seed=0)
    a, b = _files(tiny), _files(again)
    assert set(a) >= {"model.safetensors", "tokenizer.json", "tokenizer_config.json",
                      "config.json", "draft/model.safetensors", "moe-draft/model.safetensors",
                      STAMP_NAME}
    assert a == b


def test_second_call_is_cached_and_instant(tiny):
    start = time.perf_counter()
    paths = make_tiny_model(tiny, "qwen3_moe", draft=True, moe_draft=True, seed=0)
    assert not paths.built
    assert time.perf_counter() - start < 0.5


def test_other_seed_rebuilds_with_other_weights(tiny, tmp_path):
    other = tmp_path / "seed1"
    make_tiny_model(other, "qwen3_moe", draft=False, seed=1)
    assert (other / "tokenizer.json").read_bytes() == (tiny / "tokenizer.json").read_bytes()
    assert (other / "model.safetensors").read_bytes() != (tiny / "model.safetensors").read_bytes()
    assert not (other / "draft").exists()


def test_refuses_to_overwrite_a_foreign_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="^out_dir:"):
        make_tiny_model(tmp_path, "qwen3_moe", draft=False)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("bad, field", [({"arch": "gpt2"}, "arch"), ({"seed": -1}, "seed")])
def test_bad_input_names_the_field(tmp_path, bad, field):
    kwargs = {"arch": "qwen3_moe", "draft": False, **bad}
    with pytest.raises(ValueError, match=f"^{field}:"):
        make_tiny_model(tmp_path / "m", **kwargs)


def test_tokenizer_round_trips_text_and_keeps_special_ids():
    tok = build_tokenizer(stdlib_corpus(200_000), vocab_size=512)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    text = "def f(x):\n    return x * 2  # ünïcode ✓"
    enc = tok.encode(text)
    assert len(enc.ids) < len(text.encode())  # merges learned: fewer tokens than bytes
    assert tok.decode(enc.ids) == text
    with pytest.raises(ValueError, match="^vocab_size:"):
        build_tokenizer(["x"], vocab_size=10)


def test_transformers_loads_target_and_drafts_with_shared_tokenizer(tiny):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    assert tok.is_fast
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok("import os\nprint(os.getcwd())", return_tensors="pt").input_ids
    vocab = None
    for sub in ("", "draft", "moe-draft"):
        d = tiny / sub
        assert AutoTokenizer.from_pretrained(d).get_vocab() == tok.get_vocab()
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        with torch.no_grad():
            logits = model(ids).logits
        assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
        assert torch.isfinite(logits).all()
        vocab = vocab or model.config.vocab_size
        assert model.config.vocab_size == vocab
        assert getattr(model.config, "head_dim", 32) >= 32  # vLLM CPU attention's smallest


def test_draft_agrees_with_target_and_experts_still_matter(tiny):
    """The two properties the residual scaling buys (tiny_model.RESIDUAL_SCALE_*)."""
    import torch
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    draft = AutoModelForCausalLM.from_pretrained(tiny / "draft", dtype=torch.float32)
    ids = torch.randint(3, target.config.vocab_size, (8, 32),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        t = target(ids).logits.argmax(-1)
        d = draft(ids).logits.argmax(-1)
        for name, p in target.named_parameters():
            if "experts" in name and p.dim() == 3:
                p[[0, 1]] = p[[1, 0]].clone()
        swapped = target(ids).logits.argmax(-1)
    agree = (t == d).float().mean().item()
    changed = (t != swapped).float().mean().item()
    assert agree > 0.5, agree
    assert changed > 0.01, changed


@pytest.mark.vllm
def test_vllm_model_config_accepts_every_arch(tiny, tmp_path):
    dirs = {"qwen3_moe": tiny}
    for arch in ("mixtral", "olmoe"):
        dirs[arch] = tmp_path / arch
        make_tiny_model(dirs[arch], arch, draft=False)
    script = (
        "import json, sys\n"
        "from vllm.config import ModelConfig\n"
        "out = {}\n"
        "for arch, d in json.loads(sys.argv[1]).items():\n"
        "    c = ModelConfig(model=d, max_model_len=256)\n"
        "    out[arch] = [c.architectures, c.get_head_size(), c.get_vocab_size()]\n"
        "print(json.dumps(out))\n"
    )
    res = subprocess.run([sys.executable, "-c", script,
                          json.dumps({k: str(v) for k, v in dirs.items()})],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == {
        "qwen3_moe": [["Qwen3MoeForCausalLM"], 32, 2048],
        "mixtral": [["MixtralForCausalLM"], 32, 2048],
        "olmoe": [["OlmoeForCausalLM"], 32, 2048],
    }
