"""gated_residual: the Triton kernels (interpreter on CPU) against gated_residual_ref, the in-place rule, and the ref
against autograd of x + gate·y."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexdit_kernels import gated_residual, gated_residual_backward_ref, gated_residual_ref

# The adaLN family's module (its launchers and launch sizes); the package re-exports only the ops.
from flexdit_kernels import _adaln as mod

from .guard import check_gaps, check_guards, guard_allocations, guarded
from .helpers import OpLog, bad_input_test, check_compiled, grads_via, kernels_only_fixture

# (x dtype, y/gate dtype, atol, rtol): the fp32 residual stream with a low-precision branch, as under autocast.
DTYPES = [
    (torch.float32, torch.float32, 1e-5, 1e-5),
    (torch.float32, torch.float16, 1e-5, 1e-5),
    (torch.float16, torch.float16, 2e-3, 2e-3),
]
# (B, L, C): C = 40, 72 (not powers of two) and 1152 (DiT-XL, several channel blocks); L = 1, L not a multiple of
# the token block.
CASES = [(2, 7, 40), (1, 13, 72), (3, 1, 40), (1, 5, 1152)]
PARAMS = [pytest.param(case, *dt, id=f"B{case[0]}-L{case[1]}-C{case[2]}-{str(dt[0])[6:]}-{str(dt[1])[6:]}")
          for case in CASES for dt in DTYPES]


def _inputs(b, n, c, x_dtype, y_dtype):
    """x, y, gate, grad_out; gate is a strided chunk of one (B, 6C) adaLN projection, as in DiT."""
    x = torch.randn(b, n, c).to(x_dtype)
    y = torch.randn(b, n, c).to(y_dtype)
    gate = torch.randn(b, 6 * c).to(y_dtype)[:, 2 * c:3 * c]
    grad_out = torch.randn(b, n, c).to(x_dtype)
    return x, y, gate, grad_out


def _grads_via_ref(x, y, gate, grad_out):
    """Output and input gradients of the reference through autograd, in fp32."""
    return grads_via(gated_residual_ref, (x, y, gate), grad_out, dtype=torch.float32)


kernels_only = kernels_only_fixture(mod, "gated_residual")


# ----------------------------------------------------------------------------------------------------------------
# Kernels against the reference
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case, x_dtype, y_dtype, atol, rtol", PARAMS)
def test_public_op_runs_kernels(case, x_dtype, y_dtype, atol, rtol, kernels_only):
    b, n, c = case
    x, y, gate, grad_out = _inputs(b, n, c, x_dtype, y_dtype)
    ref_out, ref_grads = _grads_via_ref(x, y, gate, grad_out)

    leaves = [t.clone().requires_grad_() for t in (x, y, gate)]
    out = gated_residual(*leaves)
    out.backward(grad_out)
    assert out.dtype == x_dtype and out.shape == (b, n, c)
    torch.testing.assert_close(out.float(), ref_out, atol=atol, rtol=rtol)
    for name, leaf, ref in zip(("dx", "dy", "dgate"), leaves, ref_grads):
        assert leaf.grad.dtype == leaf.dtype, name
        # Low-precision gradients are rounded once; dgate is a sum over L rounded to y's dtype.
        tol = 1e-5 if leaf.dtype == torch.float32 else 2e-3 * (max(n, 4) if name == "dgate" else 1)
        torch.testing.assert_close(leaf.grad.float(), ref, atol=tol, rtol=max(tol, 2e-3),
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("tile, block_c, target", [(64, 16, 1), (32, 32, 5)])
def test_launchers_tiling_and_strides(monkeypatch, tile, block_c, target):
    """Small tiles and few programs, so the grid has several channel and token blocks and each backward program
    loops over several token blocks; x and y strided (batch-minor, channel stride 2), grad_out expanded."""
    for name in ("_TILE", "_BWD_TILE"):
        monkeypatch.setattr(mod, name, tile)
    monkeypatch.setattr(mod, "_MAX_BLOCK_C", block_c)
    monkeypatch.setattr(mod, "_resident", lambda *args: target)        # programs of one wave
    b, n, c = 2, 23, 40
    x = torch.randn(n, b, 2 * c).transpose(0, 1)[:, :, ::2]
    y = torch.randn(b, c, n).transpose(1, 2)
    gate = torch.randn(c, b).t()
    grad_out = torch.randn(1, 1, c).expand(b, n, c)
    torch.testing.assert_close(mod.gated_residual_fwd(x, y, gate), gated_residual_ref(x, y, gate))
    got = mod.gated_residual_bwd(grad_out, y, gate)
    for g, w in zip(got, gated_residual_backward_ref(grad_out, y, gate)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    xi = x.clone().transpose(0, 1).contiguous().transpose(0, 1)                # strided, no overlap
    mod.gated_residual_inplace_fwd(xi, y, gate)
    torch.testing.assert_close(xi, gated_residual_ref(x, y, gate))


def test_broadcast_branch_via_expand(kernels_only):
    """A branch output shared by every token (the Poolingformer's pooled attention, (B, 1, C)) goes in as a
    stride-0 expand, without materializing (B, L, C); its gradient sums over L through the expand."""
    x, _, gate, grad_out = _inputs(2, 9, 40, torch.float32, torch.float32)
    v = torch.randn(2, 1, 40, requires_grad=True)
    out = gated_residual(x, v.expand(2, 9, 40), gate)
    out.backward(grad_out)
    vr = v.detach().clone().requires_grad_()
    ref = x + gate.unsqueeze(1) * vr
    ref.backward(grad_out)
    torch.testing.assert_close(out, ref.detach())
    torch.testing.assert_close(v.grad, vr.grad)


@settings(max_examples=6, deadline=None)
@given(b=st.integers(1, 2), n=st.integers(1, 40), c=st.integers(1, 90))
def test_property_random_shapes(b, n, c):
    x, y, gate, grad_out = _inputs(b, n, c, torch.float32, torch.float32)
    torch.testing.assert_close(mod.gated_residual_fwd(x, y, gate), gated_residual_ref(x, y, gate))
    for g, w in zip(mod.gated_residual_bwd(grad_out, y, gate), gated_residual_backward_ref(grad_out, y, gate)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("x_dtype, y_dtype", [(torch.float32, torch.float16), (torch.float16, torch.float16)])
def test_guard_buffers(x_dtype, y_dtype):
    """Inputs inside NaN guard buffers, launcher allocations inside sentinel buffers; the in-place update writes
    only inside x's view."""
    x, y, gate, grad_out = (guarded(t) for t in _inputs(2, 11, 72, x_dtype, y_dtype))
    with guard_allocations() as allocs:
        out = mod.gated_residual_fwd(x, y, gate)
        dy, dgate = mod.gated_residual_bwd(grad_out, y, gate)
    check_guards(allocs, (out, dy, dgate), x=x, y=y, gate=gate, grad_out=grad_out)
    torch.testing.assert_close(out, gated_residual_ref(x, y, gate))
    want_dy, want_dgate = gated_residual_backward_ref(grad_out, y, gate)
    torch.testing.assert_close(dy, want_dy)
    torch.testing.assert_close(dgate, want_dgate, atol=2e-2, rtol=2e-3)
    expected = gated_residual_ref(x, y, gate)
    mod.gated_residual_inplace_fwd(x, y, gate)
    check_gaps(x, "x updated in place")
    torch.testing.assert_close(x, expected)


# ----------------------------------------------------------------------------------------------------------------
# The in-place rule
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "no_requires_grad"])
def test_inplace_when_autograd_does_not_record(mode, kernels_only):
    x, y, gate, _ = _inputs(2, 7, 40, torch.float32, torch.float16)
    expected = gated_residual_ref(x, y, gate)
    ptr = x.data_ptr()
    if mode == "no_grad":
        y.requires_grad_()
        with torch.no_grad():
            out = gated_residual(x, y, gate, inplace=True)
    elif mode == "inference_mode":
        with torch.inference_mode():
            x = x.clone()
            ptr = x.data_ptr()
            out = gated_residual(x, y, gate, inplace=True)
    else:
        out = gated_residual(x, y, gate, inplace=True)
    assert out is x and out.data_ptr() == ptr
    torch.testing.assert_close(out, expected)


