"""The vLLM general plugin: version gate, opt-in, config, and the registration hooks.

vLLM calls `moespac_vllm.register()` (entry point `vllm.general_plugins: moespac`) in every process
it starts (API server, engine core, workers), possibly several times per process, whenever
`VLLM_PLUGINS` is unset or names `moespac`. `register()` here is therefore:

- idempotent: the first call decides, later calls return the same `PluginState`;
- lazy: it imports only `vllm.version` and, once past the gate, the glue modules;
- gated: vLLM versions outside VERIFIED_VLLM_VERSIONS leave the plugin inert with ONE warning, unless
  `MOESPAC_ALLOW_UNVERIFIED_VLLM=1`;
- opt-in: installing the package changes nothing. Offloading is on for an engine only when asked
  (`config.enabled_by`: a "moespac" section in its additional_config, a `MOESPAC_*` setting, or
  `--plugin moespac`). Otherwise only two inert hooks are installed (the `--plugin` flag and the
  engine-config hook, `engine_config.py`) and stock vLLM runs untouched; the process that builds
  the engine config logs exactly one line `moespac: installed, not enabled (...)`.

Where the decision is made. vLLM does not hand general plugins its `VllmConfig`: in the API-server
process plugins load while the CLI parser is being built, before any config exists. The config is
built later by `EngineArgs.create_engine_config`, which `engine_config.py` wraps: there the
additional_config is known, the compilation config is made safe, start-up checks run, and for an
enabled engine `MOESPAC_ENGINE_ENABLED=1` is put in the environment, which the engine-core and
worker processes it starts inherit; their `register()` reads it and installs the offloaded layer
(`routed_experts.register`) before the model is built. In-process engines
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`) get the layer from the hook directly (`enable_offloading`).
The layer calls `config_for(vllm_config)` when it is built: `--additional-config '{"moespac":
{...}}'` merged over the env is the config in force.

The `--plugin moespac` flag: vLLM 0.32/0.33 has no such flag. But `AsyncEngineArgs.add_cli_args`
(the serve parser of both `vllm serve` and `python -m vllm.entrypoints.openai.api_server`) calls
load_general_plugins() *before* it adds the engine arguments "so plugins can update the parser"; we
wrap `EngineArgs.add_cli_args` to add `--plugin {moespac}` there (LEDGER). Parsing it sets
`MOESPAC_ENABLE=1` in the environment, which enables offloading for the engine being configured
(and, inherited, in its engine processes).
"""
from __future__ import annotations

import argparse
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from moespac_vllm.config import ENV_ENABLE, HOW_TO_ENABLE, MoESpacConfig, enabled_by

logger = logging.getLogger("moespac_vllm.plugin")

VERIFIED_VLLM_VERSIONS = frozenset({"0.32.0", "0.33.0"})
ALLOW_UNVERIFIED_ENV = "MOESPAC_ALLOW_UNVERIFIED_VLLM"
LAYER_MODULE = "moespac_vllm.patches.routed_experts"
PLUGIN_FLAG = "--plugin"
PLUGIN_NAME = "moespac"


@dataclass(frozen=True, slots=True)
class PluginState:
    """What the first `register()` call in this process did."""

    loaded: bool  # hooks installed and the config parsed
    vllm_version: str
    verified: bool  # vllm_version is in VERIFIED_VLLM_VERSIONS
    inert_reason: str | None = None  # why not loaded
    config: dict[str, Any] = field(default_factory=dict)  # MoESpacConfig.to_flat() at register
    layer_installed: bool = False  # routed_experts.register(config) ran
    cli_flag_installed: bool = False  # `--plugin moespac` is accepted by vLLM's serve parser
    # where `config` came from: "env" (MOESPAC_* only; an engine's --additional-config is applied
    # when its layers are built) or "env+additional_config" (a VllmConfig was current)
    config_source: str = "env"
    # why offloading is on in this process at register time (config.enabled_by), None: not (yet)
    enabled: str | None = None

    def summary(self) -> str:
        """The one-line load message (also the demo's stats line until the layer reports)."""
        if not self.loaded:
            return f"moespac: plugin inert (vLLM {self.vllm_version}: {self.inert_reason})"
        if not self.enabled and not self.layer_installed:
            return f"moespac: installed, not enabled ({HOW_TO_ENABLE})"
        c = self.config
        budget = (f"gpu_expert_budget_gb {c['gpu_expert_budget_gb']}"
                  if c.get("gpu_expert_budget_gb") is not None
                  else f"cache_ratio {c.get('cache_ratio') if c.get('cache_ratio') is not None else 'default 0.25'}")
        layer = "offloaded layer installed" if self.layer_installed else \
            "offloaded layer not installed yet"
        source = ("from env; an engine's --additional-config applies when its layers are built"
                  if self.config_source == "env" else "from env + --additional-config")
        return (f"moespac: plugin loaded (vLLM {self.vllm_version}, {budget}, policy "
                f"{c.get('policy')}, balancer {c.get('balancer')} [{source}]; {layer})")


