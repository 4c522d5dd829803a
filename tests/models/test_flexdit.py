import pytest
import torch

import flexdit
import flexdit_kernels as fk
from flexdit.layers import modulate
from flexdit.models import DiTBlock
from flexdit.plan import Slot

from .helpers import TOY, randomize_, toy_config, toy_dit, toy_inputs


def test_xl_plan_matches_reference_mapping():
    kinds = flexdit.flexdit_config("FlexDiT-XL/2").layer_kinds()
    assert kinds[:2] == ["pool", "pool"] and kinds[26:] == ["dense", "dense"]
    for k in range(4):
        assert kinds[2 + 6 * k] == "gen" and kinds[6 + 6 * k] == "recover" and kinds[7 + 6 * k] == "dense"
        assert kinds[3 + 6 * k:6 + 6 * k] == ["sparse"] * 3
    assert flexdit.flexdit_config("FlexDiT-L/2").layer_kinds().count("sparse") == 8
    cfg = flexdit.flexdit_config("DiT-S/2")
    assert cfg.plan == flexdit.Plan(1, 2, (1, 2, 1, 1), 1, 8) and cfg.plan.grid == (8, 8)


@pytest.mark.parametrize("model_name", ["FlexDiT-XL/2", "FlexDiT-L/4", "FlexDiT-B/2", "FlexDiT-S/8"])
def test_registry_builds_every_size(model_name):
    with torch.device("meta"):
        model = flexdit.create_model(model_name)
    assert len(model.blocks) == model.config.depth
    assert max(model.config.plan.grid) <= min(model.token_grid)


def test_degenerate_plan_equals_dense():
    dit = toy_dit()
    cfg = toy_config(num_pool=0, num_modules=0, num_top=TOY["depth"])
    flex = flexdit.from_dit(dit, cfg).eval()
    x, t, y = toy_inputs()
    with fk.backend("reference"), torch.no_grad():
        torch.testing.assert_close(flex(x, t, y), dit(x, t, y), rtol=0, atol=0)


def test_conversion_weights():
    dit = toy_dit()
    cfg = toy_config()
    flex = flexdit.from_dit(dit, cfg)
    src, dst, c = dit.state_dict(), flex.state_dict(), TOY["hidden_size"]
    kinds = cfg.layer_kinds()
    assert kinds == ["pool", "gen", "sparse", "sparse", "recover", "dense"]
    for key, value in dst.items():
        if ".fuse_" in key:
            continue
        if ".attn.v." in key:
            expected = src[key.replace("attn.v.", "attn.qkv.")][2 * c:]
        elif ".attn.q." in key:
            expected = src[key.replace("attn.q.", "attn.qkv.")][:c]
        elif ".attn.kv." in key:
            expected = src[key.replace("attn.kv.", "attn.qkv.")][c:]
        else:
            expected = src[key]
        assert torch.equal(value, expected), key
    rec = flex.blocks[4]
    assert torch.equal(rec.fuse_sparse.weight, torch.zeros(c, c)) and not rec.fuse_sparse.bias.any()
    assert torch.equal(rec.fuse_dense.weight, torch.eye(c)) and not rec.fuse_dense.bias.any()
    # Storage is not shared with the dense model.
    assert flex.blocks[5].attn.qkv.weight.data_ptr() != dit.blocks[5].attn.qkv.weight.data_ptr()
    # Count: dense + two C x C fusion linears per recovery layer − the Q and K rows of each Poolingformer
    # (cross layers keep all of qkv, split into q and kv).
    n_dense = sum(p.numel() for p in dit.parameters())
    n_flex = sum(p.numel() for p in flex.parameters())
    n_fusion = kinds.count("recover") * 2 * (c * c + c)
    n_dropped = kinds.count("pool") * 2 * (c * c + c)
    assert n_flex == n_dense + n_fusion - n_dropped
    assert not flex.pos_embed.requires_grad


