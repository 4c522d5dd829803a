"""apply_patch / remove_patch on the project's DiT, diffusers' DiT and PixArt-α, at toy size."""
import copy

import pytest
import torch
import torch.nn as nn

import flexdit
import flexdit_kernels as fk
from flexdit import FlexPatch, Plan, apply_patch, is_patched, remove_patch
from flexdit.layers import Attention, Mlp, modulate
from flexdit.patch import patch_record

from .models.helpers import TOY, randomize_, toy_config, toy_dit, toy_inputs

diffusers = pytest.importorskip("diffusers")

TOY_PLAN = Plan(num_pool=1, num_modules=1, group=(1, 2, 1, 1), num_top=0, grid=3)
DENSE_PLAN = Plan(num_pool=0, num_modules=0, group=(1, 3, 1, 1), num_top=TOY["depth"], grid=3)


# ----------------------------------------------------------------------------------------------------------------
# Tiny hosts (shared with test_pixart.py)
# ----------------------------------------------------------------------------------------------------------------

def tiny_diffusers_dit(num_classes=10):
    """A diffusers DiT as converted checkpoints are: one timestep/class embedder copied into every block."""
    m = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                        num_layers=TOY["depth"], sample_size=16, patch_size=2,
                                        num_embeds_ada_norm=num_classes, norm_eps=1e-6)
    randomize_(m)
    with torch.no_grad():
        emb = m.transformer_blocks[0].norm1.emb.state_dict()
        for block in m.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(emb)
    return m.eval()


def tiny_pixart():
    m = diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                           num_layers=TOY["depth"], cross_attention_dim=32, caption_channels=24,
                                           sample_size=16, patch_size=2)
    return randomize_(m, std=0.1).eval()


def caption(batch=2, length=7, seed=3):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(batch, length, 24, generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length // 2:] = 0
    return y, mask


def call(model, target, x, t, y):
    """One forward of a host of kind `target` on toy inputs (labels y for DiTs, captions for PixArt)."""
    if target == "dit":
        return model(x, t, y)
    if target == "diffusers-dit":
        return model(x, timestep=t, class_labels=y).sample
    text, mask = caption(len(x))
    return model(x, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=t,
                 added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample


HOSTS = {"dit": toy_dit, "diffusers-dit": tiny_diffusers_dit, "pixart-alpha": tiny_pixart}


# ----------------------------------------------------------------------------------------------------------------
# Equivalences
# ----------------------------------------------------------------------------------------------------------------

def test_patched_dit_equals_from_dit():
    dit = toy_dit()
    x, t, y = toy_inputs()
    flex = flexdit.from_dit(dit, toy_config()).eval()
    apply_patch(dit, TOY_PLAN)
    with fk.backend("reference"), torch.no_grad():
        torch.testing.assert_close(dit(x, t, y), flex(x, t, y), rtol=0, atol=0)
        # DiT's sampler calls self.forward directly (forward_with_cfg): the patch must see those calls too.
        xx, tt, yy = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)])
        torch.testing.assert_close(dit.forward_with_cfg(xx, tt, yy, 1.5), flex.forward_with_cfg(xx, tt, yy, 1.5))
    assert "FlexDiT patch of a dit: P=1, K=1 x (g, s, r, d)=(1, 2, 1, 1), T=0, grid=3" in str(dit)


def test_patched_diffusers_dit_equals_flexdit_from_converted_weights():
    from flexdit.diffusers_convert import dit_from_diffusers, use_diffusers_timesteps_
    host = tiny_diffusers_dit()
    x, t, y = toy_inputs()
    dense = dit_from_diffusers(host).eval()
    flex = use_diffusers_timesteps_(flexdit.from_dit(dense, toy_config())).eval()
    with fk.backend("reference"), torch.no_grad():
        torch.testing.assert_close(dense(x, t, y), call(host, "diffusers-dit", x, t, y))
        apply_patch(host, TOY_PLAN)
        torch.testing.assert_close(call(host, "diffusers-dit", x, t, y), flex(x, t, y))


