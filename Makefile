# One-command setup, tests and demo on a fresh machine (Python 3.11, CPU).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup data browser test test-slow demo bench clean

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

# Headless Chromium for the test that opens a run's report.html as a person would (Playwright drives this system
# browser; it downloads none); that test is skipped when chromium cannot be installed
browser:
	@if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -q chromium >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) || \
		echo "note: could not install chromium; the report's browser test will be skipped"; fi

test: setup data browser
	$(BIN)/pytest -q -m "not slow"

test-slow: setup data
	$(BIN)/pytest -q -m slow

# Every benchmark protocol behind results/ that takes minutes to an hour (benchmarks/run_all.py --list shows all of them, the
# training-heavy ones included, with their costs; `python benchmarks/run_all.py` runs everything)
bench: setup data
	PYTHONPATH=src:benchmarks $(BIN)/python benchmarks/run_all.py --skip-heavy

# The main job: `reassembly run --demo` reassembles a network for CIFAR-10 classes 5-9 from blocks of the shipped
# Split-CIFAR zoo (similarity, partition, search, stitch, 3 epochs of frozen training) into runs/demo, and prints it
# next to the zoo models within the same budget, fitted and trained the same way. Offline; a few minutes on 2 CPU
# cores. Running it again skips every stage already done. It ends by writing runs/demo/report.html, the whole run on
# one page (`reassembly report runs/demo` writes it again).
demo: setup data
	$(BIN)/reassembly zoo list
	$(BIN)/reassembly eval --model resnet20_cifar5 --pretrained --data 'cifar10[0:5]' --split test
	$(BIN)/reassembly run --demo

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
