"""layernorm_modulate: the Triton kernels (interpreter on CPU) against layernorm_modulate_ref, and the ref against
F.layer_norm + modulate under fp64 autograd."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flexdit_kernels import layernorm_modulate, layernorm_modulate_backward_ref, layernorm_modulate_ref

# The adaLN family's module (its launchers and launch sizes); the package re-exports only the ops.
from flexdit_kernels import _adaln as mod

from .grid_cases import DTYPES
from .guard import check_guards, guard_allocations, guarded
from .helpers import OpLog, bad_input_test, check_compiled, grads_via, kernels_only_fixture

# (B, L, C, offset): C = 40 and 72 (not powers of two) and 1152 (DiT-XL); L = 1 and L not a multiple of the row
# block; `offset` adds a large common value to every channel, where a one-pass E[x^2] - E[x]^2 loses its digits.
CASES = [
    (2, 7, 40, 0.0),
    (1, 13, 72, 100.0),
    (3, 1, 40, 0.0),
    (1, 5, 1152, 0.0),
]
PARAMS = [pytest.param(case, *dt, id=f"B{case[0]}-L{case[1]}-C{case[2]}-off{case[3]:g}-{str(dt[0])[6:]}")
          for case in CASES for dt in DTYPES]


def _inputs(b, n, c, offset, dtype, mod_dtype=None):
    """x, shift, scale, grad_out; shift and scale are strided chunks of one (B, 6C) adaLN projection, as in DiT."""
    x = (torch.randn(b, n, c) * 2 + offset).to(dtype)
    ada = torch.randn(b, 6 * c).to(mod_dtype or dtype)
    shift, scale = ada[:, :c], ada[:, c:2 * c]
    grad_out = torch.randn(b, n, c).to(dtype)
    return x, shift, scale, grad_out


def _grads_via_ref(x, shift, scale, grad_out, eps=1e-6):
    """Output and input gradients of the reference through autograd, in fp32."""
    return grads_via(layernorm_modulate_ref, (x, shift, scale), grad_out, eps, dtype=torch.float32)


kernels_only = kernels_only_fixture(mod, "layernorm_modulate")


# ----------------------------------------------------------------------------------------------------------------
# Kernels against the reference
# ----------------------------------------------------------------------------------------------------------------

def _truth(x, shift, scale, grad_out, eps=1e-6):
    """fp64 output and gradients of F.layer_norm + modulate under autograd, from the same (rounded) inputs."""
    leaves = [t.detach().double().requires_grad_() for t in (x, shift, scale)]
    out = F.layer_norm(leaves[0], leaves[0].shape[-1:], eps=eps) * (1 + leaves[2].unsqueeze(1)) + \
        leaves[1].unsqueeze(1)
    return out.detach(), list(torch.autograd.grad(out, leaves, grad_out.double()))


def _assert_within(name, got, ref, truth, floor):
    """The kernel's error against fp64 is at most twice the fp32 reference's, cast like the kernel's, plus floor."""
    err = (got.double() - truth).abs().max().item()
    ref_err = (ref.to(got.dtype).double() - truth).abs().max().item()
    assert err <= 2 * ref_err + floor, f"{name}: error {err:.3g} vs the reference's {ref_err:.3g}"


@pytest.mark.parametrize("case, dtype, atol, rtol", PARAMS)
def test_public_op_runs_kernels(case, dtype, atol, rtol, kernels_only):
    b, n, c, offset = case
    x, shift, scale, grad_out = _inputs(b, n, c, offset, dtype)
    ref_out, ref_grads = _grads_via_ref(x, shift, scale, grad_out)
    truth_out, truth_grads = _truth(x, shift, scale, grad_out)

    leaves = [t.clone().requires_grad_() for t in (x, shift, scale)]
    out = layernorm_modulate(*leaves)
    out.backward(grad_out)
    assert out.dtype == dtype and out.shape == (b, n, c) and out.is_contiguous()
    _assert_within("out", out, ref_out, truth_out, atol)
    for name, leaf, ref, truth in zip(("dx", "dshift", "dscale"), leaves, ref_grads, truth_grads):
        assert leaf.grad.dtype == dtype, name
        _assert_within(name, leaf.grad, ref, truth, atol)
    if offset == 0:
        torch.testing.assert_close(out.float(), ref_out, atol=atol, rtol=rtol)


