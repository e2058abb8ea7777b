"""models/train.py: a seconds-long training proves the whole `train-tiny` pipeline (corpus
split, shared tokenizer, target with aux loss, distilled draft, fake-quantized MoE draft, HF
checkpoints, cache, resume). The full training is a benchmark-sized run (benchmarks/README.md),
never a test."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from moespac_vllm.models import train
from moespac_vllm.models.train import Document, TrainConfig

# A model that trains in seconds: smallest head vLLM's CPU attention accepts, 4 experts top-2.
MICRO = dict(corpus_max_bytes=60_000, steps=12, draft_steps=8, batch_size=4, seq_len=32,
             vocab_size=320, num_layers=2, hidden_size=32, num_heads=1, num_kv_heads=1,
             head_dim=32, num_experts=4, top_k=2, moe_intermediate_size=16, draft_layers=1,
             draft_hidden_size=32, draft_intermediate_size=32, checkpoint_every=4, eval_blocks=4,
             warmup_steps=2, lr=1e-2, draft_lr=1e-2, max_position_embeddings=128,
             greedy_distil_prompts=8)


def _corpus(path: Path, rows: int = 400) -> Path:
    """Learnable JSONL text: templated functions, so a few steps visibly lower the loss."""
    with open(path, "w") as f:
        for i in range(rows):
            body = f"def add_{i}(x):\n    return x + {i % 7}\n\nprint(add_{i}({i % 5}))\n"
            f.write(json.dumps({"text": body * 3}) + "\n")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    corpus = _corpus(d / "corpus.jsonl")
    cfg = TrainConfig(**MICRO, corpus=str(corpus), distil=True)
    t0 = time.perf_counter()
    rec = train.train_tiny(d / "model", cfg)
    return d / "model", cfg, rec, time.perf_counter() - t0


@pytest.mark.parametrize("field,value", [("seed", -1), ("top_k", 9), ("head_dim", 16),
                                         ("arch", "llama"), ("moe_draft_bits", 5),
                                         ("vocab_size", 100), ("lr", float("nan"))])
def test_bad_config_raises_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{**MICRO, "num_experts": 8, field: value})


def test_missing_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="corpus"):
        train.load_corpus(str(tmp_path / "nope.jsonl"), 1000)


def test_corpus_split_is_deterministic_disjoint_and_capped(tmp_path):
    corpus = _corpus(tmp_path / "c.jsonl", rows=600)
    a_train, a_held = train.load_corpus(str(corpus), 20_000)
    b_train, b_held = train.load_corpus(str(corpus), 20_000)
    assert [d.name for d in a_train] == [d.name for d in b_train]
    assert [d.name for d in a_held] == [d.name for d in b_held]
    assert a_held and not {d.name for d in a_train} & {d.name for d in a_held}
    assert sum(len(d.text) for d in a_train) < 20_000 + max(len(d.text) for d in a_train)
    # A larger cap keeps the same held-out documents (the split does not depend on the cap).
    _, c_held = train.load_corpus(str(corpus), 40_000)
    assert {d.name for d in a_held} <= {d.name for d in c_held}


def test_default_corpus_is_the_standard_library():
    docs, held = train.load_corpus(None, 200_000)
    assert docs and held
    assert all(d.name.endswith(".py") and "site-packages" not in d.name for d in docs + held)


def test_unigram_baseline_of_uniform_tokens_is_log_vocab():
    v = 64
    ids = torch.arange(v).repeat(100)
    assert train.unigram_cross_entropy(ids, ids, v) == pytest.approx(math.log(v), rel=1e-6)
    skewed = torch.zeros(1000, dtype=torch.long)
    assert train.unigram_cross_entropy(skewed, skewed[:10], v) < 0.1


def test_fake_quantize_leaves_at_most_2_to_the_bits_levels_per_row():
    torch.manual_seed(0)
    w = torch.randn(3, 8, 64)
    err = train.fake_quantize_(w, 4)
    assert 0 < err < 0.2
    for row in w.reshape(-1, 64):
        assert row.unique().numel() <= 16


def test_resumed_training_equals_uninterrupted(tmp_path):
    from transformers import Qwen3ForCausalLM

    cfg = TrainConfig(**MICRO)
    blocks = torch.randint(0, cfg.vocab_size, (16, cfg.seq_len))

    def run(ckpt: Path, stop_at=None, init_seed=0):
        torch.manual_seed(init_seed)
        m = Qwen3ForCausalLM(train.draft_config(cfg, 0))
        rec = train.train_loop(m, train.draft_loss(m), blocks, steps=6, batch_size=4, seed=3,
                               lr=1e-2, warmup=2, ckpt=ckpt, checkpoint_every=100, desc="t",
                               stop_at=stop_at)
        return m, rec

    straight, rec_a = run(tmp_path / "a.ckpt")
    _, stopped = run(tmp_path / "b.ckpt", stop_at=3)
    assert stopped == {"stopped_at": 3}
    resumed, rec_b = run(tmp_path / "b.ckpt", init_seed=99)  # init is overwritten by the resume
    assert rec_b["resumed_from_step"] == 3
    assert [c["loss"] for c in rec_a["curve"]] == [c["loss"] for c in rec_b["curve"]]
    for (n, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_pipeline_writes_loadable_checkpoints_and_learns(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, cfg, rec, _ = trained
    assert rec["status"] == "done" and not out.with_name(out.name + ".work").exists()
    tok = AutoTokenizer.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out / "draft").get_vocab() == tok.get_vocab()
    target = AutoModelForCausalLM.from_pretrained(out)
    draft = AutoModelForCausalLM.from_pretrained(out / "draft")
    assert type(target).__name__ == "Qwen3MoeForCausalLM"
    assert type(draft).__name__ == "Qwen3ForCausalLM"
    assert target.config.num_experts == cfg.num_experts and target.config.head_dim >= 32
    assert target.config.router_aux_loss_coef > 0
    assert target.get_input_embeddings().weight.dtype == torch.bfloat16
    # Stops at the end of a document and at the chat end token.
    sep = tok.convert_tokens_to_ids(train.DOC_SEPARATOR)
    assert set(target.generation_config.eos_token_id) == {sep, tok.eos_token_id}
    curve = rec["target"]["curve"]
    assert curve[-1]["lm_loss"] < curve[0]["lm_loss"] - 1.0
    assert rec["target"]["steps"] == cfg.steps and rec["draft"]["steps"] == cfg.draft_steps
    assert rec["target"]["tokens"] == cfg.steps * cfg.batch_size * cfg.seq_len
    h = rec["heldout_loss_nats"]
    # 12 steps only reach the unigram level on held-out text; they must be far below uniform.
    assert h["target"] < math.log(cfg.vocab_size) - 1.0 and h["unigram_baseline"] > 0
    assert 0 <= h["draft_vs_target"]["argmax_agreement"] <= 1


def test_moe_draft_shares_the_targets_routers_exactly(trained):
    from safetensors.torch import load_file

    out, _, rec, _ = trained
    t = load_file(out / "model.safetensors")
    d = load_file(out / "moe-draft" / "model.safetensors")
    assert t.keys() == d.keys()
    gates = [k for k in t if k.endswith("mlp.gate.weight")]
    experts = [k for k in t if ".mlp.experts." in k]
    assert gates and experts
    assert all(torch.equal(t[k], d[k]) for k in gates)
    assert any(not torch.equal(t[k], d[k]) for k in experts)
    assert rec["moe_draft"]["bits"] == 4
    assert rec["heldout_loss_nats"]["moe_draft_vs_target"]["topk_set_agreement"] > 0.5


def test_second_call_with_same_arguments_is_cached(trained):
    out, cfg, rec, first_s = trained
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    again = train.train_tiny(out, cfg)
    assert again == rec
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    assert time.perf_counter() - t0 < first_s / 2


def test_changing_only_draft_options_keeps_the_trained_target(trained, tmp_path):
    import shutil

    from safetensors.torch import load_file

    out, cfg, rec, _ = trained
    copy = tmp_path / "model"
    shutil.copytree(out, copy)
    again = train.train_tiny(copy, cfg.replace(draft_steps=cfg.draft_steps + 2))
    assert again["target"]["reused_from_key"] == rec["key"]
    assert again["draft"]["steps"] == cfg.draft_steps + 2
    before, after = load_file(out / "model.safetensors"), load_file(copy / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_greedy_blocks_continue_the_prompt_with_the_targets_argmax():
    from transformers import Qwen3MoeForCausalLM

    cfg = TrainConfig(**MICRO)
    torch.manual_seed(0)
    target = Qwen3MoeForCausalLM(train.target_config(cfg, 0))
    blocks = torch.randint(1, cfg.vocab_size, (10, cfg.seq_len))
    g = train.greedy_blocks(target, blocks, 3, seed=0, batch_size=2)
    assert g.shape == (3, cfg.seq_len)
    half = cfg.seq_len // 2
    assert any(torch.equal(g[0, :half], b[:half]) for b in blocks)
    with torch.no_grad():
        nxt = target(input_ids=g[:, :half]).logits[:, -1].argmax(-1)
    assert torch.equal(nxt, g[:, half])


def test_refuses_to_overwrite_a_folder_that_holds_something_else(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="out"):
        train.train_tiny(tmp_path, TrainConfig(**MICRO, corpus=str(_corpus(tmp_path / "c.jsonl"))))


def test_cli_reports_bad_arguments_with_exit_code_2(tmp_path, capsys):
    from moespac_vllm.cli import main

    assert main(["train-tiny", str(tmp_path / "m"), "--seed", "-1"]) == 2
    assert "seed" in capsys.readouterr().err


def test_documents_from_plain_text_are_chunked(tmp_path):
    p = tmp_path / "book.txt"
    p.write_text("\n\n".join(f"paragraph {i} " * 40 for i in range(100)))
    docs = list(train._file_documents(p))
    assert len(docs) > 5 and all(isinstance(d, Document) for d in docs)
