# The two set-up commands of the README, and a few conveniences.
#   make train   creates .venv if missing, installs the package, runs the tiny model on the embedded corpus
#   make test    creates or reuses the same .venv and runs the tests
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/tiny_cpu

.PHONY: venv train test data clean-runs

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

data: $(STAMP)
	$(PY) -m spectron_jax.data.prepare --format=embedded --input=data/embedded --output_dir=$(RUN_DIR)/data

train: $(STAMP)
	$(PY) -m spectron_jax.quickstart --output_dir=$(RUN_DIR)

test: $(STAMP)
	$(PY) -m pytest -q -n 2

clean-runs:
	rm -rf runs
