"""attention: every Triton path (few-keys, split-K, flash loop) against an fp64 reference, with the error bound set by
PyTorch's own error in the same dtype (2x forward, 3x backward); routing, strides, validation, torch.compile."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from flexdit_kernels import attention, attention_ref, backend, interpreting
from flexdit_kernels import _attention as A

SHAPES = [(64, 256), (256, 64), (36, 100), (100, 36), (1, 64), (64, 1), (130, 130)]
EXPECTED_PATH = {(64, 256): "split_k", (256, 64): "few_keys", (36, 100): "few_keys", (100, 36): "few_keys",
                 (1, 64): "few_keys", (64, 1): "few_keys", (130, 130): "flash"}
# An absolute floor under PyTorch's error, so that fp32 does not fail on ~1e-7 rounding noise.
FLOOR = {torch.float32: 2e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


DEFAULT_ROUTES = A.ROUTES
TRITON_ROUTES = tuple(r for r in A.ROUTES if r.path != "sdpa")
HEAD_DIMS = (64, 72, 80, 128)
# One shape per Triton path (CPU): few-keys with two programs along the queries, split-K with three key splits (the
# last one partial), the flash loop with three query and three key blocks.
PATH_SHAPES = {"few_keys": (100, 36), "split_k": (20, 150), "flash": (130, 130)}


@pytest.fixture(autouse=True)
def _triton_everywhere(monkeypatch):
    """Keep every shape and dtype on Triton (no SDPA routing) unless a test says otherwise."""
    monkeypatch.setattr(A, "ROUTES", TRITON_ROUTES)
    monkeypatch.setattr(A, "SDPA_DTYPES", ())


def _fused_views(b, lq, lk, h, d, dtype, device, self_attention=False):
    """q, k, v as views of a fused projection output: qkv.view(B, N, 3, H, D)[:, :, i] (or q + kv for cross)."""
    if self_attention:
        qkv = torch.randn(b, lq, 3 * h * d, device=device, dtype=dtype).view(b, lq, 3, h, d)
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = torch.randn(b, lq, 3 * h * d, device=device, dtype=dtype).view(b, lq, 3, h, d)[:, :, 0]
    kv = torch.randn(b, lk, 2 * h * d, device=device, dtype=dtype).view(b, lk, 2, h, d)
    return q, kv[:, :, 0], kv[:, :, 1]


def _fwd_bwd(fn, q, k, v, grad_out):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


def _sdpa(q, k, v):
    return attention_ref(q, k, v)


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _check_against_torch(q, k, v, fwd_factor=2.0, bwd_factor=3.0):
    """Kernel error vs fp64 <= factor x (PyTorch's error in the same dtype vs fp64) + floor, output and gradients."""
    dtype = q.dtype
    grad_out = torch.randn(q.shape, device=q.device, dtype=dtype)
    exact = _fwd_bwd(_sdpa, q.double(), k.double(), v.double(), grad_out.double())
    torch_res = _fwd_bwd(_sdpa, q, k, v, grad_out)
    ours = _fwd_bwd(attention, q, k, v, grad_out)
    assert ours[0].shape == q.shape and ours[0].is_contiguous() and ours[0].dtype == dtype
    for name, o, t, e, factor in zip(("out", "dq", "dk", "dv"), ours, torch_res, exact,
                                     (fwd_factor, bwd_factor, bwd_factor, bwd_factor)):
        assert o.shape == e.shape and o.dtype == dtype, name
        bound = factor * _err(t, e) + FLOOR[dtype] * max(1.0, e.abs().max().item())
        assert _err(o, e) <= bound, f"{name}: error {_err(o, e):.3g} > bound {bound:.3g}"


# ----------------------------------------------------------------------------------------------------------------
# Paths and configuration
# ----------------------------------------------------------------------------------------------------------------

def test_attention_path_routing(monkeypatch):
    for (lq, lk), path in EXPECTED_PATH.items():
        assert A.attention_path(lq, lk) == path
    monkeypatch.setattr(A, "ROUTES", DEFAULT_ROUTES)
    assert A.attention_path(1024, 1024) == "sdpa"
    assert A.attention_path(256, 256) == "sdpa"
    assert A.attention_path(1024, 64) == "few_keys" and A.attention_path(64, 1024) == "split_k"
    assert A.attention_path(130, 130) == "flash" and A.attention_path(255, 1024) == "flash"
    assert A.attention_path(1024, 1024, sdpa=False) == "flash"


def test_routes_are_one_table(monkeypatch):
    """The decisions are the rows of ROUTES, read in order; a few-keys row past the kernel's tile is refused."""
    monkeypatch.setattr(A, "ROUTES", (A.Route("sdpa", min_lq=100), A.Route("split_k")))
    assert A.attention_path(100, 10) == "sdpa" and A.attention_path(99, 10) == "split_k"
    assert A.attention_path(100, 10, sdpa=False) == "split_k"
    monkeypatch.setattr(A, "ROUTES", (A.Route("few_keys", max_lk=256),))
    assert A.attention_path(8, 128) == "few_keys"
    with pytest.raises(ValueError, match="few_keys"):
        A.attention_path(8, 129)


@pytest.mark.parametrize("d, block_d", [(8, 16), (16, 16), (24, 32), (40, 64), (64, 64), (72, 128), (80, 128),
                                        (104, 128), (128, 128)])
def test_head_dim_is_one_tile(d, block_d):
    assert A._block_d(d) == block_d


def test_split_k_fills_the_gpu():
    cpu = torch.device("cpu")
    many, few = A._fwd_config(64, 1024, 512, cpu), A._fwd_config(64, 1024, 16, cpu)
    assert many.path == few.path == "split_k"
    assert few.n_splits > many.n_splits >= 1
    assert few.n_splits * 16 >= 132 and many.n_splits * 512 >= 132
    assert few.chunk % few.block_n == 0 and (few.n_splits - 1) * few.chunk < 1024   # every split non-empty


class _Stop(Exception):
    pass


class _FakeKernel:
    """Stands in for a kernel: `kernel[grid](*args, **meta)` records meta and launches nothing (raises if `stop`)."""

    def __init__(self, stop=False):
        self.meta, self.stop = {}, stop

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.meta.update(meta)
            if self.stop:
                raise _Stop
        return launch


@pytest.mark.parametrize("dtype, block_m", [(torch.float32, 32), (torch.float16, 32)])
def test_fused_backward_fits_sm90_shared_memory(monkeypatch, dtype, block_m):
    """128 keys x 128 head-dim columns run the fused dk/dv/dq kernel at BLOCK_M = 32 and 8 warps in every dtype (fp32
    at BLOCK_M = 64 needs 262,656 B of shared memory on sm_90, over the 232,448 B of a block; bf16 at BLOCK_M = 64
    spills 224 B per thread even at 8 warps)."""
    dkdv = _FakeKernel(stop=True)
    monkeypatch.setattr(A, "_attention_bwd_preprocess_kernel", _FakeKernel())
    monkeypatch.setattr(A, "_attention_bwd_dkdv_kernel", dkdv)
    q, k = torch.empty(1, 64, 2, 72, dtype=dtype), torch.empty(1, 100, 2, 72, dtype=dtype)
    with pytest.raises(_Stop):
        A.attention_bwd(torch.empty_like(q), q, k, k, q, torch.empty(1, 2, 64), 0.1)
    meta = dkdv.meta
    assert meta["FUSE_DQ"] and meta["BLOCK_N"] == 128 and meta["BLOCK_D"] == 128 and meta["BLOCK_M"] == block_m and meta["num_warps"] == 8


def test_split_count_follows_occupancy():
    """Split-K fills one wave of CTAs: more CTAs per SM, more splits (none past the key blocks)."""
    cpu = torch.device("cpu")
    one, three = A._fwd_config(64, 1024, 16, cpu, ctas=1), A._fwd_config(64, 1024, 16, cpu, ctas=3)
    assert one.n_splits * 16 <= 132 < three.n_splits * 16 and three.n_splits == 1024 // three.block_n
    assert A._fwd_config(64, 1024, 16, cpu).n_splits == A._fwd_config(64, 1024, 16, cpu, ctas=A._SM90_CTAS["split_k"]
                                                                       ).n_splits


@pytest.mark.parametrize("lq, lk, tiles", [(1024, 36, (64, 64, True)), (1024, 100, (32, 128, True)),
                                           (1, 128, (16, 128, True)), (36, 1024, (64, 64, False))])
def test_backward_tiles(lq, lk, tiles):
    assert A._bwd_tiles(lq, lk) == tiles


def test_fitted_halves_the_query_tile(monkeypatch):
    """A tile over a block's shared memory (0 CTAs per SM) is halved until it fits, down to 16 rows; then q is named."""
    tried = []

    def ctas(kernel, device, default, *args, **meta):
        tried.append(meta["BLOCK_M"])
        return 2 if meta["BLOCK_M"] <= limit else 0

    monkeypatch.setattr(A, "compiled_ctas_per_sm", ctas)
    limit = 16
    meta, n = A._fitted(A._attention_fwd_kernel, torch.device("cpu"), 3, (), dict(BLOCK_M=64, HEAD_DIM=72))
    assert meta["BLOCK_M"] == 16 and n == 2 and tried == [64, 32, 16]
    limit = 8
    with pytest.raises(ValueError, match="q: no _attention_fwd_kernel tile fits"):
        A._fitted(A._attention_fwd_kernel, torch.device("cpu"), 3, (), dict(BLOCK_M=64, HEAD_DIM=72))


def test_compiled_ctas_off_the_gpu():
    from flexdit_kernels._launch import compiled_ctas_per_sm
    assert compiled_ctas_per_sm(A._attention_fwd_kernel, torch.device("cpu"), 3) == 3


def _recording_fwd(monkeypatch):
    """Replace the forward kernels by recorders that launch nothing; returns the dict their meta goes to."""
    meta = {}
    for name in ("_attention_fwd_few_keys_kernel", "_attention_fwd_kernel", "_attention_fwd_combine_kernel"):
        fake = _FakeKernel()
        fake.meta = meta
        monkeypatch.setattr(A, name, fake)
    return meta


def test_few_keys_query_tile(monkeypatch):
    """Over 64 keys (K and V as 128-row tiles) the few-keys forward runs 32 query rows staged once, the tile that
    keeps 3 CTAs per SM on sm_90 (the default target's figures off the GPU); up to 64 keys, and for one query, the
    64-row (16-row) tile with the next q block prefetched. A configuration's BLOCK_M is kept."""
    meta = _recording_fwd(monkeypatch)
    cpu = torch.device("cpu")
    for lq, lk, tile in [(1024, 100, (32, 128, 1)), (36, 65, (32, 128, 1)), (100, 128, (32, 128, 1)),
                         (1, 100, (16, 128, 2)), (1024, 64, (64, 64, 2)), (100, 36, (64, 64, 2))]:
        q, k, v = _fused_views(1, lq, lk, 2, 72, torch.float16, cpu)
        A.attention_fwd(q, k, v, 0.1)
        assert (meta["BLOCK_M"], meta["BLOCK_N"], meta["num_stages"]) == tile, (lq, lk)
    A.attention_fwd(q, k, v, 0.1, {"BLOCK_M": 32})
    assert (meta["BLOCK_M"], meta["num_stages"]) == (32, 2)            # 3 CTAs at 64 keys with q prefetched
    q, k, v = _fused_views(1, 1024, 100, 2, 72, torch.float16, cpu)
    A.attention_fwd(q, k, v, 0.1, {"BLOCK_M": 64})
    assert (meta["BLOCK_M"], meta["num_stages"]) == (64, 2)            # the 64-row tile at 2 CTAs (wgmma on sm_90)
    assert {"BLOCK_M": 64} in A.CONFIGS["attention"](q, k, v) and {"BLOCK_M": 32} in A.CONFIGS["attention"](q, k, v)


def test_few_keys_programs_fill_whole_waves():
    """Few-keys programs per head: the count that finishes soonest in whole waves of 3 CTAs on 132 SMs, not one
    head per program at B = 32 (512 programs, 1.29 waves) nor four at B = 8 (512 again)."""
    cpu = torch.device("cpu")
    assert A._fwd_config(1024, 100, 512, cpu, 3, 32).n_splits == 2            # 1,024 programs of 16 query blocks
    assert A._fwd_config(1024, 100, 128, cpu, 3, 32).n_splits == 3            # 384 programs: 0.97 waves
    assert A._fwd_config(100, 36, 4, cpu).n_splits == 2                        # every query block its own program
    assert A._fwd_config(1, 100, 4, cpu).n_splits == 1


def test_few_keys_tile_follows_the_compiled_kernel(monkeypatch):
    """On a GPU the tile comes from the compiled kernels' CTAs per SM: the first reaching 3 (the second is then not
    compiled), else the one with the most, the first of equals."""
    tried = []

    def compiled(figures):
        def ctas(kernel, device, default, *args, **meta):
            tried.append((meta["BLOCK_M"], meta["num_stages"]))
            return figures[(meta["BLOCK_M"], meta["num_stages"])]
        return ctas

    meta = dict(BLOCK_M=64, BLOCK_N=128, num_stages=2)
    for figures, want in [({(64, 2): 3, (32, 1): 4}, [(64, 2)]), ({(64, 2): 1, (32, 1): 2}, [(64, 2), (32, 1)]),
                          ({(64, 2): 2, (32, 1): 2}, [(64, 2), (32, 1)])]:
        tried.clear()
        monkeypatch.setattr(A, "compiled_ctas_per_sm", compiled(figures))
        got, ctas = A._few_keys_fitted(torch.device("cpu"), (), meta)
        assert tried == want and ctas == max(figures[t] for t in want)
        assert (got["BLOCK_M"], got["num_stages"]) == (want[-1] if ctas > figures[(64, 2)] else (64, 2))


def test_aligned_flag():
    """ALIGNED holds for fused-projection views (D = 72) and for a head-dim stride of 2, not for a data pointer or a
    stride off the multiple of 8 elements (a size-1 dim's stride does not count)."""
    q, k, v = _fused_views(2, 5, 7, 2, 72, torch.float16, torch.device("cpu"))
    assert A._is_aligned(q, k, v)
    assert A._is_aligned(torch.empty(2, 5, 2, 144, dtype=torch.float16)[..., ::2])
    assert A._is_aligned(torch.empty(1, 5, 2, 72).as_strided((1, 5, 2, 72), (3, 144, 72, 1)))
    buf = torch.empty(2 * 5 * 2 * 72 + 8, dtype=torch.float16)
    assert not A._is_aligned(buf[1:1 + 1440].view(2, 5, 2, 72))
    assert A._is_aligned(buf[8:8 + 1440].view(2, 5, 2, 72))                        # 16 bytes in
    assert not A._is_aligned(torch.empty(2, 5, 2, 75, dtype=torch.float16)[..., :72])


def test_aligned_flag_reaches_the_kernels(monkeypatch):
    meta = _recording_fwd(monkeypatch)
    q, k, v = _fused_views(1, 100, 36, 2, 72, torch.float16, torch.device("cpu"))
    A.attention_fwd(q, k, v, 0.1)
    assert meta["ALIGNED"] is True
    A.attention_fwd(q, k, torch.empty(1, 36, 2, 75, dtype=torch.float16)[..., :72], 0.1)
    assert meta["ALIGNED"] is False


# ----------------------------------------------------------------------------------------------------------------
# Numerics on every path
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lq, lk", SHAPES)
def test_attention_matches_fp64(lq, lk, dtype, device):
    """FlexDiT's head dim 72 on awkward shapes of every path, forward and backward, from fused-projection views."""
    b, h = (1, 2) if lq * lk > 10_000 else (2, 2)                      # interpreter time
    cfg = A._fwd_config(lq, lk, b * h, device)                           # what the launcher will run
    assert A.attention_path(lq, lk) == cfg.path == EXPECTED_PATH[(lq, lk)]
    if cfg.path == "split_k":
        assert cfg.n_splits > 1                                          # the combine kernel runs
    q, k, v = _fused_views(b, lq, lk, h, 72, dtype, device, self_attention=(lq == lk))
    _check_against_torch(q, k, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lq, lk", [(40, 65), (1, 100), (33, 128)])
def test_few_keys_over_64_keys(lq, lk, dtype, device):
    """K and V as 128-row tiles with the 32-row query tile: the first and last key counts it holds, one query, a
    partial last query block; forward and the fused backward."""
    assert A.attention_path(lq, lk) == "few_keys"
    q, k, v = _fused_views(1, lq, lk, 2, 72, dtype, device)
    _check_against_torch(q, k, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d", [d for d in HEAD_DIMS if d != 72])
@pytest.mark.parametrize("path", PATH_SHAPES)
def test_every_path_every_head_dim(path, d, dtype, device):
    """Head dims 64, 80 and 128 (72: above) on every path, forward and backward, from fused-projection views."""
    lq, lk = PATH_SHAPES[path]
    b, h = 1, 2
    cfg = A._fwd_config(lq, lk, b * h, device)
    assert cfg.path == path and (cfg.n_splits >= 2 or path == "flash")
    q, k, v = _fused_views(b, lq, lk, h, d, dtype, device, self_attention=(lq == lk))
    _check_against_torch(q, k, v)


def test_split_k_single_split(monkeypatch, device):
    """With a GPU full of programs the split-K path runs one split (no combine, no dq split)."""
    monkeypatch.setattr(A, "resident_programs", lambda device, per_sm: per_sm)     # a GPU of one SM
    assert A._fwd_config(64, 256, 4, device).n_splits == 1
    q, k, v = _fused_views(2, 64, 256, 2, 72, torch.float32, device)
    _check_against_torch(q, k, v)


@pytest.mark.parametrize("d", [8, 40, 104])
def test_other_head_dims(d, device):
    q, k, v = _fused_views(1, 40, 150, 2, d, torch.float16, device)
    _check_against_torch(q, k, v)


def test_arbitrary_strides(device):
    """q from a (B, H, L, D) buffer, k with a head-dim stride of 2, v reversed along tokens: no copies needed."""
    b, lq, lk, h, d = 1, 48, 70, 2, 72
    q = torch.randn(b, h, lq, d, device=device).transpose(1, 2)
    k = torch.randn(b, lk, h, 2 * d, device=device)[..., ::2]
    v = torch.randn(b, lk, h, d, device=device).flip(1)
    assert q.stride(-1) == 1 and k.stride(-1) == 2
    _check_against_torch(q, k, v)


@pytest.mark.parametrize("path", PATH_SHAPES)
def test_unaligned_views(path, device):
    """ALIGNED off: q, k, v whose data pointers sit one element past 16 bytes and whose token strides are odd, forward
    and backward on every path."""
    lq, lk = PATH_SHAPES[path]
    b, h, d = 1, 2, 72
    views = []
    for n in (lq, lk, lk):
        buf = torch.randn(1 + b * n * h * (d + 1), device=device, dtype=torch.float16)
        views.append(buf[1:].view(b, n, h, d + 1)[..., :d])
    assert not A._is_aligned(*views)
    _check_against_torch(*views)


def test_custom_scale(device):
    q, k, v = _fused_views(1, 20, 200, 2, 72, torch.float32, device)
    torch.testing.assert_close(attention(q, k, v, scale=0.3), attention_ref(q, k, v, 0.3), atol=2e-6, rtol=1e-5)


@settings(max_examples=8, deadline=None)
@given(lq=st.integers(1, 140), lk=st.integers(1, 200), d8=st.integers(1, 16), h=st.integers(1, 2))
def test_attention_property(lq, lk, d8, h):
    torch.manual_seed(lq * 1000 + lk)
    q, k, v = _fused_views(1, lq, lk, h, 8 * d8, torch.float32, torch.device("cpu"))
    torch.testing.assert_close(attention(q, k, v), attention_ref(q, k, v), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Routing, backends, torch.compile
# ----------------------------------------------------------------------------------------------------------------

def test_dense_routes_to_sdpa(monkeypatch, device):
    monkeypatch.setattr(A, "ROUTES", DEFAULT_ROUTES)

    def fail(*args):
        raise AssertionError("the Triton forward must not run for a dense shape routed to SDPA")

    monkeypatch.setattr(A, "attention_fwd", fail)
    q, k, v = _fused_views(1, 300, 300, 2, 72, torch.float32, device, self_attention=True)
    with backend("triton"):
        _check_against_torch(q, k, v)


def test_fp32_routes_to_sdpa(monkeypatch, device):
    """fp32 (SDPA_DTYPES) goes to SDPA at every shape on the Triton backend; fp16 takes the kernel."""
    monkeypatch.setattr(A, "SDPA_DTYPES", (torch.float32,))
    calls = []
    real = A.attention_fwd
    monkeypatch.setattr(A, "attention_fwd", lambda *args: calls.append(args[0].dtype) or real(*args))
    for dtype in (torch.float32, torch.float16):
        q, k, v = _fused_views(1, 20, 36, 2, 72, dtype, device)
        with backend("triton"):
            torch.testing.assert_close(attention(q, k, v), attention_ref(q, k, v), atol=2e-3, rtol=2e-3)
    assert calls == [torch.float16]


def test_triton_only_knob(monkeypatch, device):
    """While `_dispatch.triton_only()` is active, neither a dense shape nor fp32 is sent to SDPA."""
    from flexdit_kernels import _dispatch
    monkeypatch.setattr(A, "ROUTES", DEFAULT_ROUTES)
    monkeypatch.setattr(A, "SDPA_DTYPES", (torch.float32,))
    calls = []
    real = A.attention_fwd
    monkeypatch.setattr(A, "attention_fwd", lambda *args: calls.append(args[0].shape) or real(*args))
    q, k, v = _fused_views(1, 256, 256, 1, 16, torch.float32, device, self_attention=True)
    with backend("triton"):
        attention(q, k, v)
        assert calls == []
        with _dispatch.triton_only():
            torch.testing.assert_close(attention(q, k, v), attention_ref(q, k, v), atol=1e-5, rtol=1e-5)
        attention(q, k, v)
    assert calls == [q.shape]


def test_reference_backend(device):
    q, k, v = _fused_views(1, 30, 90, 2, 72, torch.float32, device)
    with backend("reference"):
        _check_against_torch(q, k, v)
        _, lse = A._attention_op(q, k, v, 72 ** -0.5)
    with backend("triton"):
        _, lse_triton = A._attention_op(q, k, v, 72 ** -0.5)
    torch.testing.assert_close(lse_triton, lse, atol=1e-5, rtol=1e-5)


def test_torch_compile_fullgraph(device):
    q, k, v = _fused_views(1, 36, 100, 2, 72, torch.float32, device)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))

    def f(q, k, v):
        return attention(q, k, v).reshape(1, 36, -1).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    loss_ref = f(q, k, v)
    grads_ref = torch.autograd.grad(loss_ref, (q, k, v))
    torch.testing.assert_close(loss, loss_ref)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r)


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------

def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize("args, match", [
    ((_t(2, 8, 2, 64)[0], _t(2, 8, 2, 64), _t(2, 8, 2, 64)), "q must have rank 4"),
    ((_t(2, 8, 2, 64), _t(2, 8, 2, 64).long(), _t(2, 8, 2, 64)), "k must have dtype"),
    ((_t(2, 8, 2, 64), _t(2, 8, 2, 64), _t(2, 8, 2, 64, dtype=torch.float16)), "v has dtype"),
    ((_t(2, 8, 2, 64), _t(3, 8, 2, 64), _t(3, 8, 2, 64)), "k has batch 3"),
    ((_t(2, 8, 2, 64), _t(2, 8, 4, 64), _t(2, 8, 4, 64)), "k has 4 heads"),
    ((_t(2, 8, 2, 64), _t(2, 8, 2, 72), _t(2, 8, 2, 72)), "k has head dim 72"),
    ((_t(2, 8, 2, 64), _t(2, 8, 2, 64), _t(2, 9, 2, 64)), "k .* and v .* must have the same shape"),
    ((_t(2, 8, 2, 60), _t(2, 8, 2, 60), _t(2, 8, 2, 60)), r"head dim \(q.shape\[3\]\) must be a multiple of 8"),
    ((_t(2, 8, 2, 136), _t(2, 8, 2, 136), _t(2, 8, 2, 136)), r"head dim \(q.shape\[3\]\)"),
    ((_t(2, 0, 2, 64), _t(2, 8, 2, 64), _t(2, 8, 2, 64)), "at least one token"),
    (("q", _t(2, 8, 2, 64), _t(2, 8, 2, 64)), "q must be a torch.Tensor"),
])
def test_attention_validation(args, match):
    with pytest.raises(ValueError, match=match):
        attention(*args)


def test_attention_refuses_bf16_on_the_interpreter():
    """The interpreter's bf16 dots return wrong numbers without an error: a bf16 call that would take a Triton path
    there is refused, naming q; SDPA-routed shapes and the reference backend still run."""
    if not interpreting():
        pytest.skip("runs the Triton interpreter (TRITON_INTERPRET=1)")
    q = _t(2, 8, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="q is bfloat16, which the Triton interpreter"):
        attention(q, q, q)
    with backend("reference"):
        assert attention(q, q, q).dtype == torch.bfloat16


def test_attention_validation_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device type")
    q = _t(2, 8, 2, 64)
    with pytest.raises(ValueError, match="k is on"):
        attention(q, q.cuda(), q.cuda())


def test_attention_validation_grid(device):
    """More batch x heads than a CUDA grid axis holds is refused before any launch, naming q."""
    q = torch.zeros(1, 1, A.MAX_GRID_YZ + 1, 8, device=device)
    with pytest.raises(ValueError, match="q: batch x heads"):
        attention(q, q, q)
    with pytest.raises(ValueError, match=r"head dim \(q.shape\[3\]\)"):
        A.attention_fwd(torch.zeros(1, 4, 2, 60, device=device), torch.zeros(1, 4, 2, 60, device=device),
                        torch.zeros(1, 4, 2, 60, device=device), 1.0)


# ----------------------------------------------------------------------------------------------------------------
# GPU: bf16 and fp16 on every path and head dim from fused-projection views, then FlexDiT's full size
# (DiT-XL/2 at 512²: B = 32 with guidance, 16 heads, D = 72)
# ----------------------------------------------------------------------------------------------------------------

GPU_DTYPES = [torch.bfloat16, torch.float16]
# Every head dim: 64x1024 split-K, 1024x64, 64x64 and 1x64 few-keys, 130x130 the flash loop. D = 72 also: 36x1024 and
# 1x1024 split-K (FlexDiT's G = 6 grid; one query), 1024x100 few-keys (G = 10), 1024x1024 the flash loop (kept on
# Triton). Each (dtype, D) compiles its own kernels, so the extra shapes stay at FlexDiT's D.
GPU_SHAPES = [(64, 1024), (1024, 64), (130, 130), (64, 64), (1, 64)]
GPU_SHAPES_D72 = [(36, 1024), (1, 1024), (1024, 100), (1024, 1024)]
GPU_CASES = [(lq, lk, d) for d in HEAD_DIMS for lq, lk in GPU_SHAPES] + [(lq, lk, 72) for lq, lk in GPU_SHAPES_D72]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("lq, lk, d", GPU_CASES)
def test_attention_gpu(lq, lk, d, dtype):
    """Forward and every gradient within the error bound, B = 2, H = 4, q/k/v views of a fused projection."""
    device = torch.device("cuda")
    q, k, v = _fused_views(2, lq, lk, 4, d, dtype, device, self_attention=(lq == lk))
    _check_against_torch(q, k, v)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("lq, lk", [(64, 1024), (1024, 64)])
def test_attention_full_size_forward_gpu(lq, lk, dtype):
    device = torch.device("cuda")
    q, k, v = _fused_views(32, lq, lk, 16, 72, dtype, device)
    out = attention(q, k, v)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    exact = attention_ref(q.double(), k.double(), v.double())
    bound = 2.0 * _err(attention_ref(q, k, v), exact) + FLOOR[dtype] * max(1.0, exact.abs().max().item())
    assert _err(out, exact) <= bound, f"error {_err(out, exact):.3g} > bound {bound:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("bh", [(1, 16), (32, 16)])
def test_split_k_small_batch_gpu(bh):
    device = torch.device("cuda")
    q, k, v = _fused_views(bh[0], 64, 1024, bh[1], 72, torch.bfloat16, device)
    cfg = A._fwd_config(64, 1024, bh[0] * bh[1], device)
    assert cfg.path == "split_k" and (cfg.n_splits > 1 or bh[0] * bh[1] >= A.resident_programs(device, 3))
    _check_against_torch(q, k, v)


@pytest.mark.gpu
def test_dense_sdpa_route_gpu(monkeypatch):
    monkeypatch.setattr(A, "ROUTES", DEFAULT_ROUTES)
    q, k, v = _fused_views(32, 1024, 1024, 16, 72, torch.bfloat16, torch.device("cuda"), self_attention=True)
    _check_against_torch(q, k, v)


@pytest.mark.gpu
def test_compiled_occupancy_gpu():
    """On a GPU the split counts come from the compiled kernels: every attention kernel variant fits (> 0 CTAs/SM)."""
    from flexdit_kernels._launch import _OCCUPANCY
    q, k, v = _fused_views(2, 64, 1024, 4, 72, torch.bfloat16, torch.device("cuda"))
    _check_against_torch(q, k, v)
    q, k, v = _fused_views(2, 1024, 100, 4, 72, torch.bfloat16, torch.device("cuda"))
    _check_against_torch(q, k, v)
    assert _OCCUPANCY and all(n > 0 for n in _OCCUPANCY.values())
