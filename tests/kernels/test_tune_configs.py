"""Config spaces and attention routing through the tuner, on the CPU: injected timers (and, for attention, injected
launchers), the Triton interpreter for the pooling kernels."""
import inspect

import pytest
import torch

import flexdit_kernels as fk
from flexdit_kernels import _adaln, _attention, _dispatch, _launch, _token_mean, _token_pool, _tune, _upsample_add

from .grid_cases import patch_sm_count
from .guard import check_gaps, guard_allocations, guarded


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """FLEXDIT_TUNE=on, the "auto" backend and an empty cache in tmp_path (also used by test_tune_gpu.py)."""
    monkeypatch.setenv("FLEXDIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FLEXDIT_TUNE", "on")
    monkeypatch.delenv("FLEXDIT_TUNE_FILE", raising=False)
    monkeypatch.setattr(_tune, "_caches", {})
    monkeypatch.setattr(_tune, "_warned", set())
    monkeypatch.setattr(_tune, "_memo", {})
    with _dispatch.backend("auto"):
        yield tmp_path / "cache"


def _recording(monkeypatch, module, name, launched, wrong=None, unfit=None):
    """Replace module.name (a launcher taking `config`) by one that records its configuration's variant name in
    `launched`, returns a wrong result for the variant `wrong` and raises Unfit for `unfit`."""
    real = getattr(module, name)
    signature = inspect.signature(real)

    def launcher(*args, **kwargs):
        variant = _tune.variant_name(signature.bind(*args, **kwargs).arguments.get("config"))
        launched.append(variant)
        if variant == unfit:
            raise _tune.Unfit("needs more shared memory than a block may have")
        out = real(*args, **kwargs)
        return out + 1 if variant == wrong else out

    monkeypatch.setattr(module, name, launcher)


def _timer(launched, times):
    """A timer that runs fn and reports the time `times` gives the variant it launched (the PyTorch path when it
    launched none)."""
    def timer(fn):
        n = len(launched)
        fn()
        return times[launched[-1] if len(launched) > n else _tune.REFERENCE]
    return timer


def test_every_variant_is_checked_and_the_fastest_is_the_one_launched(monkeypatch):
    launched = []
    _recording(monkeypatch, _token_pool, "_token_pool_fwd", launched)
    times = {"reference": 1.0, "triton": 0.8, "triton:num_warps=2": 0.9, "triton:num_warps=8": 0.5}
    monkeypatch.setattr(_tune, "timer_override", _timer(launched, times))
    x = torch.randn(2, 36, 16)
    out = fk.token_pool(x, hw=(6, 6), grid=3)
    assert set(launched) == set(times) - {"reference"}                  # every variant checked (and timed)
    assert launched[-1] == "triton:num_warps=8"                           # the winner is what the call launched
    assert fk.last_route("token_pool") == "triton:num_warps=8 (tune=on)"
    torch.testing.assert_close(out, fk.token_pool_ref(x, (6, 6), 3))
    row, = fk.tune_decisions("cpu")
    assert row["winner"] == "triton:num_warps=8" and row["winner_ms"] == 0.5 and row["pytorch_ms"] == 1.0
    assert set(row["candidates"].values()) == {"passed"}
    launched.clear()
    fk.token_pool(x, hw=(6, 6), grid=3)                                   # warm: no check, the winner again
    assert launched == ["triton:num_warps=8"]


def test_a_wrong_variant_is_rejected_and_an_unfit_one_pruned(monkeypatch):
    launched = []
    _recording(monkeypatch, _token_pool, "_token_pool_fwd", launched, wrong="triton:num_warps=8",
               unfit="triton:num_warps=2")
    times = {"reference": 1.0, "triton": 0.8, "triton:num_warps=2": 0.1, "triton:num_warps=8": 0.1}
    monkeypatch.setattr(_tune, "timer_override", _timer(launched, times))
    with pytest.warns(RuntimeWarning, match="token_pool kernel variant triton:num_warps=8 failed") as record:
        fk.token_pool(torch.randn(2, 36, 16), hw=(6, 6), grid=3)
    assert not any("num_warps=2" in str(w.message) for w in record)      # pruned quietly: it never ran
    assert launched[-1] == "triton"
    row, = fk.tune_decisions("cpu")
    assert row["candidates"]["triton:num_warps=8"].startswith("failed: max error")
    assert row["candidates"]["triton:num_warps=2"].startswith("pruned: needs more shared memory")
    assert set(row["times_ms"]) == {"reference", "triton"}


