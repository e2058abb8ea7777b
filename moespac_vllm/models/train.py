"""Train a small Qwen3-MoE target and its drafts offline, on CPU, from a local corpus.

No pretrained MoE can be downloaded here and random-weight models route almost uniformly and accept
almost no draft tokens, so this module builds a pair that has actually learned something:

  OUT/                 the target: Qwen3MoeForCausalLM (L layers, E experts, top-K, load-balancing
                       aux loss); the same layout as `moespac make-tiny-model`, so `generate --model
                       OUT --draft OUT/draft` works on either
  OUT/draft/           Qwen3ForCausalLM, dense and small, same tokenizer (optionally distilled)
  OUT/moe-draft/       the target with every expert fake-quantized to int4 (per output row,
                       symmetric) and saved in bf16: its routers are the target's, so its routing
                       logits are a draft-side lookahead for the estimator
  OUT/training.json    config, corpus fingerprint, steps, tokens, loss curve, wall time, held-out
                       loss of every model against a unigram baseline, draft/target agreement
  OUT.work/            tokenizer, tokenized corpus and resumable checkpoints (removed when done)

All checkpoints are Hugging Face directories (bf16 safetensors + models.tiny's byte-level BPE
tokenizer with its ChatML template) that vLLM loads as-is; head_dim is 64 (vLLM's CPU attention
needs head_dim >= 32). Documents are separated by <|endoftext|>, which is also a stop token.

Determinism: `torch.manual_seed(seed)` before each model is built and a data order that is a pure
function of (seed, step), so a run resumed from a checkpoint sees exactly the batches it would have.
Cached: `training.json` carries a key hashed from the config and the corpus text; a second call with
the same key returns at once.

Shapes: B batch, T sequence length, V vocabulary, E experts, K top-k.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import math
import shutil
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# Bump when a change here alters what a given config trains, so stale caches are not reused.
TRAIN_FORMAT_VERSION = 1
DOC_SEPARATOR = "<|endoftext|>"  # models.tiny's tokenizer: also its pad token
ARCHS = ("qwen3_moe",)
# Held-out documents are picked by a hash of their name, independent of the seed, so every run of a
# corpus is evaluated on the same text.
HELDOUT_MODULUS = 50


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Everything that decides what `train_tiny` produces (and so its cache key)."""

    arch: str = "qwen3_moe"
    corpus: str | None = None  # None: the Python standard library's sources and docs
    corpus_max_bytes: int = 6_000_000
    seed: int = 0
    steps: int = 240  # target optimizer steps (16 x 256 tokens each)
    draft_steps: int = 300  # 120: SD acceptance 0.14-0.57, 300: 0.57-0.76 (benchmarks/README)
    distil: bool = False  # draft learns the target's distribution instead of the corpus
    # With distil: prompts (half a block of training text) whose greedy target continuation
    # (the other half) makes up half of the draft's batches, so the draft also learns what the
    # target does on its own outputs, which is what speculative decoding verifies.
    greedy_distil_prompts: int = 384
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 2e-3
    draft_lr: float = 3e-3
    warmup_steps: int = 40
    vocab_size: int = 2048
    # target
    num_layers: int = 6
    hidden_size: int = 256
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    num_experts: int = 16
    top_k: int = 2
    moe_intermediate_size: int = 128
    router_aux_loss_coef: float = 0.01
    # dense draft
    draft_layers: int = 2
    draft_hidden_size: int = 256
    draft_intermediate_size: int = 512
    # MoE draft variant: expert bits (0 disables it)
    moe_draft_bits: int = 4
    max_position_embeddings: int = 2048
    # bf16 autocast + transformers' grouped_mm experts: 1.3 s instead of 15 s per 4096-token target
    # step on this 2-core AVX512-BF16 machine (fp32 weights and optimizer state stay fp32).
    bf16_autocast: bool = True
    checkpoint_every: int = 40
    eval_blocks: int = 48

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch: must be one of {ARCHS}, got {self.arch!r}")
        positive = ("corpus_max_bytes", "steps", "batch_size", "seq_len", "vocab_size", "num_layers",
                    "hidden_size", "num_heads", "num_kv_heads", "head_dim", "num_experts", "top_k",
                    "moe_intermediate_size", "draft_layers", "draft_hidden_size",
                    "draft_intermediate_size", "max_position_embeddings", "checkpoint_every",
                    "eval_blocks")
        for name in positive:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: must be a positive integer, got {v!r}")
        for name in ("seed", "draft_steps", "warmup_steps", "moe_draft_bits",
                     "greedy_distil_prompts"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}: must be a non-negative integer, got {v!r}")
        for name in ("lr", "draft_lr", "router_aux_loss_coef"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name}: must be a finite non-negative number, got {v!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k: {self.top_k} exceeds num_experts {self.num_experts}")
        if self.head_dim < 32:
            raise ValueError(f"head_dim: vLLM's CPU attention needs >= 32, got {self.head_dim}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads: {self.num_kv_heads} must divide num_heads "
                             f"{self.num_heads}")
        if self.moe_draft_bits not in (0, 2, 3, 4, 8):
            raise ValueError(f"moe_draft_bits: one of 0 (off), 2, 3, 4, 8; got {self.moe_draft_bits}")
        if self.vocab_size < 300:
            raise ValueError(f"vocab_size: a byte-level BPE needs >= 300, got {self.vocab_size}")
        if self.seq_len > self.max_position_embeddings:
            raise ValueError(f"seq_len: {self.seq_len} exceeds max_position_embeddings "
                             f"{self.max_position_embeddings}")

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


# A seconds-long configuration: proves the pipeline in CI, learns nothing worth serving.
SMOKE = dict(corpus_max_bytes=300_000, steps=30, draft_steps=20, batch_size=8, seq_len=64,
             vocab_size=512, num_layers=2, hidden_size=64, num_heads=2, num_kv_heads=1,
             head_dim=32, num_experts=8, top_k=2, moe_intermediate_size=32, draft_layers=1,
             draft_hidden_size=64, draft_intermediate_size=128, checkpoint_every=10,
             eval_blocks=8, warmup_steps=5, max_position_embeddings=512, greedy_distil_prompts=8)


# ---- corpus ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Document:
    name: str
    text: str


def _stdlib_documents() -> Iterator[Document]:
    """Python sources and docs that ship with the interpreter (pydoc_data holds the reference docs),
    without site-packages and the test suites."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip.intersection(rel.parts[:-1]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        yield Document(str(rel), text)


def _json_text(row: Any) -> str:
    if isinstance(row, str):
        return row
    if isinstance(row, dict):
        if isinstance(row.get("text"), str):
            return row["text"]
        return "\n".join(_json_text(v) for v in row.values() if isinstance(v, (str, list)))
    if isinstance(row, list):
        return "\n".join(_json_text(v) for v in row)
    return ""


def _file_documents(path: Path) -> Iterator[Document]:
    opener = gzip.open if path.suffix == ".gz" else open
    stem = path.name.removesuffix(".gz")
    with opener(path, "rt", encoding="utf-8") as f:
        if stem.endswith(".jsonl"):
            for i, line in enumerate(f):
                if line.strip():
                    text = _json_text(json.loads(line))
                    if text.strip():
                        yield Document(f"{path.name}:{i}", text)
            return
        text = f.read()
    # Plain text: paragraphs grouped into ~4 kB documents so a held-out split exists.
    chunk: list[str] = []
    size = 0
    n = 0
    for para in text.split("\n\n"):
        chunk.append(para)
        size += len(para) + 2
        if size >= 4096:
            yield Document(f"{path.name}:{n}", "\n\n".join(chunk))
            chunk, size, n = [], 0, n + 1
    if chunk:
        yield Document(f"{path.name}:{n}", "\n\n".join(chunk))


def load_corpus(corpus: str | None, max_bytes: int) -> tuple[list[Document], list[Document]]:
    """(train, held-out) documents. Deterministic: the same corpus always splits the same way.

    `corpus`: None (the standard library), a .jsonl/.jsonl.gz file (each row's "text", else its
    string fields joined), a text file, or a directory of .py/.txt/.md/.jsonl files."""
    if corpus is None:
        docs = list(_stdlib_documents())
    else:
        p = Path(corpus)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(
                (".py", ".txt", ".md", ".jsonl", ".jsonl.gz")))
            docs = []
            for f in files:
                if f.name.endswith((".jsonl", ".jsonl.gz")):
                    docs.extend(_file_documents(f))
                else:
                    docs.append(Document(str(f.relative_to(p)), f.read_text(encoding="utf-8",
                                                                             errors="replace")))
        elif p.is_file():
            docs = list(_file_documents(p))
        else:
            raise ValueError(f"corpus: {corpus!r} is neither a file nor a directory")
    if not docs:
        raise ValueError(f"corpus: no text found in {corpus or 'the standard library'}")

    def h(name: str) -> int:
        return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")

    held = [d for d in docs if h(d.name) % HELDOUT_MODULUS == 0]
    train = [d for d in docs if h(d.name) % HELDOUT_MODULUS != 0]
    if not held:  # tiny corpora: keep the last document back
        held, train = train[-1:], train[:-1]
    # Cap the training text, taking documents in hash order (a seed-free shuffle) so a cap does not
    # keep only the alphabetically first modules.
    train.sort(key=lambda d: h("order:" + d.name))
    kept, total = [], 0
    for d in train:
        if total >= max_bytes:
            break
        kept.append(d)
        total += len(d.text)
    held_kept, total = [], 0
    for d in sorted(held, key=lambda d: h("order:" + d.name)):
        if total >= max(max_bytes // HELDOUT_MODULUS, 20_000):
            break
        held_kept.append(d)
        total += len(d.text)
    if not kept:
        raise ValueError(f"corpus: {corpus!r} has too little text to train on")
    return kept, held_kept


def corpus_fingerprint(train: list[Document], held: list[Document]) -> str:
    h = hashlib.sha256()
    for tag, docs in (("train", train), ("held", held)):
        for d in docs:
            h.update(f"{tag}\0{d.name}\0".encode())
            h.update(d.text.encode())
    return h.hexdigest()[:16]


# ---- tokenizer ------------------------------------------------------------------------------------
def tokenize(tokenizer, docs: list[Document]) -> torch.Tensor:
    """All documents, each followed by <|endoftext|>, as one int64 stream [N]."""
    eos = tokenizer.convert_tokens_to_ids(DOC_SEPARATOR)
    ids: list[int] = []
    for d in docs:
        ids.extend(tokenizer(d.text, add_special_tokens=False)["input_ids"])
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def unigram_cross_entropy(train_ids: torch.Tensor, eval_ids: torch.Tensor, vocab_size: int) -> float:
    """Held-out cross-entropy (nats/token) of the add-one-smoothed unigram model of `train_ids`:
    the baseline a trained model must clearly beat."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return float(-logp[eval_ids].mean())


def _first(ids: int | list[int]) -> int:
    return ids[0] if isinstance(ids, list) else ids


# ---- models ---------------------------------------------------------------------------------------
def target_config(cfg: TrainConfig, eos_id: int | list[int]):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.moe_intermediate_size * cfg.top_k,
        moe_intermediate_size=cfg.moe_intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, num_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k,
        norm_topk_prob=True, output_router_logits=True,
        router_aux_loss_coef=cfg.router_aux_loss_coef,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=True,
        eos_token_id=eos_id, pad_token_id=_first(eos_id))


