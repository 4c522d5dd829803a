"""bench/fixtures.py: dense/patched pairs of diffusers models at bench sizes (tiny configurations here)."""
import pytest
import torch

import flexdit_kernels as fk
from bench.fixtures import build_patched_pair
from flexdit import Plan, is_patched

pytest.importorskip("diffusers")


def test_build_patched_pair_tiny():
    tiny = dict(num_layers=12, num_attention_heads=2, attention_head_dim=16)
    for target, extra in (("diffusers-dit", {}), ("pixart-alpha", dict(cross_attention_dim=32, caption_channels=24))):
        dense, patched, make_inputs = build_patched_pair(target, 64, "cpu", torch.float32,
                                                         config_overrides={**tiny, **extra})
        assert is_patched(patched) and not is_patched(dense)
        assert patched.transformer_blocks.plan == Plan(1, 2, (1, 2, 1, 1), 1, 4)
        inputs = make_inputs(2)
        with fk.backend("reference"), torch.no_grad():
            a, b = dense(**inputs)[0], patched(**inputs)[0]
        assert a.shape == b.shape == (2, 8, 8, 8) and torch.isfinite(b).all()
    with pytest.raises(ValueError, match="target must be"):
        build_patched_pair("unet", 64)


def test_diffusers_configs_read_off_the_size_table():
    """The bench's real-size configs are `flexdit.sizes.ModelArgs` rows, field for field the published ones."""
    from bench.fixtures import _diffusers_config
    xl = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28)
    assert _diffusers_config("diffusers-dit", 32, 16) == dict(xl, sample_size=32)
    for latent in (64, 128):
        assert _diffusers_config("pixart-alpha", latent, 16) == dict(
            xl, sample_size=latent, cross_attention_dim=1152, caption_channels=4096,
            use_additional_conditions=latent == 128)
    assert _diffusers_config("latte", 64, 8) == dict(
        xl, sample_size=64, cross_attention_dim=1152, caption_channels=4096, patch_size=2,
        norm_type="ada_norm_single", activation_fn="gelu-approximate", attention_bias=True, num_embeds_ada_norm=1000,
        norm_elementwise_affine=False, norm_eps=1e-6, video_length=8)