def test_the_pytorch_path_wins_where_faster(monkeypatch):
    launched = []
    _recording(monkeypatch, _upsample_add, "_upsample_add_fwd", launched)
    times = {"reference": 1.0, "triton": 0.99, "triton:num_warps=2": 1.5, "triton:num_warps=8": 2.0,
             "triton:max_run=1": 0.98}
    monkeypatch.setattr(_tune, "timer_override", _timer(launched, times))
    fk.upsample_add(torch.randn(2, 9, 16), torch.randn(2, 36, 16), hw=(6, 6), grid=3)
    assert fk.last_route("upsample_add") == "reference (tune=on)"      # 2% faster is inside the 3% margin
    assert len(launched) == 8                         # four variants checked and timed; the call itself ran none
    launched.clear()
    fk.upsample_add(torch.randn(2, 9, 16), torch.randn(2, 36, 16), hw=(6, 6), grid=3)
    assert launched == []


def test_without_a_timer_the_heuristic_runs_unchecked(monkeypatch):
    launched = []
    _recording(monkeypatch, _token_mean, "_token_mean_fwd", launched)
    fk.token_mean(torch.randn(2, 8, 16))
    assert launched == ["triton"] and fk.tune_decisions("cpu") == []
    assert fk.last_route("token_mean") == "triton (tune=on)"


def test_alternatives_and_variant_names():
    assert _tune.alternatives({"num_warps": 4}, num_warps=(2, 4, 8), max_run=(1,)) == [
        {"num_warps": 2}, {"num_warps": 8}, {"max_run": 1}]
    assert _tune.variant_name(None) == _tune.variant_name({}) == "triton"
    assert _tune.variant_name({"BLOCK_M": 32, "num_warps": 8}) == "triton:BLOCK_M=32,num_warps=8"


def _adaln_inputs():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 12, 24, generator=g), torch.randn(2, 12, 24, generator=g)
    gate, shift, scale = (torch.randn(2, 24, generator=g) for _ in range(3))
    return x, y, gate, shift, scale


def test_every_configuration_of_the_spaces_is_right():
    """Each launcher run with each configuration of its op's space gives the heuristic's numbers."""
    x, y, gate, shift, scale = _adaln_inputs()
    cases = [
        (_token_pool.CONFIGS["token_pool"], (x,), lambda c: _token_pool._token_pool_fwd(x, 3, 4, 2, 2, c)),
        (_token_pool.CONFIGS["token_pool_backward"], (y[:, :4],), lambda c: _token_pool._token_pool_bwd(
            y[:, :4], 3, 4, 2, 2, c)),
        (_upsample_add.CONFIGS["upsample_add"], (y[:, :4], x), lambda c: _upsample_add._upsample_add_fwd(
            y[:, :4], x, 3, 4, 2, 2, c)),
        (_upsample_add.CONFIGS["upsample_add_backward"], (x,), lambda c: _upsample_add._upsample_add_bwd(
            x, 3, 4, 2, 2, c)),
        (_token_mean.CONFIGS["token_mean"], (x,), lambda c: _token_mean._token_mean_fwd(x, 1e-6, c)),
        (_token_mean.CONFIGS["token_mean_backward"], (gate, x), lambda c: _token_mean._token_mean_bwd(
            gate, x, 1e-6, c)),
        (_adaln.CONFIGS["gated_residual_layernorm_modulate"], (x, y, gate, shift, scale),
         lambda c: _adaln.gated_residual_layernorm_modulate_fwd(x, y, gate, shift, scale, config=c)),
        (_adaln.CONFIGS["gated_residual_layernorm_modulate_backward"], (x, y, x, y, gate, scale),
         lambda c: _adaln.gated_residual_layernorm_modulate_bwd(x, y, x, y, gate, scale, config=c)),
        (_adaln.CONFIGS["gated_residual_backward"], (x, y, gate),
         lambda c: _adaln.gated_residual_bwd(x, y, gate, config=c)),
        (_adaln.CONFIGS["silu"], (torch.randn(2, 1100),), lambda c: _adaln.silu_fwd(torch.ones(2, 1100), config=c)),
    ]
    for space, tensors, launch in cases:
        configs = space(*tensors)
        assert configs, space
        expected = launch(None)
        for config in configs:
            torch.testing.assert_close(launch(config), expected, msg=lambda m, c=config: f"{c}: {m}")


# ----------------------------------------------------------------------------------------------------------------
# The `waves` variants: runs and token splits that make WAVES waves of programs
# ----------------------------------------------------------------------------------------------------------------

def test_wave_split_reaches_the_waves_with_the_longest_splits():
    for n_programs in (1, 7, 32, 288):
        for n_blocks in (1, 5, 50, 128, 512):
            for wave in (1, 264, 528):
                per = _launch.wave_split(n_programs, n_blocks, wave, 4)
                programs = n_programs * _launch.cdiv(n_blocks, per)
                assert 1 <= per <= n_blocks
                assert programs >= 4 * wave or per == 1                  # the waves, or every block its own program
                assert per == n_blocks or n_programs * _launch.cdiv(n_blocks, per + 1) < 4 * wave   # the longest


