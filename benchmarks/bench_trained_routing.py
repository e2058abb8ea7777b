"""Is the trained model's routing realistic? Expert-usage entropy and temporal reuse of the model
trained by `moespac train-tiny`, next to a random-weight model of the same shape and the recorded
Mixtral-8x7B decode traces.

For each model: greedy decode (transformers, bf16, the saved checkpoint) of held-out HumanEval
prompts, then one teacher-forced forward over prompt + continuation with router logits on, so the
routing of every generated token is exactly what decoding computed. Per source, averaged over
layers:

  entropy_norm       H(expert shares) / ln E (1 = uniform use of the experts)
  share_cv           std/mean of the expert shares (0 = uniform)
  reuse_lag1         P(e in S_{t+1} | e in S_t), S_t the top-k set of token t
  reuse_lift         (reuse_lag1 - R0) / (1 - R0), R0 the same probability for tokens drawing
                     experts independently with these popularities (trace.independent_reuse)
  window_reuse_w4    P(e in W_{i+1} | e in W_i), W_i the union over a window of 4 consecutive
                     tokens (a k=3 verification window); window_reuse_w4_indep the same for
                     independent draws with these popularities (analytic)

    .venv/bin/python benchmarks/bench_trained_routing.py .models/trained-qwen3-moe

Prints JSON lines (with device and command), appends them to benchmarks/results/
trained_routing.jsonl and writes benchmarks/results/trained_routing.png.
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moespac_vllm.calibrate import describe_device  # noqa: E402
from moespac_vllm.config import shared_data_dir  # noqa: E402
from moespac_vllm.trace import expert_shares, independent_reuse, load_trace, reuse_curve  # noqa: E402


def data_dir() -> Path:
    d = shared_data_dir()
    if d is None:
        raise SystemExit("shared data not found: set MOESPAC_DATA_DIR")
    return d


def window_reuse(streams: list[np.ndarray], num_experts: int, w: int) -> np.ndarray:
    """[L] P(e in W_{i+1} | e in W_i) over consecutive non-overlapping windows of w tokens."""
    per_layer_hit, per_layer_base = None, None
    for ids in streams:
        nw = ids.shape[0] // w
        if nw < 2:
            continue
        oh = np.zeros((nw, ids.shape[1], num_experts), dtype=bool)
        for j in range(w):
            np.put_along_axis(oh, ids[j: nw * w: w].astype(np.int64), True, axis=2)
        h = (oh[:-1] & oh[1:]).sum(axis=(0, 2))
        b = oh[:-1].sum(axis=(0, 2))
        per_layer_hit = h if per_layer_hit is None else per_layer_hit + h
        per_layer_base = b if per_layer_base is None else per_layer_base + b
    return per_layer_hit / np.maximum(per_layer_base, 1)


def independent_window_reuse(shares: np.ndarray, top_k: int, w: int) -> np.ndarray:
    """[L] window reuse if every token drew its experts independently: q = 1 - (1 - pi)^w is the
    chance an expert is in a window; reuse = sum q^2 / sum q."""
    pi = np.clip(top_k * shares, 0.0, 1.0)
    q = 1.0 - (1.0 - pi) ** w
    return (q * q).sum(axis=1) / np.maximum(q.sum(axis=1), 1e-12)


def summarize(name: str, streams: list[np.ndarray], num_experts: int, top_k: int,
              extra: dict) -> dict:
    allids = np.concatenate(streams, axis=0)
    shares = expert_shares(allids, num_experts)  # [L, E]
    p = np.where(shares > 0, shares, 1.0)
    entropy = -(shares * np.log(p)).sum(axis=1) / np.log(num_experts)
    lagged, _ = reuse_curve(streams, num_experts=num_experts, max_lag=4)
    r0 = independent_reuse(shares, top_k)
    lift = (lagged[:, 0] - r0) / np.maximum(1 - r0, 1e-12)
    wr = window_reuse(streams, num_experts, 4)
    wr0 = independent_window_reuse(shares, top_k, 4)
    cv = shares.std(axis=1) / shares.mean(axis=1)
    return {"source": name, "num_experts": num_experts, "top_k": top_k,
            "num_layers": int(shares.shape[0]), "tokens": int(allids.shape[0]),
            "entropy_norm": round(float(entropy.mean()), 4),
            "entropy_norm_min_layer": round(float(entropy.min()), 4),
            "share_cv": round(float(cv.mean()), 4),
            "reuse_lag1": round(float(lagged[:, 0].mean()), 4),
            "reuse_lag1_indep": round(float(r0.mean()), 4),
            "reuse_lift": round(float(lift.mean()), 4),
            "window_reuse_w4": round(float(wr.mean()), 4),
            "window_reuse_w4_indep": round(float(wr0.mean()), 4),
            "per_layer_entropy_norm": [round(float(x), 3) for x in entropy],
            "per_layer_reuse_lift": [round(float(x), 3) for x in lift],
            **extra}, shares


def hf_streams(model_dir: Path | None, config_dir: Path, prompts: list[str], max_new: int,
               seed: int, teacher_forced: bool = False) -> list[np.ndarray]:
    """Per prompt, the [n, L, K] routing of the greedy continuation (or, teacher_forced, of every
    token of the given text). model_dir None: random weights (seeded) with the trained model's
    config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(config_dir)
    if model_dir is None:
        torch.manual_seed(seed)
        cfg = AutoConfig.from_pretrained(config_dir)
        model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    model.eval()
    k = model.config.num_experts_per_tok
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt")["input_ids"][:, -384:]
            if teacher_forced:
                gen, n0 = ids, 1
            else:
                gen = model.generate(ids, max_new_tokens=max_new, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
                n0 = ids.shape[1]
            if gen.shape[1] - n0 < 8:
                continue
            fwd = model(input_ids=gen, output_router_logits=True)
            # router_logits: per layer [T, E] (batch 1) -> [n, L, K] for the generated tokens
            per_layer = [rl.reshape(gen.shape[1], -1)[n0 - 1: gen.shape[1] - 1].float()
                         .topk(k, dim=-1).indices for rl in fwd.router_logits]
            out.append(torch.stack(per_layer, dim=1).numpy().astype(np.int16))
    return out


def estimator_on_traces(paths: list[str], d: Path, common: dict) -> list[dict]:
    """The utility estimator's per-layer hot/cold prediction (bench_estimator.window_prediction)
    on recorded speculative traces, and on Mixtral's decode trace cut into exact k=3 windows."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_estimator import window_prediction

    from moespac_vllm.trace import StepKind, windows_from_autoregressive

    works = []
    for p in paths:
        t = load_trace(p)
        verify = t.kind == StepKind.VERIFY
        acc = t.num_accepted[verify]
        works.append((f"recorded {Path(p).name}", t, {
            "verify_steps": int(verify.sum()),
            "mean_window_tokens": round(float(t.tokens_per_step[verify].mean()), 3)
            if verify.any() else None,
            "mean_accepted": round(float(acc.mean()), 3) if acc.size else None,
            "has_draft_routing": t.has_draft}))
    mix = load_trace(d / "mixtral-8x7b-routing" / "humaneval_2_routing.jsonl")
    works.append(("mixtral humaneval_2 k=3 exact windows", windows_from_autoregressive(mix, 3, 3),
                  {}))
    rows = []
    for name, work, info in works:
        for predictor in ("previous", "fixed", "window", "window+draft", "all_hot"):
            if predictor == "window+draft" and not work.has_draft:
                continue
            res = window_prediction(work, predictor)
            rows.append({**common, "bench": "trained_routing_estimator", "trace": name,
                         "label": work.label, "E": work.dims.num_experts,
                         "top_k": work.dims.top_k, "predictor": predictor, **info,
                         **{k: (round(v, 4) if isinstance(v, float) else v)
                            for k, v in res.items()}})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trained", help="output folder of `moespac train-tiny`")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--sd-trace", action="append", default=[], metavar="PATH",
                    help="a speculative trace recorded in vLLM (bench_acceptance.py "
                    "--moespac-config record_trace): score the utility estimator's hot/cold "
                    "prediction per layer on its real verification windows, next to Mixtral's "
                    "k=3 windows (repeatable)")
    ap.add_argument("--skip-models", action="store_true",
                    help="only the --sd-trace evaluation (no decoding of the two models)")
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results"
                                              / "trained_routing.jsonl"))
    ap.add_argument("--plot", default=str(REPO / "benchmarks" / "results" / "trained_routing.png"))
    args = ap.parse_args(argv)
    trained = Path(args.trained)
    if not (trained / "config.json").exists():
        raise SystemExit(f"{trained} holds no checkpoint: run `moespac train-tiny {trained}`")
    d = data_dir()
    with gzip.open(d / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
        rows_he = [json.loads(line) for line in f][: args.num_prompts]
    prompts = [r["prompt"] for r in rows_he]
    # Real held-out code (prompt + canonical solution), read teacher-forced: the routing of
    # diverse text, free of the repetition loops tiny models fall into when decoding greedily.
    texts = [r["prompt"] + r["canonical_solution"] for r in rows_he]
    cfg = json.loads((trained / "config.json").read_text())
    e, k = cfg.get("num_experts", cfg.get("num_local_experts")), cfg["num_experts_per_tok"]
    command = " ".join([Path(sys.executable).name, *sys.argv])
    common = {"bench": "trained_routing", "device": describe_device(), "command": command}
    rows, shares = [], {}
    if args.sd_trace:
        est_rows = estimator_on_traces(args.sd_trace, d, common)
        with open(args.results, "a") as f:
            for r in est_rows:
                print(json.dumps(r))
                f.write(json.dumps(r) + "\n")
        if args.skip_models:
            return 0
    for name, mdir in (("trained", trained), ("random_weights", None)):
        for tf in (False, True):
            streams = hf_streams(mdir, trained, texts if tf else prompts, args.max_new_tokens,
                                 seed=0, teacher_forced=tf)
            how = ("teacher-forced prompt+canonical_solution" if tf else
                   f"greedy {args.max_new_tokens} new tokens")
            row, sh = summarize(f"{name} qwen3_moe E{e} K{k} {'text' if tf else 'greedy'}",
                                streams, e, k,
                                {**common, "prompts": f"humaneval[:{len(streams)}] {how}"})
            rows.append(row)
            shares[row["source"]] = sh
    tr = load_trace(d / "mixtral-8x7b-routing" / "humaneval_2_routing.jsonl")
    from moespac_vllm.trace import request_streams

    row, sh = summarize("mixtral-8x7b recorded (humaneval_2_routing)", request_streams(tr),
                        tr.dims.num_experts, tr.dims.top_k,
                        {**common, "prompts": "HumanEval/0,1 greedy decode (recorded in vLLM)"})
    rows.append(row)
    shares[row["source"]] = sh
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as f:
        for r in rows:
            print(json.dumps(r))
            f.write(json.dumps(r) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for src, sh in shares.items():
            s = np.sort(sh, axis=1)[:, ::-1].mean(axis=0)
            axes[0].plot(np.arange(1, s.size + 1) / s.size, s * s.size, marker=".", label=src)
        axes[0].axhline(1.0, color="grey", lw=0.8)
        axes[0].set_xlabel("expert rank / E")
        axes[0].set_ylabel("share x E (1 = uniform)")
        axes[0].set_title("expert popularity (sorted, mean over layers)")
        axes[0].legend(fontsize=7)
        names = [r["source"].split(" (")[0] for r in rows]
        x = np.arange(len(rows))
        axes[1].bar(x - 0.2, [r["reuse_lag1"] for r in rows], 0.4, label="next-token reuse")
        axes[1].bar(x + 0.2, [r["window_reuse_w4"] for r in rows], 0.4, label="next-window (4)")
        axes[1].scatter(x - 0.2, [r["reuse_lag1_indep"] for r in rows], color="k", zorder=3,
                        label="independent draws")
        axes[1].scatter(x + 0.2, [r["window_reuse_w4_indep"] for r in rows], color="k", zorder=3)
        axes[1].set_xticks(x, names, fontsize=7)
        axes[1].set_title("temporal reuse")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
