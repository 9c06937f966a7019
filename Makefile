# The two commands of the README:
#   make distill  build kdkernels from source in ./.venv (with the trainer's and the tests'
#                 dependencies) and run `kdkernels distill` on its default task (--task lm)
#   make test     build kdkernels from source in ./.venv and run the test suite
# make demo runs the fused loss's demo (python -m kdkernels) instead.
# torch is installed only when the environment has none (TORCH_SPEC, a CPU build here); a machine
# that already has torch (a GPU image) keeps its own through --system-site-packages.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?= -q
# pytest-xdist workers, one test file each at a time (a file's module-scoped builds stay in one
# process); 0 runs the suite in this process
TEST_WORKERS ?= 2
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
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

distill: install
	$(BIN)/python -m kdkernels.train

bench: install
	$(BIN)/python -m bench softmax_kl

clean:
	rm -rf build *.egg-info kdkernels/_C*.so $(VENV)
