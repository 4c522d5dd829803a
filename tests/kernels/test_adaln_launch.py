"""Launch sizes of the adaLN family at DiT-XL/2 shapes, without launching anything: the backward reductions fill
whole waves, the forward leaves at least 4 waves at B = 32, and a wave comes from the compiled kernel's registers on a
GPU (the sm_90 figures elsewhere)."""
import types

import pytest
import torch

from flexdit_kernels import _adaln as mod
from flexdit_kernels._launch import TARGETS, cdiv, ctas_per_sm, whole_wave_splits

C = 1152


class _Grid:
    """Stands in for a JITFunction: records (grid, constexprs) of each launch instead of running it."""

    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((grid, kwargs))


@pytest.fixture
def launches(monkeypatch):
    log = {"fwd": [], "bwd": [], "sum": []}
    monkeypatch.setattr(mod, "_adaln_fwd_kernel", _Grid(log["fwd"]))
    monkeypatch.setattr(mod, "_adaln_bwd_kernel", _Grid(log["bwd"]))
    monkeypatch.setattr(mod, "_column_sum_kernel", _Grid(log["sum"]))
    monkeypatch.setattr(mod, "_PER_SM", {})
    return log


def _wave(direction, has_residual, has_norm, kwargs):
    """Resident programs of a recorded launch on an H100 from the sm_90 register table."""
    regs = mod._SM90_REGS[(direction, has_residual, has_norm, kwargs["BLOCK_N"])]
    return ctas_per_sm(regs, kwargs["num_warps"], 1024, TARGETS[90])[0] * TARGETS[90].sm_count


def _run_all(b, n):
    e = torch.empty
    x, y, ada = e(b, n, C), e(b, n, C, dtype=torch.bfloat16), e(b, 6 * C, dtype=torch.bfloat16)
    gate, shift, scale = (ada[:, i * C:(i + 1) * C] for i in (2, 3, 4))
    mod.layernorm_modulate_fwd(x, shift, scale, 1e-6, torch.bfloat16)
    mod.gated_residual_fwd(x, y, gate)
    mod.gated_residual_layernorm_modulate_fwd(x, y, gate, shift, scale, 1e-6, torch.bfloat16)
    mod.layernorm_modulate_bwd(y, x, scale, 1e-6)
    mod.gated_residual_bwd(x, y, gate)
    mod.gated_residual_layernorm_modulate_bwd(x, y, x, y, gate, scale, 1e-6)


KINDS = [(False, True), (True, False), (True, True)]     # layernorm_modulate, gated_residual, the fused op


@pytest.mark.parametrize("n", [1024, 256, 100, 64])
@pytest.mark.parametrize("b", [32, 1])
def test_backward_fills_whole_waves(launches, b, n):
    """Each backward grid takes the time (waves x token blocks per program) within 10% of the best split, every
    split non-empty; at the dense shape (B = 32, L = 1024) its programs fill at least 90% of their last wave."""
    _run_all(b, n)
    for (has_residual, has_norm), (grid, kw) in zip(KINDS, launches["bwd"]):
        assert (kw["HAS_RESIDUAL"], kw["HAS_NORM"]) == (has_residual, has_norm)
        wave = _wave("bwd", has_residual, has_norm, kw)
        n_blocks = cdiv(n, kw["BLOCK_N"])
        assert grid[0] == b and (grid[1] - 1) * cdiv(n_blocks, grid[1]) < n_blocks       # no empty split

        def cost(splits):
            return cdiv(b * grid[2] * splits, wave) * cdiv(n_blocks, splits)
        assert cost(grid[1]) <= 1.1 * min(cost(s) for s in range(1, n_blocks + 1)), (grid, kw, wave)
        if (b, n) == (32, 1024):
            programs = grid[0] * grid[1] * grid[2]
            assert programs >= 0.9 * cdiv(programs, wave) * wave, (grid, kw, wave)


@pytest.mark.parametrize("n", [1024, 256])
def test_forward_leaves_four_waves_at_batch_32(launches, n):
    _run_all(32, n)
    for (has_residual, has_norm), (grid, kw) in zip(KINDS, launches["fwd"]):
        assert grid[0] * grid[1] >= 4 * _wave("fwd", has_residual, has_norm, kw), (grid, kw)


def test_whole_wave_splits_cost():
    """The split count is within 10% of the best time (waves x blocks per program) and the fewest such."""
    for programs, blocks, wave in [(32, 512, 396), (32, 1024, 264), (288, 32, 528), (1, 512, 396), (9, 3, 528)]:
        def cost(s):
            return cdiv(programs * s, wave) * cdiv(blocks, s)
        s = whole_wave_splits(programs, blocks, wave)
        best = min(cost(t) for t in range(1, blocks + 1))
        assert 1 <= s <= blocks and cost(s) <= 1.1 * best
        assert all(cost(t) > 1.1 * best for t in range(1, s))


def test_wave_from_the_compiled_kernel_on_a_gpu(monkeypatch):
    """On a CUDA device the wave comes from the compiled variant's registers and shared memory (here 255 registers
    at 8 warps: one CTA per SM), cached per variant and device."""
    monkeypatch.setattr(mod, "_PER_SM", {})
    monkeypatch.setattr(mod, "device_limits", lambda device: TARGETS[90])
    compiled = types.SimpleNamespace(n_regs=255, metadata=types.SimpleNamespace(shared=1024),
                                     _init_handles=lambda: None)
    calls = []

    def compile_variant():
        calls.append(1)
        return compiled
    device = torch.device("cuda", 0)
    assert mod._resident(("bwd", False, True, 1), 8, device, compile_variant) == 132
    assert mod._resident(("bwd", False, True, 1), 8, device, compile_variant) == 132
    assert len(calls) == 1


@pytest.mark.gpu
def test_gpu_waves_from_compiled_kernels(monkeypatch):
    """On a GPU each launched variant's CTAs per SM are read once from its compiled kernel, and the results hold."""
    monkeypatch.setattr(mod, "_PER_SM", {})
    x = torch.randn(32, 1024, C, device="cuda")
    ada = torch.randn(32, 6 * C, device="cuda", dtype=torch.bfloat16)
    shift, scale = ada[:, :C], ada[:, C:2 * C]
    grad_out = torch.randn(32, 1024, C, device="cuda", dtype=torch.bfloat16)
    out = mod.layernorm_modulate_fwd(x, shift, scale, 1e-6, torch.bfloat16)
    got = mod.layernorm_modulate_bwd(grad_out, x, scale)
    assert mod._PER_SM and all(v >= 1 for v in mod._PER_SM.values())
    assert {k[0][0] for k in mod._PER_SM} == {"fwd", "bwd"}
    torch.testing.assert_close(out.float(), mod.layernorm_modulate_ref(x, shift, scale, out_dtype=torch.float32),
                               atol=2e-2, rtol=1e-2)
    want = mod.layernorm_modulate_backward_ref(grad_out.float(), x, scale.float())
    torch.testing.assert_close(got[0], want[0], atol=2e-2, rtol=1e-2)
    for g, w in zip(got[1:], want[1:]):      # sums over 1024 tokens, rounded once to bf16
        torch.testing.assert_close(g.float(), w, atol=0.5, rtol=1e-2)