def draft_config(cfg: TrainConfig, eos_id: int | list[int]):
    from transformers import Qwen3Config

    heads = max(cfg.draft_hidden_size // cfg.head_dim, 1)
    return Qwen3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.draft_hidden_size,
        intermediate_size=cfg.draft_intermediate_size, num_hidden_layers=cfg.draft_layers,
        num_attention_heads=heads, num_key_value_heads=heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=True,
        eos_token_id=eos_id, pad_token_id=_first(eos_id))


def fake_quantize_(weight: torch.Tensor, bits: int) -> float:
    """Symmetric per-output-row fake quantization in place (round to `bits`-bit integers times a
    row scale, kept in float). `weight`: [..., out, in]. Returns the relative Frobenius error."""
    qmax = 2 ** (bits - 1) - 1
    with torch.no_grad():
        orig = weight.detach().clone()
        scale = weight.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / qmax
        weight.copy_(torch.round(weight / scale).clamp(-qmax - 1, qmax) * scale)
        return float((weight - orig).norm() / orig.norm().clamp_min(1e-12))


def quantized_moe_draft(target, bits: int):
    """A copy of the MoE target whose experts are fake-quantized to `bits`; attention, norms,
    embeddings and the routers stay exact, so the draft's routing mirrors the target's."""
    import copy

    draft = copy.deepcopy(target)
    errors = []
    for name, p in draft.named_parameters():
        if ".mlp.experts." in name:
            errors.append(fake_quantize_(p.data, bits))
    if not errors:
        raise ValueError("arch: the target has no expert weights to quantize")
    return draft, float(sum(errors) / len(errors))


