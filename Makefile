# The two set-up commands of the README, and a few conveniences.
#   make train   creates .venv if missing, installs the package, trains the tiny model on the embedded corpus
#   make test    creates or reuses the same .venv, adds the extras the tests need, runs the whole suite
#                (what CI runs: .ci/run only installs the system tools first)
#   make learn   the reference learning run (gin/runs/learn_cpu.gin, about an
#                hour on 2 CPU cores; docs/experiments/learning.md)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The tests' extras: pytest and the GCS emulator (test), libtpu for the ahead-of-time TPU compiles (tpu),
# the scorers (eval: torch, ...), the checkpoint importers (convert) and Apache Beam for
# `prepare --runner=beam` (beam). Installed by `make test` only, so `make train` stays light (no torch).
TEST_EXTRAS := test,tpu,eval,convert,beam
TEST_STAMP := $(VENV)/.installed-test
RUN_DIR ?= runs/tiny_cpu
# The embedded corpus's TFRecord shards (prepare is resumable: re-running skips finished shards).
TRAIN_DATA_DIR ?= runs/embedded_tfrecords

LEARN_DIR ?= runs/learn_cpu

.PHONY: venv test-venv data train learn test clean-runs

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $(STAMP)

# Rebuilt after $(STAMP), so a changed setup.py reinstalls both.
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[$(TEST_EXTRAS)]"
	touch $(TEST_STAMP)

venv: $(STAMP)

test-venv: $(TEST_STAMP)

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

test: $(TEST_STAMP)
	$(PY) -m pytest -q -n 2

clean-runs:
	rm -rf runs
