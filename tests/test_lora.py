"""flexdit.lora on patched tiny hosts: what is adapted and trained, save -> load -> merge, refusals."""
import copy

import pytest
import torch

import flexdit_kernels as fk
from flexdit import Plan, apply_patch
from flexdit.lora import FUSION, add_lora, load_adapters, lora_info, lora_targets, merge_lora, save_adapters

from .test_mmdit import PLAN, inputs, tiny_flux, tiny_sd3
from .test_patch import caption, tiny_pixart

pytest.importorskip("peft")
PIXART_PLAN = Plan(num_pool=1, num_modules=1, group=(1, 2, 1, 1), num_top=0, grid=4)


def _host(target):
    """(patched host, forward) at toy size."""
    if target == "pixart":
        model = apply_patch(tiny_pixart(), PIXART_PLAN)
        g = torch.Generator().manual_seed(0)
        x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700])
        text, mask = caption(2)
        return model, lambda m: m(x, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=t,
                                  added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    model = apply_patch(tiny_flux() if target == "flux" else tiny_sd3(), PLAN)
    kw = inputs(target)
    return model, lambda m: m(**kw)[0]


@pytest.mark.parametrize("target", ["flux", "sd3", "pixart"])
def test_lora_trains_adapters_and_fusion_only(target):
    model, forward = _host(target)
    add_lora(model, 4)
    with fk.backend("reference"):
        forward(model).square().mean().backward()
    for name, p in model.named_parameters():
        trained = "lora_" in name or any(f in name for f in FUSION)
        assert p.requires_grad == trained, name
        assert (p.grad is not None) == trained, name     # every adapter is used; nothing frozen gets a gradient
    assert any(any(f in n for f in FUSION) for n, _ in model.named_parameters())
    names = lora_info(model)["modules"]
    assert all(n.split(".")[0] in ("transformer_blocks", "single_transformer_blocks") for n in names)


def test_targets_select_and_refuse():
    model, _ = _host("flux")
    only_q = lora_targets(model, ["to_q"])
    assert only_q and all(n.endswith(".to_q") for n in only_q)
    assert "transformer_blocks.0.block.attn.to_q" not in only_q    # layer 0 is a Poolingformer: no queries
    for bad in ([], "to_q", ["nothing_like_this"]):
        with pytest.raises(ValueError, match="targets"):
            lora_targets(model, bad)
    with pytest.raises(ValueError, match="rank"):
        add_lora(model, 0)
    add_lora(model, 2)
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model, 2)


@pytest.mark.parametrize("target", ["flux", "pixart"])
def test_save_load_merge_gives_the_same_outputs(target, tmp_path):
    model, forward = _host(target)
    fresh = copy.deepcopy(model)
    add_lora(model, 4, alpha=8)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    path = save_adapters(model, tmp_path / "adapters.safetensors")
    with fk.backend("reference"), torch.no_grad():
        ref = forward(model)
        loaded = forward(load_adapters(copy.deepcopy(fresh), path))
        merged_model = load_adapters(copy.deepcopy(fresh), path, merge=True)
        merged = forward(merged_model)
        torch.testing.assert_close(loaded, ref, atol=0, rtol=0)
        torch.testing.assert_close(merged, ref, atol=2e-5, rtol=1e-4)
        assert not any("lora_" in n for n, _ in merged_model.named_parameters())
        assert not torch.allclose(forward(fresh), ref, atol=1e-4)
        torch.testing.assert_close(forward(merge_lora(model)), ref, atol=2e-5, rtol=1e-4)


def test_load_refuses_other_plans_and_bad_files(tmp_path):
    model, _ = _host("flux")
    other = apply_patch(tiny_flux(), Plan(num_pool=1, num_modules=1, group=(1, 1, 1, 1), num_top=1, grid=2))
    add_lora(copy.deepcopy(model), 2)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_adapters(model, tmp_path / "none.safetensors")
    path = save_adapters(add_lora(copy.deepcopy(model), 2), tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="trained on plan"):
        load_adapters(other, path)
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_adapters(model, tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="no such file"):
        load_adapters(model, tmp_path / "absent.safetensors")
