"""apply_patch / remove_patch on the MMDiT hosts (diffusers' SD3 / SD3.5 and FLUX.1) at toy size."""
import copy

import pytest
import torch

import flexdit_kernels as fk
from flexdit import Plan, apply_patch, is_patched, remove_patch
from flexdit.mmdit import (MMDiTFlexLayer, MMDiTRouteState, flux_image_ids, image_token_grid, mmdit_macs,
                           sparse_positions)
from flexdit.plan import Slot

from .models.helpers import randomize_
from .test_patch import check_pipeline_patch_round_trip, tiny_vae

diffusers = pytest.importorskip("diffusers")

PLAN = Plan(num_pool=1, num_modules=1, group=(1, 1, 1, 1), num_top=1, grid=3)   # 6 layers
TEXT, POOLED = 24, 12


def tiny_flux(double=2, single=4):
    m = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=double, num_single_layers=single,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT,
                                         pooled_projection_dim=POOLED, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    return randomize_(m, std=0.1).eval()


def tiny_sd3(layers=6, sample_size=16):
    m = diffusers.SD3Transformer2DModel(sample_size=sample_size, patch_size=2, in_channels=4, num_layers=layers,
                                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT,
                                        caption_projection_dim=32, pooled_projection_dim=POOLED, out_channels=4,
                                        pos_embed_max_size=16, dual_attention_layers=(0, 1, 2), qk_norm="rms_norm")
    return randomize_(m, std=0.1).eval()


def inputs(target, hw=(8, 8), batch=2, t=0.7, text=5, seed=1):
    """One forward's keyword arguments: t is σ (FLUX receives σ, SD3 σ·1000)."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(encoder_hidden_states=torch.randn(batch, text, TEXT, generator=g),
              pooled_projections=torch.randn(batch, POOLED, generator=g), return_dict=False)
    if target == "sd3":
        return dict(kw, hidden_states=torch.randn(batch, 4, 2 * hw[0], 2 * hw[1], generator=g),
                    timestep=torch.full((batch,), 1000 * t))
    return dict(kw, hidden_states=torch.randn(batch, hw[0] * hw[1], 16, generator=g), img_ids=flux_image_ids(*hw),
                txt_ids=torch.zeros(text, 3), timestep=torch.full((batch,), t), guidance=torch.full((batch,), 3.5))


HOSTS = {"flux": tiny_flux, "sd3": tiny_sd3}


def run(model, kw):
    with torch.no_grad():
        return model(**kw)[0]


# ----------------------------------------------------------------------------------------------------------------
# Whole models
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target, blocks", [("flux", (2, 4)), ("flux", (4, 2)), ("sd3", None)])
def test_patch_changes_output_and_remove_patch_restores_it(target, blocks):
    """FLUX (2, 4): gen in a double block, sparse / recovery / dense in single blocks; (4, 2): the module in
    double blocks. SD3: dual-attention pool / gen / sparse layers and the context-pre-only last block."""
    host = tiny_flux(*blocks) if blocks else tiny_sd3()
    before = {k: v.clone() for k, v in host.state_dict().items()}
    kw = inputs(target)
    with fk.backend("reference"):
        ref = run(host, kw)
        apply_patch(host, PLAN)
        assert is_patched(host)
        out = run(host, kw)
        assert out.shape == ref.shape and torch.isfinite(out).all() and (out - ref).abs().max() > 1e-3
        # Fine-tune the patched model a step: the original blocks must not see it.
        opt = torch.optim.SGD(host.parameters(), lr=0.1)
        host(**kw)[0].square().mean().backward()
        opt.step()
        remove_patch(host)
        torch.testing.assert_close(run(host, kw), ref, rtol=0, atol=0)
    assert not is_patched(host) and "forward" not in host.__dict__
    after = host.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("target", sorted(HOSTS))
def test_dense_plan_equals_host_and_patching_twice_equals_once(target):
    host = HOSTS[target]()
    kw = inputs(target)
    with fk.backend("reference"):
        ref = run(host, kw)
        torch.testing.assert_close(run(apply_patch(host, Plan.dense(6)), kw), ref, rtol=0, atol=0)
        once = run(apply_patch(host, PLAN), kw)
        assert run(apply_patch(copy.deepcopy(host), PLAN), kw).equal(once)
        assert run(apply_patch(host, PLAN), kw).equal(once)


@pytest.mark.parametrize("target", sorted(HOSTS))
def test_token_grid_and_sparse_grid_change_per_call(target):
    host = apply_patch(HOSTS[target](), PLAN, schedule=flexdit_schedule())
    with fk.backend("reference"):
        for hw, t in (((8, 8), 0.9), ((6, 8), 0.9), ((8, 8), 0.1), ((4, 6), 0.1)):
            out = run(host, inputs(target, hw, t=t))
            assert out.shape == run(remove_patch(copy.deepcopy(host)), inputs(target, hw, t=t)).shape
            assert torch.isfinite(out).all()
        # σ = 1 (the first flow-matching step: t = 1000) falls in the schedule's last stage
        run(host, inputs(target, t=1.0))
        with pytest.raises(ValueError, match="larger than the token grid 2x2"):
            run(host, inputs(target, (2, 2), t=0.1))   # stage 0's grid 4 does not fit


def flexdit_schedule():
    from flexdit import DensitySchedule
    return DensitySchedule([4, 3, 3, 2])


def test_schedule_reads_sigma_times_1000():
    """FLUX receives σ, SD3 σ·1000: both select the schedule's grid at σ·1000."""
    class Record:
        num_timesteps = 1000

        def __init__(self):
            self.seen = []

        def grid(self, t):
            self.seen.append(float(t))
            return 2

    for target in HOSTS:
        sched = Record()
        host = apply_patch(HOSTS[target](), PLAN, schedule=sched)
        with fk.backend("reference"):
            run(host, inputs(target, t=0.25))
            run(host, inputs(target, t=1.0))
        assert sched.seen == [250.0, 999.0]