# ---- training -------------------------------------------------------------------------------------
class _Perms:
    """The batch for optimizer step s is rows [s*B, (s+1)*B) of the concatenated epoch-wise
    permutations seeded by (seed, epoch): a pure function of the step, so a resumed run sees the
    same batches."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self._cache = n, seed, {}

    def batch(self, blocks: torch.Tensor, step: int, batch_size: int) -> torch.Tensor:
        rows = []
        for i in range(step * batch_size, (step + 1) * batch_size):
            epoch, pos = divmod(i, self.n)
            if epoch not in self._cache:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._cache = {epoch: torch.randperm(self.n, generator=g)}
            rows.append(int(self._cache[epoch][pos]))
        return blocks[rows]


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(steps - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


@dataclass(frozen=True, slots=True)
class StepLoss:
    """What one optimizer step reports: the objective and its language-model part (nats/token)."""

    loss: float
    lm_loss: float
    aux_loss: float = 0.0


LossFn = Callable[[torch.Tensor], tuple[torch.Tensor, StepLoss]]


def _progress(total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", file=sys.stderr,
                dynamic_ncols=True, mininterval=2.0)


def _autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def _fast_experts(model) -> str:
    """Switch a transformers MoE to the grouped_mm experts kernel where this build has it."""
    try:
        model.set_experts_implementation("grouped_mm")
        return "grouped_mm"
    except (KeyError, ValueError, AttributeError) as e:
        log.warning("grouped_mm experts unavailable (%s); training with the eager loop", e)
        return "eager"


def train_loop(model, loss_fn: LossFn, blocks: torch.Tensor, *, steps: int, batch_size: int,
               seed: int, lr: float, warmup: int, ckpt: Path, checkpoint_every: int,
               desc: str, bf16: bool = False, stop_at: int | None = None) -> dict[str, Any]:
    """AdamW over `steps` batches of `blocks` [N, T]; resumes from `ckpt` when it exists.
    `stop_at` ends the call early after that step with a checkpoint (what an interrupted run
    leaves behind) and returns {"stopped_at": step}.

    Returns the phase record: steps, tokens, wall seconds (this process's share plus what earlier
    resumed runs reported), the loss curve and the final tokens/s."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    start, curve, wall_before = 0, [], 0.0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, curve, wall_before = state["step"], state["curve"], state["wall_s"]
        log.info("%s: resumed at step %d from %s", desc, start, ckpt)
        if start >= steps and "record" in state:
            model.eval()
            return state["record"]
    perms = _Perms(blocks.shape[0], seed)
    tokens_per_step = batch_size * blocks.shape[1]
    model.train()
    t0 = time.perf_counter()
    bar = _progress(steps, start, desc)
    window_t, window_steps = time.perf_counter(), 0
    tok_s = 0.0
    for step in range(start, steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        batch = perms.batch(blocks, step, batch_size)
        with _autocast(bf16):
            loss, rec = loss_fn(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        window_steps += 1
        now = time.perf_counter()
        if now - window_t > 5.0 or step + 1 == steps:
            tok_s = window_steps * tokens_per_step / (now - window_t)
            window_t, window_steps = now, 0
        curve.append({"step": step + 1, "loss": round(rec.loss, 4), "lm_loss": round(rec.lm_loss, 4),
                      "aux_loss": round(rec.aux_loss, 4)})
        bar.set_postfix(loss=f"{rec.lm_loss:.3f}", tok_s=f"{tok_s:.0f}", refresh=False)
        bar.update(1)
        if stop_at is not None and step + 1 >= stop_at and step + 1 < steps:
            _atomic_save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                          "curve": curve, "wall_s": wall_before + time.perf_counter() - t0}, ckpt)
            bar.close()
            return {"stopped_at": step + 1}
        if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            _atomic_save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                          "curve": curve, "wall_s": wall_before + time.perf_counter() - t0}, ckpt)
    bar.close()
    wall = wall_before + time.perf_counter() - t0
    model.eval()
    run_steps = steps - start
    record = {"steps": steps, "tokens": steps * tokens_per_step, "wall_s": round(wall, 1),
              "resumed_from_step": start,
              "tokens_per_s": round(run_steps * tokens_per_step
                                    / max(time.perf_counter() - t0, 1e-9), 1),
              "final_lm_loss": curve[-1]["lm_loss"] if curve else None,
              "curve": curve[:: max(len(curve) // 200, 1)] + curve[-1:]}
    _atomic_save({"model": model.state_dict(), "opt": opt.state_dict(), "step": steps,
                  "curve": curve, "wall_s": wall, "record": record}, ckpt)
    return record


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def target_loss(model, coef: float) -> LossFn:
    def fn(batch: torch.Tensor) -> tuple[torch.Tensor, StepLoss]:
        out = model(input_ids=batch, labels=batch)
        aux = out.aux_loss if out.aux_loss is not None else torch.zeros(())
        lm = out.loss - coef * aux  # HF adds coef * aux to the LM loss
        return out.loss, StepLoss(float(out.loss.detach()), float(lm.detach()), float(aux.detach()))

    return fn


def draft_loss(draft, teacher=None) -> LossFn:
    """Corpus cross-entropy, or with `teacher`, KL(teacher || draft) per token: the draft then learns
    the target's next-token distribution, which is what greedy acceptance rewards."""

    def fn(batch: torch.Tensor) -> tuple[torch.Tensor, StepLoss]:
        logits = draft(input_ids=batch).logits[:, :-1].float()
        labels = batch[:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        if teacher is None:
            return ce, StepLoss(float(ce.detach()), float(ce.detach()))
        with torch.no_grad():
            t_logp = F.log_softmax(teacher(input_ids=batch).logits[:, :-1].float(), dim=-1)
        d_logp = F.log_softmax(logits, dim=-1)
        kl = (t_logp.exp() * (t_logp - d_logp)).sum(-1).mean()
        return kl, StepLoss(float(kl.detach()), float(ce.detach()))

    return fn


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats/token) on `blocks` [N, T]."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, blocks.shape[0], batch_size):
        b = blocks[i:i + batch_size]
        logits = model(input_ids=b).logits[:, :-1].float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1),
                                       reduction="sum"))
        count += b[:, 1:].numel()
    return total / count


