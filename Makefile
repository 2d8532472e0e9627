# The two commands a new machine needs:
#   make serve   set up, build the bundled model, serve it on 0.0.0.0:50051
#   make test    set up, lint, type-check and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Installs resolve to the versions the suite last passed with (constraints.txt; make lock
# refreshes it), so a fresh machine gets what CI tested, not whatever was released since.
PIP_INSTALL := $(BIN)/pip install --quiet -c constraints.txt
STAMP := $(VENV)/.installed
SERVE_STAMP := $(VENV)/.installed-serve

.PHONY: serve test lint engines protos bench clean lock

# make serve installs what serving needs (ONNX Runtime on the CPU); make test adds the GPU
# runtime bindings, the test tools and the linters.
$(SERVE_STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(PIP_INSTALL) -e .
	touch $(SERVE_STAMP)

$(STAMP): $(SERVE_STAMP)
	$(PIP_INSTALL) -e '.[dev]'
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
	$(PIP_INSTALL) -e '.[bench]'
	$(BIN)/python -m bench.suite --seconds 10

protos: $(STAMP)
	$(BIN)/python protos/generate.py

# Re-resolves every dependency (all extras) in a scratch venv and writes constraints.txt. The
# stubs' generator stays at the version that wrote protos/ (make protos after raising it).
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet --upgrade pip
	.venv-lock/bin/pip install --quiet '.[dev,bench]' \
		"grpcio-tools==$$(sed -n "s/^GRPC_GENERATED_VERSION = '\(.*\)'/\1/p" protos/tensorgate/v1/inference_pb2_grpc.py)"
	{ sed -n '1,2p' constraints.txt; .venv-lock/bin/pip freeze --exclude-editable | grep -v -i '^tensorgate'; } > constraints.new
	mv constraints.new constraints.txt
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) .venv-lock .venv-triton .venv-mlserver .pytest_cache .mypy_cache .ruff_cache engines