def test_mixed_dtypes_fp32_stream_fp16_modulation(kernels_only):
    """fp32 tokens with fp16 shift/scale (a Linear under autocast): fp32 math, each gradient in its input's dtype."""
    x, shift, scale, grad_out = _inputs(2, 9, 72, 1.0, torch.float32, mod_dtype=torch.float16)
    ref_out, ref_grads = _grads_via_ref(x, shift, scale, grad_out)
    leaves = [t.clone().requires_grad_() for t in (x, shift, scale)]
    out = layernorm_modulate(*leaves, out_dtype=torch.float16)
    out.backward(grad_out.half())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref_out, atol=2e-3, rtol=2e-3)
    assert [t.grad.dtype for t in leaves] == [torch.float32, torch.float16, torch.float16]
    for leaf, ref in zip(leaves, ref_grads):
        torch.testing.assert_close(leaf.grad.float(), ref, atol=2e-2, rtol=2e-3)


@pytest.mark.parametrize("tile, target", [(128, 1), (64, 3)])
def test_launchers_tiling_and_strides(monkeypatch, tile, target):
    """Small tiles and few programs, so rows span several blocks and each backward program loops over several
    token blocks; x strided (batch-minor, channel-sliced, channel stride 2), grad_out expanded (stride 0)."""
    for name in ("_TILE", "_BWD_TILE"):
        monkeypatch.setattr(mod, name, tile)
    monkeypatch.setattr(mod, "_resident", lambda *args: target)        # programs of one wave
    b, n, c, eps = 2, 23, 40, 1e-5
    x = torch.randn(n, b, 2 * c).transpose(0, 1)[:, :, ::2]
    shift, scale = torch.randn(c, b).t(), torch.randn(b, 3 * c)[:, ::3]
    grad_out = torch.randn(1, 1, c).expand(b, n, c)
    torch.testing.assert_close(mod.layernorm_modulate_fwd(x, shift, scale, eps),
                               layernorm_modulate_ref(x, shift, scale, eps), atol=1e-5, rtol=1e-5)
    got = mod.layernorm_modulate_bwd(grad_out, x, scale, eps)
    want = layernorm_modulate_backward_ref(grad_out, x, scale, eps)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@settings(max_examples=6, deadline=None)
@given(b=st.integers(1, 2), n=st.integers(1, 40), c=st.integers(1, 90), eps=st.sampled_from([1e-6, 1e-5, 0.1]))
def test_property_random_shapes(b, n, c, eps):
    x, shift, scale, grad_out = _inputs(b, n, c, 0.0, torch.float32)
    torch.testing.assert_close(mod.layernorm_modulate_fwd(x, shift, scale, eps),
                               layernorm_modulate_ref(x, shift, scale, eps), atol=2e-5, rtol=1e-5)
    for g, w in zip(mod.layernorm_modulate_bwd(grad_out, x, scale, eps),
                    layernorm_modulate_backward_ref(grad_out, x, scale, eps)):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_guard_buffers(dtype):
    """Inputs inside NaN guard buffers (a stray read shows as NaN), launcher allocations inside sentinel buffers
    (a stray write shows as a changed sentinel); the inputs are left untouched."""
    b, n, c = 2, 11, 72
    x, shift, scale, grad_out = (guarded(t) for t in _inputs(b, n, c, 0.0, dtype))
    with guard_allocations() as allocs:
        out = mod.layernorm_modulate_fwd(x, shift, scale)
        grads = mod.layernorm_modulate_bwd(grad_out, x, scale)
    check_guards(allocs, (out, *grads), x=x, shift=shift, scale=scale, grad_out=grad_out)
    atol = 1e-5 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(out, layernorm_modulate_ref(x, shift, scale), atol=atol, rtol=atol)
    for g, w in zip(grads, layernorm_modulate_backward_ref(grad_out, x, scale)):
        torch.testing.assert_close(g, w, atol=atol * n, rtol=atol)


