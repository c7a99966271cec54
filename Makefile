# lit-tasks: every target installs what it needs into .venv first, so a fresh clone needs only Python 3.11.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The exact torch pair is pinned here (pyproject.toml declares ranges); pip takes them from local disk.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed
# CPU runs: OpenMP busy-waiting makes DataLoader workers and the trainer fight for the 2 cores.
export OMP_WAIT_POLICY ?= PASSIVE
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: install test test-all demo bench clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml setup.py datamodules/tfrecord/_wire.c Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet $(TORCH_PINS) -e ".[dev,export]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

DEMO_LOGS := lightning_logs/fcos_shapes
demo: $(STAMP)
	$(VENV)/bin/lit-tasks fit --config configs/detection/fcos_shapes.yaml
	$(VENV)/bin/lit-tasks test --config configs/detection/fcos_shapes.yaml \
	  --ckpt_path "$$(ls -t $(DEMO_LOGS)/version_*/checkpoints/best*.ckpt | head -n 1)"

bench: $(STAMP)
	$(PY) -m pip install --quiet $(TORCH_PINS) -e ".[bench]"
	for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done
