# Everything a new machine needs, from this repository's own files.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup data demo test test-all test-kernels bench clean

setup: $(VENV)/.installed data

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

# Debian ships the real Fashion-MNIST; install it when apt is there and it is missing.
data:
	@if [ -d $(FMNIST) ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	else echo "note: no apt-get; Fashion-MNIST will be read from --data-root or downloaded"; fi

# The main job on the offline default: DeepInversion, WRN-16-2 -> WRN-16-1, Fashion-MNIST.
demo: setup
	$(BIN)/dfkd-bench run --method deepinversion --dataset fashion-mnist \
	  --teacher wrn16_2 --student wrn16_1 --preset quick --seed 0 --output results/runs/demo
	$(BIN)/dfkd-bench compare results/runs/demo

test: setup
	$(BIN)/python -m pytest -q

# The numeric-effect tests again under PyTorch's portable CPU kernels: a verdict that
# holds only with this CPU's rounding fails here on any machine.
test-kernels: setup
	ATEN_CPU_CAPABILITY=default $(BIN)/python -m pytest -q -m 'numeric and not slow'

test-all: setup
	$(BIN)/python -m pytest -q -m ''

clean:
	rm -rf $(VENV) build *.egg-info