class DiTBlock(nn.Module):
    """A block as facebookresearch/DiT writes it: the SiLU inside adaLN_modulation, fed the host's raw c."""

    def __init__(self, hidden, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, 4 * hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


def test_patched_dit_with_the_published_blocks():
    """A DiT whose blocks are the published ones, not flexdit's: the same function as flexdit.DiT, and the same again
    patched with an all-dense plan (the patched layers take the conditioning the host's blocks took)."""
    dit = toy_dit()
    host = copy.deepcopy(dit)
    host.blocks = nn.ModuleList(DiTBlock(TOY["hidden_size"], TOY["num_heads"]) for _ in dit.blocks)
    host.load_state_dict(dit.state_dict())
    x, t, y = toy_inputs()
    with fk.backend("reference"), torch.no_grad():
        ref = dit(x, t, y)
        torch.testing.assert_close(host(x, t, y), ref, rtol=0, atol=0)
        apply_patch(host, DENSE_PLAN)
        torch.testing.assert_close(host(x, t, y), ref, rtol=0, atol=0)


@pytest.mark.parametrize("target", sorted(HOSTS))
def test_degenerate_plan_equals_unpatched(target):
    host = HOSTS[target]()
    x, t, y = toy_inputs()
    with fk.backend("reference"), torch.no_grad():
        ref = call(host, target, x, t, y)
        apply_patch(host, DENSE_PLAN)
        torch.testing.assert_close(call(host, target, x, t, y), ref, rtol=0, atol=0)


class Stages:  # duck-typed DensitySchedule: more tokens late in sampling (small t)
    def grid(self, t):
        g = torch.where(torch.as_tensor(t) < 500, 4, 2)
        return int(g) if g.dim() == 0 else g


def test_schedule_selects_the_grid_per_call():
    dit = toy_dit()
    flex = flexdit.from_dit(dit, toy_config()).eval()
    apply_patch(dit, TOY_PLAN, schedule=Stages())
    x, _, y = toy_inputs()
    with fk.backend("reference"), torch.no_grad():
        for step, grid in ((900, 2), (100, 4)):
            t = torch.full((2,), step)
            torch.testing.assert_close(dit(x, t, y), flex(x, t, y, grid=grid), rtol=0, atol=0)
        with pytest.raises(ValueError, match="different grids"):
            dit(x, torch.tensor([100, 900]), y)
        apply_patch(dit, TOY_PLAN, schedule=(2, 4))  # a fixed (G_h, G_w)
        torch.testing.assert_close(dit(x, torch.full((2,), 5), y), flex(x, torch.full((2,), 5), y, grid=(2, 4)))
        t = torch.full((2,), 5)
        torch.testing.assert_close(dit(x, t, y, grid="3x1"), flex(x, t, y, grid=(3, 1)), rtol=0, atol=0)  # per call
        with pytest.raises(ValueError, match="grid 9x9 is larger than the token grid 8x8"):
            dit(x, t, y, grid=9)


def test_patched_layers_are_built_with_the_kernels(device):
    """The patched diffusers DiT through the Triton kernels (the interpreter on a CPU) equals the references."""
    host = tiny_diffusers_dit().to(device)
    apply_patch(host, TOY_PLAN)
    x, t, y = (v[:1].to(device) for v in toy_inputs())
    with torch.no_grad():
        with fk.backend("reference"):
            ref = call(host, "diffusers-dit", x, t, y)
        out = call(host, "diffusers-dit", x, t, y)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# remove_patch, idempotence, copies
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", sorted(HOSTS))
def test_remove_patch_restores_bit_identical_and_clean(target):
    host = HOSTS[target]()
    attr = "blocks" if target == "dit" else "transformer_blocks"
    blocks = getattr(host, attr)
    before = {k: v.clone() for k, v in host.state_dict().items()}
    x, t, y = toy_inputs()
    with fk.backend("reference"):
        with torch.no_grad():
            ref = call(host, target, x, t, y)
        apply_patch(host, TOY_PLAN)
        assert is_patched(host) and isinstance(getattr(host, attr), FlexPatch)
        # Fine-tune the patched model a step: the original blocks must not see it.
        opt = torch.optim.SGD(host.parameters(), lr=0.1)
        call(host, target, x, t, y).square().mean().backward()
        opt.step()
        remove_patch(host)
        with torch.no_grad():
            out = call(host, target, x, t, y)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert getattr(host, attr) is blocks and not is_patched(host)
    assert "forward" not in host.__dict__ and not hasattr(host, "_flexdit_patch")
    assert not (host._forward_hooks or host._forward_pre_hooks)
    after = host.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert "FlexPatch" not in str(host) and "FlexDiT patch" not in str(host)
    remove_patch(host)  # a no-op on an unpatched model


@pytest.mark.parametrize("target", ["dit", "pixart-alpha"])
def test_patching_twice_equals_patching_once(target):
    host = HOSTS[target]()
    attr = "blocks" if target == "dit" else "transformer_blocks"
    blocks = getattr(host, attr)
    x, t, y = toy_inputs()
    with fk.backend("reference"), torch.no_grad():
        once = call(apply_patch(host, TOY_PLAN), target, x, t, y)
        apply_patch(host, DENSE_PLAN)  # a different plan first: the second patch must start from the original
        twice = call(apply_patch(host, TOY_PLAN), target, x, t, y)
    torch.testing.assert_close(twice, once, rtol=0, atol=0)
    assert patch_record(host).originals[attr] is blocks
    assert sum(isinstance(m, FlexPatch) for m in host.modules()) == 1


@pytest.mark.parametrize("target", sorted(HOSTS))
def test_keep_original_false_takes_the_blocks_over(target):
    from flexdit import save_patched
    host = HOSTS[target]()
    twin = copy.deepcopy(host)
    attr = "blocks" if target == "dit" else "transformer_blocks"
    blocks = list(getattr(host, attr))
    x, t, y = toy_inputs()
    with fk.backend("reference"), torch.no_grad():
        kept = call(apply_patch(twin, TOY_PLAN), target, x, t, y)
        taken = call(apply_patch(host, TOY_PLAN, keep_original=False), target, x, t, y)
    torch.testing.assert_close(taken, kept, rtol=0, atol=0)
    assert patch_record(host).originals is None and not patch_record(host).outside
    if target != "dit":   # the dense and sparse layers run the host's own block objects, not copies
        layers = getattr(host, attr)
        assert all(layer.block is b for layer, b in zip(layers, blocks) if layer.kind in ("dense", "sparse"))
    for undo in (remove_patch, lambda m: apply_patch(m, TOY_PLAN)):
        with pytest.raises(ValueError, match="keep_original=False"):
            undo(host)
    assert is_patched(host)
    if target != "dit":
        with pytest.raises(ValueError, match="keep_original=False"):
            save_patched(host, "unused")


def test_deepcopy_and_device_moves_follow_the_patch():
    dit = apply_patch(toy_dit(), TOY_PLAN)
    twin = copy.deepcopy(dit)
    x, t, y = toy_inputs()
    with fk.backend("reference"), torch.no_grad():
        torch.testing.assert_close(twin(x, t, y), dit(x, t, y), rtol=0, atol=0)
        remove_patch(twin.double())
        assert twin.blocks[0].attn.qkv.weight.dtype == torch.float64  # the originals follow a cast
        assert is_patched(dit) and not is_patched(twin)
        assert not (twin._forward_pre_hooks or twin.t_embedder._forward_pre_hooks)   # the twin's own hooks went
        out = dit(x, t, y)                                                               # the original's stay
        assert len(dit._forward_pre_hooks) == len(dit.t_embedder._forward_pre_hooks) == 1
    torch.testing.assert_close(remove_patch(dit)(x, t, y), twin.float()(x, t, y), rtol=0, atol=0)
    assert not torch.equal(out, twin(x, t, y))


# ----------------------------------------------------------------------------------------------------------------
# The hooks: a call's route state
# ----------------------------------------------------------------------------------------------------------------

class PublishedDiT(flexdit.DiT):
    """facebookresearch/DiT's `forward` and `forward_with_cfg`, which calls `self.forward` (no module hooks)."""

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))

    def forward_with_cfg(self, x, t, y, cfg_scale):
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = self.forward(combined, t, y)
        eps, rest = model_out[:, :3], model_out[:, 3:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)


