# Two commands do everything on a fresh machine:  make run  |  make test
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CALLER ?= alice
ROLES ?= Gateway.Standard

.PHONY: run test token deps lint typecheck unit integration infra-check mono bench clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

node_modules/.installed: package.json
	npm install --no-audit --no-fund --loglevel=error
	touch $@

deps: $(VENV)/.installed node_modules/.installed

run: deps                      ## the local stack on 127.0.0.1:7071 (Ctrl-C stops it)
	$(PY) -m tools.run_local

token: deps                    ## a dev token: make token CALLER=bob ROLES=Gateway.Premium
	@$(PY) -m tools.dev_issuer token --caller $(CALLER) --roles $(ROLES) --key-dir .local/dev-issuer

lint: deps
	$(PY) -m ruff check .
	$(VENV)/bin/hadolint Dockerfile

typecheck: deps
	$(PY) -m mypy

unit: deps
	$(PY) -m pytest -q tests/unit

integration: deps
	$(PY) -m pytest -q tests/integration

infra-check:
	bash tools/check_infra.sh

mono:                          ## Mono's C# compiler for the C# client's tier (apt-get when mcs is missing; CI fails without it)
	bash tools/install_mono.sh || [ -z "$$CI" ]

test: deps lint typecheck infra-check mono   ## every tier: lint, types, infra checks, unit + integration tests
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: deps
	$(PY) -m bench.run

clean:
	rm -rf .local .pytest_cache .mypy_cache .ruff_cache