def test_the_waves_variants_at_the_model_shapes():
    """Off the GPU the launch sizes are the H100's (132 SMs) with the sm_90 compile's registers: token_mean's
    forward at B = 32, N = 256 runs single tiles of 4 tokens (2,048 programs, 3.9 waves at 4 CTAs per SM) instead of
    runs of 16; the LayerNorm-modulate backward at B = 32, N = 1024 takes 35 token splits (4.2 waves at 2 CTAs per
    SM) instead of 8."""
    assert {"waves": _launch.WAVES} in _token_mean.CONFIGS["token_mean"](torch.empty(2, 8, 16))
    x = torch.empty(32, 256, 1152, dtype=torch.bfloat16, device="meta")
    assert _token_mean._fwd_run(x, 4, 2048, 8, 0) == 16
    assert _token_mean._fwd_run(x, 4, 2048, 8, _launch.WAVES) == 4
    t, y, gate, _, scale = _adaln_inputs()
    for op, args in (("layernorm_modulate_backward", (y, t, scale)), ("gated_residual_backward", (t, y, gate)),
                     ("gated_residual_layernorm_modulate_backward", (t, y, t, y, gate, scale))):
        assert {"waves": _launch.WAVES} in _adaln.CONFIGS[op](*args)
    wave = _adaln._resident(("bwd", False, True, 2), 8, x.device, None)
    assert wave == 264
    assert _launch.wave_split(32, 512, wave, _launch.WAVES) == 15                      # 35 splits of 30 tokens


WAVES_DTYPES = [(torch.float32, 1e-5), (torch.float16, 3e-3)]


