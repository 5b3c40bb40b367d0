"""Test configuration: device choice, interpreter, seeds, NaN-poisoned allocations, markers."""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_configure(config):
    # Without a GPU the Triton kernels run in Triton's interpreter. This is process-wide
    # configuration, not a per-test knob: Triton reads it when the kernels are first
    # decorated, so it must be in place before anything imports posattn.triton_kernels.
    if not HAS_CUDA:
        os.environ["TRITON_INTERPRET"] = "1"
    config.addinivalue_line("markers", "requires_cuda: needs a CUDA device")
    config.addinivalue_line("markers", "requires_ext: needs the compiled extension posattn._C")
    config.addinivalue_line("markers", "slow: long-running test")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "requires_cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed_and_poison(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setenv("POSATTN_POISON_ALLOC", "1")


@pytest.fixture
def device():
    return DEVICE
