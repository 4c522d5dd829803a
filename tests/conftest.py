"""Test set-up: on a machine without a GPU, Triton kernels run through the interpreter on the CPU.

TRITON_INTERPRET must be set before any kernel module is imported, since `@triton.jit` reads it when it decorates.
"""
import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
# The kernel tests test the kernels: on a GPU no op may swap its kernel for the PyTorch path after a first-use check
# (tests/kernels/test_tune.py turns the check on where it tests it).
os.environ.setdefault("FLEXDIT_TUNE", "off")
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Toy-size tensors: one intra-op thread. On a loaded 2-core machine two threads made a tiny training step 50x
    # slower (2.5 s instead of 50 ms): their hand-off costs more than these ops.
    torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (bf16, full sizes, timing gates)")
    config.addinivalue_line("markers", "slow: longer CPU tests (end-to-end training)")


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    """The device tests run on: CUDA when present, else the CPU (kernels under the Triton interpreter)."""
    return torch.device("cuda" if HAS_GPU else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
