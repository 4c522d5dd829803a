"""Eager calls of the flexdit ops skip the custom-op dispatcher (its host cost: `python -m bench.overhead`) and still
compute the op, forward and backward, on the Triton path (interpreter) and on the reference path, with contiguous
results from strided inputs as the custom op gives. torch.compile, tracing and dispatch modes take the custom op
instead (each op's own tests: compile, opcheck, one op per call)."""
import contextlib

import pytest
import torch

import flexdit_kernels as fk
from flexdit_kernels import _adaln, _attention, _token_mean, _token_pool, _upsample_add

from .helpers import OpLog

B, HW, GRID, C = 2, (5, 7), (2, 3), 24
N, M = HW[0] * HW[1], GRID[0] * GRID[1]


def _tokens(n):
    """(B, n, C) tokens, batch-minor in memory (strided)."""
    return torch.randn(n, B, C).transpose(0, 1)


def _chunks():
    """gate, shift, scale: strided chunks of one (B, 6C) adaLN projection."""
    ada = torch.randn(B, 6 * C)
    return ada[:, 2 * C:3 * C], ada[:, 3 * C:4 * C], ada[:, 4 * C:5 * C]


# name: (module, public op, its reference, inputs)
CASES = {
    # M queries on N keys, heads of 16: a Triton path (few keys / split keys), not SDPA.
    "attention": (_attention, fk.attention, fk.attention_ref,
                  lambda: (torch.randn(B, M, 2, 16), torch.randn(B, N, 2, 16), torch.randn(B, N, 2, 16))),
    "token_pool": (_token_pool, lambda x: fk.token_pool(x, HW, GRID), lambda x: fk.token_pool_ref(x, HW, GRID),
                   lambda: (_tokens(N),)),
    "token_mean": (_token_mean, lambda x: fk.token_mean(x), lambda x: fk.token_mean_ref(x),
                   lambda: (_tokens(N),)),
    "upsample_add": (_upsample_add, lambda s, d: fk.upsample_add(s, d, HW, GRID),
                     lambda s, d: fk.upsample_add_ref(s, d, HW, GRID),
                     lambda: (_tokens(M), _tokens(N))),
    "layernorm_modulate": (_adaln, fk.layernorm_modulate, fk.layernorm_modulate_ref,
                           lambda: (_tokens(N), *_chunks()[1:])),
    "gated_residual": (_adaln, fk.gated_residual, fk.gated_residual_ref,
                       lambda: (_tokens(N), _tokens(N), _chunks()[0])),
    "gated_residual_layernorm_modulate": (
        _adaln, fk.gated_residual_layernorm_modulate,
        fk.gated_residual_layernorm_modulate_ref, lambda: (_tokens(N), _tokens(N), *_chunks())),
    "silu": (_adaln, fk.silu, fk.silu_ref, lambda: (3 * torch.randn(B, C),)),
}


@pytest.fixture(autouse=True)
def _fp32_attention_on_triton(monkeypatch):
    """fp32 attention goes to SDPA by default (`_attention.SDPA_DTYPES`); these tests compare its Triton path."""
    monkeypatch.setattr(_attention, "SDPA_DTYPES", ())


def _no_custom_ops(monkeypatch, module):
    """Every custom op of `module` (forward and backward) fails when called."""
    def boom(*args, **kwargs):
        raise AssertionError("the custom op was called from an eager call")
    names = [name for name, obj in vars(module).items() if name.endswith("_op") and hasattr(obj, "register_fake")]
    assert names
    for name in names:
        monkeypatch.setattr(module, name, boom)


def _route(opaque):
    """The context of a call: with `opaque`, a dispatch mode (any one sends the ops to their custom op), else none
    (the eager path)."""
    return OpLog() if opaque else contextlib.nullcontext()


def _flat(out, contiguous=False):
    """The op's result(s) as one flat tensor; with `contiguous`, first check that each result is contiguous."""
    assert not contiguous or all(t.is_contiguous() for t in (out if isinstance(out, tuple) else (out,)))
    return torch.cat([t.flatten() for t in out]) if isinstance(out, tuple) else out.flatten()