def test_pooling_block_equals_naive_uniform_attention():
    c, n = 32, 24
    dense = randomize_(DiTBlock(c, 2))
    pool = DiTBlock(c, 2, slot=Slot("pool"))
    sd = {k: v for k, v in dense.state_dict().items() if "qkv" not in k}
    sd["attn.v.weight"] = dense.attn.qkv.weight[2 * c:]
    sd["attn.v.bias"] = dense.attn.qkv.bias[2 * c:]
    pool.load_state_dict(sd)
    x, cond = torch.randn(3, n, c), torch.randn(3, c)

    mods = dense.modulation(None, cond)
    shift_msa, scale_msa, gate_msa = mods[:3]
    u = modulate(dense.norm1(x), shift_msa, scale_msa)
    v = u @ sd["attn.v.weight"].t() + sd["attn.v.bias"]
    uniform = torch.full((n, n), 1.0 / n)                  # the naive N x N "attention" of a Poolingformer
    naive = dense.finish(x, dense.attn.proj(uniform @ v), mods, cond)
    with fk.backend("reference"):
        torch.testing.assert_close(pool(x, cond), naive, rtol=1e-5, atol=1e-5)


def test_converted_flexdit_forward_changes_with_grid():
    flex = flexdit.from_dit(toy_dit(), toy_config()).eval()
    x, t, y = toy_inputs()
    with fk.backend("reference"), torch.no_grad():
        outs = [flex(x, t, y, grid=g) for g in (1, 3, (2, 5), 8)]
    assert all(o.shape == (2, 8, 16, 16) for o in outs)
    assert not torch.allclose(outs[0], outs[1])
    # Fusion starts as W1 = 0: a grid equal to the token grid still differs from dense (sparse layers differ).
    assert torch.isfinite(outs[3]).all()


def test_non_square_latent():
    size = (16, 24)
    dit = toy_dit(input_size=size)
    flex = flexdit.from_dit(dit, toy_config(input_size=size, grid=(3, 5))).eval()
    x, t, y = toy_inputs(size=size)
    with fk.backend("reference"), torch.no_grad():
        out = flex(x, t, y)
        assert out.shape == (2, 8, *size)
        assert flex(x, t, y, grid=(8, 12)).shape == (2, 8, *size)


def test_kernel_path_equals_reference_path():
    """The same FlexDiT through the Triton kernels (the interpreter on CPU) and through the references."""
    flex = flexdit.from_dit(toy_dit(hidden_size=32), toy_config(grid=3))
    randomize_(flex, seed=3)  # non-trivial fusion weights too
    x, t, y = toy_inputs(batch=1)
    with fk.backend("reference"):
        ref = flex(x, t, y)
        grads_ref = torch.autograd.grad(ref.square().sum(), [p for p in flex.parameters() if p.requires_grad])
    with fk.backend("auto"):
        out = flex(x, t, y)
        grads = torch.autograd.grad(out.square().sum(), [p for p in flex.parameters() if p.requires_grad])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for g, gr in zip(grads, grads_ref):
        torch.testing.assert_close(g, gr, rtol=1e-3, atol=1e-4)


def test_config_validation():
    with pytest.raises(ValueError, match="depth is 6"):
        toy_config(num_top=2)
    with pytest.raises(ValueError, match="recovery"):
        toy_config(group=(1, 3, 0, 1))
    with pytest.raises(ValueError, match="grid 9x9"):
        toy_config(grid=9)
    flex = flexdit.FlexDiT(toy_config())
    x, t, y = toy_inputs()
    with pytest.raises(ValueError, match="grid 3x9"):
        flex(x, t, y, grid=(3, 9))
    with pytest.raises(ValueError, match="grid must"):
        flex(x, t, y, grid="eight")
    with pytest.raises(ValueError, match="grid must"):
        flex(x, t, y, grid=(3, 0))


def test_flexdit_is_printed_with_its_plan():
    assert "plan: P=1, K=1 x (g, s, r, d)=(1, 2, 1, 1), T=0, grid=3" in repr(flexdit.FlexDiT(toy_config()))


def test_compile_traces_without_graph_breaks():
    flex = flexdit.FlexDiT(toy_config()).eval()
    x, t, y = toy_inputs()
    with fk.backend("reference"), torch.no_grad():
        explanation = torch._dynamo.explain(flex)(x, t, y)
    assert explanation.graph_break_count == 0
