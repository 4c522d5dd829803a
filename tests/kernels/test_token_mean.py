"""token_mean: the Triton kernels (interpreter on CPU) against token_mean_ref, and the ref against F.layer_norm."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flexdit_kernels import token_mean, token_mean_backward_ref, token_mean_ref

from .grid_cases import DTYPES, patch_sm_count
from .guard import check_guards, guard_allocations, guarded
from .helpers import (auto_table_params, bad_input_test, check_compiled, grads_via, jit_trace_test,
                      kernels_only_fixture, route_log)

# The package re-exports the function under the module's name, so fetch the module itself.
from flexdit_kernels import _token_mean as mod

# (B, N, C, shift): N from the token grids (16x16, 12x20) and awkward ones (1, 37, 63), C = 40, 200 and 1152 (whole
# rows of 64, 256 and 2048 lanes, the rest masked); `shift` adds a large common offset to every channel, where a
# one-pass E[x^2] - E[x]^2 variance would lose its digits.
CASES = [
    (3, 64, 40, 0.0),
    (1, 256, 40, 0.0),
    (1, 240, 40, 0.0),
    (2, 37, 40, 100.0),
    (3, 1, 40, 0.0),
    (1, 24, 1152, 0.0),
    (2, 63, 200, 0.0),
]
# Every case in fp32; fp16 on the awkward ones only, to keep the interpreter run short.
FP16_CASES = {0, 3, 5, 6}
KERNEL_PARAMS = [pytest.param(case, *dt, id=f"B{case[0]}-N{case[1]}-C{case[2]}-shift{case[3]:g}-{str(dt[0])[6:]}")
                 for k, case in enumerate(CASES) for dt in DTYPES if dt[0] == torch.float32 or k in FP16_CASES]


def _inputs(b, n, c, shift, dtype):
    x = (torch.randn(b, n, c) * 2 + shift).to(dtype)
    # grad_out is divided by N inside the op: scale it up so dx is O(1) and the tolerances mean something.
    grad_out = (torch.randn(b, c) * n).to(dtype)
    return x, grad_out


def _grads_via_ref(x, grad_out, eps=1e-6):
    """Output and input gradient of the reference through autograd (not through token_mean_backward_ref)."""
    out, (dx,) = grads_via(token_mean_ref, (x,), grad_out, eps)
    return out, dx


kernels_only = kernels_only_fixture(mod, "token_mean")


# ----------------------------------------------------------------------------------------------------------------
# Kernels against the reference
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case, dtype, atol, rtol", KERNEL_PARAMS)
def test_public_op_runs_kernels(case, dtype, atol, rtol, kernels_only):
    b, n, c, shift = case
    x, grad_out = _inputs(b, n, c, shift, dtype)
    ref_out, ref_dx = _grads_via_ref(x, grad_out)

    xk = x.clone().requires_grad_()
    out = token_mean(xk)
    out.backward(grad_out)
    assert out.dtype == dtype and out.shape == (b, c)
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(xk.grad, ref_dx, atol=atol, rtol=rtol)
    torch.testing.assert_close(xk.grad, token_mean_backward_ref(grad_out, x), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_launchers_strided_inputs(dtype, atol, rtol):
    """The launchers read strided x and grad_out in place; dx is contiguous, as the fake impl says."""
    b, n, c, eps = 2, 30, 24, 1e-5
    x = torch.randn(n, b, 2 * c, dtype=dtype).transpose(0, 1)[:, :, 1:1 + c]   # batch-minor and channel-sliced
    grad_out = (torch.randn(c, b) * n).to(dtype).t()
    torch.testing.assert_close(mod.token_mean_fwd(x, eps), token_mean_ref(x, eps), atol=atol, rtol=rtol)
    dx = mod.token_mean_bwd(grad_out, x, eps)
    assert dx.is_contiguous()
    torch.testing.assert_close(dx, token_mean_backward_ref(grad_out, x, eps), atol=atol, rtol=rtol)


@settings(max_examples=8, deadline=None)
@given(b=st.integers(1, 2), n=st.integers(1, 40), c=st.integers(1, 70), eps=st.sampled_from([1e-6, 1e-5, 0.1]))
def test_property_random_shapes(b, n, c, eps):
    x = torch.randn(b, n, c)
    grad_out = torch.randn(b, c) * n
    torch.testing.assert_close(mod.token_mean_fwd(x, eps), token_mean_ref(x, eps), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mod.token_mean_bwd(grad_out, x, eps), token_mean_backward_ref(grad_out, x, eps),
                               atol=1e-5, rtol=1e-5)


def test_torch_compile_fullgraph():
    check_compiled(token_mean, token_mean_ref, (torch.randn(2, 20, 8),), torch.randn(2, 8), 1e-6)


def test_opcheck():
    """Schema, fake impl (shape, dtype, strides) and autograd registration agree with the real op."""
    x = torch.randn(2, 12, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.flexdit.token_mean.default, (x, 1e-6))
    torch.library.opcheck(torch.ops.flexdit.token_mean_backward.default, (torch.randn(2, 8), x.detach(), 1e-6))


# ----------------------------------------------------------------------------------------------------------------
# The reference against an independent formulation
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("b, n, c, eps", [(2, 256, 40, 1e-6), (3, 100, 72, 1e-5), (1, 1, 16, 1e-6), (2, 64, 1152, 0.1)])
def test_ref_matches_layer_norm_mean(b, n, c, eps):
    x = torch.randn(b, n, c, dtype=torch.float64) * 3 + 1
    grad_out = torch.randn(b, c, dtype=torch.float64) * n
    xr = x.clone().requires_grad_()
    expected = F.layer_norm(xr, (c,), eps=eps).mean(1)                   # fp64 autograd
    (expected_dx,) = torch.autograd.grad(expected, xr, grad_out)
    torch.testing.assert_close(token_mean_ref(x.float(), eps), expected.detach().float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(token_mean_backward_ref(grad_out.float(), x.float(), eps), expected_dx.float(),
                               atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------

BAD_CALLS = [
    ("rank", lambda f: f(torch.randn(64, 8)), "x"),
    ("dtype", lambda f: f(torch.randn(1, 64, 8).double()), "x"),
    ("int dtype", lambda f: f(torch.ones(1, 64, 8, dtype=torch.int64)), "x"),
    ("no tokens", lambda f: f(torch.randn(1, 0, 8)), "x"),
    ("no channels", lambda f: f(torch.randn(1, 4, 0)), "x"),
    ("eps", lambda f: f(torch.randn(1, 4, 8), 0.0), "eps"),
    ("not a tensor", lambda f: f([[[1.0]]]), "x"),
]


test_bad_input_raises = bad_input_test(BAD_CALLS, [token_mean, mod.token_mean_fwd, token_mean_ref],
                                       ids=["public", "launcher", "ref"])


def test_backward_ref_checks_its_arguments():
    x = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        token_mean_backward_ref(torch.randn(2, 7), x)
    with pytest.raises(ValueError, match="eps"):
        token_mean_backward_ref(torch.randn(2, 8), x, 0.0)


def test_launchers_bad_device_and_grad():
    x = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="x is on meta"):
        mod.token_mean_fwd(torch.randn(2, 4, 8, device="meta"))
    with pytest.raises(ValueError, match="grad_out is on meta"):
        mod.token_mean_bwd(torch.randn(2, 8, device="meta"), x)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        mod.token_mean_bwd(torch.randn(2, 7), x)
    with pytest.raises(ValueError, match="grad_out must have rank 2"):
        mod.token_mean_bwd(torch.randn(2, 1, 8), x)
    with pytest.raises(ValueError, match="grad_out has dtype"):
        mod.token_mean_bwd(torch.randn(2, 8).half(), x)


def test_backward_of_sum_reads_stride_zero_gradient(kernels_only):
    """`.sum()` sends back an expanded (stride-0) gradient; the backward kernel reads it without a copy."""
    x = torch.randn(2, 12, 8, requires_grad=True)
    token_mean(x).sum().backward()
    torch.testing.assert_close(x.grad, token_mean_backward_ref(torch.ones(2, 8), x.detach()), atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Guard buffers, long token runs, how the op is called
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("b, n, c", [(2, 63, 200), (1, 37, 40), (2, 1, 24)])
def test_guard_buffers(b, n, c, dtype, atol, rtol, kernels_only):
    """Inputs as strided views in NaN-filled buffers, launcher allocations (outputs, the fp32 workspace) in sentinel
    buffers: forward and backward read nothing outside their inputs and write nothing outside their outputs."""
    x, grad_out = _inputs(b, n, c, 0.0, dtype)
    x = guarded(x).requires_grad_()
    grad_out = guarded(grad_out)
    with guard_allocations() as allocs:
        out = token_mean(x)
        out.backward(grad_out)
    check_guards(allocs, (out, x.grad), x=x, grad_out=grad_out)
    ref_out, ref_dx = _grads_via_ref(x, grad_out)
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(x.grad, ref_dx, atol=atol, rtol=rtol)


@pytest.mark.parametrize("sms, n", [(0, 240), (0, 100), (1000, 240)],
                         ids=["runs-of-128", "one-run-per-batch-entry", "shortest-runs"])
def test_token_runs(monkeypatch, sms, n, kernels_only):
    """The SM count sets the run of tokens per program. No SM to fill: runs of 128 tokens (two BLOCK_N steps each,
    the last run partial), or at N = 100 one run per batch entry (the forward skips the combine); many SMs: runs of
    one BLOCK_N, many partial rows for the combine."""
    patch_sm_count(monkeypatch, sms)
    x, grad_out = _inputs(2, n, 40, 3.0, torch.float32)
    torch.testing.assert_close(mod.token_mean_fwd(x), token_mean_ref(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mod.token_mean_bwd(grad_out, x), token_mean_backward_ref(grad_out, x),
                               atol=1e-5, rtol=1e-5)


def test_int64_index_path(monkeypatch, kernels_only):
    """The IDX64 variants (taken when a batch entry spans 2**31 elements or more), forced at a small shape."""
    monkeypatch.setattr(mod, "fits_int32", lambda *tensors: False)
    x, grad_out = _inputs(2, 37, 24, 0.0, torch.float32)
    x.requires_grad_()
    out = token_mean(x)
    out.backward(grad_out)
    ref_out, ref_dx = _grads_via_ref(x, grad_out)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, ref_dx, atol=1e-5, rtol=1e-5)


test_jit_trace_sees_one_op = jit_trace_test("token_mean", lambda t: token_mean(t, 1e-6),
                                            lambda: (torch.randn(2, 12, 8),), inside="aten::layer_norm")


@pytest.mark.parametrize("fwd_row, bwd_row, expected", auto_table_params("token_mean"))
def test_auto_table_is_honoured(monkeypatch, fwd_row, bwd_row, expected):
    row = ({"batch": (2, 2), "tokens": (12, 12), "channels": (None, 8)}, "reference")
    calls = route_log(monkeypatch, mod, "token_mean", row, fwd_row, bwd_row)
    x, grad_out = _inputs(2, 12, 8, 0.0, torch.float32)
    x.requires_grad_()
    token_mean(x).backward(grad_out)
    assert calls == expected
    torch.testing.assert_close(x.grad, token_mean_backward_ref(grad_out, x.detach()), atol=1e-5, rtol=1e-5)
    calls.clear()
    token_mean(torch.randn(2, 13, 8))                                         # N = 13 misses the row
    assert calls == ["_token_mean_fwd"]


# ----------------------------------------------------------------------------------------------------------------
# GPU: bf16 and fp16 at the model's sizes
# ----------------------------------------------------------------------------------------------------------------

GPU_DTYPES = [(torch.bfloat16, 1e-2, 1e-2, 2e-2), (torch.float16, 2e-3, 2e-3, 4e-3)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol, rtol, grad_tol", GPU_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("b", [32, 8])
@pytest.mark.parametrize("n", [1024, 256, 64])
def test_gpu_model_sizes(n, b, dtype, atol, rtol, grad_tol):
    """DiT-XL/2: C = 1152, N = 32x32 (512 px), 16x16 (256 px) and an 8x8 sparse grid; B = 32 and 8 (one run per
    batch entry, or many runs and the combine)."""
    c = 1152
    x = (torch.randn(b, n, c, device="cuda") * 2 + 1).to(dtype)
    grad_out = (torch.randn(b, c, device="cuda") * n).to(dtype)
    out = mod.token_mean_fwd(x)
    torch.testing.assert_close(out, token_mean_ref(x), atol=atol, rtol=rtol)
    assert torch.equal(mod.token_mean_fwd(x), out)                           # split-N combine is deterministic
    dx = mod.token_mean_bwd(grad_out, x)
    torch.testing.assert_close(dx, token_mean_backward_ref(grad_out, x), atol=grad_tol, rtol=grad_tol)
    assert torch.equal(mod.token_mean_bwd(grad_out, x), dx)
    xk = x.clone().requires_grad_()
    out_op = token_mean(xk)
    out_op.backward(grad_out)
    assert torch.equal(out_op, out)
    torch.testing.assert_close(xk.grad, dx, atol=0, rtol=0)