@pytest.mark.parametrize("dtype, atol", WAVES_DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("b, n, c, sms, waves", [(2, 37, 200, None, 4), (1, 1, 24, None, 4), (1, 37, 1100, 1, 1)],
                         ids=["runs-of-one-tile", "N1", "runs-of-three-tiles"])
def test_token_mean_waves_variant(monkeypatch, b, n, c, sms, waves, dtype, atol):
    """token_mean's forward with the `waves` configuration, inputs in NaN guard buffers and the workspace in a
    sentinel one, against the reference: runs of one 16-token tile (the H100's 4 waves need more programs than the
    shape has tiles), one token, and (one SM, 1 wave) runs of three 4-token tiles, the last one a single token."""
    if sms is not None:
        patch_sm_count(monkeypatch, sms)
    x = guarded((torch.randn(b, n, c) * 2 + 1).to(dtype))
    with guard_allocations() as allocs:
        out = _token_mean._token_mean_fwd(x, 1e-6, {"waves": waves})
    allocs.check()
    check_gaps(x, "x")
    torch.testing.assert_close(out, fk.token_mean_ref(x), atol=atol, rtol=atol)


def _backward_launch(op, b, n, c, dtype):
    """(guarded inputs, launch(config), reference()) of an adaLN backward op: fp32 residual stream and gradient,
    `dtype` branch, LayerNorm-modulate gradient and modulation (chunks of one guarded (B, 6C) projection)."""
    x32 = guarded(torch.randn(b, n, c) * 2 + 1)
    y, du = (guarded(torch.randn(b, n, c).to(dtype)) for _ in range(2))
    dr = guarded(torch.randn(b, n, c))
    ada = guarded(torch.randn(b, 6 * c).to(dtype))
    gate, scale = ada[:, 2 * c:3 * c], ada[:, 4 * c:5 * c]
    guards = (x32, y, du, dr, ada)
    if op == "layernorm_modulate_backward":
        args = (du, x32, scale)
        return guards, lambda cfg: _adaln.layernorm_modulate_bwd(*args, config=cfg), \
            lambda: _adaln.layernorm_modulate_backward_ref(*args)
    if op == "gated_residual_backward":
        args = (dr, y, gate)
        return guards, lambda cfg: _adaln.gated_residual_bwd(*args, config=cfg), \
            lambda: _adaln.gated_residual_backward_ref(*args)
    args = (dr, du, x32, y, gate, scale)
    return guards, lambda cfg: _adaln.gated_residual_layernorm_modulate_bwd(*args, config=cfg), \
        lambda: _adaln.gated_residual_layernorm_modulate_backward_ref(*args)


@pytest.mark.parametrize("dtype, atol", WAVES_DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("b, n, c, wave", [(2, 23, 40, 2), (1, 1, 24, None), (2, 37, 72, None)],
                         ids=["splits-of-3-tiles", "L1", "splits-of-one-tile"])
@pytest.mark.parametrize("op", ["layernorm_modulate_backward", "gated_residual_backward",
                                "gated_residual_layernorm_modulate_backward"])
def test_adaln_backward_waves_variant(monkeypatch, op, b, n, c, wave, dtype, atol):
    """The adaLN backward ops with the `waves` configuration, inputs in NaN guard buffers and the partial sums in
    sentinel ones, against the references: token splits of one BLOCK_N (the H100's 4 waves need more programs than
    these shapes have tiles), one token, and (two resident programs, 2-token tiles) 4 splits of 6, 6, 6 and 5
    tokens, 3 steps each but the last."""
    if wave is not None:
        monkeypatch.setattr(_adaln, "_BWD_TILE", 128)
        monkeypatch.setattr(_adaln, "_resident", lambda *args: wave)
    guards, launch, reference = _backward_launch(op, b, n, c, dtype)
    with guard_allocations() as allocs:
        got = launch({"waves": _launch.WAVES})
    allocs.check()
    for i, t in enumerate(guards):
        check_gaps(t, f"input {i}")
    for g, w in zip(got, reference()):
        torch.testing.assert_close(g, w, atol=atol * max(n, 1), rtol=atol)


# ----------------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture
def fake_attention(monkeypatch):
    """attention_fwd / attention_bwd replaced by the references, recording the configurations launched (the
    interpreter's attention kernels are too slow to run every variant here; tests/kernels/test_attention.py runs
    them)."""
    launched = []

    def fwd(q, k, v, scale, config=None):
        launched.append(("fwd", _tune.variant_name(config)))
        return _attention.attention_ref(q, k, v, scale), _attention.attention_lse_ref(q, k, scale)

    def bwd(grad_out, q, k, v, out, lse, scale, config=None):
        launched.append(("bwd", _tune.variant_name(config)))
        dq, dk, dv = _attention.attention_backward_ref(grad_out, q, k, v, out, scale)
        return (dq + 1 if config == {"num_warps": 4} else dq), dk, dv          # one wrong backward variant

    monkeypatch.setattr(_attention, "attention_fwd", fwd)
    monkeypatch.setattr(_attention, "attention_bwd", bwd)
    return launched


def _attention_timer(launched, times):
    def timer(fn):
        n = len(launched)
        fn()
        return times.get(launched[-1][1] if len(launched) > n else _tune.REFERENCE, 1.0)
    return timer


def test_attention_routes_to_the_fastest_checked_path_and_its_backward(monkeypatch, fake_attention):
    times = {"reference": 1.0, "triton": 0.9, "triton:path=flash": 0.5, "triton:BLOCK_M=32": 0.95}
    monkeypatch.setattr(_tune, "timer_override", _attention_timer(fake_attention, times))
    q, k, v = (torch.randn(1, n, 2, 16, dtype=torch.float16, requires_grad=True) for n in (40, 20, 20))
    with pytest.warns(RuntimeWarning, match="attention_backward kernel variant triton:num_warps=4 failed"):
        fk.attention(q, k, v).sum().backward()
    fwd = {name for kind, name in fake_attention if kind == "fwd"}
    assert fwd == {"triton", "triton:path=split_k", "triton:path=flash", "triton:BLOCK_M=32", "triton:num_warps=8"}
    assert fake_attention[-1][0] == "bwd"
    assert [e for e in fake_attention if e[0] == "fwd"][-1] == ("fwd", "triton:path=flash")   # what the call ran
    assert fk.last_route("attention") == "triton:path=flash (tune=on)"
    rows = {r["op"]: r for r in fk.tune_decisions("cpu")}
    assert rows["attention_backward"]["candidates"]["triton:num_warps=4"].startswith("failed")
    assert rows["attention_backward"]["winner"] != "triton:num_warps=4"
    torch.testing.assert_close(q.grad, torch.autograd.grad(
        _attention.attention_ref(q, k, v).sum(), q)[0], atol=2e-3, rtol=2e-3)


def test_attention_takes_sdpa_where_it_is_faster_and_the_rule_without_a_timer(monkeypatch, fake_attention):
    q, k, v = (torch.randn(1, n, 2, 16, dtype=torch.float16) for n in (40, 20, 20))
    fk.attention(q, k, v)
    assert fake_attention == [("fwd", "triton")] and fk.last_route("attention") == "triton (tune=on)"   # the rule
    fake_attention.clear()
    monkeypatch.setattr(_tune, "timer_override", _attention_timer(fake_attention, {"reference": 0.5}))
    fk.attention(q, k, v)
    assert fk.last_route("attention") == "reference (tune=on)"
    assert len(fake_attention) == 10                  # five variants checked and timed; the call itself ran none
    with _dispatch.triton_only():
        fk.attention(q, k, v)
    assert fk.last_route("attention") == "triton (backend)"
