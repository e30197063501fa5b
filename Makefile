# One-command setup, tests and demo on a fresh machine (Python 3.11, CPU).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
AKAMASTER := ../shared/models/akamaster-cifar10-resnet

.PHONY: setup data test test-slow demo bench clean

setup: $(STAMP)

# torch==2.13.0 first, so that the local CPU wheel is used instead of a multi-GB CUDA build
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# Fashion-MNIST comes from a Debian package; tests that need it skip when it cannot be installed
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) || \
		echo "note: could not install dataset-fashion-mnist; its tests will be skipped"; fi

test: setup data
	$(BIN)/pytest -q -m "not slow"

test-slow: setup data
	$(BIN)/pytest -q -m slow

demo: setup data
	$(BIN)/reassembly zoo list
	$(BIN)/reassembly info cifar_resnet20 --depth 2
	$(BIN)/reassembly dissect mobilenext_100 --granularity stage
	$(BIN)/reassembly eval --model resnet20_cifar5 --pretrained --data 'cifar10[0:5]' --split test
	$(BIN)/reassembly eval --model cifar_resnet20 --checkpoint $(AKAMASTER)/resnet20-12fca82f.th --data cifar10 --split test
	$(BIN)/reassembly eval --model cifar_resnet32 --checkpoint $(AKAMASTER)/resnet32-d509ac18.th --data cifar10 --split test
	$(BIN)/reassembly similarity --zoo split-cifar --data 'cifar10[0:5]' --probe-size 500 --out runs/demo/similarity
	$(BIN)/reassembly partition runs/demo/similarity --k 4
	$(BIN)/reassembly stitch --blocks 'resnet20_cifar5:1-4,mobilenext_cifar5:3-9,vit_cifar5:4-7' \
		--data 'cifar10[5:10]' --max-per-class 1000 --out runs/demo/net --overwrite
	$(BIN)/reassembly eval --model runs/demo/net --data 'cifar10[5:10]'

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