def test_autocast_output_dtype(kernels_only):
    """Under CPU autocast the default output dtype is the autocast dtype (bf16); out_dtype overrides it; outside
    autocast the output keeps x's dtype."""
    x, shift, scale, _ = _inputs(2, 5, 40, 0.0, torch.float32)
    ref = layernorm_modulate_ref(x, shift, scale)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layernorm_modulate(x, shift, scale)
        assert layernorm_modulate(x, shift, scale, out_dtype=torch.float32).dtype == torch.float32
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=1e-2)      # bf16 elementwise works interpreted
    assert layernorm_modulate(x, shift, scale).dtype == torch.float32
    assert layernorm_modulate(x.half(), shift, scale).dtype == torch.float16


def test_torch_compile_fullgraph():
    x, shift, scale, grad_out = _inputs(2, 6, 8, 0.0, torch.float32)
    check_compiled(layernorm_modulate, layernorm_modulate_ref, (x, shift, scale), grad_out)


def test_opcheck():
    """Schema, fake impl (shape, dtype, strides) and autograd registration agree with the real op."""
    x, shift, scale, grad_out = _inputs(2, 5, 8, 0.0, torch.float32)
    args = (x.requires_grad_(), shift.requires_grad_(), scale.requires_grad_(), 1e-6, torch.float16)
    torch.library.opcheck(torch.ops.flexdit.layernorm_modulate.default, args)
    torch.library.opcheck(torch.ops.flexdit.layernorm_modulate_backward.default,
                          (grad_out, x.detach(), scale.detach().half(), 1e-6, torch.float32))


def test_one_op_per_call():
    """An op counter sees one `flexdit.layernorm_modulate` per forward, whatever backend runs inside it."""
    x, shift, scale, _ = _inputs(1, 4, 8, 0.0, torch.float32)
    with OpLog() as log:
        layernorm_modulate(x, shift, scale)
    assert log.ops == ["flexdit.layernorm_modulate.default"]


