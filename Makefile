# The README's two commands: `make demo` and `make test`. Both set up a local virtual
# environment (.venv) first. On a machine without an NVIDIA GPU the CPU build of torch is
# installed explicitly, so nothing here ever pulls a CUDA build of torch onto a CPU machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# Where the CPU build comes from when no local wheel is configured for pip, e.g.
# `make test TORCH_INDEX=https://download.pytorch.org/whl/cpu`.
TORCH_INDEX ?=
TRITON_VERSION ?= 3.9.0
# Tests compare RoPE scalings, T5 buckets and whole attention layers with HF transformers itself.
TRANSFORMERS_VERSION ?= 5.23.0
PYTEST_ARGS ?=

.PHONY: demo test install clean

$(VENV)/.installed: setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing torch from the default index"; \
		$(PY) -m pip install -q torch; \
	else \
		echo "no NVIDIA GPU: installing the CPU build torch==$(TORCH_VERSION)+cpu"; \
		$(PY) -m pip install -q "torch==$(TORCH_VERSION)+cpu" $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) \
			|| { echo "no CPU build of torch $(TORCH_VERSION) found: rerun with TORCH_INDEX=https://download.pytorch.org/whl/cpu"; exit 1; }; \
	fi
	$(PY) -m pip install -q triton==$(TRITON_VERSION) numpy pytest transformers==$(TRANSFORMERS_VERSION) cmake ninja matplotlib
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# The C++ CPU backend posattn._C (CMake + Ninja, incremental): rebuilt whenever a source changes.
$(VENV)/.extension: $(VENV)/.installed CMakeLists.txt $(wildcard csrc/*)
	$(PY) setup.py -q build_ext --inplace
	touch $@

install: $(VENV)/.extension

demo: install
	$(PY) -m posattn

test: install
	$(PY) -m pytest -q -ra tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info python/*.egg-info python/posattn/_C*.so