_lock = threading.Lock()
_state: PluginState | None = None


def state() -> PluginState | None:
    """The state after register() in this process, or None if vLLM has not loaded the plugin."""
    return _state


def vllm_version() -> str:
    from vllm.version import __version__

    return str(__version__)


def _allow_unverified(environ: Mapping[str, str]) -> bool:
    return environ.get(ALLOW_UNVERIFIED_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def config_for(vllm_config: Any | None = None,
               environ: Mapping[str, str] | None = None) -> MoESpacConfig:
    """The config in force for an engine: `MOESPAC_*` env merged under the engine's
    `--additional-config '{"moespac": {...}}'`. With no argument, uses vLLM's current config if
    one is set (model construction), else env only. Raises ValueError naming a bad field."""
    if vllm_config is None:
        from vllm.config import get_current_vllm_config_or_none

        vllm_config = get_current_vllm_config_or_none()
    additional = getattr(vllm_config, "additional_config", None) if vllm_config else None
    if additional is not None and not isinstance(additional, Mapping):
        additional = None  # a SupportsHash object from another plugin: not ours to read
    return MoESpacConfig.resolve(additional_config=additional, environ=environ)


def register(environ: Mapping[str, str] | None = None) -> PluginState:
    """vLLM's general-plugin hook (via `moespac_vllm.register`). See the module docstring."""
    global _state
    with _lock:
        if _state is not None:
            return _state
        _state = _register(os.environ if environ is None else environ)
        return _state


def _register(environ: Mapping[str, str]) -> PluginState:
    _ensure_log_handler(environ)
    version = vllm_version()
    verified = version in VERIFIED_VLLM_VERSIONS
    if not verified and not _allow_unverified(environ):
        reason = (f"unverified vLLM version; verified: {', '.join(sorted(VERIFIED_VLLM_VERSIONS))};"
                  f" set {ALLOW_UNVERIFIED_ENV}=1 to try anyway")
        logger.warning("moespac: plugin inert: vLLM %s is not a verified version (%s); set %s=1 "
                       "to load it anyway", version, ", ".join(sorted(VERIFIED_VLLM_VERSIONS)),
                       ALLOW_UNVERIFIED_ENV)
        return PluginState(loaded=False, vllm_version=version, verified=False, inert_reason=reason)
    if not verified:
        logger.warning("moespac: loading on unverified vLLM %s because %s=1", version,
                       ALLOW_UNVERIFIED_ENV)

    from vllm.config import get_current_vllm_config_or_none

    current = get_current_vllm_config_or_none()
    additional = getattr(current, "additional_config", None) if current is not None else None
    why = enabled_by(additional if isinstance(additional, Mapping) else None, environ)
    flag = _install_plugin_flag()
    from moespac_vllm.patches import engine_config

    engine_config.install()
    if why is None:
        # Nothing else is touched. The engine-config hook logs the one "not enabled" line in the
        # process that builds the config; engine processes stay silent.
        st = PluginState(loaded=True, vllm_version=version, verified=verified,
                         cli_flag_installed=flag)
        logger.debug("%s", st.summary())
        return st
    # Bad config raises here, which stops vLLM with our one-line ValueError naming the field.
    config = config_for(current, environ=environ)
    layer_installed = _install_layer(config)
    st = PluginState(loaded=True, vllm_version=version, verified=verified,
                     config=config.to_flat(), layer_installed=layer_installed,
                     cli_flag_installed=flag, enabled=why,
                     config_source="env" if current is None else "env+additional_config")
    logger.info("%s", st.summary())
    return st


def _install_layer(config: MoESpacConfig) -> bool:
    """routed_experts.register(config): the offloaded layer and the step hooks."""
    import importlib

    try:
        routed_experts = importlib.import_module(LAYER_MODULE)
    except ImportError as e:
        if e.name != LAYER_MODULE:
            raise  # the layer exists but something it imports is missing: that is a real error
        logger.info("moespac: offloaded layer not installed yet (%s missing); plugin loaded "
                    "without offloading", LAYER_MODULE)
        return False
    routed_experts.register(config)
    return True


def enable_offloading(config: MoESpacConfig) -> None:
    """An engine of this process is enabled (engine_config's hook): make sure the offloaded layer
    is installed here too (in-process engines build their model in this process)."""
    global _state
    with _lock:
        st = _state
        if st is None or not st.loaded:
            return
        installed = _install_layer(config)
        if not st.layer_installed or not st.enabled:
            from dataclasses import replace

            _state = replace(st, layer_installed=installed, enabled=st.enabled or "engine config",
                             config=config.to_flat(), config_source="env+additional_config")
            logger.info("%s", _state.summary())


def disable_offloading() -> None:
    """An engine of this process is not enabled: a later model built here must be stock, so the
    out-of-tree layer is withdrawn (the step hooks find no runtime and stay inert)."""
    import sys

    if LAYER_MODULE in sys.modules:
        sys.modules[LAYER_MODULE].unregister()


def _ensure_log_handler(environ: Mapping[str, str]) -> None:
    """Give `moespac_vllm.*` loggers a handler like vLLM's (stdout, INFO, vLLM's level variable),
    so the load line and the layer's stats lines are seen. vLLM configures only its own `vllm`
    logger, and usually after plugins load. Skipped when the application configured our logger or
    turned vLLM's logging configuration off (VLLM_CONFIGURE_LOGGING=0)."""
    import sys

    pkg = logging.getLogger("moespac_vllm")
    if pkg.handlers or environ.get("VLLM_CONFIGURE_LOGGING", "1").strip() == "0":
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s",
                                           datefmt="%m-%d %H:%M:%S"))
    pkg.addHandler(handler)
    level = environ.get("VLLM_LOGGING_LEVEL", "INFO").strip().upper()
    pkg.setLevel(level if level in logging.getLevelNamesMapping() else "INFO")
    pkg.propagate = False


