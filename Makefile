# The two commands of the quick start: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Touched after a successful install: pip runs again only when requirements.txt is newer.
STAMP  := $(VENV)/.requirements-installed

.PHONY: test demo venv clean-demo

venv: $(STAMP)

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	@touch $@

test: $(STAMP)
	$(PY) -m pytest -q tests

# Tiny tokenizer + model from the bundled corpus, stages 1 -> 2 -> 3 on CPU with 2 processes, then a generation.
demo: $(STAMP)
	PY=$(PY) scripts/demo.sh
