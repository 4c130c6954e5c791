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

.PHONY: setup build test demo data bench lint clean

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

test: build
	$(PY) -m pytest -q tests

# Debian's dataset-fashion-mnist package holds the IDX files (no download at run time).
$(FMNIST_DEB_DIR):
	@if [ ! -d $@ ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q dataset-fashion-mnist; \
	  else sudo apt-get update -q && sudo apt-get install -y -q dataset-fashion-mnist; fi; fi

$(DATA)/train: | $(FMNIST_DEB_DIR) setup
	$(PY) -m dsq_ext.datasets fashion-mnist $(DATA)

data: $(DATA)/train

demo: build data
	$(PY) train.py -a resnet18 -q DSQ --quan_bit 4 --quantize_input --image-size 32 \
	  --epochs 1 -b 128 --lr 0.1 -j 2 --log_path log/demo $(DATA)
	$(PY) train.py -a resnet18 -q DSQ --quan_bit 4 --quantize_input --image-size 32 \
	  -b 256 -j 2 --log_path log/demo --evaluate --resume log/demo/model_best.pth.tar $(DATA)
	$(PY) -m dsq_ext.report log/demo/model_best.pth.tar --plot log/demo/alpha.png

bench: build
	$(PY) bench/bench_ops.py
	$(PY) bench/bench_step.py

lint:
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf build dist *.egg-info dsq_ext/*.so
