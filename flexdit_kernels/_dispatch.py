"""The one place that decides whether an op runs its Triton kernel or its PyTorch reference."""
import contextlib
import os

import torch

_BACKENDS = ("auto", "triton", "reference")
_backend = os.environ.get("FLEXDIT_BACKEND", "auto")


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def set_backend(name: str) -> None:
    """Choose "auto" (Triton on CUDA or under the interpreter, reference otherwise), "triton" or "reference"."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def backend(name: str):
    """Context manager form of `set_backend`; restores the previous choice on exit."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether an op on these tensors runs its Triton kernel.

    "auto": Triton when the tensors are on CUDA, or on the CPU under `TRITON_INTERPRET=1`; the reference otherwise.
    "triton": always Triton (a CPU tensor without the interpreter is an error), "reference": never.
    """
    if _backend == "reference":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if _backend == "triton":
        if not (on_cuda or interpreting()):
            raise ValueError("backend 'triton' needs CUDA tensors or TRITON_INTERPRET=1")
        return True
    return on_cuda or (interpreting() and all(t.device.type == "cpu" for t in tensors))
