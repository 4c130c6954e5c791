# make test : fresh machine -> virtualenv, torch, build, the whole test suite
# make demo : fresh machine -> ... -> ResNet-18 DSQ W4A4 on Fashion-MNIST, top-1 and the alpha table
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The torch pair this project is tested with (a CUDA build that also runs on CPU).
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1
# nvcc may live in /usr/local/bin while the toolkit's headers are in /usr/local/cuda.
ifeq ($(CUDA_HOME),)
ifneq ($(wildcard /usr/local/cuda/include/cuda_runtime.h),)
export CUDA_HOME := /usr/local/cuda
endif
endif
DATA ?= data/fashion-mnist
FMNIST_DEB_DIR := /usr/share/datasets/fashion-mnist

.PHONY: setup build test test-install demo data bench lint clean

$(VENV)/.stamp-deps: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install $(TORCH_PKGS)
	$(PIP) install -r requirements.txt
	touch $@

setup: $(VENV)/.stamp-deps

# Built against the installed torch, never an isolated copy (ABI).
build: setup
	$(PIP) install --no-build-isolation -e .
	$(PY) -c "import dsq_ext, json; print(json.dumps(dsq_ext.build_info()))"

# The whole suite, with the `pip install` checks (tests/test_install.py) that a plain
# `pytest tests` skips; `make test-install` runs those alone.
test: build
	DSQ_INSTALL_TESTS=1 $(PY) -m pytest -q tests

test-install: build
	DSQ_INSTALL_TESTS=1 $(PY) -m pytest -q tests/test_install.py

# Debian's dataset-fashion-mnist package holds the IDX files (no download at run time).
$(FMNIST_DEB_DIR):
	@if [ ! -d $@ ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q dataset-fashion-mnist; \
	  else sudo apt-get update -q && sudo apt-get install -y -q dataset-fashion-mnist; fi; fi

# python -m dsq_ext.datasets imports dsq_ext, hence build. It writes val/ then train/, each
# renamed into place when complete, so an interrupted run is redone rather than trusted.
$(DATA)/train: | $(FMNIST_DEB_DIR) build
	$(PY) -m dsq_ext.datasets fashion-mnist $(DATA)

data: $(DATA)/train

# One seeded epoch of ResNet-18 DSQ W4A4 at 32x32 (activation bounds from the first batch's
# 99.9th percentile, RESULTS.md's recipe; the default affine grid); then the best checkpoint
# is evaluated again (same batch size, so the same numbers), its learned alpha per layer is
# tabulated, and it is exported to ONNX and run by onnxruntime on the 10,000 test images.
DEMO_FLAGS := -a resnet18 -q DSQ --quan_bit 4 --quantize_input --act-percentile 99.9 --image-size 32 -b 128 -j 2 --seed 0 --log_path log/demo
demo: build data
	$(PY) train.py $(DEMO_FLAGS) --epochs 1 --lr 0.1 -p 50 $(DATA)
	$(PY) train.py $(DEMO_FLAGS) -p 50 --evaluate --resume log/demo/model_best.pth.tar $(DATA)
	$(PY) -m dsq_ext.report log/demo/model_best.pth.tar --plot log/demo/alpha.png
	$(PY) -m dsq_ext.export log/demo/model_best.pth.tar -o log/demo/resnet18_w4a4.onnx --data $(DATA)/val --images 10000

bench: build
	$(PY) bench/bench_ops.py
	$(PY) bench/bench_step.py

lint:
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf build dist *.egg-info dsq_ext/*.so
