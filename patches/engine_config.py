"""The engine's config, once, where vLLM builds it: is moespac on, is the config safe, is it usable.

vLLM builds every engine's `VllmConfig` in the process that owns the engine (`LLM(...)`, the API
server of `vllm serve`) through `EngineArgs.create_engine_config`, then ships that object to the
engine-core and worker processes. We wrap that one method (LEDGER) and, for each config:

1. **Decide** whether moespac offloads this engine (`config.enabled_by`: a "moespac" section in
   additional_config, a `MOESPAC_*` setting, or `--plugin moespac`). Off: nothing is changed and
   one line `moespac: installed, not enabled (...)` is logged (once per process). On: the engine
   processes this one starts are told through the environment (`MOESPAC_ENGINE_ENABLED=1`, which
   they inherit), because their plugin load runs before any config reaches them.
2. **Compilation.** vLLM's CUDA default (O2/O3) is `cudagraph_mode=FULL_AND_PIECEWISE`. A FULL graph
   would replay one captured expert placement; a PIECEWISE graph split at `vllm::moe_forward*`
   runs the offloaded op eagerly between graphs, but the graph after it reads its input from the
   address captured once, while the op (and, for models with shared experts, vLLM's shared-expert
   output) is a fresh allocation on every call: a stale pointer (vLLM's breakable-graph notes
   state the same rule: eager segments must write the capture-time buffers). So the fastest mode
   that is correct for every MoE model today is `cudagraph_mode=NONE` with torch.compile kept
   (`mode` stays VLLM_COMPILE: Inductor fusions, no graph replay), applied exactly the way vLLM's
   own `_normalize_piecewise_cudagraph_mode` falls back to NONE (capture sizes cleared). Only
   vLLM's *default* is changed, and the change is logged; a mode the user set explicitly that
   captures the MoE layers is refused with one line. (PIECEWISE becomes correct once the
   offloaded op writes persistent per-batch-size output buffers and no shared-expert output
   crosses a graph boundary: GPU check case, issue 12.)
3. **Start-up checks** that would otherwise fail late: the cost `profile` resolves, and
   `stats_file` / `record_trace` can be written (missing parent directories are created). Each
   failure is one `ValueError` naming the field, raised from `LLM(...)` / `vllm serve` before
   any engine process starts.
"""
from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from moespac_vllm.config import (
    ENV_ENGINE_ENABLED,
    HOW_TO_ENABLE,
    MoESpacConfig,
    enabled_by,
    prepare_output_path,
)

logger = logging.getLogger("moespac_vllm.plugin")

_lock = threading.Lock()
_not_enabled_logged = False


@dataclass(frozen=True, slots=True)
class CompilationChange:
    """What `safe_compilation` changed in an engine's compilation config."""

    before: str  # cudagraph_mode name before
    after: str  # cudagraph_mode name after
    torch_compile: str  # compilation mode kept (name)

    def describe(self) -> str:
        return (f"cudagraph_mode {self.before} -> {self.after} (vLLM's default captures the MoE "
                f"layers in CUDA graphs, which would replay a stale expert placement / output "
                f"buffer; torch.compile kept: mode {self.torch_compile})")


def _mode_name(mode: Any) -> str:
    return str(getattr(mode, "name", mode))


def safe_compilation(vllm_config: Any, user_cudagraph_mode: Any = None) -> CompilationChange | None:
    """Make `vllm_config.compilation_config` safe for an offloaded MoE op, in place.

    `user_cudagraph_mode` is what the user set explicitly (EngineArgs' compilation_config before
    vLLM applied its optimisation-level defaults), None when unset. Returns what changed (None:
    nothing). Raises ValueError when the user's explicit mode captures the MoE layers."""
    from vllm.config.compilation import CUDAGraphMode

    model_config = getattr(vllm_config, "model_config", None)
    if model_config is not None and getattr(model_config, "enforce_eager", False):
        return None
    cc = vllm_config.compilation_config
    mode = cc.cudagraph_mode
    if mode is None or mode == CUDAGraphMode.NONE:
        return None
    if isinstance(user_cudagraph_mode, str):  # a dict-form compilation config keeps the name
        user_cudagraph_mode = CUDAGraphMode[user_cudagraph_mode.strip().upper()]
    if user_cudagraph_mode is not None and user_cudagraph_mode != CUDAGraphMode.NONE:
        raise ValueError(
            f"moespac: cudagraph_mode {_mode_name(mode)} (set explicitly) captures the offloaded "
            "MoE layers in CUDA graphs, which replay one expert placement and one output buffer; "
            "drop the setting (moespac then picks cudagraph_mode NONE with torch.compile kept), "
            "set -cc.cudagraph_mode=NONE, or use --enforce-eager")
    change = CompilationChange(before=_mode_name(mode), after="NONE",
                               torch_compile=_mode_name(cc.mode))
    # As vLLM's own fallback to NONE (VllmConfig._normalize_piecewise_cudagraph_mode).
    cc.cudagraph_mode = CUDAGraphMode.NONE
    cc.max_cudagraph_capture_size = 0
    cc.cudagraph_capture_sizes = []
    return change


