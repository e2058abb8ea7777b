"""The vLLM plugin: vLLM's own loader honours VLLM_PLUGINS, register() is idempotent, gated on the
vLLM version, opt-in (installed but not asked for: nothing but two inert hooks, and one `not
enabled` line where the engine config is built), parses the config (bad config stops vLLM with the
field's name), calls the offloaded layer's hook, and makes `--plugin moespac` parse on vLLM's serve
parser and enable offloading.

Each scenario is a fresh interpreter (plugin state and vLLM's `plugins_loaded` are per process);
three interpreters start together in one module fixture because each pays vLLM's import (~10 s
on 2 cores, more when the machine is busy)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

_PRELUDE = """
import json, sys
def report(**kw):
    print("RESULT " + json.dumps(kw, default=str), flush=True)
"""

SCENARIOS: dict[str, tuple[dict[str, str], str]] = {
    # VLLM_PLUGINS=moespac through vLLM's loader; twice, plus a direct call: one load line.
    "named": ({"VLLM_PLUGINS": "moespac", "MOESPAC_CACHE_RATIO": "0.5"}, """
        from vllm.plugins import load_general_plugins
        import vllm.plugins
        load_general_plugins()
        vllm.plugins.plugins_loaded = False
        load_general_plugins()
        import moespac_vllm
        moespac_vllm.register()
        import importlib.util
        from dataclasses import asdict
        from moespac_vllm.patches import plugin
        from moespac_vllm.patches.serve import build_serve_parser, parse_serve_args
        parser, _ = build_serve_parser()
        ok = parser.parse_args(["serve", "/m", "--plugin", "moespac",
                                "--additional-config", '{"moespac": {"cache_ratio": 0.25}}'])
        try:
            parser.parse_args(["serve", "/m", "--plugin", "other"])
            other = "accepted"
        except SystemExit as e:
            other = f"exit {e.code}"
        ms = parse_serve_args("/m", ["--port", "8123", "--plugin", "moespac"])
        from vllm.config import VllmConfig
        vc = VllmConfig(additional_config={"moespac": {"policy": "lru"}})
        report(state=asdict(plugin.state()), plugin_flag=ok.plugin, model_tag=ok.model_tag,
               additional=ok.additional_config, other=other,
               layer_exists=importlib.util.find_spec(plugin.LAYER_MODULE) is not None,
               moespac_serve=[ms.model_tag, ms.host, ms.port, ms.plugin],
               config_for=plugin.config_for(vc).to_flat())
    """),
    # Installed and loaded, not asked for: no layer, no step hooks; EngineArgs builds a config
    # (the tiny model's) with the one "not enabled" line; `--plugin moespac` then enables.
    "not_enabled": ({"VLLM_PLUGINS": "moespac"}, """
        import os
        from vllm.plugins import load_general_plugins
        load_general_plugins()
        from dataclasses import asdict
        from vllm.engine.arg_utils import EngineArgs
        from vllm.model_executor.custom_op import op_registry_oot
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
        from moespac_vllm.patches import plugin
        from moespac_vllm.patches.serve import build_serve_parser
        st = asdict(plugin.state())
        wrapped = getattr(GPUModelRunner.execute_model, "_moespac_wrapped", False)
        model = os.environ["TINY_MODEL"]
        vc = EngineArgs(model=model, enforce_eager=True, max_model_len=256).create_engine_config()
        vc2 = EngineArgs(model=model, enforce_eager=True, max_model_len=256).create_engine_config()
        oot_after_off = "RoutedExperts" in op_registry_oot
        stats_off = plugin.stats_line()
        print("PHASE flag", flush=True)
        parser, _ = build_serve_parser()
        args = parser.parse_args(["serve", model, "--plugin", "moespac"])
        vc3 = EngineArgs(model=model, enforce_eager=True, max_model_len=256).create_engine_config()
        report(state=st, runner_wrapped=wrapped, oot_after_off=oot_after_off,
               stats=stats_off, enable_env=os.environ.get("MOESPAC_ENABLE"),
               engine_marker=os.environ.get("MOESPAC_ENGINE_ENABLED"),
               oot_after_flag="RoutedExperts" in op_registry_oot,
               runner_wrapped_after_flag=getattr(GPUModelRunner.execute_model,
                                                 "_moespac_wrapped", False))
    """),
    # VLLM_PLUGINS=other: vLLM's loader keeps us out; the flag does not exist.
    "other": ({"VLLM_PLUGINS": "other"}, """
        from vllm.plugins import load_general_plugins
        load_general_plugins()
        from moespac_vllm.patches.serve import build_serve_parser
        parser, _ = build_serve_parser()
        try:
            parser.parse_args(["serve", "/m", "--plugin", "moespac"])
            flag = "accepted"
        except SystemExit as e:
            flag = f"exit {e.code}"
        report(imported="moespac_vllm.patches.plugin" in sys.modules, flag=flag)
    """),
    # register() itself, in one interpreter (state reset between phases): the version gate, the
    # override, bad config, and the layer hook (a stand-in routed_experts module records calls).
    "gate": ({"VLLM_PLUGINS": "moespac"}, """
        import types
        from dataclasses import asdict
        import vllm.version
        from moespac_vllm.patches import plugin
        from vllm.engine.arg_utils import EngineArgs
        vllm.version.__version__ = "0.31.0"
        out = {}
        plugin.register(environ={}); plugin.register(environ={})
        out["unverified"] = asdict(plugin.state())
        out["wrapped"] = getattr(EngineArgs.add_cli_args, "_moespac_wrapped", False)
        print("PHASE allowed", flush=True)
        plugin._state = None
        plugin.register(environ={"MOESPAC_ALLOW_UNVERIFIED_VLLM": "1"})
        out["allowed"] = asdict(plugin.state())
        vllm.version.__version__ = "0.32.0"
        plugin._state = None
        try:
            plugin.register(environ={"MOESPAC_CACHE_RATIO": "0"})
            out["bad_config"] = None
        except ValueError as e:
            out["bad_config"] = str(e)
        calls = []
        fake = types.ModuleType(plugin.LAYER_MODULE)
        fake.register = lambda config: calls.append(config)
        fake.stats_line = lambda: "fake layer stats"
        sys.modules[fake.__name__] = fake
        plugin._state = None
        plugin.register(environ={"MOESPAC_POLICY": "lru"}); plugin.register(environ={})
        out["hook_calls"] = [c.to_flat() for c in calls]
        out["hook_types"] = [type(c).__name__ for c in calls]
        out["hook_state"] = asdict(plugin.state())
        out["hook_stats"] = plugin.stats_line()
        report(**out)
    """),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, tuple[dict, str]]:
    from moespac_vllm.models.tiny import make_tiny_model

    tiny = make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", "qwen3_moe").target
    procs = {}
    for name, (env, body) in SCENARIOS.items():
        full_env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("MOESPAC_", "VLLM_PLUGINS"))}
        full_env.update(env)
        full_env["TINY_MODEL"] = str(tiny)
        code = _PRELUDE + textwrap.dedent(body)
        procs[name] = subprocess.Popen([sys.executable, "-c", code], env=full_env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=600)
        lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
        assert p.returncode == 0 and lines, f"{name}: rc={p.returncode}\n{stderr[-3000:]}"
        out[name] = (json.loads(lines[-1][len("RESULT "):]), stdout + stderr)
    return out


def test_vllm_plugins_moespac_loads_it_once_with_a_log_line(results):
    res, log = results["named"]
    st = res["state"]
    assert st["loaded"] and st["verified"] and st["vllm_version"] in ("0.32.0", "0.33.0")
    assert st["config"]["cache_ratio"] == 0.5
    assert st["layer_installed"] == res["layer_exists"]
    assert log.count("moespac: plugin loaded (vLLM ") == 1, log[-2000:]
    assert "cache_ratio 0.5" in log


def test_installed_but_not_enabled_touches_nothing_and_says_so_once(results):
    res, log = results["not_enabled"]
    st = res["state"]
    assert st["loaded"] and st["enabled"] is None and not st["layer_installed"]
    assert res["runner_wrapped"] is False and res["oot_after_off"] is False
    before_flag = log.split("PHASE flag")[0]
    assert before_flag.count("moespac: installed, not enabled (") == 1, log[-3000:]
    assert "--plugin moespac" in before_flag and "moespac: plugin loaded" not in before_flag
    assert res["stats"].startswith("moespac: installed, not enabled (")


def test_plugin_flag_enables_offloading_for_the_next_engine(results):
    res, _ = results["not_enabled"]
    assert res["enable_env"] == "1"  # inherited by the engine processes
    assert res["engine_marker"] == "1"
    assert res["oot_after_flag"] is True and res["runner_wrapped_after_flag"] is True


def test_vllm_plugins_other_keeps_it_out(results):
    res, _ = results["other"]
    assert res["imported"] is False
    assert res["flag"] == "exit 2"  # `--plugin` is unknown to vLLM without us


def test_plugin_flag_parses_on_vllms_serve_parser(results):
    res, _ = results["named"]
    assert res["plugin_flag"] == "moespac" and res["model_tag"] == "/m"
    assert res["additional"] == {"moespac": {"cache_ratio": 0.25}}
    assert res["other"] == "exit 2"  # only `moespac` is a valid value
    assert res["moespac_serve"] == ["/m", "127.0.0.1", 8123, "moespac"]


def test_additional_config_overrides_env_for_the_engine(results):
    res, _ = results["named"]
    assert res["config_for"]["policy"] == "lru"
    assert res["config_for"]["cache_ratio"] == 0.5  # from MOESPAC_CACHE_RATIO


def test_unverified_vllm_leaves_it_inert_with_one_warning(results):
    res, log = results["gate"]
    st = res["unverified"]
    assert not st["loaded"] and not st["verified"] and st["vllm_version"] == "0.31.0"
    assert "MOESPAC_ALLOW_UNVERIFIED_VLLM" in st["inert_reason"]
    before_phase2 = log.split("PHASE allowed")[0]
    assert before_phase2.count("moespac: plugin inert") == 1, log[-2000:]
    assert res["wrapped"] is False  # inert means nothing patched


def test_allow_unverified_loads_it_with_a_warning(results):
    res, log = results["gate"]
    assert res["allowed"]["loaded"] and not res["allowed"]["verified"]
    assert "loading on unverified vLLM 0.31.0" in log


def test_bad_config_stops_the_plugin_naming_the_field(results):
    res, _ = results["gate"]
    assert res["bad_config"] is not None and res["bad_config"].startswith("cache_ratio:")


def test_layer_hook_gets_the_parsed_config_once(results):
    res, _ = results["gate"]
    assert res["hook_types"] == ["MoESpacConfig"]
    assert res["hook_calls"][0]["policy"] == "lru"
    assert res["hook_state"]["layer_installed"] is True
    assert res["hook_stats"] == "fake layer stats"
