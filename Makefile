# The two set-up commands of the README, and a few conveniences.
#   make train   creates .venv if missing, installs the package, trains the tiny model on the embedded corpus
#   make test    creates or reuses the same .venv and runs the tests
#   make learn   the reference run that shows the recipe learning (gin/runs/learn_cpu.gin, about an
#                hour on 2 CPU cores; docs/experiments/learning.md)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/tiny_cpu
# The embedded corpus's TFRecord shards (prepare is resumable: re-running skips finished shards).
TRAIN_DATA_DIR ?= runs/embedded_tfrecords

LEARN_DIR ?= runs/learn_cpu

.PHONY: venv data train learn test clean-runs

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

data: $(STAMP)
	$(PY) -m spectron_jax.data.prepare --format=embedded --input=data/embedded --output_dir=$(TRAIN_DATA_DIR)

train: $(STAMP)
	test -f $(TRAIN_DATA_DIR)/report.json || $(MAKE) --no-print-directory data
	$(PY) -m spectron_jax.train --gin_file=gin/runs/tiny_cpu.gin --gin.MODEL_DIR="'$(RUN_DIR)'" \
		--gin.TrainConfig.data_dir="'$(TRAIN_DATA_DIR)'"

learn: $(STAMP)
	test -f $(TRAIN_DATA_DIR)/report.json || $(MAKE) --no-print-directory data
	$(PY) -m spectron_jax.train --gin_file=gin/runs/learn_cpu.gin --gin.MODEL_DIR="'$(LEARN_DIR)'" \
		--gin.TrainConfig.data_dir="'$(TRAIN_DATA_DIR)'"

test: $(STAMP)
	$(PY) -m pytest -q -n 2

clean-runs:
	rm -rf runs
