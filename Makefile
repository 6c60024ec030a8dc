# `make repro`: set up from nothing and run the whole pipeline. `make test`: set up and run the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup repro test lock clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	touch $@

repro: setup
	$(BIN)/dvc repro

test: setup
	$(BIN)/python -m pytest -q tests

lock:  # refresh requirements.lock from requirements.in in a clean venv
	rm -rf .lockenv && $(PYTHON) -m venv .lockenv && .lockenv/bin/pip install --quiet -r requirements.in
	(echo "# pip freeze of requirements.in on Linux x86_64, CPython 3.11. Refresh: see README, 'Pinning'."; \
	 .lockenv/bin/pip freeze) > requirements.lock && rm -rf .lockenv

clean:
	rm -rf $(VENV)