@pytest.mark.parametrize("path", ["triton", "reference"])
@pytest.mark.parametrize("name", list(CASES))
def test_eager_call_skips_the_custom_op(name, path, monkeypatch):
    if path == "triton" and not fk.interpreting():
        pytest.skip("the Triton path on the CPU needs TRITON_INTERPRET=1")
    module, call, ref, make_inputs = CASES[name]
    inputs = make_inputs()
    ref_leaves = [t.clone().requires_grad_() for t in inputs]
    want = _flat(ref(*ref_leaves))
    grad_out = torch.randn_like(want)
    want.backward(grad_out)

    _no_custom_ops(monkeypatch, module)
    leaves = [t.clone().requires_grad_() for t in inputs]
    with fk.backend(path):
        with torch.no_grad():
            got_no_grad = _flat(call(*inputs), contiguous=True)
        got = _flat(call(*leaves), contiguous=True)
        got.backward(grad_out)
    torch.testing.assert_close(got_no_grad, want.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.detach(), want.detach(), atol=1e-5, rtol=1e-5)
    for i, (leaf, ref_leaf) in enumerate(zip(leaves, ref_leaves)):
        torch.testing.assert_close(leaf.grad, ref_leaf.grad, atol=1e-4, rtol=1e-4, msg=lambda m: f"input {i}: {m}")


@pytest.mark.parametrize("path", ["triton", "reference"])
def test_eager_inplace_residual_skips_the_custom_op(path, monkeypatch):
    if path == "triton" and not fk.interpreting():
        pytest.skip("the Triton path on the CPU needs TRITON_INTERPRET=1")
    x, y, gate = CASES["gated_residual"][3]()
    want = fk.gated_residual_ref(x, y, gate)
    _no_custom_ops(monkeypatch, _adaln)
    with fk.backend(path), torch.no_grad():
        assert fk.gated_residual(x, y, gate, inplace=True) is x
    torch.testing.assert_close(x, want)


def _outcome(call, inputs, path, opaque, create_graph_step):
    """What `create_graph_step(call, leaves)` leads to through the eager path or (opaque) the custom op: the leaves'
    gradients, or the error's first words."""
    leaves = [t.clone().requires_grad_() for t in inputs]
    with fk.backend(path):
        with _route(opaque):
            out = _flat(call(*leaves))
        try:
            create_graph_step(out, leaves)
        except RuntimeError as err:
            return str(err).split(":")[0]
    return [t.grad for t in leaves]


@pytest.mark.parametrize("path", ["triton", "reference"])
@pytest.mark.parametrize("name", list(CASES))
def test_double_backward_as_the_custom_op(name, path):
    """A second derivative through the eager path does what it does through the custom op (whose backward op has no
    derivative): it raises where the backward depends on saved inputs, rather than silently dropping those terms
    (even when the incoming gradient itself has no graph), and is zero for the linear ops that save nothing."""
    if path == "triton" and not fk.interpreting():
        pytest.skip("the Triton path on the CPU needs TRITON_INTERPRET=1")
    _, call, _, make_inputs = CASES[name]
    inputs = make_inputs()
    torch.manual_seed(0)
    weight = torch.randn_like(_flat(CASES[name][2](*inputs)))

    def second_derivative(out, leaves):
        grads = torch.autograd.grad((out * weight).sum(), leaves, create_graph=True, allow_unused=True)
        (sum((g * g).sum() for g in grads if g is not None) + sum(t.sum() for t in leaves)).backward()

    eager, op = (_outcome(call, inputs, path, opaque, second_derivative) for opaque in (False, True))
    if isinstance(op, str):
        assert eager == op
    else:
        for a, b in zip(eager, op):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("path", ["triton", "reference"])
