"""PixArt-α through diffusers at toy size: the state-dict conversion to the original layout, the patched
PixArtAlphaPipeline, and the patched layers through the kernels."""
import pytest
import torch

import flexdit_kernels as fk
from flexdit.diffusers_convert import pixart_state_dict_from_diffusers
from flexdit.patch import apply_patch

from .models.helpers import randomize_, toy_inputs
from .test_patch import TOY_PLAN, caption, check_pipeline_patch_round_trip, tiny_pixart, tiny_vae

diffusers = pytest.importorskip("diffusers")


def test_diffusers_pixart_state_dict_in_the_original_layout():
    host = tiny_pixart()
    src = host.state_dict()
    sd = pixart_state_dict_from_diffusers(host)
    assert sum(v.numel() for v in sd.values()) == sum(v.numel() for v in src.values())   # every weight, once
    c = 32
    for part in ("weight", "bias"):
        qkv = sd[f"blocks.1.attn.qkv.{part}"]
        for i, n in enumerate("qkv"):
            assert torch.equal(qkv[i * c:(i + 1) * c], src[f"transformer_blocks.1.attn1.to_{n}.{part}"])
        assert torch.equal(sd[f"blocks.1.cross_attn.kv_linear.{part}"][c:],
                           src[f"transformer_blocks.1.attn2.to_v.{part}"])
    assert torch.equal(sd["t_block.1.weight"], src["adaln_single.linear.weight"])
    assert torch.equal(sd["final_layer.scale_shift_table"], src["scale_shift_table"])
    assert sd["blocks.0.mlp.fc1.weight"].data_ptr() != src["transformer_blocks.0.ff.net.0.proj.weight"].data_ptr()


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


def test_patched_pixart_kernel_path_equals_references(device):
    host = apply_patch(tiny_pixart(), TOY_PLAN)
    randomize_(host, std=0.1, seed=4)  # fusion weights too
    host = host.to(device)
    x, t, _ = (v[:1].to(device) for v in toy_inputs())
    text, mask = (v[:1].to(device) for v in caption())

    def run():
        return host(x, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=t,
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample

    with torch.no_grad():
        with fk.backend("reference"):
            ref = run()
        out = run()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