def test_out_of_place_when_autograd_records(kernels_only):
    """inplace=True under autograd still returns a new tensor and leaves x as it was; gradients are right."""
    x, y, gate, grad_out = _inputs(2, 7, 40, torch.float32, torch.float32)
    base = x.clone().requires_grad_()
    x_in = base * 1                                                            # a non-leaf, as in a model
    before = x_in.detach().clone()
    out = gated_residual(x_in, y.requires_grad_(), gate.requires_grad_(), inplace=True)
    assert out is not x_in and torch.equal(x_in, before)
    out.backward(grad_out)
    _, (dx, dy, dgate) = _grads_via_ref(x, y, gate, grad_out)
    torch.testing.assert_close(base.grad, dx)
    torch.testing.assert_close(y.grad, dy)
    torch.testing.assert_close(gate.grad, dgate)


def test_default_is_out_of_place(kernels_only):
    x, y, gate, _ = _inputs(2, 3, 8, torch.float32, torch.float32)
    before = x.clone()
    with torch.no_grad():
        out = gated_residual(x, y, gate)
    assert out is not x and torch.equal(x, before)


def test_inplace_expanded_x_raises():
    x = torch.randn(1, 1, 8).expand(2, 3, 8)
    with torch.no_grad(), pytest.raises(ValueError, match="x is expanded"):
        gated_residual(x, torch.randn(2, 3, 8), torch.randn(2, 8), inplace=True)


