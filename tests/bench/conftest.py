"""Bench tests run tiny models on the CPU: one intra-op thread is faster there than two (thread hand-off costs
more than these ops) and keeps the directory's time steady on a shared 2-core runner."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
