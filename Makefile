# Two entry points for a fresh clone: `make demo` and `make test`. Each creates .venv.
# torch is installed first and pinned, so pip never pulls a different (e.g. CUDA) build.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.test: $(VENV)/.core
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.core
	$(BIN)/shardlm generate --prompt "def fibonacci(n):" --max-tokens 64 --temperature 0

lint: $(VENV)/.test
	$(BIN)/ruff check src tests benchmarks tools
	$(BIN)/ruff format --check src tests benchmarks tools

test: $(VENV)/.test lint
	$(BIN)/python -m pytest -q

bench: $(VENV)/.test
	$(BIN)/python benchmarks/decode_vs_hf.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
