# The README's commands. `make chat` and `make test` do all the set-up on a fresh machine.
PY ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1
export OPENBLAS_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: chat test lint bench eval setup clean lock

$(BIN)/python:
	@$(PY) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null || \
		{ echo "stackwise needs Python 3.11 (python3.11 on PATH)"; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): $(BIN)/python pyproject.toml requirements.lock
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c requirements.lock -e '.[dev]'
	$(BIN)/stackwise tools >/dev/null   # first-run preparation: import check, registry and plugins load
	@touch $(STAMP)

setup: $(STAMP)

chat: setup
	@$(BIN)/stackwise kb stats >/dev/null || true   # first run: index the concept cards (~15 s, once)
	$(BIN)/stackwise chat

test: setup
	$(BIN)/ruff check .
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/stackwise bench

eval: setup
	$(BIN)/stackwise eval

# Re-pin the lock from the current venv (run after changing dependencies).
lock:
	$(BIN)/pip freeze --exclude-editable | grep -v '^-e' | grep -vi "^stackwise\|^torch==" > requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
