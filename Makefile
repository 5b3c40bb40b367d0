# The README's two commands: `make demo` and `make test`. Both set up their environment first.
#
# Two ways to get that environment:
# - a project virtual environment, $(VENV) (default .venv), with everything pip-installed into
#   it. On a machine without an NVIDIA GPU the CPU build of torch is installed explicitly, so
#   nothing here ever pulls a CUDA build of torch onto a CPU machine;
# - SYSTEM=1 (`make test-system`): $(PYTHON)'s own environment, with the torch, Triton and pytest
#   already installed there (a GPU runner's image, the offline GPU machine). Only posattn itself is
#   installed into it, editable, from this tree with `pip --no-index`: nothing is downloaded.
#   SYSTEM defaults to 1 where nvidia-smi exists and $(PYTHON) already imports a CUDA build of
#   torch, triton and pytest; `make test SYSTEM=0` forces the project venv.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
# Where the CPU build comes from when no local wheel is configured for pip, e.g.
# `make test TORCH_INDEX=https://download.pytorch.org/whl/cpu`.
TORCH_INDEX ?=
TRITON_VERSION ?= 3.9.0
# Tests compare RoPE scalings, T5 buckets and whole attention layers with HF transformers itself.
TRANSFORMERS_VERSION ?= 5.23.0
PYTEST_ARGS ?=
SYSTEM ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && $(PYTHON) -c \
	"import torch, triton, pytest; assert torch.version.cuda" >/dev/null 2>&1 && echo 1 || echo 0)

VENV ?= .venv
ifeq ($(SYSTEM),1)
PY := $(PYTHON)
STAMP := build/.system$(subst /,_,$(abspath $(shell command -v $(PYTHON))))
else
PY := $(VENV)/bin/python
STAMP := $(VENV)
endif

.PHONY: demo test test-system install clean

ifneq ($(SYSTEM),1)
# The project venv: every tool the tests and the demo use, pinned where it matters.
$(VENV)/.installed: pyproject.toml setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing torch from the default index"; \
		$(PY) -m pip install -q torch; \
	else \
		echo "no NVIDIA GPU: installing the CPU build torch==$(TORCH_VERSION)+cpu"; \
		$(PY) -m pip install -q "torch==$(TORCH_VERSION)+cpu" $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) \
			|| { echo "no CPU build of torch $(TORCH_VERSION) found: rerun with TORCH_INDEX=https://download.pytorch.org/whl/cpu"; exit 1; }; \
	fi
	$(PY) -m pip install -q triton==$(TRITON_VERSION) numpy pytest transformers==$(TRANSFORMERS_VERSION) \
		setuptools cmake ninja matplotlib build check-jsonschema
	# the extension is built once, below, in build/ (incrementally from then on)
	POSATTN_BUILD_CPU=0 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

$(STAMP)/.extension: $(STAMP)/.installed
else
# SYSTEM=1: nothing downloaded, nothing but posattn installed (re-run every time: a few seconds).
.PHONY: $(STAMP)/.installed
$(STAMP)/.installed:
	@$(PY) -c "import torch, triton, pytest" || { echo "SYSTEM=1 needs torch, triton and pytest installed for \
	$(PYTHON); install them, or use the project venv: make test SYSTEM=0"; exit 1; }
	mkdir -p $(STAMP)
	POSATTN_BUILD_CPU=0 $(PY) -m pip install -q --no-index --no-build-isolation --no-deps -e .
endif

# The C++ CPU backend posattn._C (CMake + Ninja, incremental): rebuilt whenever a source changes.
# SYSTEM=1 without cmake and ninja: posattn works without it, the requires_ext tests fail (by design).
$(STAMP)/.extension: CMakeLists.txt $(wildcard csrc/*) pyproject.toml setup.py
	@if [ "$(SYSTEM)" = 1 ] && ! { $(PY) -c "import cmake, ninja" 2>/dev/null || { command -v cmake && command -v ninja; } >/dev/null; }; \
	then echo "SYSTEM=1: no cmake/ninja for $(PYTHON): posattn._C not built (backend='cpu' and the requires_ext tests need it)"; \
	else $(PY) setup.py -q build_ext --inplace && touch $@; fi

install: $(STAMP)/.installed $(STAMP)/.extension

demo: install
	$(PY) -m posattn

test: install
	$(PY) -m pytest -q -ra tests $(PYTEST_ARGS)

# The same tests in $(PYTHON)'s own environment, whatever the machine (see SYSTEM above).
test-system:
	$(MAKE) test SYSTEM=1

clean:
	rm -rf $(VENV) build dist *.egg-info python/*.egg-info python/posattn/_C*.so