@torch.no_grad()
def agreement(draft, target, blocks: torch.Tensor, batch_size: int,
              routing: bool = False) -> dict[str, float]:
    """Teacher-forced proxy for greedy acceptance: how often the draft's argmax equals the target's
    on held-out text; with `routing`, also how often their per-layer top-k expert sets are equal."""
    same, n, route_same, route_n = 0, 0, 0, 0
    for i in range(0, blocks.shape[0], batch_size):
        b = blocks[i:i + batch_size]
        t_out = target(input_ids=b, output_router_logits=routing)
        d_out = draft(input_ids=b, output_router_logits=routing)
        same += int((t_out.logits.argmax(-1) == d_out.logits.argmax(-1)).sum())
        n += b.numel()
        if routing:
            k = target.config.num_experts_per_tok
            for tl, dl in zip(t_out.router_logits, d_out.router_logits):
                ts = torch.zeros_like(tl, dtype=torch.bool).scatter_(-1, tl.topk(k, -1).indices, True)
                ds = torch.zeros_like(dl, dtype=torch.bool).scatter_(-1, dl.topk(k, -1).indices, True)
                route_same += int((ts == ds).all(-1).sum())
                route_n += tl.shape[0]
    out = {"argmax_agreement": same / n}
    if routing:
        out["topk_set_agreement"] = route_same / route_n
    return out


