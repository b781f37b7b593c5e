# Two commands do all the set-up on a fresh machine:
#   make demo   — the main job (end-to-end demo through the training API)
#   make test   — the test suite (what CI runs)
# Both create .venv on first use. The venv sees system site-packages, so an installed CUDA
# build of torch is kept; with no torch at all, the CPU wheel torch==2.13.0 is installed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.signal-installed
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: setup demo tour test test-fast bench bench-quick gpu-check peer-wheels clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0" \
		|| $(PY) -m pip install -q torch --index-url $(TORCH_CPU_INDEX)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m signalrl.cli demo $(ARGS)

tour: $(STAMP)
	$(PY) -m signalrl.cli tour $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks $(ARGS)

bench-quick: $(STAMP)
	$(PY) -m benchmarks --quick $(ARGS)

gpu-check:
	bash benchmarks/gpu_check.sh

# The benchmark peers as wheels in .whl/, for a GPU machine without network (gpu_check.sh installs them from there).
peer-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: -d .whl liger-kernel==0.8.5 cut-cross-entropy==25.1.1

clean:
	rm -rf $(VENV) build *.egg-info
