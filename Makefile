# Two commands on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup demo reproduce test test-fast bench clean-venv readme

setup: $(STAMP)

# Torch and torchvision first, together, then everything else under the same pins.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -c constraints.txt -e .
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/evotok pipeline demo

# The README's numbers at full quality (hours on 2 cores; not part of CI): the tiny tokenizer pipeline, the
# understanding/generation pipeline, the default Lpix/Lsem sweep, its ablation table and report.
reproduce: $(STAMP)
	$(VENV)/bin/evotok pipeline tiny
	$(VENV)/bin/evotok pipeline mllm_tiny
	$(VENV)/bin/evotok sweep --spec lpix_lsem
	$(VENV)/bin/evotok sweep --spec lpix_lsem --collect
	$(PY) -m evotok.readme record-sweep lpix_lsem

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(VENV)/bin/evotok bench data
	$(VENV)/bin/evotok bench quantizer

readme: $(STAMP)
	$(PY) -m evotok.readme

clean-venv:
	rm -rf $(VENV)