def _heldout_metrics(cfg: TrainConfig, train_ids: torch.Tensor, held_blocks: torch.Tensor,
                     target, draft) -> dict[str, Any]:
    eb = cfg.batch_size
    return {
        "unigram_baseline": unigram_cross_entropy(train_ids, held_blocks[:, 1:].reshape(-1),
                                                  cfg.vocab_size),
        "target": evaluate(target, held_blocks, eb),
        "draft": evaluate(draft, held_blocks, eb),
        "draft_vs_target": agreement(draft, target, held_blocks, eb),
    }


def _save_hf(model, tokenizer, path: Path) -> None:
    """bf16 safetensors + tokenizer into `path` (inside the build folder). The model stays bf16."""
    path.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


# ---- entry point ----------------------------------------------------------------------------------
# Fields that change only the drafts: a new value retrains the drafts around the saved target.
DRAFT_FIELDS = frozenset({"draft_steps", "distil", "draft_lr", "draft_layers", "draft_hidden_size",
                          "draft_intermediate_size", "greedy_distil_prompts", "moe_draft_bits"})


def cache_key(cfg: TrainConfig | dict[str, Any], fingerprint: str, target_only: bool = False) -> str:
    d = dataclasses.asdict(cfg) if isinstance(cfg, TrainConfig) else dict(cfg)
    if target_only:
        d = {k: v for k, v in d.items() if k not in DRAFT_FIELDS}
    blob = json.dumps({"cfg": d, "corpus": fingerprint,
                       "format": TRAIN_FORMAT_VERSION, "torch": torch.__version__.split("+")[0]},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def reusable_target(out: Path, cfg: TrainConfig, fingerprint: str) -> dict[str, Any] | None:
    """training.json of a finished run in `out` whose target this config would train again."""
    try:
        rec = json.loads((out / "training.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if rec.get("status") != "done" or not (out / "config.json").is_file():
        return None
    if cache_key(rec["config"], rec["corpus"]["fingerprint"], target_only=True) != cache_key(
            cfg, fingerprint, target_only=True):
        return None
    return rec


@torch.no_grad()
def greedy_blocks(target, blocks: torch.Tensor, num_prompts: int, seed: int,
                  batch_size: int = 32) -> torch.Tensor:
    """[num_prompts, T]: the first T/2 tokens of seeded training blocks, then the target's greedy
    continuation (T/2 tokens; stop tokens suppressed so every row is full)."""
    T = blocks.shape[1]
    half = T // 2
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7)
    rows = torch.randperm(blocks.shape[0], generator=g)[:num_prompts]
    prompts = blocks[rows, :half]
    target.eval()
    out = []
    for i in range(0, prompts.shape[0], batch_size):
        p = prompts[i:i + batch_size]
        gen = target.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=T - half,
                              min_new_tokens=T - half, do_sample=False,
                              pad_token_id=target.config.pad_token_id)
        out.append(gen[:, :T])
    return torch.cat(out)


def cached_result(out: Path, key: str) -> dict[str, Any] | None:
    meta = out / "training.json"
    if not meta.exists():
        return None
    try:
        rec = json.loads(meta.read_text())
    except json.JSONDecodeError:
        return None
    if rec.get("key") == key and rec.get("status") == "done" and (out / "config.json").is_file():
        return rec
    return None


def train_tiny(out: str | Path, cfg: TrainConfig) -> dict[str, Any]:
    """Train (or resume, or return the cached) target + drafts into `out`; returns training.json."""
    from transformers import PreTrainedTokenizerFast, Qwen3ForCausalLM, Qwen3MoeForCausalLM

    from moespac_vllm.models.tiny import build_tokenizer, save_tokenizer

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "training.json").exists():
        raise ValueError(f"out: {out} is not empty and holds no trained model; refusing to "
                         "overwrite it")
    t_start = time.perf_counter()
    train_docs, held_docs = load_corpus(cfg.corpus, cfg.corpus_max_bytes)
    fingerprint = corpus_fingerprint(train_docs, held_docs)
    key = cache_key(cfg, fingerprint)
    cached = cached_result(out, key)
    if cached is not None:
        log.info("train-tiny: %s is up to date (key %s)", out, key)
        return cached
    reused = reusable_target(out, cfg, fingerprint)
    work = out.with_name(out.name + ".work")
    if (work / "key").exists() and (work / "key").read_text() != key:
        shutil.rmtree(work)  # a different config's leftovers must not be resumed
    work.mkdir(parents=True, exist_ok=True)
    (work / "key").write_text(key)

    # Tokenizer (models.tiny's BPE, trained on this corpus) and token streams, cached in the work
    # folder so a resumed run skips them.
    tok_dir = work / "tokenizer"
    t0 = time.perf_counter()
    if reused is not None:  # the target's own tokenizer
        tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
    else:
        if not (tok_dir / "tokenizer.json").exists():
            save_tokenizer(build_tokenizer([d.text for d in train_docs], cfg.vocab_size), tok_dir)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    ids_path = work / "tokens.pt"
    if ids_path.exists():
        ids = torch.load(ids_path)
    else:
        ids = {"train": tokenize(tokenizer, train_docs), "held": tokenize(tokenizer, held_docs)}
        _atomic_save(ids, ids_path)
    tokenize_s = time.perf_counter() - t0
    vocab = len(tokenizer)
    if vocab > cfg.vocab_size:
        raise ValueError(f"vocab_size: tokenizer has {vocab} entries > {cfg.vocab_size}")
    T = cfg.seq_len
    train_blocks = ids["train"][: ids["train"].numel() // T * T].view(-1, T)
    held_blocks = ids["held"][: ids["held"].numel() // T * T].view(-1, T)[: cfg.eval_blocks]
    if train_blocks.shape[0] < cfg.batch_size or held_blocks.shape[0] == 0:
        raise ValueError(f"corpus: {ids['train'].numel()} training tokens / "
                         f"{ids['held'].numel()} held-out tokens are too few for seq_len {T}")
    # Generation stops at the chat end token and at the end of a document (all it was trained on).
    # The first is also the pad token.
    stop_ids = [tokenizer.convert_tokens_to_ids(DOC_SEPARATOR), tokenizer.eos_token_id]

    if reused is not None:
        # Only draft options changed: keep the saved (bf16) target and retrain the drafts.
        log.info("train-tiny: reusing the target in %s (key %s)", out, reused["key"])
        target = Qwen3MoeForCausalLM.from_pretrained(out, dtype=torch.float32)
        experts_impl = _fast_experts(target)
        target_rec = {k: v for k, v in reused["target"].items()
                      if k not in ("dir", "params", "expert_params")}
        target_rec["reused_from_key"] = reused["key"]
    else:
        torch.manual_seed(cfg.seed)
        target = Qwen3MoeForCausalLM(target_config(cfg, stop_ids))
        experts_impl = _fast_experts(target)
        target_rec = train_loop(target, target_loss(target, cfg.router_aux_loss_coef),
                                train_blocks, steps=cfg.steps, batch_size=cfg.batch_size,
                                seed=cfg.seed, lr=cfg.lr, warmup=cfg.warmup_steps,
                                ckpt=work / "target.ckpt", checkpoint_every=cfg.checkpoint_every,
                                desc="target", bf16=cfg.bf16_autocast)

    torch.manual_seed(cfg.seed + 1)
    draft = Qwen3ForCausalLM(draft_config(cfg, stop_ids))
    draft_rec: dict[str, Any] = {"steps": 0, "wall_s": 0.0}
    draft_blocks, greedy_s = train_blocks, 0.0
    if cfg.draft_steps and cfg.distil and cfg.greedy_distil_prompts:
        t0 = time.perf_counter()
        gpath = work / "greedy.pt"
        if gpath.exists():
            greedy = torch.load(gpath)
        else:
            with _autocast(cfg.bf16_autocast):
                greedy = greedy_blocks(target, train_blocks, cfg.greedy_distil_prompts, cfg.seed)
            _atomic_save(greedy, gpath)
        # Half of the draft's batches come from the target's greedy continuations.
        reps = max(train_blocks.shape[0] // greedy.shape[0], 1)
        draft_blocks = torch.cat([train_blocks, greedy.repeat(reps, 1)])
        greedy_s = time.perf_counter() - t0
    if cfg.draft_steps:
        target.eval()
        draft_rec = train_loop(draft, draft_loss(draft, target if cfg.distil else None),
                               draft_blocks, steps=cfg.draft_steps, batch_size=cfg.batch_size,
                               seed=cfg.seed + 1, lr=cfg.draft_lr, warmup=cfg.warmup_steps,
                               ckpt=work / "draft.ckpt", checkpoint_every=cfg.checkpoint_every,
                               desc="draft" + (" (distil)" if cfg.distil else ""),
                               bf16=cfg.bf16_autocast)

    # Evaluate, then write everything into a sibling build folder and swap it in, so an
    # interrupted run never leaves a folder that looks trained.
    t0 = time.perf_counter()
    eb = cfg.batch_size
    build = out.with_name("." + out.name + ".partial")
    shutil.rmtree(build, ignore_errors=True)
    with _autocast(cfg.bf16_autocast):
        heldout = _heldout_metrics(cfg, ids["train"], held_blocks, target, draft)
    moe_draft_rec = None
    if cfg.moe_draft_bits:
        moe_draft, qerr = quantized_moe_draft(target, cfg.moe_draft_bits)
        with _autocast(cfg.bf16_autocast):
            heldout["moe_draft"] = evaluate(moe_draft, held_blocks, eb)
            heldout["moe_draft_vs_target"] = agreement(moe_draft, target, held_blocks, eb,
                                                       routing=True)
        _save_hf(moe_draft, tokenizer, build / "moe-draft")
        moe_draft_rec = {"dir": "moe-draft", "bits": cfg.moe_draft_bits,
                         "relative_weight_error": round(qerr, 4)}
        del moe_draft
    heldout = {k: (round(v, 4) if isinstance(v, float) else
                   {kk: round(vv, 4) for kk, vv in v.items()}) for k, v in heldout.items()}
    _save_hf(target, tokenizer, build)
    _save_hf(draft, tokenizer, build / "draft")
    eval_s = time.perf_counter() - t0

    n_params = sum(p.numel() for p in target.parameters())
    n_expert = sum(p.numel() for n, p in target.named_parameters() if ".mlp.experts." in n)
    rec = {
        "status": "done", "key": key, "format": TRAIN_FORMAT_VERSION,
        "config": dataclasses.asdict(cfg),
        "corpus": {"source": cfg.corpus or f"stdlib:{sysconfig.get_paths()['stdlib']}",
                   "fingerprint": fingerprint, "train_docs": len(train_docs),
                   "heldout_docs": len(held_docs), "train_tokens": int(ids["train"].numel()),
                   "heldout_tokens_evaluated": int(held_blocks[:, 1:].numel())},
        "tokenizer": {"vocab": vocab, "stop_token_ids": stop_ids},
        "target": {"dir": ".", "params": n_params, "expert_params": n_expert, **target_rec},
        "draft": {"dir": "draft", "params": sum(p.numel() for p in draft.parameters()),
                  "distil": cfg.distil, **draft_rec},
        "moe_draft": moe_draft_rec,
        "heldout_loss_nats": heldout,
        # Training phases include the wall time of earlier (resumed) runs.
        "wall_s": {"tokenize": round(tokenize_s, 1), "target": target_rec["wall_s"],
                   "greedy_generation": round(greedy_s, 1), "draft": draft_rec["wall_s"],
                   "eval_and_save": round(eval_s, 1),
                   "total_this_call": round(time.perf_counter() - t_start, 1)},
        "torch_threads": torch.get_num_threads(),
        "training_numerics": {"bf16_autocast": cfg.bf16_autocast, "experts": experts_impl},
    }
    (build / "training.json").write_text(json.dumps(rec, indent=1))
    if out.exists():
        shutil.rmtree(out)
    build.rename(out)
    shutil.rmtree(work, ignore_errors=True)
    return rec
