"""MAC accounting (flexdit.flops) against the paper's counts, on the meta device (no memory, no compute)."""
import functools
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from flexdit import FlexDiT, create_model, flexdit_config
from flexdit.flops import count_macs

pytest.importorskip("fvcore")

C = 1152


def _meta_inputs(latent, batch=1):
    with torch.device("meta"):
        return (torch.empty(batch, 4, latent, latent), torch.zeros(batch), torch.zeros(batch, dtype=torch.long))


def _dense_macs(latent):
    with torch.device("meta"):
        model = create_model("DiT-XL/2", input_size=latent)
    return count_macs(model, *_meta_inputs(latent))


@functools.lru_cache(maxsize=None)
def _flex_macs(latent, grid, name="DiT-XL/2"):
    with torch.device("meta"):
        model = FlexDiT(flexdit_config(name, input_size=latent, grid=grid))
    return count_macs(model, *_meta_inputs(latent), grid=grid)


@pytest.mark.parametrize("image, paper_gmacs", [(256, 118.6), (512, 524.6)])
def test_dit_xl2_matches_paper(image, paper_gmacs):
    result = _dense_macs(image // 8)
    assert result.total / 1e9 == pytest.approx(paper_gmacs, rel=5e-3)
    # Per block 12·C²·N (linears) + 2·N²·C (attention), 28 blocks; the rest is < 0.2%.
    n = (image // 16) ** 2
    assert result.total == pytest.approx(28 * (12 * C * C * n + 2 * n * n * C), rel=3e-3)
    assert not result.unsupported
    assert result.by_module[""] == result.total
    assert "blocks.0.attn" in result.by_module and "scaled_dot_product_attention" in result.by_operator


def test_flexdit_xl2_512_grid8_matches_reference():
    """≈ 223 G with W1 before the upsampling and the Poolingformer's V/proj on the token mean."""
    result = _flex_macs(64, 8)
    assert result.total / 1e9 == pytest.approx(223.0, rel=1e-2)
    assert not result.unsupported
    for op in ("attention", "token_pool", "token_mean", "upsample_add"):
        assert result.by_operator.get(op, 0) > 0, op
    # The recovery layer's W1 runs on M = 64 tokens, the Poolingformer's V/proj on one vector per image.
    assert result.by_module["blocks.6.fuse_sparse"] == 64 * C * C
    assert result.by_module["blocks.0.attn.v"] == C * C


def test_flexdit_macs_fall_with_the_grid():
    """Every grid side from the full token grid down to 1x1 (DiT-S/2 at 256², same layer kinds as XL)."""
    totals = [_flex_macs(32, g, "DiT-S/2").total for g in (16, 8, 4, 1)]
    assert all(a > b for a, b in zip(totals, totals[1:])), totals
    with torch.device("meta"):
        dense = create_model("DiT-S/2", input_size=32)
    assert totals[0] < count_macs(dense, *_meta_inputs(32)).total
    assert _flex_macs(64, 8).total < _flex_macs(64, 10).total < _dense_macs(64).total


def test_meta_count_equals_cpu_count():
    """The meta-device patch-embedding workaround counts what a real CPU trace counts."""
    torch.manual_seed(0)
    kwargs = dict(input_size=16, depth=6, hidden_size=64, num_heads=2, num_pool=1, num_modules=1,
                  group=(1, 2, 1, 1), num_top=0)
    cpu_model = FlexDiT(flexdit_config("DiT-S/4", **kwargs, grid=2))
    x, t, y = torch.randn(2, 4, 16, 16), torch.zeros(2), torch.zeros(2, dtype=torch.long)
    import flexdit_kernels as fk
    with fk.backend("reference"):
        on_cpu = count_macs(cpu_model, x, t, y, grid=2)
    with torch.device("meta"):
        meta_model = FlexDiT(flexdit_config("DiT-S/4", **kwargs, grid=2))
    on_meta = count_macs(meta_model, x.to("meta"), t.to("meta"), y.to("meta"), grid=2)
    assert on_cpu.total == on_meta.total
    assert on_cpu.by_module["x_embedder.proj"] == on_meta.by_module["x_embedder.proj"] == 2 * 16 * 64 * 64


def test_sdpa_handle_formula():
    class Attn(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 16)
    assert count_macs(Attn(), q, k, v).total == 2 * 3 * 5 * 7 * (8 + 16)


def test_missing_fvcore_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "fvcore", None)
    monkeypatch.setitem(sys.modules, "fvcore.nn", None)
    with pytest.raises(ImportError, match="pip install fvcore"):
        count_macs(nn.Linear(2, 2), torch.randn(1, 2))
