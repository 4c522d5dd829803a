"""save_patched / load_patched: a patched, fine-tuned diffusers DiT, PixArt-α or Latte (and the project's DiT)
round-trips bit for bit with its plan and schedule; a plain save_pretrained of a patched model is refused."""
import json

import pytest
import torch

import flexdit_kernels as fk
from flexdit import DensitySchedule, apply_patch, is_patched, load_patched, remove_patch, save_patched

from .models.helpers import toy_dit, toy_inputs
from .test_latte import clip, run, tiny_latte
from .test_patch import TOY_PLAN, call, tiny_diffusers_dit, tiny_pixart

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("safetensors")

HOSTS = {"dit": toy_dit, "diffusers-dit": tiny_diffusers_dit, "pixart-alpha": tiny_pixart}


def _finetune_a_little(model):
    """Change every patched weight, as fine-tuning would."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("target", sorted(HOSTS))
def test_round_trip_bit_for_bit_with_plan_and_schedule(tmp_path, target):
    x, t, y = toy_inputs()
    dense = HOSTS[target]()
    with fk.backend("reference"), torch.no_grad():
        dense_out = call(dense, target, x, t, y)
        sched = DensitySchedule([3, 2], token_grid=(8, 8))
        model = apply_patch(dense, TOY_PLAN, schedule=sched)
        _finetune_a_little(model)
        before = call(model, target, x, t, y)
        save_patched(model, tmp_path / "m")
        again = load_patched(tmp_path / "m")
        assert is_patched(again) and getattr(again, "blocks" if target == "dit" else "transformer_blocks").plan == \
            TOY_PLAN
        _same_state(again, model)
        assert torch.equal(call(again, target, x, t, y), before)
        remove_patch(again)                       # the dense host comes back as it was when patched
        assert torch.equal(call(again, target, x, t, y), dense_out)
    manifest = json.loads((tmp_path / "m" / "flexdit_patch.json").read_text())
    assert manifest["schedule"]["density"]["grids"] == [3, 2]


def test_latte_round_trip(tmp_path):
    x, t, text = clip()
    with fk.backend("reference"), torch.no_grad():
        model = apply_patch(tiny_latte(), TOY_PLAN, schedule=2)
        _finetune_a_little(model)
        before = run(model, x, t, text)
        save_patched(model, tmp_path / "latte")
        again = load_patched(tmp_path / "latte")
        _same_state(again, model)
        assert torch.equal(run(again, x, t, text), before)


def test_plain_save_pretrained_of_a_patched_model_is_refused(tmp_path):
    model = apply_patch(tiny_diffusers_dit(), TOY_PLAN)
    with pytest.raises(ValueError, match="flexdit.save_patched"):
        model.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain").exists() or not any((tmp_path / "plain").iterdir())
    remove_patch(model)
    model.save_pretrained(tmp_path / "dense")           # unpatched: diffusers' own save works again
    assert (tmp_path / "dense" / "config.json").is_file()


def test_pipeline_save_and_errors(tmp_path):
    pipe = diffusers.DiTPipeline(transformer=tiny_diffusers_dit(num_classes=1000),
                                 vae=diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4,
                                                             layers_per_block=1, latent_channels=4),
                                 scheduler=diffusers.DDIMScheduler())
    apply_patch(pipe, TOY_PLAN)
    with pytest.raises(ValueError, match="patched by flexdit"):
        pipe.save_pretrained(tmp_path / "pipe")
    save_patched(pipe, tmp_path / "t")
    pipe.transformer = load_patched(tmp_path / "t")
    assert is_patched(pipe.transformer)
    with pytest.raises(ValueError, match="is not patched"):
        save_patched(tiny_diffusers_dit(), tmp_path / "x")
    with pytest.raises(ValueError, match="no flexdit_patch.json"):
        load_patched(tmp_path / "x")
    (tmp_path / "t" / "patched.safetensors").unlink()
    with pytest.raises(ValueError, match="patched.safetensors: missing"):
        load_patched(tmp_path / "t")


def test_partial_file_names_missing_and_unexpected_keys(tmp_path):
    from safetensors.torch import load_file, save_file
    model = apply_patch(tiny_diffusers_dit(), TOY_PLAN)
    save_patched(model, tmp_path / "m")
    path = tmp_path / "m" / "patched.safetensors"
    state = load_file(str(path))
    gone = sorted(state)[0]
    del state[gone]
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(path))
    with pytest.raises(ValueError) as err:
        load_patched(tmp_path / "m")
    assert f"missing keys (1): {gone}" in str(err.value) and "unexpected keys (1): extra.weight" in str(err.value)


@pytest.mark.parametrize("target", ["flux", "sd3"])
def test_mmdit_hosts_round_trip(tmp_path, target):
    """SD3 and FLUX.1 hosts (tests/test_mmdit.py's toy models, where that module exists)."""
    mmdit = pytest.importorskip("tests.test_mmdit", reason="needs the SD3/FLUX hosts of tests/test_mmdit.py")
    model = apply_patch(mmdit.tiny_flux() if target == "flux" else mmdit.tiny_sd3(), mmdit.PLAN)
    kw = mmdit.inputs(target)
    with fk.backend("reference"), torch.no_grad():
        before = mmdit.run(model, kw)
        save_patched(model, tmp_path / "m")
        assert torch.equal(mmdit.run(load_patched(tmp_path / "m"), kw), before)
    with pytest.raises(ValueError, match="flexdit.save_patched"):
        model.save_pretrained(tmp_path / "plain")
