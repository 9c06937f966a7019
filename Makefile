# The two commands of the README:
#   make demo   build kdkernels from source in ./.venv and run the end-to-end demo (python -m kdkernels)
#   make test   build kdkernels from source in ./.venv and run the test suite
# torch is installed only when the environment has none (TORCH_SPEC, a CPU build here); a machine
# that already has torch (a GPU image) keeps its own through --system-site-packages.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?= -q
BIN := $(VENV)/bin
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.h csrc/cpu/*.h csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h python/*.cpp python/*.h)

.PHONY: demo test bench distill install clean

$(BIN)/python:
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python $(SOURCES)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q setuptools wheel ninja numpy
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python -m kdkernels

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

distill: install
	$(BIN)/python -m pip install -q "scikit-learn>=1.3" "tokenizers>=0.15" "pyyaml>=6" "matplotlib>=3.7"
	$(BIN)/python -m kdkernels.train

bench: install
	$(BIN)/python -m bench softmax_kl

clean:
	rm -rf build *.egg-info kdkernels/_C*.so $(VENV)
