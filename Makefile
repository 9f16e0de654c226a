# Two commands set up everything on a fresh machine:
#   make demo   - the tiny end-to-end pipeline (CPU, offline)
#   make test   - the test suite
# `make small` runs the longer CPU profile (configs/small.yaml, about 55 minutes on 2 cores);
# `make compare` every generator of mvc/generation/generators.py, with and without clustering-based sampling.
# Both create .venv and install what is missing; `demo` also installs Debian's
# dataset-fashion-mnist when it can (root or sudo), else torchvision downloads the data.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/tiny.yaml
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup data demo small compare test bench clean

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

setup: $(VENV)/.installed

data:
	@if [ ! -d $(FMNIST) ]; then \
	  if [ "$$(id -u)" = 0 ]; then (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || true; \
	  elif command -v sudo >/dev/null; then (sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist) || true; \
	  fi; \
	fi
	@[ -d $(FMNIST) ] || echo "note: $(FMNIST) not found; Fashion-MNIST will be looked for under datasets/ or downloaded"

demo: setup data
	$(PY) run_pipeline.py --config $(CONFIG)

small: setup data
	$(PY) run_pipeline.py --config configs/small.yaml

compare: setup data
	$(PY) scripts/compare_generators.py --config $(CONFIG)

test: setup
	$(PY) -m ruff check --quiet .
	$(PY) -m pytest -q tests

bench: setup
	$(PY) bench/run_all.py

clean:
	rm -rf outputs
