"""FlexDiT on video: apply_patch / remove_patch on a tiny diffusers Latte, folded-frame pooling, video grids, MACs."""
import copy

import pytest
import torch
import torch.nn as nn

import flexdit
import flexdit_kernels as fk
from flexdit import FlexPatch, Plan, apply_patch, is_patched, remove_patch
from flexdit.flops import count_macs, count_macs_dispatch
from flexdit.patch import TemporalFlexLayer

from .kernels.helpers import OpLog
from .models.helpers import randomize_, toy_config, toy_dit, toy_inputs

diffusers = pytest.importorskip("diffusers")

DEPTH = 6  # spatial/temporal pairs
TOY_PLAN = Plan(num_pool=1, num_modules=1, group=(1, 2, 1, 1), num_top=0, grid=3)
KINDS = ["pool", "gen", "sparse", "sparse", "recover", "dense"]
TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=DEPTH,
            cross_attention_dim=32, caption_channels=16, sample_size=16, patch_size=2, norm_type="ada_norm_single",
            activation_fn="gelu-approximate", attention_bias=True, num_embeds_ada_norm=1000,
            norm_elementwise_affine=False, norm_eps=1e-6)


def tiny_latte(frames=5, **overrides):
    """Latte-1's block layout at toy size; its temporal position table (and so its clip length) has `frames`."""
    m = diffusers.LatteTransformer3DModel(**{**TINY, "video_length": frames, **overrides})
    return randomize_(m, std=0.1).eval()


def clip(batch=2, frames=5, seed=1, t=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, frames, 16, 16, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g) if t is None else torch.full((batch,), t)
    text = torch.randn(batch, 7, 16, generator=g)
    return x, t, text


def run(model, x, t, text, **kw):
    return model(x, timestep=t, encoder_hidden_states=text, return_dict=False, **kw)[0]


# ----------------------------------------------------------------------------------------------------------------
# Patch, unpatch, shapes, frames
# ----------------------------------------------------------------------------------------------------------------

def test_remove_patch_restores_bit_identical_and_clean():
    host = tiny_latte()
    spatial, temporal = host.transformer_blocks, host.temporal_transformer_blocks
    before = {k: v.clone() for k, v in host.state_dict().items()}
    x, t, text = clip()
    with fk.backend("reference"):
        with torch.no_grad():
            ref = run(host, x, t, text)
        apply_patch(host, TOY_PLAN)
        assert is_patched(host) and isinstance(host.transformer_blocks, FlexPatch)
        assert [b.kind for b in host.transformer_blocks] == KINDS
        assert all(isinstance(b, TemporalFlexLayer) for b in host.temporal_transformer_blocks)
        # Fine-tune the patched model a step: the original blocks (spatial and temporal) must not see it.
        opt = torch.optim.SGD(host.parameters(), lr=0.1)
        run(host, x, t, text).square().mean().backward()
        opt.step()
        remove_patch(host)
        with torch.no_grad():
            out = run(host, x, t, text)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert host.transformer_blocks is spatial and host.temporal_transformer_blocks is temporal
    assert not is_patched(host) and "forward" not in host.__dict__
    after = host.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert "TemporalFlexLayer" not in str(host) and "FlexDiT patch" not in str(host)


def test_degenerate_plan_equals_unpatched_and_patching_twice_equals_once():
    host = tiny_latte()
    x, t, text = clip()
    with fk.backend("reference"), torch.no_grad():
        ref = run(host, x, t, text)
        apply_patch(host, Plan.dense(DEPTH))
        torch.testing.assert_close(run(host, x, t, text), ref, rtol=0, atol=0)
        once = run(apply_patch(host, TOY_PLAN), x, t, text)
        twice = run(apply_patch(host, TOY_PLAN), x, t, text)
        twin = copy.deepcopy(host)  # the copy's layers share the copy's clip state
        torch.testing.assert_close(run(twin, x, t, text), once, rtol=0, atol=0)
        remove_patch(twin)
        torch.testing.assert_close(run(twin, x, t, text), ref, rtol=0, atol=0)
    torch.testing.assert_close(twice, once, rtol=0, atol=0)
    assert is_patched(host) and "FlexDiT patch of a latte: P=1" in str(host)
    assert (once - ref).abs().max() > 1e-3  # FlexDiT is not the dense model before fine-tuning


