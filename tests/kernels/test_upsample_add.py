"""upsample_add: the Triton kernels (interpreter on CPU) against upsample_add_ref, and the ref against F.interpolate."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flexdit_kernels import upsample_add, upsample_add_backward_ref, upsample_add_ref

from .grid_cases import DTYPES, REF_GRIDS, kernel_params, patch_sm_count
from .guard import check_guards, guard_allocations, guarded
from .helpers import (auto_table_params, bad_input_test, check_compiled, grads_via, jit_trace_test,
                      kernels_only_fixture, route_log, via_image)

from flexdit_kernels import _grid_ops
# The package re-exports the function under the module's name, so fetch the module itself.
from flexdit_kernels import _upsample_add as mod


def _ids(case):
    b, hw, grid, c = case
    return f"B{b}-{grid[0]}x{grid[1]}-to-{hw[0]}x{hw[1]}-C{c}"


KERNEL_PARAMS = kernel_params(_ids)


def _grads_via_ref(sparse, dense, hw, grid, grad_out):
    """Output and both gradients of the reference through autograd (not through upsample_add_backward_ref)."""
    out, (ds, dd) = grads_via(upsample_add_ref, (sparse, dense), grad_out, hw, grid)
    return out, ds, dd


kernels_only = kernels_only_fixture(mod, "upsample_add")


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
    out, (ds, dd) = grads_via(upsample_add, (sparse, dense), grad_out, hw, grid)
    assert out.dtype == dtype and out.shape == ref_out.shape
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(ds, ref_ds, atol=atol, rtol=rtol)
    torch.testing.assert_close(ds, upsample_add_backward_ref(grad_out, hw, grid), atol=atol, rtol=rtol)
    torch.testing.assert_close(dd, ref_dd, atol=0, rtol=0)


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
    sparse, dense, grad_out = torch.randn(2, 15, 8), torch.randn(2, 48, 8), torch.randn(2, 48, 8)
    check_compiled(upsample_add, upsample_add_ref, (sparse, dense), grad_out, (6, 8), (3, 5))


def test_opcheck():
    """Schema, fake impl (shape, dtype, strides) and autograd registration agree with the real op."""
    sparse = torch.randn(2, 6, 8, requires_grad=True)
    dense = torch.randn(2, 20, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.flexdit.upsample_add.default, (sparse, dense, [4, 5], [3, 2]))
    torch.library.opcheck(torch.ops.flexdit.upsample_add_backward.default, (torch.randn(2, 20, 8), [4, 5], [3, 2]))


# ----------------------------------------------------------------------------------------------------------------
# The reference against an independent formulation
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hw, grid", REF_GRIDS)
def test_ref_matches_interpolate_nearest(hw, grid):
    b, c = 2, 12
    sparse = torch.randn(b, grid[0] * grid[1], c)
    dense = torch.randn(b, hw[0] * hw[1], c)
    grad_out = torch.randn(b, hw[0] * hw[1], c)
    up, expected_ds = via_image(lambda image: F.interpolate(image, size=hw, mode="nearest"), sparse, grid, grad_out)
    torch.testing.assert_close(upsample_add_ref(sparse, dense, hw, grid), up + dense)
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


test_bad_input_raises = bad_input_test(BAD_CALLS, [upsample_add, mod.upsample_add_fwd, upsample_add_ref],
                                       ids=["public", "launcher", "ref"])


def test_refs_take_the_ops_arguments():
    """An int grid and hw work for the references as for the op; their backward checks its arguments too."""
    sparse, dense = torch.randn(2, 16, 8), torch.randn(2, 64, 8)
    torch.testing.assert_close(upsample_add_ref(sparse, dense, 8, 4), upsample_add_ref(sparse, dense, (8, 8), (4, 4)))
    torch.testing.assert_close(upsample_add_backward_ref(dense, 8, 4), upsample_add_backward_ref(dense, (8, 8), (4, 4)))
    with pytest.raises(ValueError, match="hw"):
        upsample_add_backward_ref(torch.randn(1, 60, 8), (8, 8), 4)
    with pytest.raises(ValueError, match="grid"):
        upsample_add_backward_ref(torch.randn(1, 64, 8), 8, 9)


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
# Guard buffers, long token runs, how the op is called
# ----------------------------------------------------------------------------------------------------------------

GUARD_CASES = [(2, (7, 9), (3, 4), 200), (1, (12, 20), (5, 7), 40), (2, (6, 6), (1, 1), 24)]


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("case", GUARD_CASES, ids=_ids)
def test_guard_buffers(case, dtype, atol, rtol, kernels_only):
    """Inputs as strided views in NaN-filled buffers, launcher allocations in sentinel buffers: forward and backward
    read nothing outside their inputs and write nothing outside their outputs."""
    b, hw, grid, c = case
    sparse = guarded(torch.randn(b, grid[0] * grid[1], c, dtype=dtype)).requires_grad_()
    dense = guarded(torch.randn(b, hw[0] * hw[1], c, dtype=dtype)).requires_grad_()
    grad_out = guarded(torch.randn(b, hw[0] * hw[1], c, dtype=dtype))
    with guard_allocations() as allocs:
        out = upsample_add(sparse, dense, hw, grid)
        out.backward(grad_out)
    check_guards(allocs, (out, sparse.grad, dense.grad), sparse=sparse, dense=dense, grad_out=grad_out)
    ref_out, ref_ds, ref_dd = _grads_via_ref(sparse, dense, hw, grid, grad_out)
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(sparse.grad, ref_ds, atol=atol, rtol=rtol)
    torch.testing.assert_close(dense.grad, ref_dd, atol=0, rtol=0)


def test_frames_folded_into_batch(kernels_only):
    """Video frames folded into the batch, (B, T, N, C) -> (B*T, N, C), are views: the op reads them through their
    batch strides and allocates nothing but its output."""
    sparse = torch.randn(2, 3, 15, 16)[..., 4:12].flatten(0, 1)           # (B*T, M, C) views of channel slices
    dense = torch.randn(2, 3, 48, 16)[..., 4:12].flatten(0, 1)            # (B*T, N, C)
    with guard_allocations() as allocs:
        out = upsample_add(sparse, dense, (6, 8), (3, 5))
    assert len(allocs.tensors) == 1
    torch.testing.assert_close(out, upsample_add_ref(sparse.contiguous(), dense.contiguous(), (6, 8), (3, 5)))


@pytest.mark.parametrize("sms", [0, 3])
def test_long_runs(monkeypatch, sms, kernels_only):
    """Runs of tiles grow only while the grid keeps 4 waves of programs. With no SM to fill the runs are the longest:
    128 tokens per forward program (16 BLOCK_N steps, the last run partial), all 35 sparse tokens in one backward
    program (5 tiles of 8, the last partial); with 3 SMs one tile per program."""
    patch_sm_count(monkeypatch, sms)
    hw, grid, c = (12, 20), (5, 7), 40
    sparse, dense, grad_out = torch.randn(2, 35, c), torch.randn(2, 240, c), torch.randn(2, 240, c)
    torch.testing.assert_close(mod.upsample_add_fwd(sparse, dense, hw, grid),
                               upsample_add_ref(sparse, dense, hw, grid))
    torch.testing.assert_close(mod.upsample_add_bwd(grad_out, hw, grid), upsample_add_backward_ref(grad_out, hw, grid))


def test_int64_index_path(monkeypatch, kernels_only):
    """The IDX64 variants (taken when a batch entry spans 2**31 elements or more), forced at a small shape."""
    monkeypatch.setattr(_grid_ops, "fits_int32", lambda *tensors: False)     # where the launches choose
    sparse = torch.randn(2, 12, 24, requires_grad=True)
    dense = torch.randn(2, 63, 24, requires_grad=True)
    grad_out = torch.randn(2, 63, 24)
    out = upsample_add(sparse, dense, (7, 9), (3, 4))
    out.backward(grad_out)
    ref_out, ref_ds, _ = _grads_via_ref(sparse, dense, (7, 9), (3, 4), grad_out)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(sparse.grad, ref_ds)


test_jit_trace_sees_one_op = jit_trace_test("upsample_add", lambda s, d: upsample_add(s, d, (6, 8), (3, 5)),
                                            lambda: (torch.randn(2, 15, 8), torch.randn(2, 48, 8)),
                                            inside="aten::index")


@pytest.mark.parametrize("fwd_row, bwd_row, expected", auto_table_params("upsample_add"))
def test_auto_table_is_honoured(monkeypatch, fwd_row, bwd_row, expected):
    hw, grid = (6, 8), (3, 5)
    row = ({"tokens": (48, 48), "sparse": (15, 15), "channels": (None, 8), "batch": (2, 2)}, "reference")
    calls = route_log(monkeypatch, mod, "upsample_add", row, fwd_row, bwd_row)
    sparse = torch.randn(2, 15, 8, requires_grad=True)
    dense = torch.randn(2, 48, 8, requires_grad=True)
    grad_out = torch.randn(2, 48, 8)
    upsample_add(sparse, dense, hw, grid).backward(grad_out)
    assert calls == expected
    torch.testing.assert_close(sparse.grad, upsample_add_backward_ref(grad_out, hw, grid))
    torch.testing.assert_close(dense.grad, grad_out)
    calls.clear()
    upsample_add(torch.randn(2, 15, 16), torch.randn(2, 48, 16), hw, grid)     # C = 16 misses the row
    assert calls == ["_upsample_add_fwd"]


# ----------------------------------------------------------------------------------------------------------------
# GPU: bf16 and fp16 at the model's sizes
# ----------------------------------------------------------------------------------------------------------------

GPU_DTYPES = [(torch.bfloat16, 2e-2, 2e-2), (torch.float16, 4e-3, 4e-3)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol, rtol", GPU_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("side", [32, 16])
@pytest.mark.parametrize("g", [6, 8, 10])
def test_gpu_model_sizes(g, side, dtype, atol, rtol):
    """DiT-XL/2: B = 32, 32x32 (512 px) and 16x16 (256 px) tokens, C = 1152, FlexDiT grids 6, 8, 10."""
    b, c, hw, grid = 32, 1152, (side, side), (g, g)
    sparse = torch.randn(b, g * g, c, device="cuda", dtype=dtype)
    dense = torch.randn(b, side * side, c, device="cuda", dtype=dtype)
    grad_out = torch.randn(b, side * side, c, device="cuda", dtype=dtype)
    out = mod.upsample_add_fwd(sparse, dense, hw, grid)
    torch.testing.assert_close(out, upsample_add_ref(sparse, dense, hw, grid), atol=0, rtol=0)
    ds = mod.upsample_add_bwd(grad_out, hw, grid)
    torch.testing.assert_close(ds, upsample_add_backward_ref(grad_out, hw, grid), atol=atol, rtol=rtol)
    assert torch.equal(mod.upsample_add_bwd(grad_out, hw, grid), ds)         # no atomics: bitwise repeatable
    s = sparse.clone().requires_grad_()
    d = dense.clone().requires_grad_()
    out_op = upsample_add(s, d, hw, grid)
    out_op.backward(grad_out)
    assert torch.equal(out_op, out)
    torch.testing.assert_close(s.grad, ds, atol=0, rtol=0)
    torch.testing.assert_close(d.grad, grad_out, atol=0, rtol=0)
