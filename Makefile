# MemLens: `make run` starts the app on the embedded model, `make test` runs every check.
# Both create .venv in the repo root and install what they need on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: run test lint bench train venv dev-venv system-deps

$(VENV)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev: requirements-dev.txt $(VENV)/.runtime
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

venv: $(VENV)/.runtime
dev-venv: $(VENV)/.dev

system-deps:
	bash scripts/install-system-deps.sh

run: venv
	$(OFFLINE) $(PY) app.py

lint: dev-venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: system-deps dev-venv lint
	$(OFFLINE) $(PY) -m pytest

bench: dev-venv
	for script in bench/bench_*.py; do $(OFFLINE) $(PY) $$script || exit 1; done

train: venv
	bash scripts/install-system-deps.sh --training-text
	$(OFFLINE) $(PY) -m analysis.train_demo
