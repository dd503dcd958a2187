# Two commands do everything on a fresh machine:  make run  |  make test
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CALLER ?= alice
ROLES ?= Gateway.Standard

DASHBOARD_VENDOR := gateway_lib/http/dashboard/vendor

.PHONY: lock run test token deps worker lint typecheck unit integration infra-check mono browser bench clean dashboard-assets chat-params

$(VENV)/.installed: requirements.txt requirements-dev.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

node_modules/.installed: package.json
	npm install --no-audit --no-fund --loglevel=error
	touch $@

# The dashboard's one browser dependency, from npm, copied beside the page so the deployed package serves it.
$(DASHBOARD_VENDOR)/msal-browser.min.js: node_modules/.installed
	mkdir -p $(DASHBOARD_VENDOR)
	cp node_modules/@azure/msal-browser/lib/msal-browser.min.js node_modules/@azure/msal-browser/LICENSE $(DASHBOARD_VENDOR)/

dashboard-assets: $(DASHBOARD_VENDOR)/msal-browser.min.js

LOCK_VENV := .local/lock-venv
lock:                          ## refresh constraints.txt: the newest versions the ranges allow (then make test)
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	sed '/^-c /d' requirements.txt > $(LOCK_VENV)/requirements.txt
	cp requirements-dev.txt $(LOCK_VENV)/requirements-dev.txt
	$(LOCK_VENV)/bin/pip install --quiet -r $(LOCK_VENV)/requirements-dev.txt
	{ grep '^#' constraints.txt; $(LOCK_VENV)/bin/pip freeze; } > constraints.txt.new && mv constraints.txt.new constraints.txt
	rm -rf $(LOCK_VENV)

deps: $(VENV)/.installed node_modules/.installed dashboard-assets

browser:                       ## headless Chromium for the dashboard test (apt-get when missing; its test fails under CI without it)
	bash tools/install_chromium.sh || [ -z "$$CI" ]

run: deps                      ## the local stack on 127.0.0.1:7071 (Ctrl-C stops it)
	$(PY) -m tools.run_local

token: deps                    ## a dev token: make token CALLER=bob ROLES=Gateway.Premium
	@$(PY) -m tools.dev_issuer token --caller $(CALLER) --roles $(ROLES) --key-dir .local/dev-issuer

chat-params: deps             ## regenerate the chat parameter list from the installed openai SDK
	$(PY) -m tools.gen_chat_params

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

worker: deps                   ## the real Functions Python worker under .local/ (skipped with a reason when its source is absent)
	$(PY) -m tools.worker_setup

test: deps lint typecheck infra-check mono browser worker   ## every tier: lint, types, infra checks, unit + integration tests
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: deps
	$(PY) -m bench.run --cell-by-cell

clean:
	rm -rf .local .pytest_cache .mypy_cache .ruff_cache $(DASHBOARD_VENDOR)
