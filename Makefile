# pwself: `make demo` (set up + pretrain on Fashion-MNIST + kNN + report), `make test` (set up + tests).
PY ?= python3
VENV ?= .venv
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
DEMO_OUT ?= runs/demo

.PHONY: demo demo-clean test bench setup clean

setup: $(VENV)/.installed

# torch is pinned exactly: an unpinned torch would pull a multi-GB build.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install -q -e '.[test,peers]'
	touch $@

$(FMNIST):
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist

# Again after an interruption: continues the run exactly; after it finished: shows its result, trains nothing.
# The two variables make pwself's hints name make's commands.
demo: $(VENV)/.installed $(FMNIST)
	PWSELF_AGAIN="make demo" PWSELF_START_OVER="make demo-clean demo" \
	    $(VENV)/bin/pwself pretrain --config fmnist_demo --out-dir $(DEMO_OUT) --auto-resume

demo-clean:
	rm -rf $(DEMO_OUT)

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache

bench: $(VENV)/.installed
	$(VENV)/bin/python benchmarks/run.py
