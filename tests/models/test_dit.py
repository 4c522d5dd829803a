import math

import numpy as np
import pytest
import torch

import flexdit
import flexdit_kernels as fk
from flexdit.layers import TimestepEmbedder, get_2d_sincos_pos_embed

from .helpers import toy_config, toy_dit, toy_inputs


def published_dit_xl2_shapes(input_size=32):
    """Key → shape of the published DiT-XL/2 checkpoints, written out from the DiT paper's architecture."""
    c, p, depth, n = 1152, 2, 28, (input_size // 2) ** 2
    shapes = {
        "pos_embed": (1, n, c),
        "x_embedder.proj.weight": (c, 4, p, p), "x_embedder.proj.bias": (c,),
        "t_embedder.mlp.0.weight": (c, 256), "t_embedder.mlp.0.bias": (c,),
        "t_embedder.mlp.2.weight": (c, c), "t_embedder.mlp.2.bias": (c,),
        "y_embedder.embedding_table.weight": (1001, c),
        "final_layer.linear.weight": (p * p * 8, c), "final_layer.linear.bias": (p * p * 8,),
        "final_layer.adaLN_modulation.1.weight": (2 * c, c), "final_layer.adaLN_modulation.1.bias": (2 * c,),
    }
    for i in range(depth):
        for name, shape in {"attn.qkv": (3 * c, c), "attn.proj": (c, c), "mlp.fc1": (4 * c, c),
                            "mlp.fc2": (c, 4 * c), "adaLN_modulation.1": (6 * c, c)}.items():
            shapes[f"blocks.{i}.{name}.weight"] = shape
            shapes[f"blocks.{i}.{name}.bias"] = (shape[0],)
    return shapes


@pytest.mark.parametrize("input_size", [32, 64])
def test_dit_xl2_state_dict_matches_published_layout(input_size):
    with torch.device("meta"):
        model = flexdit.create_model("DiT-XL/2", input_size=input_size)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == published_dit_xl2_shapes(input_size)
    if input_size == 32:  # DiT-XL/2 at 256x256: the published 675M parameters (pos_embed included)
        assert sum(v.numel() for v in model.state_dict().values()) == 675_129_632


def test_pos_embed_layout():
    c, h, w = 16, 3, 5
    table = get_2d_sincos_pos_embed(c, (h, w))
    i, j = 2, 4
    omega = 1.0 / 10000 ** (np.arange(c // 4) / (c / 4))
    expected = np.concatenate([np.sin(j * omega), np.cos(j * omega), np.sin(i * omega), np.cos(i * omega)])
    np.testing.assert_allclose(table[i * w + j], expected, rtol=1e-6, atol=1e-7)


def test_embedded_tokens_are_row_major():
    """The residual stream enters the first layer contiguous (the kernels would read a transposed one with strided
    loads), though the patch embedding's tokens are a transposed view of the convolution's output."""
    for model in (toy_dit(), flexdit.from_dit(toy_dit(), toy_config())):
        tokens, _ = model.embed(*toy_inputs())
        assert model.x_embedder(toy_inputs()[0]).stride(1) == 1 and tokens.is_contiguous()


def test_timestep_embedding_is_cos_then_sin():
    t = torch.tensor([0.0, 7.0])
    emb = TimestepEmbedder.timestep_embedding(t, 256)
    freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    torch.testing.assert_close(emb[1, :128], torch.cos(7.0 * freqs))
    torch.testing.assert_close(emb[1, 128:], torch.sin(7.0 * freqs))


def test_dit_forward_shape_and_cfg():
    """The published DiT's output and guidance conventions (the "reference" backend: the published computation)."""
    model = toy_dit()
    x, t, y = toy_inputs(batch=4)
    with fk.backend("reference"):
        out = model(x, t, y)
        assert out.shape == (4, 8, 16, 16)
        # Guidance scale 1 returns the conditional eps; DiT's batch convention: [cond half; null half], same noise.
        x = torch.cat([x[:2], x[:2]])
        y = torch.cat([y[:2], torch.full((2,), 10)])
        guided = model.forward_with_cfg(x, t, y, cfg_scale=1.0)
        torch.testing.assert_close(guided[:2], model(x, t, y)[:2], rtol=1e-5, atol=1e-6)
        guided4 = model.forward_with_cfg(x, t, y, cfg_scale=4.0, cfg_channels=4)
        cond, uncond = model(x, t, y)[:, :4].chunk(2)
        torch.testing.assert_close(guided4[:2, :4], uncond + 4.0 * (cond - uncond), rtol=1e-5, atol=1e-5)


def test_registry_and_bad_names():
    assert len(flexdit.DiT_models) == 12 and "DiT-XL/8" in flexdit.DiT_models
    with pytest.raises(ValueError, match="unknown model name 'DiT-XXL/2'"):
        flexdit.create_model("DiT-XXL/2")
    with pytest.raises(ValueError, match="unknown model name"):
        flexdit.flexdit_config("FlexDiT-M/2")


def test_dit_bad_input():
    model = toy_dit()
    x, t, y = toy_inputs()
    with pytest.raises(ValueError, match="x must be"):
        model(x[0], t, y)
    with pytest.raises(ValueError, match="spatial size"):
        model(torch.randn(2, 4, 8, 8), t, y)
    with pytest.raises(ValueError, match="t .* must be"):
        model(x, t[:1], y)
    with pytest.raises(ValueError, match="patch_size"):
        flexdit.DiT(input_size=15, patch_size=2, hidden_size=32, depth=1, num_heads=2)


def test_null_label_only_where_the_model_has_one():
    """Label num_classes is guidance's null label: accepted with label dropout, refused (ValueError naming y) without
    it, where the embedding table has no row for it."""
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([5])
    with_null = flexdit.create_model("DiT-S/2", input_size=8, num_classes=4)
    with fk.backend("reference"):
        assert with_null(x, t, torch.tensor([4])).shape == (1, 8, 8, 8)
    no_null = flexdit.create_model("DiT-S/2", input_size=8, num_classes=4, class_dropout_prob=0.0)
    with pytest.raises(ValueError, match=r"y: label 4 is outside \[0, 4\)$"):
        no_null(x, t, torch.tensor([4]))
