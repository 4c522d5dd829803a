"""silu: the Triton kernels (interpreter on CPU) against silu_ref, the output dtype under autocast, and the ref
against autograd of F.silu."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flexdit_kernels import silu, silu_backward_ref, silu_ref

# The adaLN family's module (its launchers and launch sizes); the package re-exports only the ops.
from flexdit_kernels import _adaln as mod

from .guard import check_guards, guard_allocations, guarded
from .helpers import OpLog, bad_input_test, kernels_only_fixture

# (x dtype, out dtype, atol, rtol): fp32 conditioning written in fp16 for the projection, as under autocast.
DTYPES = [
    (torch.float32, torch.float32, 1e-6, 1e-5),
    (torch.float32, torch.float16, 1e-3, 1e-3),
    (torch.float16, torch.float16, 1e-3, 1e-3),
]
# (B, C): C = 40, 72 (not powers of two), 1152 (DiT-XL: two channel blocks), B = 1.
CASES = [(2, 40), (1, 72), (3, 1152)]
PARAMS = [pytest.param(case, *dt, id=f"B{case[0]}-C{case[1]}-{str(dt[0])[6:]}-{str(dt[1])[6:]}")
          for case in CASES for dt in DTYPES]


def _inputs(b, c, dtype):
    """x, a strided chunk of a wider (B, 2C) tensor, and grad_out in out's place."""
    x = (3 * torch.randn(b, 2 * c)).to(dtype)[:, c:]
    return x, torch.randn(b, c).to(dtype)


kernels_only = kernels_only_fixture(mod, "silu")


# ----------------------------------------------------------------------------------------------------------------
# Kernels against the reference
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case, x_dtype, out_dtype, atol, rtol", PARAMS)
def test_public_op_runs_kernels(case, x_dtype, out_dtype, atol, rtol, kernels_only):
    x, grad_out = _inputs(*case, x_dtype)
    xr = x.detach().float().requires_grad_()
    want = F.silu(xr)
    want.backward(grad_out.to(out_dtype).float())

    leaf = x.clone().requires_grad_()
    out = silu(leaf, out_dtype)
    out.backward(grad_out.to(out_dtype))
    assert out.dtype == out_dtype and out.shape == case and out.is_contiguous()
    torch.testing.assert_close(out.float(), want.detach(), atol=atol, rtol=rtol)
    assert leaf.grad.dtype == x_dtype
    torch.testing.assert_close(leaf.grad.float(), xr.grad, atol=atol, rtol=rtol)


def test_autocast_picks_the_output_dtype(kernels_only):
    """Under autocast the result is in the autocast dtype, the same numbers as autocast's SiLU then cast."""
    x, _ = _inputs(2, 72, torch.float32)
    with torch.autocast("cpu", dtype=torch.float16):
        out = silu(x)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, F.silu(x).half(), atol=1e-3, rtol=1e-3)
    assert silu(x).dtype == torch.float32


def test_launchers_small_blocks_and_strides(monkeypatch):
    """Channel blocks smaller than C (several programs per row), x batch-minor, grad_out expanded (stride 0)."""
    monkeypatch.setattr(mod, "_ROW_MAX_BLOCK_C", 16)
    x = torch.randn(40, 3).t()
    grad_out = torch.randn(1, 40).expand(3, 40)
    torch.testing.assert_close(mod.silu_fwd(x, torch.float16), silu_ref(x, torch.float16))
    torch.testing.assert_close(mod.silu_bwd(grad_out, x), silu_backward_ref(grad_out, x))


@settings(max_examples=6, deadline=None)
@given(b=st.integers(1, 3), c=st.integers(1, 300))
def test_property_random_shapes(b, c):
    x, grad_out = _inputs(b, c, torch.float32)
    torch.testing.assert_close(mod.silu_fwd(x), silu_ref(x))
    torch.testing.assert_close(mod.silu_bwd(grad_out, x), silu_backward_ref(grad_out, x))


@pytest.mark.parametrize("x_dtype, out_dtype", [(torch.float32, torch.float16), (torch.float16, torch.float16)])
def test_guard_buffers(x_dtype, out_dtype):
    """Inputs inside NaN guard buffers, launcher allocations inside sentinel buffers."""
    x, grad_out = (guarded(t) for t in _inputs(3, 72, x_dtype))
    with guard_allocations() as allocs:
        out = mod.silu_fwd(x, out_dtype)
        dx = mod.silu_bwd(grad_out, x)
    check_guards(allocs, (out, dx), x=x, grad_out=grad_out)
    torch.testing.assert_close(out, silu_ref(x, out_dtype))
    torch.testing.assert_close(dx, silu_backward_ref(grad_out, x))


