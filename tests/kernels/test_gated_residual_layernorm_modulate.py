"""gated_residual_layernorm_modulate: the fused Triton kernels (interpreter on CPU) against the composition of the
gated_residual and layernorm_modulate references, under autograd."""

import pytest
import torch

from flexdit_kernels import (
    gated_residual_layernorm_modulate, gated_residual_layernorm_modulate_backward_ref,
    gated_residual_layernorm_modulate_ref, gated_residual_ref, layernorm_modulate_ref,
)

# The adaLN family's module (its launchers and launch sizes); the package re-exports only the ops.
from flexdit_kernels import _adaln as mod

from .guard import check_guards, guard_allocations, guarded
from .helpers import OpLog, kernels_only_fixture

# (x dtype, branch/modulation dtype, atol): the fp32 residual stream with fp16 branch and adaLN chunks, or all fp16.
DTYPES = [(torch.float32, torch.float32, 1e-5), (torch.float32, torch.float16, 1e-5), (torch.float16, torch.float16,
                                                                                        3e-3)]
CASES = [(2, 7, 40), (1, 13, 72), (3, 1, 40), (1, 5, 1152)]
PARAMS = [pytest.param(case, *dt, id=f"B{case[0]}-L{case[1]}-C{case[2]}-{str(dt[0])[6:]}-{str(dt[1])[6:]}")
          for case in CASES for dt in DTYPES]


def _inputs(b, n, c, x_dtype, y_dtype):
    """x, y, gate, shift, scale, grad_r, grad_u; gate, shift, scale are strided chunks of one (B, 6C) projection."""
    x = (torch.randn(b, n, c) * 2 + 1).to(x_dtype)
    y = torch.randn(b, n, c).to(y_dtype)
    ada = torch.randn(b, 6 * c).to(y_dtype)
    gate, shift, scale = ada[:, 2 * c:3 * c], ada[:, 3 * c:4 * c], ada[:, 4 * c:5 * c]
    grad_r, grad_u = torch.randn(b, n, c).to(x_dtype), torch.randn(b, n, c).to(x_dtype)
    return x, y, gate, shift, scale, grad_r, grad_u


def _grads_via_ref(x, y, gate, shift, scale, grad_r, grad_u, eps=1e-6):
    """Outputs and input gradients of the composed references through autograd, in fp32."""
    leaves = [t.detach().float().requires_grad_() for t in (x, y, gate, shift, scale)]
    r = gated_residual_ref(*leaves[:3])
    u = layernorm_modulate_ref(r, leaves[3], leaves[4], eps)
    torch.autograd.backward([r, u], [grad_r.float(), grad_u.float()])
    return r, u, [t.grad for t in leaves]


kernels_only = kernels_only_fixture(mod, "gated_residual_layernorm_modulate")


