"""vLLM's CUDA defaults and the engine-config hook (patches/engine_config.py), on vLLM's own config
classes: opt-in, compilation made safe (or an explicit unsafe mode refused), start-up checks.

On this CPU platform a whole VllmConfig resets cudagraph_mode to NONE in its post-init (no CUDA
graphs on CPU), so the CUDA default is rebuilt the way vLLM builds it on CUDA: O2's
CompilationConfig (mode VLLM_COMPILE, FULL_AND_PIECEWISE) with `set_splitting_ops_for_v1`, which
gives the attention-only splitting ops, placed into a real VllmConfig."""
from __future__ import annotations

import logging

import pytest

pytestmark = [pytest.mark.vllm]

pytest.importorskip("vllm")

from vllm.config import CompilationConfig, VllmConfig  # noqa: E402
from vllm.config.compilation import CompilationMode, CUDAGraphMode  # noqa: E402
from vllm.config.vllm import OPTIMIZATION_LEVEL_TO_CONFIG, OptimizationLevel  # noqa: E402

from moespac_vllm.config import MoESpacConfig  # noqa: E402
from moespac_vllm.patches import engine_config, routed_experts  # noqa: E402

ON = {"MOESPAC_CACHE_RATIO": "0.25"}


def cuda_default_config(**user) -> VllmConfig:
    """A VllmConfig carrying what vLLM's O2 default gives on CUDA."""
    o2 = OPTIMIZATION_LEVEL_TO_CONFIG[OptimizationLevel.O2]["compilation_config"]
    cc = CompilationConfig(mode=CompilationMode.VLLM_COMPILE,
                           cudagraph_mode=user.pop("cudagraph_mode", o2["cudagraph_mode"]),
                           **user)
    cc.set_splitting_ops_for_v1("allgather_reducescatter")
    cc.cudagraph_capture_sizes = [1, 2, 4, 8]
    cc.max_cudagraph_capture_size = 8
    vc = VllmConfig()
    vc.compilation_config = cc
    return vc


def test_o2_default_on_cuda_is_full_and_piecewise_with_attention_only_splits():
    vc = cuda_default_config()
    cc = vc.compilation_config
    assert cc.cudagraph_mode == CUDAGraphMode.FULL_AND_PIECEWISE
    assert "vllm::unified_attention_with_output" in cc.splitting_ops
    assert not any("moe_forward" in op for op in cc.splitting_ops)


def test_cuda_defaults_no_longer_make_the_plugin_raise(caplog):
    """Old code: check_cudagraph_mode raised on vLLM's default. Now the hook picks NONE with
    torch.compile kept, logs it, and the layer's own check passes on the result."""
    vc = cuda_default_config()
    with pytest.raises(ValueError, match="FULL CUDA graphs"):
        routed_experts.check_cudagraph_mode(vc)  # what the layer met before the hook existed
    with caplog.at_level(logging.INFO, logger="moespac_vllm"):
        why = engine_config.on_engine_config(vc, None, environ=ON)
    assert why == "MOESPAC_CACHE_RATIO"
    cc = vc.compilation_config
    assert cc.cudagraph_mode == CUDAGraphMode.NONE
    assert cc.mode == CompilationMode.VLLM_COMPILE  # torch.compile kept
    assert cc.cudagraph_capture_sizes == [] and cc.max_cudagraph_capture_size == 0
    routed_experts.check_cudagraph_mode(vc)
    lines = [r.getMessage() for r in caplog.records if "cudagraph_mode" in r.getMessage()]
    assert lines == ["moespac: cudagraph_mode FULL_AND_PIECEWISE -> NONE (vLLM's default captures "
                     "the MoE layers in CUDA graphs, which would replay a stale expert placement "
                     "/ output buffer; torch.compile kept: mode VLLM_COMPILE)"]


