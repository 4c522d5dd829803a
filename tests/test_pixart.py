"""Native PixArt-α / FlexPixArt, conversion from diffusers, and the patched PixArtAlphaPipeline, at toy size."""
import pytest
import torch

import flexdit_kernels as fk
from flexdit.convert import flex_pixart_from_pixart
from flexdit.diffusers_convert import pixart_config_from_diffusers, pixart_from_diffusers
from flexdit.patch import apply_patch
from flexdit.pixart import FlexPixArt, PixArtBlock, create_pixart

from .models.helpers import TOY, randomize_, toy_inputs
from .test_patch import TOY_PLAN, caption, check_pipeline_patch_round_trip, tiny_pixart, tiny_vae

diffusers = pytest.importorskip("diffusers")

TOY_PLAN_KW = dict(num_pool=1, num_modules=1, group=(1, 2, 1, 1), num_top=0, grid=3)


def host_out(host, x, t, text, mask):
    return host(x, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=t,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample


def test_diffusers_pixart_converts_to_native_dense():
    host = tiny_pixart()
    dense = pixart_from_diffusers(host).eval()
    x, t, _ = toy_inputs()
    text, mask = caption()
    with torch.no_grad():
        ref = host_out(host, x, t, text, mask)
        torch.testing.assert_close(dense(x, t, text, mask), ref)
        assert not torch.allclose(dense(x, t, text), ref)  # the caption mask is honoured
    torch.testing.assert_close(dense.pos_embed, host.pos_embed.pos_embed)
    assert dense.embed(x, t, text, mask)[0].is_contiguous()             # the residual stream starts row-major


def test_patched_diffusers_pixart_equals_native_flexpixart():
    host = tiny_pixart()
    flex = flex_pixart_from_pixart(pixart_from_diffusers(host), pixart_config_from_diffusers(host, **TOY_PLAN_KW))
    flex.eval()
    assert flex.kinds == ["pool", "gen", "sparse", "sparse", "recover", "dense"]
    x, t, _ = toy_inputs()
    text, mask = caption()
    with fk.backend("reference"), torch.no_grad():
        ref = host_out(host, x, t, text, mask)
        apply_patch(host, TOY_PLAN)
        out = host_out(host, x, t, text, mask)
        torch.testing.assert_close(out, flex(x, t, text, mask))
        torch.testing.assert_close(host_out(host, x, t, text, mask), flex(x, t, text, mask, grid=3))
        assert (out - ref).abs().max() > 1e-3  # FlexDiT is not the dense model before fine-tuning
        assert flex(x, t, text, mask, grid=8).shape == ref.shape


def test_native_flexpixart_mapping_and_degenerate_plan():
    host = tiny_pixart()
    dense = pixart_from_diffusers(host).eval()
    all_dense = pixart_config_from_diffusers(host, num_pool=0, num_modules=0, num_top=TOY["depth"])
    flex = flex_pixart_from_pixart(dense, all_dense).eval()
    x, t, _ = toy_inputs()
    text, mask = caption()
    with fk.backend("reference"), torch.no_grad():
        torch.testing.assert_close(flex(x, t, text, mask), dense(x, t, text, mask), rtol=0, atol=0)
    flex = flex_pixart_from_pixart(dense, pixart_config_from_diffusers(host, **TOY_PLAN_KW))
    c, src = 32, dense.state_dict()
    assert torch.equal(flex.blocks[0].attn.v.weight, src["blocks.0.attn.qkv.weight"][2 * c:])
    assert torch.equal(flex.blocks[1].attn.kv.bias, src["blocks.1.attn.qkv.bias"][c:])
    assert torch.equal(flex.blocks[4].cross_attn.kv_linear.weight, src["blocks.4.cross_attn.kv_linear.weight"])
    rec = flex.blocks[4]
    assert isinstance(rec, PixArtBlock) and rec.kind == "recover" and not rec.fuse_sparse.weight.any()
    assert torch.equal(rec.fuse_dense.weight, torch.eye(c))
    assert flex.blocks[0].attn.v.weight.data_ptr() != dense.blocks[0].attn.qkv.weight.data_ptr()


def test_registry_and_refusals():
    with torch.device("meta"):
        dense, flex = create_pixart("PixArt-XL/2"), create_pixart("FlexPixArt-XL/2")
    assert 600e6 < sum(p.numel() for p in dense.parameters()) < 620e6  # PixArt-α XL/2: about 611 M
    assert isinstance(flex, FlexPixArt) and len(flex.blocks) == 28 and flex.config.plan.grid == (8, 8)
    assert flex.kinds[:3] == ["pool", "pool", "gen"] and flex.kinds.count("sparse") == 12
    assert "plan: P=2, K=4 x (g, s, r, d)=(1, 3, 1, 1), T=2, grid=8" in repr(flex)
    with pytest.raises(ValueError, match="unknown model name"):
        create_pixart("PixArt-Huge/2")
    with pytest.raises(ValueError, match="plan for depth 6"):
        create_pixart("FlexPixArt-XL/2", depth=6, hidden_size=32, num_heads=2, caption_channels=8)
    big = diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, num_layers=1,
                                             cross_attention_dim=32, caption_channels=8, sample_size=16,
                                             use_additional_conditions=True)
    with pytest.raises(ValueError, match="resolution/aspect-ratio"):
        pixart_config_from_diffusers(big)


def tiny_tokenizer():
    """A word-level tokenizer built offline (no T5 SentencePiece file is needed for the pipeline's calls)."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate("a red cat on the mat".split())}}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")


def tiny_text_encoder():
    """A one-layer T5 encoder of width 24 over `tiny_tokenizer`'s vocabulary (skips the test without transformers)."""
    transformers = pytest.importorskip("transformers")
    t5 = transformers.T5Config(vocab_size=16, d_model=24, d_kv=8, num_heads=2, num_layers=1, d_ff=32)
    return transformers.T5EncoderModel(t5).eval()


def test_pixart_pipeline_runs_patched_and_unpatched():
    pipe = diffusers.PixArtAlphaPipeline(tokenizer=tiny_tokenizer(), text_encoder=tiny_text_encoder(),
                                         vae=tiny_vae(), transformer=tiny_pixart(),
                                         scheduler=diffusers.DDIMScheduler())

    def sample():
        return pipe("a red cat", num_inference_steps=2, guidance_scale=2.0, output_type="np", max_sequence_length=8,
                    use_resolution_binning=False, clean_caption=False,
                    generator=torch.Generator().manual_seed(0)).images

    check_pipeline_patch_round_trip(pipe, sample, (1, 32, 32, 3))


def test_flexpixart_kernel_path_equals_references(device):
    host = tiny_pixart()
    flex = flex_pixart_from_pixart(pixart_from_diffusers(host), pixart_config_from_diffusers(host, **TOY_PLAN_KW))
    randomize_(flex, std=0.1, seed=4)  # fusion weights too
    flex = flex.to(device).eval()
    x, t, _ = (v[:1].to(device) for v in toy_inputs())
    text, mask = (v[:1].to(device) for v in caption())
    with torch.no_grad():
        with fk.backend("reference"):
            ref = flex(x, t, text, mask)
        out = flex(x, t, text, mask)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
