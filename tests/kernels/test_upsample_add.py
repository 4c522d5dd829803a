"""upsample_add: the Triton kernels (interpreter on CPU) against upsample_add_ref, and the ref against F.interpolate."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flexdit_kernels import upsample_add, upsample_add_backward_ref, upsample_add_ref

from .grid_cases import DTYPES, kernel_params

# The package re-exports the function under the module's name, so fetch the module itself.
from flexdit_kernels import _upsample_add as mod


def _ids(case):
    b, hw, grid, c = case
    return f"B{b}-{grid[0]}x{grid[1]}-to-{hw[0]}x{hw[1]}-C{c}"


KERNEL_PARAMS = kernel_params(_ids)


def _grads_via_ref(sparse, dense, hw, grid, grad_out):
    """Output and both gradients of the reference through autograd (not through upsample_add_backward_ref)."""
    s = sparse.detach().clone().requires_grad_()
    d = dense.detach().clone().requires_grad_()
    out = upsample_add_ref(s, d, hw, grid)
    out.backward(grad_out)
    return out, s.grad, d.grad


@pytest.fixture
def kernels_only(monkeypatch):
    """Make the custom ops' reference branch fail, so a passing test proves the Triton kernels ran."""
    def boom(*args, **kwargs):
        raise AssertionError("reference called where the Triton kernel should run")
    monkeypatch.setattr(mod, "upsample_add_ref", boom)
    monkeypatch.setattr(mod, "upsample_add_backward_ref", boom)


# ----------------------------------------------------------------------------------------------------------------
# Kernels against the reference
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case, dtype, atol, rtol", KERNEL_PARAMS)
def test_public_op_runs_kernels(case, dtype, atol, rtol, kernels_only):
    b, hw, grid, c = case
    sparse = torch.randn(b, grid[0] * grid[1], c, dtype=dtype)
    dense = torch.randn(b, hw[0] * hw[1], c, dtype=dtype)
    grad_out = torch.randn(b, hw[0] * hw[1], c, dtype=dtype)
    ref_out, ref_ds, ref_dd = _grads_via_ref(sparse, dense, hw, grid, grad_out)

    s = sparse.clone().requires_grad_()
    d = dense.clone().requires_grad_()
    out = upsample_add(s, d, hw, grid)
    out.backward(grad_out)
    assert out.dtype == dtype and out.shape == ref_out.shape
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(s.grad, ref_ds, atol=atol, rtol=rtol)
    torch.testing.assert_close(s.grad, upsample_add_backward_ref(grad_out, hw, grid), atol=atol, rtol=rtol)
    torch.testing.assert_close(d.grad, ref_dd, atol=0, rtol=0)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_launchers_strided_inputs(dtype, atol, rtol):
    """The launchers read strided inputs in place; the output takes dense's layout, as the fake impl says."""
    hw, grid, c = (12, 20), (5, 7), 24
    sparse = torch.randn(2, 35, 2 * c, dtype=dtype)[:, :, 3:3 + c]        # non-contiguous channel slice
    dense = torch.randn(240, 2, c, dtype=dtype).transpose(0, 1)           # (B, N, C) with the batch stride smallest
    out = mod.upsample_add_fwd(sparse, dense, hw, grid)
    assert out.is_contiguous()
    torch.testing.assert_close(out, upsample_add_ref(sparse, dense, hw, grid), atol=atol, rtol=rtol)
    grad_out = torch.randn(2, 240, 2 * c, dtype=dtype)[:, :, ::2]
    torch.testing.assert_close(mod.upsample_add_bwd(grad_out, hw, grid),
                               upsample_add_backward_ref(grad_out, hw, grid), atol=atol, rtol=rtol)


@settings(max_examples=8, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(1, 9), gh_frac=st.floats(0, 1), gw_frac=st.floats(0, 1),
       c=st.integers(1, 20), b=st.integers(1, 2))
def test_property_random_grids(h, w, gh_frac, gw_frac, c, b):
    gh, gw = 1 + round(gh_frac * (h - 1)), 1 + round(gw_frac * (w - 1))
    sparse, dense = torch.randn(b, gh * gw, c), torch.randn(b, h * w, c)
    grad_out = torch.randn(b, h * w, c)
    torch.testing.assert_close(mod.upsample_add_fwd(sparse, dense, (h, w), (gh, gw)),
                               upsample_add_ref(sparse, dense, (h, w), (gh, gw)))
    torch.testing.assert_close(mod.upsample_add_bwd(grad_out, (h, w), (gh, gw)),
                               upsample_add_backward_ref(grad_out, (h, w), (gh, gw)))


def test_torch_compile_fullgraph():
    sparse = torch.randn(2, 15, 8, requires_grad=True)
    dense = torch.randn(2, 48, 8, requires_grad=True)
    grad_out = torch.randn(2, 48, 8)
    compiled = torch.compile(lambda s, d: upsample_add(s * 2, d, (6, 8), (3, 5)), fullgraph=True,
                             backend="aot_eager")
    out = compiled(sparse, dense)
    out.backward(grad_out)
    ref_out, ref_ds, ref_dd = _grads_via_ref(sparse * 2, dense, (6, 8), (3, 5), grad_out)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(sparse.grad, ref_ds * 2)
    torch.testing.assert_close(dense.grad, ref_dd)


def test_opcheck():
    """Schema, fake impl (shape, dtype, strides) and autograd registration agree with the real op."""
    sparse = torch.randn(2, 6, 8, requires_grad=True)
    dense = torch.randn(2, 20, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.flexdit.upsample_add.default, (sparse, dense, [4, 5], [3, 2]))
    torch.library.opcheck(torch.ops.flexdit.upsample_add_backward.default, (torch.randn(2, 20, 8), [4, 5], [3, 2]))


