"""token_pool: the Triton kernels (interpreter on CPU) against token_pool_ref, and the ref against PyTorch's pooling."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import flexdit_kernels as fk
from flexdit_kernels import token_pool, token_pool_backward_ref, token_pool_ref

from .grid_cases import DTYPES, REF_GRIDS, kernel_params, patch_sm_count
from .guard import check_guards, guard_allocations, guarded
from .helpers import (auto_table_params, bad_input_test, grads_via, jit_trace_test, kernels_only_fixture, route_log,
                      via_image)

from flexdit_kernels import _dispatch, _grid_ops
# The package re-exports the function under the module's name, so fetch the module itself.
from flexdit_kernels import _token_pool as mod


def _ids(case):
    b, hw, grid, c = case
    return f"B{b}-{hw[0]}x{hw[1]}-to-{grid[0]}x{grid[1]}-C{c}"


KERNEL_PARAMS = kernel_params(_ids)


def _grads_via_ref(x, hw, grid, grad_out):
    """Output and input gradient of the reference, through autograd (not through token_pool_backward_ref)."""
    out, (dx,) = grads_via(token_pool_ref, (x,), grad_out, hw, grid)
    return out, dx


kernels_only = kernels_only_fixture(mod, "token_pool")


# ----------------------------------------------------------------------------------------------------------------
# Kernels against the reference
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case, dtype, atol, rtol", KERNEL_PARAMS)
def test_public_op_runs_kernels(case, dtype, atol, rtol, kernels_only):
    b, hw, grid, c = case
    x = torch.randn(b, hw[0] * hw[1], c, dtype=dtype)
    grad_out = torch.randn(b, grid[0] * grid[1], c, dtype=dtype)
    ref_out, ref_dx = _grads_via_ref(x, hw, grid, grad_out)
    out, (dx,) = grads_via(token_pool, (x,), grad_out, hw, grid)
    assert out.dtype == dtype and out.shape == ref_out.shape
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(dx, ref_dx, atol=atol, rtol=rtol)
    torch.testing.assert_close(dx, token_pool_backward_ref(grad_out, hw, grid), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_launchers_strided_inputs(dtype, atol, rtol):
    """The launchers read strided x and grad_out in place: a channel slice and a batch-minor layout."""
    hw, grid, c = (12, 20), (5, 7), 24
    big = torch.randn(2, 240, 2 * c, dtype=dtype)
    x = big[:, :, 5:5 + c]                                               # non-contiguous channel slice
    torch.testing.assert_close(mod.token_pool_fwd(x, hw, grid), token_pool_ref(x, hw, grid), atol=atol, rtol=rtol)
    grad_out = torch.randn(35, 2, c, dtype=dtype).transpose(0, 1)       # (B, M, C) with the batch stride smallest
    torch.testing.assert_close(mod.token_pool_bwd(grad_out, hw, grid), token_pool_backward_ref(grad_out, hw, grid),
                               atol=atol, rtol=rtol)


@settings(max_examples=8, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(1, 9), gh_frac=st.floats(0, 1), gw_frac=st.floats(0, 1),
       c=st.integers(1, 20), b=st.integers(1, 2))
def test_property_random_grids(h, w, gh_frac, gw_frac, c, b):
    gh, gw = 1 + round(gh_frac * (h - 1)), 1 + round(gw_frac * (w - 1))
    x = torch.randn(b, h * w, c)
    grad_out = torch.randn(b, gh * gw, c)
    torch.testing.assert_close(mod.token_pool_fwd(x, (h, w), (gh, gw)), token_pool_ref(x, (h, w), (gh, gw)))
    torch.testing.assert_close(mod.token_pool_bwd(grad_out, (h, w), (gh, gw)),
                               token_pool_backward_ref(grad_out, (h, w), (gh, gw)))


def test_torch_compile_fullgraph():
    x = torch.randn(2, 48, 8, requires_grad=True)
    grad_out = torch.randn(2, 15, 8)
    compiled = torch.compile(lambda t: token_pool(t, (6, 8), (3, 5)) * 2, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.backward(grad_out)
    ref_out, ref_dx = _grads_via_ref(x, (6, 8), (3, 5), grad_out * 2)
    torch.testing.assert_close(out, ref_out * 2)
    torch.testing.assert_close(x.grad, ref_dx)


def test_opcheck():
    """Schema, fake impl (shape, dtype, strides) and autograd registration agree with the real op."""
    x = torch.randn(2, 20, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.flexdit.token_pool.default, (x, [4, 5], [3, 2]))
    torch.library.opcheck(torch.ops.flexdit.token_pool_backward.default, (torch.randn(2, 6, 8), [4, 5], [3, 2]))


# ----------------------------------------------------------------------------------------------------------------
# The reference against an independent formulation
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hw, grid", REF_GRIDS)
def test_ref_matches_adaptive_avg_pool2d(hw, grid):
    b, c = 2, 12
    x = torch.randn(b, hw[0] * hw[1], c)
    grad_out = torch.randn(b, grid[0] * grid[1], c)
    expected, expected_dx = via_image(lambda image: F.adaptive_avg_pool2d(image, grid), x, hw, grad_out)
    torch.testing.assert_close(token_pool_ref(x, hw, grid), expected)
    torch.testing.assert_close(token_pool_backward_ref(grad_out, hw, grid), expected_dx)


@pytest.mark.parametrize("size, g", [(16, 6), (16, 8), (16, 10), (32, 6), (32, 10), (7, 4), (9, 1), (5, 5)])
def test_window_plan(size, g):
    """max_window is the longest window of either rule (the reference's windows; the children of parent_index), and
    the plan splits the DiT grids' windows over enough programs at B = 32, in whole 16-byte vectors."""
    from flexdit_kernels import _launch
    assert _launch.max_window(size, g, False) == max(b - a for a, b in mod._windows(size, g))
    parents = fk.parent_index((1, size), (1, g)).tolist()
    assert _launch.max_window(size, g, True) == max(parents.count(p) for p in range(g))
    x = torch.empty(32, size * size, 1152, dtype=torch.bfloat16)
    plan = _launch.window_plan(x, size, size, g, g, children=False, num_warps=4)
    block_w, block_t = plan.meta["BLOCK_W"], plan.meta["BLOCK_T"]
    assert block_t <= _launch.next_pow2(_launch.max_window(size, g, False) ** 2)
    if size in (16, 32) and g >= 6:
        # whole 16-byte vectors per thread to load, at least 4 bytes per thread to store
        assert plan.meta["BLOCK_C"] == 128 and block_w * block_t in (8, 16, 32) and block_w >= 2
        assert plan.grid[0] * plan.grid[1] * plan.grid[2] >= 5184          # >= 4 waves of the compiled kernel
    large = _launch.window_plan(x, 32, 32, 2, 2, children=False, num_warps=4).meta
    assert large["BLOCK_W"] * large["BLOCK_T"] == 32 and large["BLOCK_T"] > 1     # 4 vectors, many tokens a step


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------

BAD_CALLS = [
    ("rank", lambda f: f(torch.randn(64, 8), (8, 8), 4), "x"),
    ("dtype", lambda f: f(torch.randn(1, 64, 8).double(), (8, 8), 4), "x"),
    ("int dtype", lambda f: f(torch.ones(1, 64, 8, dtype=torch.int32), (8, 8), 4), "x"),
    ("grid too large", lambda f: f(torch.randn(1, 64, 8), (8, 8), 9), "grid"),
    ("grid too large in w", lambda f: f(torch.randn(1, 64, 8), (4, 16), (2, 17)), "grid"),
    ("hw != N", lambda f: f(torch.randn(1, 60, 8), (8, 8), 4), "hw"),
    ("grid zero", lambda f: f(torch.randn(1, 64, 8), (8, 8), 0), "grid"),
    ("grid not a pair", lambda f: f(torch.randn(1, 64, 8), (8, 8), "a"), "grid"),
    ("not a tensor", lambda f: f([[1.0]], (1, 1), 1), "x"),
]


test_bad_input_raises = bad_input_test(BAD_CALLS, [token_pool, mod.token_pool_fwd, token_pool_ref],
                                       ids=["public", "launcher", "ref"])


def test_refs_take_the_ops_arguments():
    """An int grid and hw work for the references as for the op; their backward checks the gradient's tokens."""
    x = torch.randn(2, 64, 8)
    torch.testing.assert_close(token_pool_ref(x, 8, 4), token_pool_ref(x, (8, 8), (4, 4)))
    assert token_pool_ref(x, 8, 4).shape == (2, 16, 8)
    with pytest.raises(ValueError, match="grad_out has 15 tokens"):
        token_pool_backward_ref(torch.randn(1, 15, 8), (8, 8), 4)
    with pytest.raises(ValueError, match="grid"):
        token_pool_backward_ref(torch.randn(1, 81, 8), 8, 9)


def test_launcher_bad_device_and_grad_shape():
    with pytest.raises(ValueError, match="x is on meta"):
        mod.token_pool_fwd(torch.randn(1, 64, 8, device="meta"), (8, 8), 4)
    with pytest.raises(ValueError, match="grad_out has 15 tokens"):
        mod.token_pool_bwd(torch.randn(1, 15, 8), (8, 8), 4)
    with pytest.raises(ValueError, match="grid"):
        mod.token_pool_bwd(torch.randn(1, 81, 8), (8, 8), 9)


def test_backward_of_sum_reads_stride_zero_gradient(kernels_only):
    """`.sum()` sends back an expanded (stride-0) gradient; the backward kernel reads it without a copy."""
    x = torch.randn(2, 48, 8, requires_grad=True)
    token_pool(x, (6, 8), (3, 5)).sum().backward()
    torch.testing.assert_close(x.grad, token_pool_backward_ref(torch.ones(2, 15, 8), (6, 8), (3, 5)))


# ----------------------------------------------------------------------------------------------------------------
# Guard buffers, long token runs, how the op is called
# ----------------------------------------------------------------------------------------------------------------

GUARD_CASES = [(2, (7, 9), (3, 4), 200), (1, (12, 20), (5, 7), 40), (2, (6, 6), (6, 6), 24)]


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("case", GUARD_CASES, ids=_ids)
def test_guard_buffers(case, dtype, atol, rtol, kernels_only):
    """Inputs as strided views in NaN-filled buffers, launcher allocations in sentinel buffers: forward and backward
    read nothing outside their inputs and write nothing outside their outputs."""
    b, hw, grid, c = case
    x = guarded(torch.randn(b, hw[0] * hw[1], c, dtype=dtype)).requires_grad_()
    grad_out = guarded(torch.randn(b, grid[0] * grid[1], c, dtype=dtype))
    with guard_allocations() as allocs:
        out = token_pool(x, hw, grid)
        out.backward(grad_out)
    check_guards(allocs, (out, x.grad), x=x, grad_out=grad_out)
    ref_out, ref_dx = _grads_via_ref(x, hw, grid, grad_out)
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(x.grad, ref_dx, atol=atol, rtol=rtol)


def test_frames_folded_into_batch(kernels_only):
    """Video frames folded into the batch, (B, T, N, C) -> (B*T, N, C), are a view (here of a channel slice too):
    the op reads it through its batch stride and allocates nothing but its output."""
    video = torch.randn(2, 3, 48, 16)[..., 4:12]                          # (B, T, N, C), channel-sliced
    x = video.flatten(0, 1)                                              # (B*T, N, C), still a view
    assert x._base is not None
    with guard_allocations() as allocs:
        out = token_pool(x, (6, 8), (3, 5))
    assert len(allocs.tensors) == 1
    torch.testing.assert_close(out, token_pool_ref(x.contiguous(), (6, 8), (3, 5)))


@pytest.mark.parametrize("sms", [0, 3])
def test_long_runs(monkeypatch, sms, kernels_only):
    """Runs of tiles grow only while the grid keeps 4 waves of programs. With no SM to fill the runs are the longest:
    all 35 windows in one forward program (5 tiles of 8, the last partial), 128 tokens per backward program (16
    BLOCK_N steps, the last run partial); with 3 SMs one tile per program."""
    patch_sm_count(monkeypatch, sms)
    hw, grid, c = (12, 20), (5, 7), 40
    x, grad_out = torch.randn(2, 240, c), torch.randn(2, 35, c)
    torch.testing.assert_close(mod.token_pool_fwd(x, hw, grid), token_pool_ref(x, hw, grid))
    torch.testing.assert_close(mod.token_pool_bwd(grad_out, hw, grid), token_pool_backward_ref(grad_out, hw, grid))


def test_int64_index_path(monkeypatch, kernels_only):
    """The IDX64 variants (taken when a batch entry spans 2**31 elements or more), forced at a small shape."""
    monkeypatch.setattr(_grid_ops, "fits_int32", lambda *tensors: False)     # where the launches choose
    x = torch.randn(2, 63, 24, requires_grad=True)
    grad_out = torch.randn(2, 12, 24)
    out = token_pool(x, (7, 9), (3, 4))
    out.backward(grad_out)
    ref_out, ref_dx = _grads_via_ref(x, (7, 9), (3, 4), grad_out)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(x.grad, ref_dx)


test_jit_trace_sees_one_op = jit_trace_test("token_pool", lambda t: token_pool(t, (6, 8), (3, 5)),
                                            lambda: (torch.randn(2, 48, 8),), inside="aten::matmul")


# ----------------------------------------------------------------------------------------------------------------
# Shape-aware dispatch: the table in _dispatch
# ----------------------------------------------------------------------------------------------------------------

def test_table_path_rules(monkeypatch):
    monkeypatch.setitem(_dispatch.AUTO_TABLE, "token_pool", [
        ({"tokens": (None, 256), "sparse": (100, None)}, "reference"),
        ({"batch": (4, 8)}, "triton"),
        ({"batch": (1, 8)}, "reference"),
    ])
    path = _dispatch.table_path
    assert path("token_pool", batch=32, tokens=256, sparse=100, channels=8) == "reference"   # both ends inclusive
    assert path("token_pool", batch=32, tokens=257, sparse=100, channels=8) == "triton"      # no row matches
    assert path("token_pool", batch=4, tokens=1024, sparse=64, channels=8) == "triton"       # first match wins
    assert path("token_pool", batch=2, tokens=1024, sparse=64, channels=8) == "reference"
    assert all(p in ("triton", "reference") for rows in _dispatch.AUTO_TABLE.values() for _, p in rows)


@pytest.mark.parametrize("fwd_row, bwd_row, expected", auto_table_params("token_pool"))
def test_auto_table_is_honoured(monkeypatch, fwd_row, bwd_row, expected):
    hw, grid = (6, 8), (3, 5)
    row = ({"tokens": (48, 48), "sparse": (15, 15), "channels": (None, 8), "batch": (2, 2)}, "reference")
    calls = route_log(monkeypatch, mod, "token_pool", row, fwd_row, bwd_row)
    x = torch.randn(2, 48, 8, requires_grad=True)
    grad_out = torch.randn(2, 15, 8)
    token_pool(x, hw, grid).backward(grad_out)
    assert calls == expected
    torch.testing.assert_close(x.grad, token_pool_backward_ref(grad_out, hw, grid))
    # Another shape (C = 16) misses the row; the "triton" backend ignores the table.
    calls.clear()
    token_pool(torch.randn(2, 48, 16), hw, grid)
    with fk.backend("triton"):
        token_pool(torch.randn(2, 48, 8), hw, grid)
    assert calls == ["_token_pool_fwd", "_token_pool_fwd"]


def test_cpu_without_interpreter_runs_the_reference(monkeypatch):
    """Without the interpreter CPU tensors take the reference whatever the table says; so does the reference backend."""
    monkeypatch.setitem(_dispatch.AUTO_TABLE, "token_pool", [({}, "triton")])
    x = torch.randn(2, 48, 8)
    assert _dispatch.use_kernel("token_pool", x, batch=2, tokens=48, sparse=15, channels=8)
    with fk.backend("reference"):
        assert not _dispatch.use_kernel("token_pool", x, batch=2, tokens=48, sparse=15, channels=8)
    monkeypatch.setattr(_dispatch, "interpreting", lambda: False)
    assert not _dispatch.use_kernel("token_pool", x, batch=2, tokens=48, sparse=15, channels=8)


# ----------------------------------------------------------------------------------------------------------------
# GPU: bf16 and fp16 at the model's sizes
# ----------------------------------------------------------------------------------------------------------------

GPU_DTYPES = [(torch.bfloat16, 1e-2, 1e-2), (torch.float16, 2e-3, 2e-3)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol, rtol", GPU_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("side", [32, 16])
@pytest.mark.parametrize("g", [6, 8, 10])
def test_gpu_model_sizes(g, side, dtype, atol, rtol):
    """DiT-XL/2: B = 32, 32x32 (512 px) and 16x16 (256 px) tokens, C = 1152, FlexDiT grids 6, 8, 10."""
    b, c, hw, grid = 32, 1152, (side, side), (g, g)
    x = torch.randn(b, side * side, c, device="cuda", dtype=dtype)
    grad_out = torch.randn(b, g * g, c, device="cuda", dtype=dtype)
    out = mod.token_pool_fwd(x, hw, grid)
    torch.testing.assert_close(out, token_pool_ref(x, hw, grid), atol=atol, rtol=rtol)
    dx = mod.token_pool_bwd(grad_out, hw, grid)
    torch.testing.assert_close(dx, token_pool_backward_ref(grad_out, hw, grid), atol=atol, rtol=rtol)
    assert torch.equal(mod.token_pool_fwd(x, hw, grid), out)                # fixed order: bitwise repeatable
    assert torch.equal(mod.token_pool_bwd(grad_out, hw, grid), dx)          # no atomics: bitwise repeatable
    xk = x.clone().requires_grad_()
    out_op = token_pool(xk, hw, grid)
    out_op.backward(grad_out)
    assert torch.equal(out_op, out)
    torch.testing.assert_close(xk.grad, dx, atol=0, rtol=0)
