"""Exposure (issue 14): config paths are written only where the user pointed. A `stats_file` or
`record_trace` that is a symlink out of its directory (to a file that is not ours) is refused at
start, naming the field; the trace is replaced atomically (a link at its path is replaced, never
written through). The server's loopback default is tests/test_cli.py's."""
from __future__ import annotations

import pytest

from moespac_vllm.config import MoESpacConfig, prepare_output_path
from patches.engine_config import check_startup


@pytest.mark.parametrize("field", ["stats_file", "record_trace"])
def test_a_path_that_links_out_of_its_directory_is_refused_at_start(tmp_path, field):
    victim = tmp_path / "elsewhere" / "not_ours.txt"
    victim.parent.mkdir()
    victim.write_text("precious\n")
    out = tmp_path / "run"
    out.mkdir()
    link = out / ("stats.jsonl" if field == "stats_file" else "trace.npz")
    link.symlink_to(victim)
    cfg = MoESpacConfig().replace(**{field: str(link)})
    with pytest.raises(ValueError, match=rf"^{field}: .* is a symlink to .*not_ours.txt"):
        check_startup(cfg)
    assert victim.read_text() == "precious\n"


def test_a_dangling_link_out_of_the_directory_is_refused_too(tmp_path):
    link = tmp_path / "stats.jsonl"
    link.symlink_to("/nonexistent-dir/file")
    with pytest.raises(ValueError, match="^stats_file: .* is a symlink"):
        prepare_output_path("stats_file", str(link))


def test_a_link_inside_the_same_directory_and_a_plain_path_are_fine(tmp_path):
    (tmp_path / "real.jsonl").write_text("")
    link = tmp_path / "stats.jsonl"
    link.symlink_to(tmp_path / "real.jsonl")
    assert prepare_output_path("stats_file", str(link)) == link
    assert prepare_output_path("record_trace", str(tmp_path / "new" / "t.npz")).parent.is_dir()


def test_trace_save_replaces_a_link_instead_of_writing_through_it(tmp_path):
    import numpy as np

    from moespac_vllm.trace import ModelDims, StepKind, TraceRecorder, load_trace

    victim = tmp_path / "victim.npz"
    victim.write_bytes(b"not a trace")
    link = tmp_path / "t.npz"
    link.symlink_to(victim)
    rec = TraceRecorder(ModelDims(2, 4, 2, 8, 4, 2), source="unit")
    rec.add_step(StepKind.DECODE, np.array([[[0, 1], [2, 3]]], dtype=np.int64))
    rec.save(link)
    assert victim.read_bytes() == b"not a trace" and not link.is_symlink()
    assert load_trace(link).num_steps == 1


ROUTES = """
import json, sys
from vllm.plugins import load_general_plugins
load_general_plugins()
loaded = "moespac_vllm.patches.plugin" in sys.modules  # before the serve parser imports us
from moespac_vllm.patches.serve import parse_serve_args
from vllm.entrypoints.launchers.app import build_app
app = build_app(parse_serve_args("m", []), ("generate",))
print(json.dumps([loaded, sorted(f"{sorted(getattr(r, 'methods', None) or [])} {r.path}"
                                for r in app.routes)]))
"""


def _routes(env_extra: dict[str, str]) -> tuple[bool, list[str]]:
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MOESPAC_")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", ROUTES], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded, routes = json.loads(out.stdout.strip().splitlines()[-1])
    return loaded, routes


def test_the_plugin_registers_no_endpoint_plugin():
    from importlib.metadata import distribution

    groups = {ep.group for ep in distribution("moespac-vllm").entry_points}
    assert "vllm.endpoint_plugins" not in groups and "vllm.general_plugins" in groups


@pytest.mark.vllm
def test_the_served_app_has_the_same_routes_with_the_plugin_on_and_off():
    loaded_on, on = _routes({"MOESPAC_ENABLE": "1"})
    loaded_off, off = _routes({"VLLM_PLUGINS": ""})
    assert loaded_on and not loaded_off
    assert any("/v1/completions" in r for r in on)
    assert on == off, sorted(set(on) ^ set(off))