@pytest.mark.parametrize("mode", ["FULL", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE", "PIECEWISE"])
def test_an_explicit_capturing_mode_is_refused_with_one_line(mode):
    vc = cuda_default_config(cudagraph_mode=mode)
    with pytest.raises(ValueError) as e:
        engine_config.on_engine_config(vc, mode, environ=ON)
    msg = str(e.value)
    assert "\n" not in msg and f"cudagraph_mode {mode} (set explicitly)" in msg
    assert vc.compilation_config.cudagraph_mode == CUDAGraphMode[mode]  # untouched


def test_explicit_none_and_enforce_eager_pass_unchanged():
    vc = cuda_default_config(cudagraph_mode="NONE")
    assert engine_config.safe_compilation(vc, "NONE") is None
    vc = cuda_default_config()
    vc.model_config = type("ModelConfigView", (), {"enforce_eager": True, "is_moe": True})()
    assert engine_config.safe_compilation(vc, "FULL") is None


def test_not_enabled_leaves_the_config_alone_and_says_how_to_enable(caplog, monkeypatch):
    monkeypatch.setattr(engine_config, "_not_enabled_logged", False)
    vc = cuda_default_config()
    with caplog.at_level(logging.INFO, logger="moespac_vllm"):
        assert engine_config.on_engine_config(vc, None, environ={"MOESPAC_DATA_DIR": "/d"}) is None
        assert engine_config.on_engine_config(vc, None, environ={}) is None
    assert vc.compilation_config.cudagraph_mode == CUDAGraphMode.FULL_AND_PIECEWISE
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("moespac:")]
    assert len(lines) == 1 and lines[0].startswith("moespac: installed, not enabled (")
    assert "--plugin moespac" in lines[0] and "additional_config" in lines[0]


def test_additional_config_section_enables():
    vc = cuda_default_config()
    vc.additional_config = {"moespac": {}}
    assert engine_config.on_engine_config(vc, None, environ={}) == "additional_config"
    assert vc.compilation_config.cudagraph_mode == CUDAGraphMode.NONE


# ---- start-up checks ----------------------------------------------------------------------------
def test_a_missing_profile_fails_at_start_naming_profile():
    with pytest.raises(ValueError, match=r"^profile: .*/no/such.json"):
        engine_config.check_startup(MoESpacConfig.from_mapping({"profile": "/no/such.json"}))


def test_a_malformed_profile_fails_at_start_naming_profile(tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text('{"name": "x"')
    with pytest.raises(ValueError, match=r"^profile: ") as e:
        engine_config.check_startup(MoESpacConfig.from_mapping({"profile": str(bad)}))
    assert "\n" not in str(e.value)
    bad.write_text('{"name": "x"}')  # valid JSON, missing fields
    with pytest.raises(ValueError, match=r"^profile: "):
        engine_config.check_startup(MoESpacConfig.from_mapping({"profile": str(bad)}))


def test_named_profiles_pass():
    engine_config.check_startup(MoESpacConfig.from_mapping({"profile": "rtx4090-pcie4"}))


def test_output_paths_get_their_directories_at_start(tmp_path):
    cfg = MoESpacConfig.from_mapping({"record_trace": str(tmp_path / "no/such/dir/t.npz"),
                                      "stats_file": str(tmp_path / "s/t/stats.jsonl")})
    engine_config.check_startup(cfg)
    assert (tmp_path / "no/such/dir").is_dir() and (tmp_path / "s/t").is_dir()


@pytest.mark.parametrize("field", ["record_trace", "stats_file"])
def test_an_unusable_output_path_fails_at_start_naming_the_field(tmp_path, field):
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where a directory would have to be
    with pytest.raises(ValueError, match=rf"^{field}: "):
        engine_config.check_startup(MoESpacConfig.from_mapping({field: str(blocker / "x.npz")}))
    with pytest.raises(ValueError, match=rf"^{field}: .* is a directory"):
        engine_config.check_startup(MoESpacConfig.from_mapping({field: str(tmp_path)}))
