"""Tiny text-to-image pipelines (PixArt-α, SD3, FLUX.1) with random weights, saved with save_pretrained into a folder:
word-level tokenizers built offline, one-layer T5 and CLIP text encoders, the toy transformers of the patch tests."""
import pytest
import torch

from .test_mmdit import tiny_flux, tiny_sd3
from .test_patch import tiny_pixart, tiny_vae
from .test_pixart import tiny_text_encoder, tiny_tokenizer

WORDS = "a red cat on the mat"
T5_WIDTH = 24             # the toy transformers' caption / joint-attention width
POOLED = 12               # their pooled-projection width
CLIP_TOKENS = 8           # the CLIP tokenizers' model_max_length (77 in the real pipelines)


def clip_tokenizer():
    tk = tiny_tokenizer()
    tk.model_max_length = CLIP_TOKENS
    return tk


def clip_encoder(hidden, projection=None):
    """A one-layer CLIP text encoder (with a projection of width `projection`, as SD3's two are)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPTextConfig(vocab_size=16, hidden_size=hidden, intermediate_size=2 * hidden,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         max_position_embeddings=CLIP_TOKENS, projection_dim=projection or hidden)
    torch.manual_seed(0)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(config).eval()


def tiny_pipeline(kind):
    """A diffusers PixArtAlphaPipeline, StableDiffusion3Pipeline or FluxPipeline of toy size."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    if kind == "pixart":
        return diffusers.PixArtAlphaPipeline(tokenizer=tiny_tokenizer(), text_encoder=tiny_text_encoder(),
                                             vae=tiny_vae(), transformer=tiny_pixart(),
                                             scheduler=diffusers.DPMSolverMultistepScheduler())
    vae = tiny_vae()
    vae.register_to_config(shift_factor=0.1, scaling_factor=0.5)
    flow = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    if kind == "sd3":
        return diffusers.StableDiffusion3Pipeline(
            transformer=tiny_sd3(), scheduler=flow, vae=vae, text_encoder=clip_encoder(8, POOLED // 2),
            tokenizer=clip_tokenizer(), text_encoder_2=clip_encoder(8, POOLED // 2), tokenizer_2=clip_tokenizer(),
            text_encoder_3=tiny_text_encoder(), tokenizer_3=tiny_tokenizer())
    if kind == "flux":
        return diffusers.FluxPipeline(scheduler=flow, vae=vae, text_encoder=clip_encoder(POOLED),
                                      tokenizer=clip_tokenizer(), text_encoder_2=tiny_text_encoder(),
                                      tokenizer_2=tiny_tokenizer(), transformer=tiny_flux())
    raise ValueError(kind)


def save_tiny_pipeline(kind, folder):
    """`tiny_pipeline(kind)` saved with save_pretrained into `folder`; returns the folder."""
    tiny_pipeline(kind).save_pretrained(folder)
    return folder
