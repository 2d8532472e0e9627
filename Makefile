# The two commands a new machine needs:
#   make serve   set up, build the bundled model, serve it on 0.0.0.0:50051
#   make test    set up, lint, type-check and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SERVE_STAMP := $(VENV)/.installed-serve

.PHONY: serve test lint engines protos bench clean

# make serve installs what serving needs (ONNX Runtime on the CPU); make test adds the GPU
# runtime bindings, the test tools and the linters.
$(SERVE_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $(SERVE_STAMP)

$(STAMP): $(SERVE_STAMP)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

serve: $(SERVE_STAMP)
	$(BIN)/python build_engines.py
	$(BIN)/tensorgate serve

engines: $(STAMP)
	$(BIN)/python build_engines.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint engines
	$(BIN)/python -m pytest

# The benchmark suite: tensorgate vs the engine limit and MLServer (installed into .venv-mlserver
# on first use); writes docs/benchmarks.{md,json} and plots. About 9 minutes.
bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench.suite --seconds 10

protos: $(STAMP)
	$(BIN)/python protos/generate.py

clean:
	rm -rf $(VENV) .venv-triton .venv-mlserver .pytest_cache .mypy_cache .ruff_cache engines/*/model.onnx
