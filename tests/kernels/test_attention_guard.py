"""attention under guard buffers: q, k, v as views inside NaN-filled buffers with gaps between rows and heads, every
launcher allocation (outputs, log-sum-exp, split-K and backward workspaces) inside a sentinel-filled buffer; forward
and backward of every path must read no NaN, write nothing outside their tensors and leave the inputs untouched."""

import pytest
import torch

from flexdit_kernels import attention, attention_ref
from flexdit_kernels import _attention as A

from .guard import check_gaps, guard_allocations, guarded

# (path, Lq, Lk, D): few-keys with two programs along the queries, with one query (fused dq in the backward) and
# over 64 keys (128-row K and V tiles, 32-row query tiles, the last one partial),
# split-K with three key splits (combine; dq with three key splits), the flash loop (dk/dv with three query splits,
# dq with three key splits); D = 72 pads the head dim 72 -> 128, D = 40 pads 40 -> 64.
CASES = [("few_keys", 100, 36, 72), ("few_keys", 1, 64, 72), ("few_keys", 40, 100, 72), ("split_k", 20, 150, 72),
         ("split_k", 20, 150, 40), ("flash", 130, 130, 72)]


@pytest.fixture(autouse=True)
def _triton_everywhere(monkeypatch):
    monkeypatch.setattr(A, "ROUTES", tuple(r for r in A.ROUTES if r.path != "sdpa"))
    monkeypatch.setattr(A, "SDPA_DTYPES", ())


# Tolerance against the fp64 reference: fp32 tight; fp16/bf16 loose, since the error bound proper is the business of
# test_attention.py and these tests look for NaN and stray writes.
TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (1e-1, 5e-2)}


def _check_guarded(lq, lk, d, dtype, device):
    b, h = 1, 2
    q, k, v = (guarded(torch.randn(b, n, h, d, device=device, dtype=dtype)).requires_grad_() for n in (lq, lk, lk))
    assert q.stride(1) > h * d and q.stride(2) > d                         # gaps between rows and between heads
    grad_out = torch.randn(b, lq, h, d, device=device, dtype=dtype)
    with guard_allocations() as allocs:
        out = attention(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
    if device.type == "cuda":
        torch.cuda.synchronize()
    assert len(allocs.tensors) >= 4                                        # out, lse, delta, dk/dv at least
    for name, t in zip(("out", "dq", "dk", "dv"), (out, *grads)):
        assert not t.isnan().any(), f"{name} has NaN: a kernel read a gap or an unwritten workspace element"
    allocs.check()
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_gaps(t, name)

    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_ref(qd, kd, vd)
    ref_grads = torch.autograd.grad(ref, (qd, kd, vd), grad_out.double())
    atol, rtol = TOL[dtype]
    for name, t, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        torch.testing.assert_close(t.double(), r, atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("path, lq, lk, d", CASES)
def test_attention_guarded(path, lq, lk, d, device):
    assert A.attention_path(lq, lk) == path
    _check_guarded(lq, lk, d, torch.float32, device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path, lq, lk, d", CASES)
def test_attention_guarded_gpu(path, lq, lk, d, dtype):
    assert A.attention_path(lq, lk) == path
    _check_guarded(lq, lk, d, dtype, torch.device("cuda"))