def test_published_forward_with_cfg_equals_the_per_half_forward():
    """facebookresearch DiT's forward_with_cfg calls self.forward, which skips the host's hooks: the patch routes it
    all the same, at the schedule's grid for its timesteps."""
    dit = toy_dit()
    host = PublishedDiT(**TOY).eval()
    host.load_state_dict(dit.state_dict())
    x, _, y = toy_inputs()
    xx, yy, late = torch.cat([x, x]), torch.cat([y, torch.full_like(y, 10)]), torch.full((4,), 900)
    outs = []
    with fk.backend("reference"), torch.no_grad():
        ref = host.forward_with_cfg(xx, late, yy, 1.5)
        torch.testing.assert_close(ref, dit.forward_with_cfg(xx, late, yy, 1.5), rtol=0, atol=0)
        for schedule, step, grid in ((None, 900, 3), (Stages(), 900, 2), (Stages(), 100, 4)):
            apply_patch(host, TOY_PLAN, schedule=schedule)
            t = torch.full((4,), step)
            outs.append(host.forward_with_cfg(xx, t, yy, 1.5))
            cond, uncond = host(x, t[:2], y, grid=grid), host(x, t[2:], yy[2:], grid=grid)
            eps = uncond[:, :3] + 1.5 * (cond[:, :3] - uncond[:, :3])
            torch.testing.assert_close(outs[-1], torch.cat([torch.cat([eps, cond[:, 3:]], 1),
                                                            torch.cat([eps, uncond[:, 3:]], 1)]))
        assert not torch.allclose(outs[0], outs[1], atol=1e-4)    # the schedule's grid, not the plan's
        remove_patch(host)
        torch.testing.assert_close(host.forward_with_cfg(xx, late, yy, 1.5), ref, rtol=0, atol=0)