def check_startup(config: MoESpacConfig) -> None:
    """Fail now, naming the field, for settings that would otherwise fail mid-run or at exit."""
    if config.profile != "auto":
        from moespac_vllm.cost_model import get_profile

        try:
            get_profile(config.profile)
        except ValueError as e:
            msg = str(e)
            raise ValueError(msg if msg.startswith("profile") else f"profile: {msg}") from None
        except (OSError, KeyError, TypeError) as e:
            raise ValueError(f"profile: {config.profile} is not a valid cost profile "
                             f"({type(e).__name__}: {e})") from None
    for name, path in (("stats_file", config.stats.stats_file),
                       ("record_trace", config.stats.record_trace)):
        if path:
            prepare_output_path(name, path)


def _additional(vllm_config: Any) -> Mapping[str, Any] | None:
    add = getattr(vllm_config, "additional_config", None)
    return add if isinstance(add, Mapping) else None


def on_engine_config(vllm_config: Any, user_cudagraph_mode: Any = None,
                     environ: Mapping[str, str] | None = None) -> str | None:
    """Everything the owner process does with a freshly built engine config (see the module
    docstring). Returns why moespac is enabled for it, or None. Raises ValueError naming a field."""
    global _not_enabled_logged
    env = os.environ if environ is None else environ
    # The marker is ours, for the engine processes; an earlier engine of this process set it.
    env = {k: v for k, v in env.items() if k != ENV_ENGINE_ENABLED}
    why = enabled_by(_additional(vllm_config), env)
    model_config = getattr(vllm_config, "model_config", None)
    is_moe = bool(getattr(model_config, "is_moe", True)) if model_config is not None else True
    if why is None or not is_moe:
        with _lock:
            if not _not_enabled_logged:
                _not_enabled_logged = True
                if why is None:
                    logger.info("moespac: installed, not enabled (%s)", HOW_TO_ENABLE)
                else:
                    logger.info("moespac: enabled (%s) but the model has no MoE layers: nothing "
                                "to offload, stock vLLM runs", why)
        if environ is None:
            os.environ.pop(ENV_ENGINE_ENABLED, None)
            from moespac_vllm.patches import plugin

            plugin.disable_offloading()
        return None
    from moespac_vllm.patches.plugin import config_for

    config = config_for(vllm_config, environ=env)
    check_startup(config)
    change = safe_compilation(vllm_config, user_cudagraph_mode)
    if change is not None:
        logger.info("moespac: %s", change.describe())
    if environ is None:
        os.environ[ENV_ENGINE_ENABLED] = "1"  # the engine processes started from here inherit it
    from moespac_vllm.patches import plugin

    plugin.enable_offloading(config)  # in-process engines (VLLM_ENABLE_V1_MULTIPROCESSING=0)
    return why


def install() -> bool:
    """Wrap `EngineArgs.create_engine_config` once (LEDGER). Fails loudly if it moved."""
    import inspect

    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.__dict__.get("create_engine_config")
    if original is None or not callable(original):
        raise AttributeError("moespac: vllm EngineArgs.create_engine_config is gone; update "
                             "patches/engine_config.py")
    if getattr(original, "_moespac_wrapped", False):
        return True
    params = tuple(inspect.signature(original).parameters)
    if params[:1] != ("self",):
        raise TypeError(f"moespac: vllm EngineArgs.create_engine_config{params} changed; update "
                        "patches/engine_config.py")

    @functools.wraps(original)
    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        user_cc = getattr(self, "compilation_config", None)
        user_mode = user_cc.get("cudagraph_mode") if isinstance(user_cc, Mapping) else \
            getattr(user_cc, "cudagraph_mode", None)
        vllm_config = original(self, *args, **kwargs)
        on_engine_config(vllm_config, user_mode)
        return vllm_config

    create_engine_config._moespac_wrapped = True  # type: ignore[attr-defined]
    EngineArgs.create_engine_config = create_engine_config  # type: ignore[method-assign]
    return True


__all__ = ["CompilationChange", "check_startup", "install",
           "on_engine_config", "safe_compilation"]