# ----------------------------------------------------------------------------------------------------------------
# The reference against an independent formulation
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("b, n, c, eps", [(2, 16, 40, 1e-6), (1, 9, 72, 1e-5), (2, 3, 1152, 0.1)])
def test_ref_matches_layer_norm_modulate(b, n, c, eps):
    x = torch.randn(b, n, c, dtype=torch.float64) * 3 + 1
    shift, scale, grad_out = torch.randn(b, c, dtype=torch.float64), torch.randn(b, c, dtype=torch.float64), \
        torch.randn(b, n, c, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, shift, scale)]
    expected = F.layer_norm(leaves[0], (c,), eps=eps) * (1 + leaves[2].unsqueeze(1)) + leaves[1].unsqueeze(1)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out)
    f = [t.float() for t in (x, shift, scale, grad_out)]
    torch.testing.assert_close(layernorm_modulate_ref(f[0], f[1], f[2], eps), expected.detach().float(),
                               atol=1e-5, rtol=1e-5)
    got = layernorm_modulate_backward_ref(f[3], f[0], f[2], eps)
    for g, w in zip(got, expected_grads):
        torch.testing.assert_close(g, w.float(), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------

def _ok():
    return torch.randn(2, 4, 8), torch.randn(2, 8), torch.randn(2, 8)


BAD_CALLS = [
    ("x rank", lambda f: f(torch.randn(4, 8), *_ok()[1:]), "x must have rank 3"),
    ("x dtype", lambda f: f(torch.randn(2, 4, 8).double(), *_ok()[1:]), "x must have dtype"),
    ("x not a tensor", lambda f: f([[[1.0]]], *_ok()[1:]), "x must be a torch.Tensor"),
    ("no channels", lambda f: f(torch.randn(2, 4, 0), torch.randn(2, 0), torch.randn(2, 0)), "x must have at least"),
    ("shift rank", lambda f: f(_ok()[0], torch.randn(2, 1, 8), _ok()[2]), "shift must have rank 2"),
    ("shift shape", lambda f: f(_ok()[0], torch.randn(2, 7), _ok()[2]), r"shift must have shape \(B, C\)"),
    ("scale batch", lambda f: f(_ok()[0], _ok()[1], torch.randn(3, 8)), r"scale must have shape \(B, C\)"),
    ("scale dtype", lambda f: f(_ok()[0], _ok()[1], torch.ones(2, 8, dtype=torch.int32)), "scale must have dtype"),
    ("scale device", lambda f: f(_ok()[0], _ok()[1], torch.randn(2, 8, device="meta")), "scale is on meta"),
    ("eps", lambda f: f(*_ok(), 0.0), "eps must be positive"),
    ("out_dtype", lambda f: f(*_ok(), 1e-6, torch.float64), "out_dtype must be one of"),
    ("too wide", lambda f: f(torch.randn(1, 1, 16385), torch.randn(1, 16385), torch.randn(1, 16385)), "channels"),
]


test_bad_input_raises = bad_input_test(BAD_CALLS, [layernorm_modulate, mod.layernorm_modulate_fwd],
                                       ids=["public", "launcher"])


def test_backward_launcher_bad_input():
    x, _, scale = _ok()
    with pytest.raises(ValueError, match="x is on meta"):
        mod.layernorm_modulate_fwd(torch.randn(2, 4, 8, device="meta"), torch.randn(2, 8, device="meta"),
                                   torch.randn(2, 8, device="meta"))
    with pytest.raises(ValueError, match="grad_out is on meta"):
        mod.layernorm_modulate_bwd(torch.randn(2, 4, 8, device="meta"), x, scale)
    with pytest.raises(ValueError, match="grad_out must have x's shape"):
        mod.layernorm_modulate_bwd(torch.randn(2, 5, 8), x, scale)
    with pytest.raises(ValueError, match="grad_out must have rank 3"):
        mod.layernorm_modulate_bwd(torch.randn(2, 8), x, scale)
    with pytest.raises(ValueError, match=r"scale must have shape \(B, C\)"):
        mod.layernorm_modulate_bwd(torch.randn(2, 4, 8), x, torch.randn(2, 9))


def test_empty_token_axis(kernels_only):
    x = torch.randn(2, 0, 8, requires_grad=True)
    shift, scale = torch.randn(2, 8, requires_grad=True), torch.randn(2, 8, requires_grad=True)
    out = layernorm_modulate(x, shift, scale)
    assert out.shape == (2, 0, 8)
    out.sum().backward()
    assert torch.equal(shift.grad, torch.zeros(2, 8)) and torch.equal(scale.grad, torch.zeros(2, 8))


# ----------------------------------------------------------------------------------------------------------------
# GPU: bf16 and fp16 at the model's sizes
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("x_fp32", [True, False], ids=["x-fp32", "x-lowp"])
def test_gpu_model_sizes(dtype, x_fp32):
    """(32, 1024, 1152): fp32 residual stream with a bf16/fp16 output (autocast), or all in bf16/fp16."""
    b, n, c = 32, 1024, 1152
    x = torch.randn(b, n, c, device="cuda") * 2 + 1
    x = x if x_fp32 else x.to(dtype)
    ada = torch.randn(b, 6 * c, device="cuda").to(dtype)
    shift, scale = ada[:, :c], ada[:, c:2 * c]
    grad_out = torch.randn(b, n, c, device="cuda").to(dtype)
    with torch.autocast("cuda", dtype=dtype):
        out = layernorm_modulate(x, shift, scale)
    assert out.dtype == dtype
    ref = layernorm_modulate_ref(x, shift, scale, out_dtype=torch.float32)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=1e-2)
    got = mod.layernorm_modulate_bwd(grad_out, x, scale, shift_dtype=shift.dtype)
    want = layernorm_modulate_backward_ref(grad_out.float(), x.float(), scale.float())
    torch.testing.assert_close(got[0].float(), want[0], atol=2e-2, rtol=1e-2)
    for g, w in zip(got[1:], want[1:]):      # sums over 1024 tokens, rounded once to bf16/fp16
        torch.testing.assert_close(g.float(), w, atol=0.5, rtol=1e-2)
    again = mod.layernorm_modulate_bwd(grad_out, x, scale, shift_dtype=shift.dtype)
    assert all(torch.equal(a, g) for a, g in zip(again, got))                # deterministic reductions