def stats_line(vllm_config: Any | None = None) -> str:
    """The plugin's statistics line for this process: the offloaded layer's `stats_line()` when it
    is installed and provides one, else the load summary with the config in force for
    `vllm_config` (its --additional-config merged over the env)."""
    st = _state
    if st is None:
        return "moespac: plugin not loaded in this process"
    if not st.loaded or (not st.enabled and not st.layer_installed):
        return st.summary()
    if st.layer_installed:
        import importlib

        layer = importlib.import_module(LAYER_MODULE)
        return str(layer.stats_line())
    if vllm_config is not None and st.loaded:
        from dataclasses import replace

        st = replace(st, config=config_for(vllm_config).to_flat(),
                     config_source="env+additional_config")
    return st.summary()


# ---- `--plugin moespac` on vLLM's serve parser (LEDGER) ------------------------------------
class _EnablePlugin(argparse.Action):
    """`--plugin moespac`: store the value and set MOESPAC_ENABLE=1, which `enabled_by` reads in
    this process (when the engine config is built) and, inherited, in the engine processes."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None
                 ) -> None:
        setattr(namespace, self.dest, values)
        os.environ[ENV_ENABLE] = "1"


def _install_plugin_flag() -> bool:
    """Wrap `EngineArgs.add_cli_args` so the serve parser accepts `--plugin moespac`.

    Fails loudly (AttributeError/TypeError at load) if the upstream hook moved."""
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.__dict__["add_cli_args"]
    if not isinstance(original, staticmethod):
        raise TypeError("moespac: vllm EngineArgs.add_cli_args is no longer a staticmethod; "
                        "update patches/plugin.py (_install_plugin_flag)")
    func = original.__func__
    if getattr(func, "_moespac_wrapped", False):
        return True

    def add_cli_args(parser: Any, *args: Any, **kwargs: Any) -> Any:
        out = func(parser, *args, **kwargs)
        target = out if out is not None else parser
        if not any(PLUGIN_FLAG in a.option_strings for a in target._actions):
            target.add_argument(
                PLUGIN_FLAG, choices=[PLUGIN_NAME], default=None, action=_EnablePlugin,
                help="Enable moespac expert offloading for this engine (the same as a "
                "\"moespac\" section in --additional-config, or any MOESPAC_* setting); "
                "configure it with --additional-config '{\"moespac\": {...}}'.")
        return out

    add_cli_args._moespac_wrapped = True  # type: ignore[attr-defined]
    add_cli_args.__wrapped__ = func  # type: ignore[attr-defined]
    EngineArgs.add_cli_args = staticmethod(add_cli_args)  # type: ignore[method-assign]
    return True


__all__ = [
    "ALLOW_UNVERIFIED_ENV",
    "PluginState",
    "VERIFIED_VLLM_VERSIONS",
    "config_for",
    "disable_offloading",
    "enable_offloading",
    "register",
    "state",
    "stats_line",
    "vllm_version",
]