@pytest.mark.parametrize("target", ["dit", "diffusers-dit"])
def test_remove_patch_removes_its_hooks_and_keeps_others(target):
    host = HOSTS[target]()
    modules = (host, host.t_embedder) if target == "dit" else (host,)
    for m in modules:
        m.register_forward_pre_hook(lambda *args: None)
        m.register_forward_hook(lambda *args: None)
    before = [(dict(m._forward_pre_hooks), dict(m._forward_hooks)) for m in modules]
    apply_patch(apply_patch(host, TOY_PLAN), TOY_PLAN)   # idempotent: one set of hooks
    assert len(host._forward_pre_hooks) == len(host._forward_hooks) == 2
    assert len(modules[-1]._forward_pre_hooks) == 2
    remove_patch(host)
    assert [(dict(m._forward_pre_hooks), dict(m._forward_hooks)) for m in modules] == before
    assert not (host._forward_pre_hooks_with_kwargs or host._forward_hooks_always_called)


@pytest.mark.parametrize("target", ["dit", "diffusers-dit"])
def test_an_exception_in_the_forward_leaves_the_state_cleared(target):
    host = apply_patch(HOSTS[target](), TOY_PLAN)
    flexdit.set_checkpointing(host)
    rec = patch_record(host)
    x, t, y = toy_inputs()
    kwargs = dict(timestep=t, class_labels=y) if target == "diffusers-dit" else dict(t=t, y=y)

    def boom(module, args):
        raise RuntimeError("boom")

    with fk.backend("reference"), torch.no_grad():
        ref = call(host, target, x, t, y)
        layers = host.blocks if target == "dit" else host.transformer_blocks
        handle = layers[3].register_forward_pre_hook(boom)   # a sparse layer inside the module
        with pytest.raises(RuntimeError, match="boom"):
            call(host, target, x, t, y)
        handle.remove()
        with pytest.raises(ValueError, match="larger than the token grid"):   # raised in the patch's hooks
            host(x, grid=9, **kwargs)
        st = rec.state
        assert st.token_grid is None and st.grid is None and not st.dense and not st.sparse and rec.grid is None
        assert host.gradient_checkpointing and not rec.checkpointing
        torch.testing.assert_close(call(host, target, x, t, y), ref, rtol=0, atol=0)