# ----------------------------------------------------------------------------------------------------------------
# Registration: torch.compile, opcheck, one op per call
# ----------------------------------------------------------------------------------------------------------------

def test_torch_compile_fullgraph():
    x, y, gate, grad_out = _inputs(2, 6, 8, torch.float32, torch.float32)
    check_compiled(lambda a, b, g: gated_residual(a, b, g, inplace=True), gated_residual_ref, (x, y, gate), grad_out)

    # Under no_grad the in-place op is traced too (functionalized, then written back into x).
    xi = x.clone()
    with torch.no_grad():
        out = torch.compile(lambda a, b, g: gated_residual(a, b, g, inplace=True), fullgraph=True,
                            backend="aot_eager")(xi, y, gate)
    torch.testing.assert_close(xi, gated_residual_ref(x, y, gate))
    torch.testing.assert_close(out, xi)


def test_opcheck():
    """Schema, fake impl (shape, dtype, strides), autograd registration and the mutation agree with the real op."""
    x, y, gate, grad_out = _inputs(2, 5, 8, torch.float32, torch.float16)
    torch.library.opcheck(torch.ops.flexdit.gated_residual.default,
                          (x.requires_grad_(), y.requires_grad_(), gate.detach().requires_grad_()))
    torch.library.opcheck(torch.ops.flexdit.gated_residual_inplace.default, (x.detach().clone(), y.detach(),
                                                                             gate.detach()))
    torch.library.opcheck(torch.ops.flexdit.gated_residual_backward.default, (grad_out, y.detach(), gate.detach()))


def test_one_op_per_call():
    x, y, gate, _ = _inputs(1, 4, 8, torch.float32, torch.float32)
    with OpLog() as log:
        gated_residual(x, y, gate)
        with torch.no_grad():
            gated_residual(x, y, gate, inplace=True)
    assert log.ops == ["flexdit.gated_residual.default", "flexdit.gated_residual_inplace.default"]


# ----------------------------------------------------------------------------------------------------------------
# The reference against autograd
# ----------------------------------------------------------------------------------------------------------------