@pytest.mark.parametrize("name", list(CASES))
def test_batched_gradients(name, path):
    """torch.autograd.grad(..., is_grads_batched=True) (what jacobian(vectorize=True) runs) works as through the op."""
    if path == "triton" and not fk.interpreting():
        pytest.skip("the Triton path on the CPU needs TRITON_INTERPRET=1")
    _, call, _, make_inputs = CASES[name]
    inputs = make_inputs()

    def batched(out, leaves):
        cotangents = torch.randn(3, *out.shape, generator=torch.Generator().manual_seed(1))
        grads = torch.autograd.grad(out, leaves, cotangents, is_grads_batched=True, allow_unused=True)
        for leaf, g in zip(leaves, grads):
            leaf.grad = g

    eager, op = (_outcome(call, inputs, path, opaque, batched) for opaque in (False, True))
    assert not isinstance(op, str) or eager == op, (eager, op)
    if not isinstance(op, str):
        for a, b in zip(eager, op):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("path", ["triton", "reference"])
def test_eager_inplace_residual_bumps_the_version(path):
    """Autograd refuses a backward through a graph that saved x before the in-place update, as for any in-place op."""
    if path == "triton" and not fk.interpreting():
        pytest.skip("the Triton path on the CPU needs TRITON_INTERPRET=1")
    x, y, gate = CASES["gated_residual"][3]()
    x = x.contiguous()
    w = torch.randn_like(x, requires_grad=True)
    loss = (w * x).sum()                                       # saves x for w's gradient
    with fk.backend(path), torch.no_grad():
        fk.gated_residual(x, y, gate, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("path", ["triton", "reference"])
def test_vmap_takes_the_custom_op(path):
    """Under torch.vmap the ops go through the custom op (its batching fallback), not the raw launchers."""
    if path == "triton" and not fk.interpreting():
        pytest.skip("the Triton path on the CPU needs TRITON_INTERPRET=1")
    x = 3 * torch.randn(4, B, C)
    with fk.backend(path):
        got = torch.vmap(fk.silu)(x)
    torch.testing.assert_close(got, torch.nn.functional.silu(x), atol=1e-5, rtol=1e-5)
    # The in-place residual takes its out-of-place form under a transform (the fallback cannot batch a mutation).
    xs, ys, gates = torch.randn(4, B, N, C), torch.randn(4, B, N, C), torch.randn(4, B, C)
    with fk.backend(path), torch.no_grad():
        got = torch.vmap(lambda a, b, g: fk.gated_residual(a, b, g, inplace=True))(xs, ys, gates)
    torch.testing.assert_close(got, xs + gates[:, :, None] * ys)


@pytest.mark.parametrize("name", list(CASES))
def test_torch_func_on_the_reference_path(name):
    """torch.func.grad and vmap over the reference backend run the reference's PyTorch ops: exact gradients."""
    _, call, ref, make_inputs = CASES[name]
    inputs = make_inputs()

    def loss(fn):
        return lambda first, *rest: _flat(fn(first, *rest)).float().square().sum()

    with fk.backend("reference"):
        got = torch.func.grad(loss(call))(*inputs)
        batched = torch.vmap(lambda *a: _flat(call(*a)))(*(torch.stack([t, 2 * t]) for t in inputs))
    torch.testing.assert_close(got, torch.func.grad(loss(ref))(*inputs), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[1], _flat(ref(*(2 * t for t in inputs))), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_eager_path_equals_the_custom_op_under_autocast(name):
    """Under fp16 autocast the eager path gives the custom op's results and gradients, dtypes included (Triton path
    on the interpreter)."""
    if not fk.interpreting():
        pytest.skip("the Triton path on the CPU needs TRITON_INTERPRET=1")
    _, call, _, make_inputs = CASES[name]
    inputs = make_inputs()

    def run(opaque):
        leaves = [t.clone().requires_grad_() for t in inputs]
        with fk.backend("triton"), torch.autocast("cpu", dtype=torch.float16), _route(opaque):
            out = call(*leaves)
        flat = _flat(out)
        flat.float().sum().backward()
        return [t.dtype for t in (out if isinstance(out, tuple) else (out,))], flat.detach(), [t.grad for t in leaves]

    dtypes_a, out_a, grads_a = run(False)
    dtypes_b, out_b, grads_b = run(True)
    assert dtypes_a == dtypes_b
    torch.testing.assert_close(out_a, out_b, atol=0, rtol=0)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