@pytest.mark.parametrize("target", sorted(HOSTS))
def test_kernel_path_equals_reference(target, device):
    host = HOSTS[target]().to(device)
    apply_patch(host, PLAN)
    kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs(target, (6, 8), batch=1).items()}
    with fk.backend("reference"):
        ref = run(host, kw)
    torch.testing.assert_close(run(host, kw), ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Layers against the host's own block
# ----------------------------------------------------------------------------------------------------------------

def _block_case(kind):
    """(block, block kwargs, token grid) of one toy block: FLUX double, FLUX single, SD3.5 dual, SD3 last."""
    hw = (4, 6)
    if kind.startswith("flux"):
        host = tiny_flux()
        block = host.transformer_blocks[0] if kind == "flux-double" else host.single_transformer_blocks[0]
        rope = host.pos_embed(torch.cat([torch.zeros(5, 3), flux_image_ids(*hw)]))
        extra = {"image_rotary_emb": rope}
    else:
        host = tiny_sd3()
        block = host.transformer_blocks[0 if kind == "sd3-dual" else -1]
        extra, rope = {}, None
    g = torch.Generator().manual_seed(2)
    kw = dict(hidden_states=torch.randn(2, hw[0] * hw[1], 32, generator=g),
              encoder_hidden_states=torch.randn(2, 5, 32, generator=g), temb=torch.randn(2, 32, generator=g), **extra)
    return block, kw, hw, rope


BLOCKS = ("flux-double", "flux-single", "sd3-dual", "sd3-last")


def _layer(block, kind, hw, rope, grid):
    state = MMDiTRouteState()
    state.begin(hw, grid)
    state.rope_sparse = rope
    return MMDiTFlexLayer(block, Slot(kind, 0, kind == "gen", kind == "recover"), state), state


@pytest.mark.parametrize("block_kind", BLOCKS)
def test_generation_and_recovery_at_the_full_grid_equal_the_host_block(block_kind):
    """With M = N (grid = token grid) sparse generation and recovery (W1 = 0, W2 = I) are the host's block."""
    block, kw, hw, rope = _block_case(block_kind)
    with torch.no_grad(), fk.backend("reference"):
        want = block(**kw)
        for kind in ("gen", "recover"):
            layer, state = _layer(block, kind, hw, rope, hw)
            state.dense[0] = kw["hidden_states"]
            got = layer(**kw)
            for a, b in zip(got, want):
                if b is None:
                    assert a is None
                else:
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_kind", BLOCKS)
def test_poolingformer_is_uniform_joint_attention(block_kind):
    """A Poolingformer layer equals the host's block with q = k = 0 (uniform weights over [text; image])."""
    block, kw, hw, rope = _block_case(block_kind)
    uniform = copy.deepcopy(block)
    with torch.no_grad():
        for attn in (uniform.attn, getattr(uniform, "attn2", None)):
            for name in ("to_q", "to_k", "add_q_proj", "add_k_proj"):
                if attn is not None and getattr(attn, name, None) is not None:
                    getattr(attn, name).weight.zero_()
                    getattr(attn, name).bias.zero_()
        want = uniform(**kw)
        got = _layer(block, "pool", hw, rope, None)[0](**kw)
    for a, b in zip(got, want):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_sparse_rope_positions_are_the_window_centres():
    for hw, grid in (((8, 8), (3, 3)), ((7, 5), (3, 2)), ((6, 6), (6, 6)), ((5, 4), (1, 1))):
        ids = flux_image_ids(*hw)
        ids[:, 0] = 0
        got = sparse_positions(ids, hw, grid).view(*grid, 3)

        def centres(size, out):
            return torch.tensor([(i * size // out + -(-(i + 1) * size // out) - 1) / 2 for i in range(out)])

        rows, cols = centres(hw[0], grid[0]), centres(hw[1], grid[1])
        torch.testing.assert_close(got[..., 1], rows[:, None].expand(grid), rtol=0, atol=0)
        torch.testing.assert_close(got[..., 2], cols[None, :].expand(grid), rtol=0, atol=0)
        assert (got[..., 0] == 0).all()
    # the patched FLUX feeds them to its own RoPE: text positions first, then the M window centres
    host = apply_patch(tiny_flux(), PLAN)
    seen = []
    layer = host.single_transformer_blocks[0]   # the sparse layer
    layer.block.register_forward_pre_hook(lambda m, a, k: seen.append(k["image_rotary_emb"]), with_kwargs=True)
    with fk.backend("reference"):
        run(host, inputs("flux", (7, 5), text=4))
    pos = torch.cat([torch.zeros(4, 3), sparse_positions(flux_image_ids(7, 5), (7, 5), (3, 3))])
    want = host.pos_embed(pos)
    assert seen[0][0].shape == (4 + 9, 16)
    torch.testing.assert_close(seen[0][0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(seen[0][1], want[1], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# Pipelines
# ----------------------------------------------------------------------------------------------------------------

def _flow_vae():
    vae = tiny_vae()
    vae.register_to_config(shift_factor=0.1)
    return vae


def test_flux_pipeline_runs_patched_and_unpatched():
    pipe = diffusers.FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=_flow_vae(),
                                  text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                  transformer=tiny_flux())
    g = torch.Generator().manual_seed(3)
    text, pooled = torch.randn(1, 5, TEXT, generator=g), torch.randn(1, POOLED, generator=g)

    def sample():
        return pipe(prompt_embeds=text, pooled_prompt_embeds=pooled, height=32, width=32, num_inference_steps=2,
                    output_type="np", generator=torch.Generator().manual_seed(0)).images

    check_pipeline_patch_round_trip(pipe, sample, (1, 32, 32, 3))


def test_sd3_pipeline_runs_patched_and_unpatched():
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=tiny_sd3(), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=_flow_vae(),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
        tokenizer_3=None)
    g = torch.Generator().manual_seed(3)
    text, pooled = torch.randn(1, 5, TEXT, generator=g), torch.randn(1, POOLED, generator=g)

    def sample():
        return pipe(prompt_embeds=text, pooled_prompt_embeds=pooled, negative_prompt_embeds=text.flip(1),
                    negative_pooled_prompt_embeds=-pooled, guidance_scale=2.0, height=32, width=32,
                    num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images

    check_pipeline_patch_round_trip(pipe, sample, (1, 32, 32, 3))


# ----------------------------------------------------------------------------------------------------------------
# Refusals, MACs, bench pairs
# ----------------------------------------------------------------------------------------------------------------

def test_bad_inputs_are_refused():
    flux = tiny_flux()
    with pytest.raises(ValueError, match="no decided FlexDiT plan for depth 6"):
        apply_patch(flux)
    with pytest.raises(ValueError, match="but depth is 6"):
        apply_patch(flux, Plan(1, 1, (1, 1, 1, 1), 2, grid=3))
    with pytest.raises(ValueError, match="larger than the token grid"):
        apply_patch(tiny_sd3(), PLAN, schedule=9)
    with pytest.raises(ValueError, match=r"unsupported block types \['Identity'\] in single_transformer_blocks"):
        bad = tiny_flux()
        bad.single_transformer_blocks[1] = torch.nn.Identity()
        apply_patch(bad, PLAN)
    with pytest.raises(ValueError, match="attention processor"):
        bad = tiny_sd3()
        bad.transformer_blocks[2].attn.set_processor(diffusers.models.attention_processor.AttnProcessor2_0())
        apply_patch(bad, PLAN)
    assert not is_patched(flux)
    apply_patch(flux, PLAN)
    with fk.backend("reference"):
        with pytest.raises(ValueError, match="larger than the token grid 2x2"):
            run(flux, inputs("flux", (2, 2)))
        kw = inputs("flux", (4, 4))
        kw["img_ids"] = kw["img_ids"].flip(0)
        with pytest.raises(ValueError, match="not a row-major grid"):
            run(flux, kw)
        kw = inputs("flux")
        run(flux, kw)
        kw["img_ids"][:, 1:] = kw["img_ids"][:, 1:].flip(0)   # the same tensor, changed in place: checked again
        with pytest.raises(ValueError, match="not a row-major grid"):
            run(flux, kw)
        with pytest.raises(ValueError, match="controlnet_block_samples is not supported"):
            run(flux, dict(inputs("flux"), controlnet_block_samples=[torch.zeros(2, 64, 32)]))
    assert image_token_grid(flux_image_ids(3, 5) + 7, 15) == (3, 5)


def test_macs_and_bench_pair():
    """The patched toy FLUX costs fewer MACs (counted on the meta device, attention included); the bench pair at a
    tiny size runs on the CPU and its patched model differs from the dense one."""
    tiny = {"num_layers": 4, "num_single_layers": 8, "attention_head_dim": 16, "num_attention_heads": 2,
            "joint_attention_dim": 32, "pooled_projection_dim": 16, "axes_dims_rope": (4, 6, 6), "text_tokens": 8}
    macs = mmdit_macs("flux", 256, plan={"grid": 4}, config_overrides=tiny)
    with pytest.raises(ValueError, match="image_size must be a positive multiple of 16"):
        mmdit_macs("flux", 100, config_overrides=tiny)
    assert 0 < macs["flexdit"] < 0.7 * macs["dense"]
    from bench.fixtures import build_patched_pair
    dense, patched, make_inputs = build_patched_pair("sd3", 128, plan={"grid": 4}, config_overrides={
        "num_layers": 12, "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
        "caption_projection_dim": 32, "pooled_projection_dim": 16, "text_tokens": 8})
    kw = make_inputs(1)
    with fk.backend("reference"):
        a, b = run(dense, kw), run(patched, kw)
    assert a.shape == b.shape == (1, 16, 16, 16) and (a - b).abs().max() > 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("name, shape", [("flux", (1, 4096, 64)), ("sd3", (1, 16, 128, 128))])
def test_real_size_kernels_match_reference_on_gpu(name, shape):
    """FLUX.1-dev / SD3.5-medium sizes at 1024², bf16, random weights: the patched model through the kernels equals
    its reference path."""
    from flexdit.mmdit import build_mmdit_pair

    _, patched, make_inputs = build_mmdit_pair(name, 1024, "cuda", torch.bfloat16)
    kw = make_inputs(1)
    with torch.no_grad():
        with fk.backend("reference"):
            ref = patched(**kw)[0].float()
        out = patched(**kw)[0].float()
    assert out.shape == shape and torch.isfinite(out).all()
    assert (out - ref).abs().max() <= 5e-2 * ref.abs().max()


def test_flux_image_ids_and_sparse_positions_name_bad_arguments():
    with pytest.raises(ValueError, match="h must be a positive int"):
        flux_image_ids(0, 4)
    with pytest.raises(ValueError, match="w must be a positive int"):
        flux_image_ids(4, 2.0)
    with pytest.raises(ValueError, match=r"img_ids must be \(h·w, 3\) = \(35, 3\)"):
        sparse_positions(flux_image_ids(5, 7)[None], (7, 5), (3, 3))