def test_backward_ref_matches_autograd():
    x, y, gate, grad_out = (t.double() for t in _inputs(2, 9, 72, torch.float32, torch.float32))
    leaves = [t.clone().requires_grad_() for t in (x, y, gate)]
    out = leaves[0] + leaves[2].unsqueeze(1) * leaves[1]
    dx, dy, dgate = torch.autograd.grad(out, leaves, grad_out)
    torch.testing.assert_close(dx, grad_out)
    got_dy, got_dgate = gated_residual_backward_ref(grad_out.float(), y.float(), gate.float())
    torch.testing.assert_close(got_dy, dy.float())
    torch.testing.assert_close(got_dgate, dgate.float(), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------

def _ok():
    return torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.randn(2, 8)


BAD_CALLS = [
    ("x rank", lambda f: f(torch.randn(4, 8), *_ok()[1:]), "x must have rank 3"),
    ("x dtype", lambda f: f(torch.randn(2, 4, 8).double(), *_ok()[1:]), "x must have dtype"),
    ("x not a tensor", lambda f: f([[[1.0]]], *_ok()[1:]), "x must be a torch.Tensor"),
    ("y shape", lambda f: f(_ok()[0], torch.randn(2, 5, 8), _ok()[2]), "y must have x's shape"),
    ("y dtype", lambda f: f(_ok()[0], torch.ones(2, 4, 8, dtype=torch.int64), _ok()[2]), "y must have dtype"),
    ("y device", lambda f: f(_ok()[0], torch.randn(2, 4, 8, device="meta"), _ok()[2]), "y is on meta"),
    ("gate rank", lambda f: f(*_ok()[:2], torch.randn(2, 1, 8)), "gate must have rank 2"),
    ("gate shape", lambda f: f(*_ok()[:2], torch.randn(2, 7)), r"gate must have shape \(B, C\)"),
    ("gate device", lambda f: f(*_ok()[:2], torch.randn(2, 8, device="meta")), "gate is on meta"),
]


test_bad_input_raises = bad_input_test(BAD_CALLS, [gated_residual, mod.gated_residual_fwd,
                                                   mod.gated_residual_inplace_fwd],
                                       ids=["public", "launcher", "launcher-inplace"])


def test_launcher_bad_device():
    with pytest.raises(ValueError, match="x is on meta"):
        mod.gated_residual_fwd(*(t.to("meta") for t in _ok()))
    with pytest.raises(ValueError, match="grad_out is on meta"):
        mod.gated_residual_bwd(*(t.to("meta") for t in _ok()))


# ----------------------------------------------------------------------------------------------------------------
# GPU: bf16 and fp16 at the model's sizes
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_model_sizes(dtype):
    """(32, 1024, 1152): fp32 residual stream, bf16/fp16 branch and gate, as under autocast."""
    b, n, c = 32, 1024, 1152
    x = torch.randn(b, n, c, device="cuda")
    y = torch.randn(b, n, c, device="cuda").to(dtype)
    gate = torch.randn(b, 6 * c, device="cuda").to(dtype)[:, 2 * c:3 * c]
    grad_out = torch.randn(b, n, c, device="cuda")
    out = gated_residual(x, y, gate)
    torch.testing.assert_close(out, gated_residual_ref(x, y, gate), atol=1e-5, rtol=1e-5)
    dy, dgate = mod.gated_residual_bwd(grad_out, y, gate)
    want_dy, want_dgate = gated_residual_backward_ref(grad_out, y, gate)
    torch.testing.assert_close(dy, want_dy, atol=0, rtol=0)           # one product, rounded once either way
    torch.testing.assert_close(dgate.float(), want_dgate.float(), atol=0.5, rtol=1e-2)
    again = mod.gated_residual_bwd(grad_out, y, gate)
    assert torch.equal(again[0], dy) and torch.equal(again[1], dgate)    # deterministic reduction
    xi = x.clone()
    with torch.no_grad():
        assert gated_residual(xi, y, gate, inplace=True) is xi
    torch.testing.assert_close(xi, out, atol=0, rtol=0)