@pytest.mark.parametrize("frames", [1, 3, 5])
def test_output_shapes_for_any_frame_count(frames):
    host = apply_patch(tiny_latte(frames=max(frames, 2)), TOY_PLAN)
    x, t, text = clip(batch=2, frames=frames)
    with fk.backend("reference"), torch.no_grad():
        out = run(host, x, t, text)
        assert out.shape == (2, 8, frames, 16, 16) and torch.isfinite(out).all()
        # without temporal attention the host takes any frame count (its position table is not used)
        out = run(host, torch.cat([x, x], 2), t, text, enable_temporal_attentions=False)
        assert out.shape == (2, 8, 2 * frames, 16, 16) and torch.isfinite(out).all()


def test_temporal_layers_attend_over_the_tokens_their_spatial_layer_left():
    """(B·M, T, C) at the sparse locations after gen/sparse layers, (B·N, T, C) elsewhere; each sample's timestep."""
    host = apply_patch(tiny_latte(), TOY_PLAN)
    x, t, text = clip(batch=2, frames=5)
    seen = []

    def recorder(kind):
        def record(block, args, kwargs):
            seen.append((kind, tuple(args[0].shape), kwargs["timestep"]))
        return record

    hooks = [layer.block.register_forward_pre_hook(recorder(layer.kind), with_kwargs=True)
             for layer in host.temporal_transformer_blocks]
    with fk.backend("reference"), torch.no_grad():
        run(host, x, t, text)
        emb, _ = host.adaln_single(t, {"resolution": None, "aspect_ratio": None}, batch_size=2,
                                   hidden_dtype=torch.float32)
    for h in hooks:
        h.remove()
    assert [kind for kind, _, _ in seen] == KINDS
    for kind, shape, timestep in seen:
        tokens = 9 if kind in ("gen", "sparse") else 64
        assert shape == (2 * tokens, 5, 32)
        torch.testing.assert_close(timestep, emb.repeat_interleave(tokens, 0), rtol=0, atol=0)


def test_samples_of_a_batch_are_independent():
    """Different timesteps per sample: the sparse temporal rows belong to their own sample."""
    host = apply_patch(tiny_latte(), TOY_PLAN)
    x, _, text = clip(batch=2, frames=5)
    t = torch.tensor([10, 900])
    with fk.backend("reference"), torch.no_grad():
        both = run(host, x, t, text)
        for i in range(2):
            torch.testing.assert_close(both[i:i + 1], run(host, x[i:i + 1], t[i:i + 1], text[i:i + 1]),
                                       rtol=1e-5, atol=1e-5)


def test_grid_changes_per_call():
    class Stages:  # duck-typed DensitySchedule: more tokens late in sampling (small t)
        def grid(self, t):
            g = torch.where(torch.as_tensor(t) < 500, 4, 2)
            return int(g) if g.dim() == 0 else g

    scheduled = apply_patch(tiny_latte(), TOY_PLAN, schedule=Stages())
    fixed = {g: apply_patch(tiny_latte(), TOY_PLAN, schedule=g) for g in (2, 4)}
    x, _, text = clip(batch=2, frames=5)
    with fk.backend("reference"), torch.no_grad():
        for step, grid in ((900, 2), (100, 4)):
            t = torch.full((2,), step)
            torch.testing.assert_close(run(scheduled, x, t, text), run(fixed[grid], x, t, text), rtol=0, atol=0)
        with pytest.raises(ValueError, match="different grids"):
            run(scheduled, x, torch.tensor([100, 900]), text)
        a = run(apply_patch(scheduled, TOY_PLAN, schedule=(2, 4)), x, torch.full((2,), 5), text)
        assert a.shape == x.shape[:1] + (8,) + x.shape[2:]
        assert not torch.allclose(a, run(fixed[2], x, torch.full((2,), 5), text))


def test_pipeline_runs_patched_and_unpatched():
    from .test_patch import check_pipeline_patch_round_trip, tiny_vae
    from .test_pixart import tiny_text_encoder, tiny_tokenizer

    pipe = diffusers.LattePipeline(tokenizer=tiny_tokenizer(), text_encoder=tiny_text_encoder(),
                                   vae=tiny_vae(), transformer=tiny_latte(frames=4, caption_channels=24),
                                   scheduler=diffusers.DDIMScheduler())

    def sample():
        return pipe("a red cat", num_inference_steps=2, guidance_scale=2.0, video_length=4, height=32, width=32,
                    output_type="pt", clean_caption=False, generator=torch.Generator().manual_seed(0)).frames

    check_pipeline_patch_round_trip(pipe, sample, (1, 4, 3, 32, 32))