def test_empty_batch():
    x = torch.randn(0, 8)
    assert mod.silu_fwd(x).shape == (0, 8) and mod.silu_bwd(x, x).shape == (0, 8)


# ----------------------------------------------------------------------------------------------------------------
# Registration: torch.compile, opcheck, one op per call
# ----------------------------------------------------------------------------------------------------------------

def test_torch_compile_fullgraph():
    x, grad_out = _inputs(2, 8, torch.float32)
    leaf = x.clone().requires_grad_()
    out = torch.compile(lambda a: silu(a * 2, torch.float16), fullgraph=True, backend="aot_eager")(leaf)
    out.backward(grad_out.half())
    xr = x.clone().requires_grad_()
    want = F.silu(xr * 2)
    want.backward(grad_out.half().float())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), want.detach(), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(leaf.grad, xr.grad, atol=1e-5, rtol=1e-5)


def test_opcheck():
    """Schema, fake impl (shape, dtype, strides) and autograd registration agree with the real op."""
    x, grad_out = _inputs(2, 8, torch.float32)
    torch.library.opcheck(torch.ops.flexdit.silu.default, (x.clone().requires_grad_(), torch.float16))
    torch.library.opcheck(torch.ops.flexdit.silu_backward.default, (grad_out, x))


def test_one_op_per_call():
    x, _ = _inputs(1, 8, torch.float32)
    with OpLog() as log, torch.autocast("cpu", dtype=torch.bfloat16):
        silu(x)
    assert log.ops == ["flexdit.silu.default"]


# ----------------------------------------------------------------------------------------------------------------
# The reference against autograd
# ----------------------------------------------------------------------------------------------------------------

def test_backward_ref_matches_autograd():
    x, grad_out = (t.double() for t in _inputs(2, 72, torch.float32))
    leaf = x.clone().requires_grad_()
    (dx,) = torch.autograd.grad(F.silu(leaf), leaf, grad_out)
    torch.testing.assert_close(silu_backward_ref(grad_out.float(), x.float()), dx.float(), atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------

BAD_CALLS = [
    ("x rank", lambda f: f(torch.randn(2, 4, 8)), "x must have rank 2"),
    ("x dtype", lambda f: f(torch.randn(2, 8).double()), "x must have dtype"),
    ("x not a tensor", lambda f: f([[1.0]]), "x must be a torch.Tensor"),
    ("out_dtype", lambda f: f(torch.randn(2, 8), torch.int32), "out_dtype must be one of"),
]


test_bad_input_raises = bad_input_test(BAD_CALLS, [silu, mod.silu_fwd], ids=["public", "launcher"])


def test_launcher_bad_arguments():
    with pytest.raises(ValueError, match="x is on meta"):
        mod.silu_fwd(torch.randn(2, 8, device="meta"))
    with pytest.raises(ValueError, match="grad_out must have x's shape"):
        mod.silu_bwd(torch.randn(2, 7), torch.randn(2, 8))
    with pytest.raises(ValueError, match="grad_out is on meta"):
        mod.silu_bwd(torch.randn(2, 8, device="meta"), torch.randn(2, 8))


# ----------------------------------------------------------------------------------------------------------------
# GPU: bf16 and fp16 at the model's sizes
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_model_sizes(dtype):
    """(32, 1152) fp32 conditioning written in bf16/fp16, as under autocast; the fp32 and low-precision inputs."""
    x = torch.randn(32, 6 * 1152, device="cuda")[:, 1152:2 * 1152] * 3
    grad_out = torch.randn(32, 1152, device="cuda").to(dtype)
    # fp32 values that may differ in the last bit (exp), then rounded once: at most one ulp of dtype apart.
    torch.testing.assert_close(silu(x, dtype), silu_ref(x, dtype), atol=1e-5, rtol=1e-2)
    torch.testing.assert_close(mod.silu_bwd(grad_out, x), silu_backward_ref(grad_out, x), atol=1e-6, rtol=1e-5)
    xl = x.to(dtype)
    torch.testing.assert_close(silu(xl), silu_ref(xl), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(mod.silu_bwd(grad_out, xl), silu_backward_ref(grad_out, xl), atol=1e-2, rtol=1e-2)
