"""Test helpers shared by the kernel tests: a fixture that keeps the references out, an op log, the references'
gradients through autograd, and the tests that every op runs alike (bad input, jit trace, the auto table)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flexdit_kernels import _dispatch


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


def grads_via(fn, tensors, grad_out, *args, dtype=None):
    """`fn(*tensors, *args)` on detached copies of `tensors` (cast to `dtype` if given) and, through autograd for
    `grad_out` (cast alike), the copies' gradients: (out, [grad per tensor])."""
    leaves = [(t.detach().clone() if dtype is None else t.detach().to(dtype)).requires_grad_() for t in tensors]
    out = fn(*leaves, *args)
    out.backward(grad_out if dtype is None else grad_out.to(dtype))
    return out, [t.grad for t in leaves]


def via_image(fn, t: torch.Tensor, hw, grad_out: torch.Tensor):
    """An image op `fn` ((B, C, h, w) -> (B, C, h', w')) on token-major t (B, h*w, C): its result as tokens
    (B, h'*w', C) and, through autograd, t's gradient for grad_out."""
    leaf = t.detach().clone().requires_grad_()
    out = fn(leaf.transpose(1, 2).reshape(t.shape[0], t.shape[2], *hw)).flatten(2).transpose(1, 2)
    (grad,) = torch.autograd.grad(out, leaf, grad_out)
    return out.detach(), grad


# ----------------------------------------------------------------------------------------------------------------
# Tests every op runs alike
# ----------------------------------------------------------------------------------------------------------------

def bad_input_test(calls, fns, ids):
    """`test_bad_input_raises`: each of `calls` (what, call, match) raises a ValueError matching `match` whichever
    of `fns` (named `ids`: the public op, its launchers, its reference) it calls."""
    @pytest.mark.parametrize("fn", fns, ids=ids)
    @pytest.mark.parametrize("what, call, match", calls, ids=[c[0] for c in calls])
    def test_bad_input_raises(fn, what, call, match):
        with pytest.raises(ValueError, match=match):
            call(fn)
    return test_bad_input_raises


def jit_trace_test(op: str, fn, inputs, inside: str):
    """`test_jit_trace_sees_one_op`: torch.jit.trace (fvcore's FLOP counter) of `fn` on `inputs()` records the custom
    op `flexdit::{op}`, not `inside`, an op that runs inside it."""
    @pytest.mark.filterwarnings("ignore::DeprecationWarning")     # torch.jit.trace, still what fvcore uses
    @pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the shape checks, constants in a trace
    def test_jit_trace_sees_one_op():
        graph = str(torch.jit.trace(fn, inputs()).graph)
        assert f"flexdit::{op}" in graph and inside not in graph
    return test_jit_trace_sees_one_op


def auto_table_params(op: str):
    """(fwd_row, bwd_row, expected) for an `AUTO_TABLE` test of `op`: whether the table sends the forward and the
    backward to the reference, and which of `op`'s references and launchers then run, in order."""
    ref, bwd_ref, fwd, bwd = f"{op}_ref", f"{op}_backward_ref", f"_{op}_fwd", f"_{op}_bwd"
    return [(True, False, [ref, bwd]), (False, True, [fwd, bwd_ref]), (True, True, [ref, bwd_ref]),
            (False, False, [fwd, bwd])]


def route_log(monkeypatch, module, op: str, row, fwd_row: bool, bwd_row: bool) -> list:
    """Give `op`'s forward (if fwd_row) and backward (if bwd_row) the one `AUTO_TABLE` row `row`; returns the list
    to which every call of `module`'s reference and launcher functions of `op` appends its name."""
    monkeypatch.setitem(_dispatch.AUTO_TABLE, op, [row] if fwd_row else [])
    monkeypatch.setitem(_dispatch.AUTO_TABLE, f"{op}_backward", [row] if bwd_row else [])
    calls = []
    for name in (f"{op}_ref", f"{op}_backward_ref", f"_{op}_fwd", f"_{op}_bwd"):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    return calls


def check_compiled(op, ref, tensors, grad_out, *args) -> None:
    """torch.compile(fullgraph=True) of `op(2 * tensors[0], *tensors[1:], *args)`, the op inside a larger graph:
    its output and every tensor's gradient for grad_out equal those of `ref` in its place, through autograd."""
    compiled = torch.compile(lambda a, *rest: op(a * 2, *rest, *args), fullgraph=True, backend="aot_eager")
    out, grads = grads_via(compiled, tensors, grad_out)
    ref_out, ref_grads = grads_via(lambda a, *rest: ref(a * 2, *rest, *args), tensors, grad_out)
    torch.testing.assert_close(out, ref_out)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)