def test_kernel_path_equals_reference(device):
    host = tiny_latte(frames=3).to(device)
    apply_patch(host, TOY_PLAN)
    randomize_(host, std=0.1, seed=4)  # fusion weights too
    x, t, text = (v.to(device) for v in clip(batch=1, frames=3))
    with torch.no_grad():
        with fk.backend("reference"):
            ref = run(host, x, t, text)
        out = run(host, x, t, text)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------------------------

def test_bad_inputs_are_refused():
    from .test_patch import check_plan_refusals
    host = tiny_latte()
    check_plan_refusals(host)
    assert not is_patched(host)

    host.temporal_transformer_blocks[1] = nn.Identity()
    with pytest.raises(ValueError, match=r"unsupported temporal block types \['Identity'\]"):
        apply_patch(host, TOY_PLAN)
    del host.temporal_transformer_blocks[1]
    with pytest.raises(ValueError, match="one temporal block per spatial block"):
        apply_patch(host, TOY_PLAN)
    host = tiny_latte()
    host.transformer_blocks[2] = nn.Identity()
    with pytest.raises(ValueError, match=r"unsupported block types \['Identity'\]"):
        apply_patch(host, TOY_PLAN)
    with pytest.raises(ValueError, match="norm_type 'layer_norm'"):
        apply_patch(tiny_latte(norm_type="layer_norm"), TOY_PLAN)

    host = apply_patch(tiny_latte(), TOY_PLAN)
    x, t, text = clip()
    with pytest.raises(ValueError, match=r"must be a clip \(B, C, T, H, W\)"):
        run(host, x[:, :, 0], t, text)
    with pytest.raises(ValueError, match="needs `hidden_states` and `timestep`"):
        host(x, encoder_hidden_states=text)
    host.enable_gradient_checkpointing()   # honoured by the patched layers (tests/test_checkpointing.py)
    assert run(host, x, t, text).shape == x.shape[:1] + (8,) + x.shape[2:] and host.gradient_checkpointing
    with pytest.raises(ValueError, match="runs only inside its model's forward"):
        host.temporal_transformer_blocks[1](torch.zeros(18, 5, 32), timestep=torch.zeros(128, 192))


# ----------------------------------------------------------------------------------------------------------------
# Kernels with the frames folded into the batch; the video grid
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_pooling_with_frames_folded_into_the_batch(backend, monkeypatch):
    """A (B, T, N, C) clip's .flatten(0, 1) view, and a frame-strided one, pool and upsample exactly as frame by
    frame, read in place: the Triton launchers receive the views themselves (no copy on the way)."""
    from flexdit_kernels import _token_pool, _upsample_add

    launched = []

    def spy(module, name):
        launcher = getattr(module, name)

        def record(*args):
            launched.append([(a.data_ptr(), a.stride()) for a in args if isinstance(a, torch.Tensor)])
            return launcher(*args)
        monkeypatch.setattr(module, name, record)

    spy(_token_pool, "_token_pool_fwd")
    spy(_upsample_add, "_upsample_add_fwd")
    b, frames, hw, grid, c = 2, 3, (4, 6), (2, 3), 16
    n, m = hw[0] * hw[1], grid[0] * grid[1]
    for step in (1, 2):  # every frame of a clip, then every other frame (frame stride 2·(N+1)·(C+2))
        buf = torch.full((b, step * frames, n + 1, c + 2), float("nan"))  # gaps after each token and channel row
        buf[:, :, :n, :c] = torch.randn(b, step * frames, n, c)
        x = buf[:, ::step, :n, :c]                                                # (B, T, N, C)
        s = torch.randn(b, step * frames, m, c)[:, ::step]                         # (B, T, M, C)
        folded, folded_s = x.flatten(0, 1), s.flatten(0, 1)
        assert folded.data_ptr() == x.data_ptr() and folded._base is not None    # views, not copies
        assert folded_s.data_ptr() == s.data_ptr() and folded_s._base is not None
        launched.clear()
        with fk.backend(backend), torch.no_grad(), OpLog() as log:
            pooled = fk.token_pool(folded, hw, grid)
            up = fk.upsample_add(folded_s, folded, hw, grid)
        if backend == "auto":  # the Triton kernels (the interpreter on a CPU)
            assert log.ops == ["flexdit.token_pool.default", "flexdit.upsample_add.default"]
            view = (folded.data_ptr(), folded.stride())
            assert launched == [[view], [(folded_s.data_ptr(), folded_s.stride()), view]]
        else:
            assert launched == []
        assert pooled.shape == (b * frames, m, c) and up.shape == (b * frames, n, c)
        for i in range(b):
            for f in range(frames):
                torch.testing.assert_close(pooled[i * frames + f], fk.token_pool_ref(x[i, f:f + 1], hw, grid)[0])
                want = fk.upsample_add_ref(s[i, f:f + 1], x[i, f:f + 1], hw, grid)[0]
                torch.testing.assert_close(up[i * frames + f], want)


