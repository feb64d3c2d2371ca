# Set-up and the two Quick-start commands. Everything lives in a virtual environment (.venv by default).
#   make run    set up if needed, then run the main job
#   make test   set up if needed, then run the test suite (what CI runs)
VENV ?= .venv
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python

.PHONY: setup run test

setup: $(VENV)/.bevdeform-installed

# torch goes in first and pinned: on these machines torch==2.13.0 is a CPU wheel already on disk, whereas an open
# requirement with no torch installed would download the newest CUDA build. An existing torch (a CUDA machine's)
# is kept: the package asks only for torch>=2.4.
$(VENV)/.bevdeform-installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -e ".[dev,export]"
	$(PY) -m bevdeform.msda || echo "warning: the native MSDA op did not build; the PyTorch reference will serve"
	touch $@

run: setup
	$(PY) scripts/train.py --config bev_tiny

# The test command lives in .ci/run (set-up, then pytest), so CI and `make test` run the same thing.
test: setup
	VENV=$(VENV) bash .ci/run