def test_an_accelerate_hook_keeps_its_forward():
    """accelerate's hooks (device placement, offloading) replace the instance `forward`: patched before or after
    them, the model runs theirs, and remove_patch leaves it in place."""
    hooks = pytest.importorskip("accelerate.hooks")

    class Count(hooks.ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            self.calls += 1
            return args, kwargs

    dense = tiny_diffusers_dit()
    x, t, y = toy_inputs()
    with fk.backend("reference"), torch.no_grad():
        ref = call(dense, "diffusers-dit", x, t, y)
        want = call(apply_patch(copy.deepcopy(dense), TOY_PLAN), "diffusers-dit", x, t, y)
        for accelerate_first in (True, False):
            host, hook = copy.deepcopy(dense), Count()
            if accelerate_first:
                hooks.add_hook_to_module(host, hook)
            apply_patch(host, TOY_PLAN)
            if not accelerate_first:
                hooks.add_hook_to_module(host, hook)
            forward = host.__dict__["forward"]
            torch.testing.assert_close(call(host, "diffusers-dit", x, t, y), want, rtol=0, atol=0)
            remove_patch(host)
            assert host.__dict__["forward"] is forward
            torch.testing.assert_close(call(host, "diffusers-dit", x, t, y), ref, rtol=0, atol=0)
            assert hook.calls == 2


@pytest.mark.parametrize("target", ["dit", "diffusers-dit"])
def test_a_patched_model_pickles(target):
    """torch.save / torch.load of the whole patched module: the hooks and the record travel with it."""
    import io
    host = apply_patch(HOSTS[target](), TOY_PLAN)
    buf = io.BytesIO()
    torch.save(host, buf)
    twin = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    x, t, y = toy_inputs()
    with fk.backend("reference"), torch.no_grad():
        torch.testing.assert_close(call(twin, target, x, t, y), call(host, target, x, t, y), rtol=0, atol=0)
    if target == "diffusers-dit":
        with pytest.raises(ValueError, match="patched by flexdit"):
            twin.save_pretrained("unused")
    remove_patch(twin)
    assert not is_patched(twin) and not twin._forward_pre_hooks and "save_pretrained" not in twin.__dict__


# ----------------------------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------------------------

def check_plan_refusals(host):
    """A depth-6 host on an 8x8 token grid refuses plans and grids that do not fit (shared with test_latte.py)."""
    with pytest.raises(ValueError, match="no decided FlexDiT plan for depth 6"):
        apply_patch(host)
    with pytest.raises(ValueError, match="but depth is 6"):
        apply_patch(host, Plan(2, 4, (1, 3, 1, 1), 2))
    with pytest.raises(ValueError, match="larger than the token grid 8x8"):
        apply_patch(host, Plan(1, 1, (1, 2, 1, 1), 0, grid=9))
    with pytest.raises(ValueError, match="larger than the token grid 8x8"):
        apply_patch(host, TOY_PLAN, schedule=12)


def test_bad_inputs_are_refused():
    dit = toy_dit()
    check_plan_refusals(dit)
    with pytest.raises(ValueError, match="already FlexDiT layers"):
        apply_patch(flexdit.from_dit(dit, toy_config()), TOY_PLAN)
    with pytest.raises(ValueError, match="unsupported model"):
        apply_patch(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="plan has unknown keys"):
        apply_patch(dit, {"num_pool": 1, "pool": 2})
    assert not is_patched(dit)

    class TooFine:
        def grid(self, t):
            return 16

    apply_patch(dit, TOY_PLAN, schedule=TooFine())
    with pytest.raises(ValueError, match="larger than the token grid"):
        dit(*toy_inputs())
    host = tiny_diffusers_dit()
    host.transformer_blocks[2] = nn.Identity()
    with pytest.raises(ValueError, match=r"unsupported block types \['Identity'\]"):
        apply_patch(host, TOY_PLAN)


def test_plans_from_dicts_and_configs():
    dit = toy_dit()
    x, t, y = toy_inputs()
    with fk.backend("reference"), torch.no_grad():
        a = apply_patch(dit, dict(num_pool=1, num_modules=1, group=(1, 2, 1, 1), num_top=0, grid=3))(x, t, y)
        b = apply_patch(dit, toy_config())(x, t, y)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert Plan.for_depth(28, (4, 4)) == Plan(2, 4, (1, 3, 1, 1), 2, 4)


# ----------------------------------------------------------------------------------------------------------------
# Pipelines and the bench pair
# ----------------------------------------------------------------------------------------------------------------

def tiny_vae():
    return diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1,
                                   norm_num_groups=8).eval()


def check_pipeline_patch_round_trip(pipe, sample, shape):
    """`sample()` (a seeded run of the diffusers `pipe`) gives outputs of `shape`, different once `pipe` is patched
    and the dense ones again, exactly, after `remove_patch`."""
    pipe.set_progress_bar_config(disable=True)
    with fk.backend("reference"):
        dense = sample()
        apply_patch(pipe, TOY_PLAN)
        assert is_patched(pipe.transformer)
        flex = sample()
        remove_patch(pipe)
        restored = sample()
    assert tuple(flex.shape) == tuple(dense.shape) == shape and bool((abs(flex - dense) > 1e-4).any())
    assert (restored == dense).all()


def test_dit_pipeline_runs_patched_and_unpatched():
    pipe = diffusers.DiTPipeline(transformer=tiny_diffusers_dit(num_classes=1000), vae=tiny_vae(),
                                 scheduler=diffusers.DDIMScheduler())

    def sample():
        return pipe([1, 2], num_inference_steps=2, guidance_scale=2.0, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    check_pipeline_patch_round_trip(pipe, sample, (2, 32, 32, 3))