# ----------------------------------------------------------------------------------------------------------------
# MACs
# ----------------------------------------------------------------------------------------------------------------

def test_dispatch_mac_count_matches_fvcore_and_counts_attention():
    dit = toy_dit()
    flex = flexdit.from_dit(dit, toy_config()).eval()
    x, t, y = toy_inputs()
    with fk.backend("reference"):
        for model, kw in ((dit, {}), (flex, {"grid": 3})):
            fv = count_macs(model, x, t, y, **kw)
            # fvcore also counts the unpatchify einsum (a permutation) as B·N·p²·C_out MACs
            assert count_macs_dispatch(model, x, t, y, **kw).total == fv.total - fv.by_operator["einsum"] > 0
    host = tiny_latte()
    x, t, text = clip(batch=1)
    with fk.backend("reference"):
        on_cpu = count_macs_dispatch(host, x, timestep=t, encoder_hidden_states=text)
    on_meta = count_macs_dispatch(host.to("meta"), x.to("meta"), timestep=t.to("meta"),
                                  encoder_hidden_states=text.to("meta"))
    assert on_cpu.total == on_meta.total
    # attention: spatial 6 x frames 5 x heads 2 x 64² x (16 + 16), temporal 6 x 64 tokens x 2 x 5² x 32
    attention = 6 * 5 * 2 * 64 * 64 * 32 + 6 * 64 * 2 * 25 * 32
    assert on_cpu.by_operator["aten._scaled_dot_product_flash_attention_for_cpu"] >= attention
    assert on_cpu.by_module["temporal_transformer_blocks.0"] > 0 and on_cpu.by_module[""] == on_cpu.total


def test_latte_fixture_and_clip_macs():
    from bench.fixtures import build_patched_pair, patched_pair_macs

    tiny = {k: TINY[k] for k in ("num_attention_heads", "attention_head_dim", "cross_attention_dim",
                                 "caption_channels")}
    tiny["num_layers"] = 12
    dense, patched, make_inputs = build_patched_pair("latte", 128, "cpu", config_overrides=tiny, frames=4)
    assert patched.transformer_blocks.plan == Plan(1, 2, (1, 2, 1, 1), 1, 8)
    inputs = make_inputs(2)
    assert inputs["hidden_states"].shape == (2, 4, 4, 16, 16) and inputs["encoder_attention_mask"].shape == (8, 1, 120)
    with fk.backend("reference"), torch.no_grad():
        a, b = dense(**inputs)[0], patched(**inputs)[0]
        c = dense(**make_inputs(2, mask=False))[0]
    assert a.shape == b.shape == (2, 8, 4, 16, 16) and torch.isfinite(b).all()
    assert not torch.allclose(a, c)  # the caption mask is honoured
    macs = patched_pair_macs("latte", 128, config_overrides=dict(tiny, num_layers=12), frames=4,
                             plan={"grid": 4})
    assert 0 < macs["flexdit"] < 0.8 * macs["dense"]


@pytest.mark.gpu
def test_real_size_clip_kernels_match_reference_on_gpu():
    """Latte-XL/2, one 16-frame 512² clip in bf16: the patched model through the kernels equals its reference path."""
    from bench.fixtures import build_patched_pair

    _, patched, make_inputs = build_patched_pair("latte", 512, "cuda", torch.bfloat16)
    inputs = make_inputs(1)
    with torch.no_grad():
        with fk.backend("reference"):
            ref = patched(**inputs)[0].float()
        out = patched(**inputs)[0].float()
    assert out.shape == (1, 8, 16, 64, 64) and torch.isfinite(out).all()
    assert (out - ref).abs().max() <= 5e-2 * ref.abs().max()