# ----------------------------------------------------------------------------------------------------------------
# The reference against an independent formulation
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hw, grid", [((16, 16), (6, 6)), ((16, 16), (10, 10)), ((32, 32), (10, 10)),
                                      ((32, 32), (8, 8)), ((12, 20), (5, 7)), ((16, 16), (16, 16)),
                                      ((16, 16), (1, 1)), ((7, 13), (4, 9))])
def test_ref_matches_interpolate_nearest(hw, grid):
    b, c = 2, 12
    sparse = torch.randn(b, grid[0] * grid[1], c, requires_grad=True)
    dense = torch.randn(b, hw[0] * hw[1], c)
    grad_out = torch.randn(b, hw[0] * hw[1], c)
    image = sparse.transpose(1, 2).reshape(b, c, *grid)                   # token-major -> (B, C, G_h, G_w)
    up = F.interpolate(image, size=hw, mode="nearest").flatten(2).transpose(1, 2)
    (expected_ds,) = torch.autograd.grad(up, sparse, grad_out)
    torch.testing.assert_close(upsample_add_ref(sparse.detach(), dense, hw, grid), up.detach() + dense)
    torch.testing.assert_close(upsample_add_backward_ref(grad_out, hw, grid), expected_ds)


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------

def _s(*shape, **kw):
    return torch.randn(*shape, **kw)


BAD_CALLS = [
    ("sparse rank", lambda f: f(_s(16, 8), _s(1, 64, 8), (8, 8), 4), "sparse"),
    ("dense rank", lambda f: f(_s(1, 16, 8), _s(64, 8), (8, 8), 4), "dense"),
    ("sparse dtype", lambda f: f(_s(1, 16, 8).double(), _s(1, 64, 8), (8, 8), 4), "sparse"),
    ("dtype mismatch", lambda f: f(_s(1, 16, 8).half(), _s(1, 64, 8), (8, 8), 4), "sparse"),
    ("device mismatch", lambda f: f(_s(1, 16, 8, device="meta"), _s(1, 64, 8), (8, 8), 4), "sparse"),
    ("grid too large", lambda f: f(_s(1, 81, 8), _s(1, 64, 8), (8, 8), 9), "grid"),
    ("hw != N", lambda f: f(_s(1, 16, 8), _s(1, 60, 8), (8, 8), 4), "hw"),
    ("sparse tokens != grid", lambda f: f(_s(1, 15, 8), _s(1, 64, 8), (8, 8), 4), "sparse"),
    ("batch mismatch", lambda f: f(_s(2, 16, 8), _s(1, 64, 8), (8, 8), 4), "sparse"),
    ("channel mismatch", lambda f: f(_s(1, 16, 4), _s(1, 64, 8), (8, 8), 4), "sparse"),
]


@pytest.mark.parametrize("fn", [upsample_add, mod.upsample_add_fwd], ids=["public", "launcher"])
@pytest.mark.parametrize("what, call, name", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises(fn, what, call, name):
    with pytest.raises(ValueError, match=name):
        call(fn)


def test_bwd_launcher_bad_input():
    with pytest.raises(ValueError, match="grad_out must have rank 3"):
        mod.upsample_add_bwd(torch.randn(64, 8), (8, 8), 4)
    with pytest.raises(ValueError, match="hw"):
        mod.upsample_add_bwd(torch.randn(1, 60, 8), (8, 8), 4)
    with pytest.raises(ValueError, match="grad_out is on meta"):
        mod.upsample_add_bwd(torch.randn(1, 64, 8, device="meta"), (8, 8), 4)


def test_backward_of_sum_reads_stride_zero_gradient(kernels_only):
    """`.sum()` sends back an expanded (stride-0) gradient; the backward kernel reads it without a copy."""
    sparse = torch.randn(2, 15, 8, requires_grad=True)
    dense = torch.randn(2, 48, 8, requires_grad=True)
    upsample_add(sparse, dense, (6, 8), (3, 5)).sum().backward()
    torch.testing.assert_close(sparse.grad, upsample_add_backward_ref(torch.ones(2, 48, 8), (6, 8), (3, 5)))
    torch.testing.assert_close(dense.grad, torch.ones(2, 48, 8))


# ----------------------------------------------------------------------------------------------------------------
# GPU: bf16 at the model's sizes
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("hw, grid", [((32, 32), (8, 8)), ((32, 32), (10, 10)), ((16, 16), (6, 6))])
def test_gpu_bf16_model_sizes(hw, grid):
    b, c = 8, 1152
    sparse = torch.randn(b, grid[0] * grid[1], c, device="cuda", dtype=torch.bfloat16)
    dense = torch.randn(b, hw[0] * hw[1], c, device="cuda", dtype=torch.bfloat16)
    grad_out = torch.randn(b, hw[0] * hw[1], c, device="cuda", dtype=torch.bfloat16)
    out = mod.upsample_add_fwd(sparse, dense, hw, grid)
    torch.testing.assert_close(out, upsample_add_ref(sparse, dense, hw, grid), atol=0, rtol=0)
    ds = mod.upsample_add_bwd(grad_out, hw, grid)
    torch.testing.assert_close(ds, upsample_add_backward_ref(grad_out, hw, grid), atol=2e-2, rtol=2e-2)
    assert torch.equal(mod.upsample_add_bwd(grad_out, hw, grid), ds)         # no atomics: bitwise repeatable
    s = sparse.clone().requires_grad_()
    d = dense.clone().requires_grad_()
    upsample_add(s, d, hw, grid).backward(grad_out)
    torch.testing.assert_close(s.grad, ds, atol=0, rtol=0)
    torch.testing.assert_close(d.grad, grad_out, atol=0, rtol=0)
