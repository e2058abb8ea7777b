#!/usr/bin/env bash
# The GPU check (issue 12): everything under $OUT (default ./out/gpu-check), <= 8 min on an
# H100/H200 with torch + Triton + transformers, no vLLM, no network. Run from anywhere:
#
#   benchmarks/gpu_check.sh              # on the lent GPU machine
#   benchmarks/gpu_check.sh --cpu-smoke  # the same steps and code at tiny dims on a CPU (CI)
#
# Steps (each one's log in $OUT/<step>.log, the exit codes in $OUT/steps.json):
#   1. gpu-marked tests (pytest -m gpu; they skip cleanly without CUDA)
#   2. moespac calibrate (Qwen3-30B-A3B dims; smoke: H=64, I=32) -> $OUT/profile.json
#   3. the suite (benchmarks/gpu_check.py: decode harness, routing on the device, every case)
#      with that profile -> $OUT/gpu_check.json + $OUT/gpu_check.png
# Trace: $TRACE if set, else .device/qwen3_synthetic.npz if present (carry it to a machine without
# the shared data: `python benchmarks/gpu_check.py --out x --write-trace .device/qwen3_synthetic.npz`),
# else synthetic:400 generated from the shared data folder (where that folder is absent, as on a
# lent machine without the carried npz: the generator uncalibrated, said on stderr and in the trace).
# Extra options for gpu_check.py: GPU_CHECK_ARGS (e.g. '--distinct-layers').
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SMOKE=0
for a in "$@"; do
  case "$a" in
    --cpu-smoke) SMOKE=1 ;;
    *) echo "gpu_check.sh: error: unknown argument '$a' (only --cpu-smoke)" >&2; exit 2 ;;
  esac
done
OUT="${OUT:-$ROOT/out/gpu-check}"
mkdir -p "$OUT"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"
else PY="python3"; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# A bare checkout (no `pip install -e .`): moespac_vllm.kernels is the top-level kernels/ folder.
if ! "$PY" -c "import moespac_vllm.kernels.fused_experts" >/dev/null 2>&1; then
  ln -sfn ../kernels "$ROOT/moespac_vllm/kernels"
fi
# The native modules (planner, CPU expert kernel): build in place when they are missing and
# pybind11 is there; without them the engine's Python planner and CpuExpertPool's torch backend run
# (the JSON's setup row names the CPU path).
CPU_PATH=native
if ! "$PY" -c "import moespac_vllm._plan, moespac_vllm._cpu_experts" >/dev/null 2>&1; then
  if "$PY" -c "import pybind11" >/dev/null 2>&1; then
    "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1 || true
  fi
  "$PY" -c "import moespac_vllm._cpu_experts" >/dev/null 2>&1 || CPU_PATH=torch
fi
if [ -n "${TRACE:-}" ]; then T="$TRACE"
elif [ -f "$ROOT/.device/qwen3_synthetic.npz" ]; then T="$ROOT/.device/qwen3_synthetic.npz"
else T="synthetic:400"; fi

declare -A RC
t_start=$(date +%s)
run_step() {  # name, command...
  local name="$1"; shift
  local t0=$(date +%s)
  "$@" >"$OUT/$name.log" 2>&1
  RC[$name]=$?
  echo "gpu_check.sh: $name rc=${RC[$name]} ($(( $(date +%s) - t0 )) s; log $OUT/$name.log)" >&2
}

if [ "$SMOKE" = 1 ]; then
  DIMS="64,32"; CAL_ARGS=(--quick --device cpu); SUITE_ARGS=(--cpu-smoke)
else
  DIMS="qwen3-30b-a3b"; CAL_ARGS=(--quick --device cuda); SUITE_ARGS=()
fi
if "$PY" -c "import pytest" >/dev/null 2>&1; then
  run_step gpu_tests "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_mover.py \
    tests/test_offload.py tests/test_fused_experts.py tests/test_calibrate.py \
    tests/test_async_path.py
  # pytest exits 5 when every selected test was deselected or skipped: no GPU (smoke) is fine
  if [ "$SMOKE" = 1 ] && [ "${RC[gpu_tests]}" = 5 ]; then RC[gpu_tests]=0; fi
else
  echo "pytest missing: gpu tests not run" >"$OUT/gpu_tests.log"; RC[gpu_tests]=127
fi
run_step calibrate "$PY" -m moespac_vllm.cli calibrate --dims "$DIMS" "${CAL_ARGS[@]}" \
  --cpu-path "$CPU_PATH" --out "$OUT/profile.json"
PROFILE="$OUT/profile.json"
[ "${RC[calibrate]}" = 0 ] || PROFILE=calibrate  # the suite measures its own then
# shellcheck disable=SC2086
run_step suite "$PY" benchmarks/gpu_check.py --out "$OUT" --trace "$T" --profile "$PROFILE" \
  --cpu-path "$CPU_PATH" "${SUITE_ARGS[@]}" ${GPU_CHECK_ARGS:-}
printf '{"mode": "%s", "gpu_tests": %s, "calibrate": %s, "suite": %s, "wall_s": %s, "trace": "%s", "cpu_path": "%s"}\n' \
  "$([ "$SMOKE" = 1 ] && echo cpu-smoke || echo gpu)" "${RC[gpu_tests]}" "${RC[calibrate]}" \
  "${RC[suite]}" "$(( $(date +%s) - t_start ))" "$T" "$CPU_PATH" | tee "$OUT/steps.json"
tail -n 25 "$OUT/suite.log" >&2
for s in gpu_tests calibrate suite; do [ "${RC[$s]}" = 0 ] || exit 1; done
exit 0
