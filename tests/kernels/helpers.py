"""Test helpers shared by the kernel tests: a fixture that keeps the references out, an op log."""
import pytest
from torch.utils._python_dispatch import TorchDispatchMode


def kernels_only_fixture(module, op: str):
    """A `kernels_only` fixture: `module`'s `{op}_ref` and `{op}_backward_ref` fail when called, so a test that passes
    with it proves the custom ops ran their Triton kernels."""
    @pytest.fixture
    def kernels_only(monkeypatch):
        def boom(*args, **kwargs):
            raise AssertionError("reference called where the Triton kernel should run")
        monkeypatch.setattr(module, f"{op}_ref", boom)
        monkeypatch.setattr(module, f"{op}_backward_ref", boom)
    return kernels_only


class OpLog(TorchDispatchMode):
    """Every op that reaches the dispatcher, by overload name (views included), in order."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))