@pytest.mark.parametrize("case, x_dtype, y_dtype, atol", PARAMS)
def test_public_op_runs_kernels(case, x_dtype, y_dtype, atol, kernels_only):
    b, n, c = case
    x, y, gate, shift, scale, grad_r, grad_u = _inputs(b, n, c, x_dtype, y_dtype)
    ref_r, ref_u, ref_grads = _grads_via_ref(x, y, gate, shift, scale, grad_r, grad_u)

    leaves = [t.clone().requires_grad_() for t in (x, y, gate, shift, scale)]
    r, u = gated_residual_layernorm_modulate(*leaves)
    torch.autograd.backward([r, u], [grad_r, grad_u])
    assert r.dtype == x_dtype and u.dtype == x_dtype and r.shape == u.shape == (b, n, c)
    torch.testing.assert_close(r.float(), ref_r, atol=atol, rtol=atol)
    torch.testing.assert_close(u.float(), ref_u, atol=2 * atol, rtol=2 * atol)
    for name, leaf, ref in zip(("dx", "dy", "dgate", "dshift", "dscale"), leaves, ref_grads):
        assert leaf.grad.dtype == leaf.dtype, name
        # Low-precision gradients are rounded once; sums over L are rounded once at their size.
        tol = 2e-5 if leaf.dtype == torch.float32 else 3e-3 * (1 if leaf.dim() == 3 else max(n, 4))
        torch.testing.assert_close(leaf.grad.float(), ref, atol=tol, rtol=max(tol, 3e-3),
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("tile, target", [(128, 1), (256, 3)])
def test_launchers_tiling_and_strides(monkeypatch, tile, target):
    """Small tiles and few programs (several token blocks per backward program); strided x and y, expanded grads."""
    for name in ("_TILE", "_BWD_TILE"):
        monkeypatch.setattr(mod, name, tile)
    monkeypatch.setattr(mod, "_resident", lambda *args: target)        # programs of one wave
    b, n, c = 2, 23, 40
    x = torch.randn(n, b, 2 * c).transpose(0, 1)[:, :, ::2]
    y = torch.randn(b, c, n).transpose(1, 2)
    gate, shift, scale = torch.randn(c, b).t(), torch.randn(b, c), torch.randn(b, 3 * c)[:, ::3]
    grad_r, grad_u = torch.randn(1, 1, c).expand(b, n, c), torch.randn(b, 1, c).expand(b, n, c)
    got = mod.gated_residual_layernorm_modulate_fwd(x, y, gate, shift, scale)
    for g, w in zip(got, gated_residual_layernorm_modulate_ref(x, y, gate, shift, scale)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    r = got[0]
    got = mod.gated_residual_layernorm_modulate_bwd(grad_r, grad_u, r, y, gate, scale)
    want = gated_residual_layernorm_modulate_backward_ref(grad_r, grad_u, r, y, gate, scale)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5)


def test_guard_buffers():
    x, y, gate, shift, scale, grad_r, grad_u = (guarded(t) for t in _inputs(2, 11, 72, torch.float32,
                                                                             torch.float16))
    with guard_allocations() as allocs:
        r, u = mod.gated_residual_layernorm_modulate_fwd(x, y, gate, shift, scale, out_dtype=torch.float16)
        grads = mod.gated_residual_layernorm_modulate_bwd(grad_r, grad_u, r, y, gate, scale)
    check_guards(allocs, (r, u, *grads), x=x, y=y, gate=gate, shift=shift, scale=scale)
    want_r, want_u = gated_residual_layernorm_modulate_ref(x, y, gate, shift, scale, out_dtype=torch.float16)
    torch.testing.assert_close(r, want_r)
    torch.testing.assert_close(u, want_u, atol=2e-3, rtol=2e-3)
    for g, w in zip(grads, gated_residual_layernorm_modulate_backward_ref(grad_r, grad_u, r, y, gate, scale)):
        torch.testing.assert_close(g, w, atol=3e-2, rtol=3e-3)


def test_autocast_output_dtype(kernels_only):
    x, y, gate, shift, scale, _, _ = _inputs(2, 5, 40, torch.float32, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r, u = gated_residual_layernorm_modulate(x, y, gate, shift, scale)
    assert r.dtype == torch.float32 and u.dtype == torch.bfloat16
    want_r, want_u = gated_residual_layernorm_modulate_ref(x, y, gate, shift, scale)
    torch.testing.assert_close(u.float(), want_u, atol=2e-2, rtol=1e-2)


def test_torch_compile_fullgraph_and_opcheck():
    x, y, gate, shift, scale, grad_r, grad_u = _inputs(2, 6, 8, torch.float32, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, y, gate, shift, scale)]
    compiled = torch.compile(lambda *a: gated_residual_layernorm_modulate(a[0] * 2, *a[1:]), fullgraph=True,
                             backend="aot_eager")
    r, u = compiled(*leaves)
    torch.autograd.backward([r, u], [grad_r, grad_u])
    ref_r, ref_u, ref_grads = _grads_via_ref(x * 2, y, gate, shift, scale, grad_r, grad_u)
    torch.testing.assert_close(u, ref_u)
    torch.testing.assert_close(leaves[0].grad, ref_grads[0] * 2)
    for leaf, ref in zip(leaves[1:], ref_grads[1:]):
        torch.testing.assert_close(leaf.grad, ref)
    args = [t.detach().requires_grad_() for t in (x, y, gate, shift, scale)]
    torch.library.opcheck(torch.ops.flexdit.gated_residual_layernorm_modulate.default, (*args, 1e-6, torch.float16))
    with OpLog() as log:
        gated_residual_layernorm_modulate(x, y, gate, shift, scale)
    assert log.ops == ["flexdit.gated_residual_layernorm_modulate.default"]


BAD_CALLS = [
    ("x rank", lambda a: (a[0][0], *a[1:]), "x must have rank 3"),
    ("y shape", lambda a: (a[0], a[1][:, :-1], *a[2:]), "y must have x's shape"),
    ("gate shape", lambda a: (*a[:2], a[2][:, :-1], *a[3:]), r"gate must have shape \(B, C\)"),
    ("shift shape", lambda a: (*a[:3], a[3][:1], a[4]), r"shift must have shape \(B, C\)"),
    ("scale device", lambda a: (*a[:4], a[4].to("meta")), "scale is on meta"),
    ("eps", lambda a: (*a, 0.0), "eps must be positive"),
]


@pytest.mark.parametrize("fn", [gated_residual_layernorm_modulate, mod.gated_residual_layernorm_modulate_fwd],
                         ids=["public", "launcher"])
@pytest.mark.parametrize("what, make, match", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises(fn, what, make, match):
    args = _inputs(2, 4, 8, torch.float32, torch.float32)[:5]
    with pytest.raises(ValueError, match=match):
        fn(*make(args))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_model_sizes(dtype):
    """(32, 1024, 1152): fp32 residual stream, bf16/fp16 branch and adaLN chunks, u in the autocast dtype."""
    b, n, c = 32, 1024, 1152
    x = torch.randn(b, n, c, device="cuda") * 2 + 1
    y = torch.randn(b, n, c, device="cuda").to(dtype)
    ada = torch.randn(b, 6 * c, device="cuda").to(dtype)
    gate, shift, scale = ada[:, 2 * c:3 * c], ada[:, 3 * c:4 * c], ada[:, 4 * c:5 * c]
    with torch.autocast("cuda", dtype=dtype):
        r, u = gated_residual_layernorm_modulate(x, y, gate, shift, scale)
    want_r, want_u = gated_residual_layernorm_modulate_ref(x, y, gate, shift, scale, out_dtype=torch.float32)
    torch.testing.assert_close(r, want_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(u.float(), want_u, atol=2e-2, rtol=1e-2)
    grad_r, grad_u = torch.randn_like(x), torch.randn(b, n, c, device="cuda").to(dtype)
    got = mod.gated_residual_layernorm_modulate_bwd(grad_r, grad_u, r, y, gate, scale, shift_dtype=dtype)
    want = gated_residual_layernorm_modulate_backward_ref(grad_r, grad_u, r, y, gate, scale.float())
    torch.testing.assert_close(got[0], want[0].float(), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(got[1].float(), want[1].float(), atol=2e-2, rtol=1e-2)
    for g, w in zip(got[2:], want[2:]):
        torch.testing.assert_close(g.float(), w.float(), atol=1.0, rtol=1e-2)
    again = mod.gated_residual_layernorm_modulate_bwd(grad_r, grad_u, r, y, gate, scale, shift_dtype=dtype)
    assert all(torch.equal(a, g) for a, g in zip(again, got))
