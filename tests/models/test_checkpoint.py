import pytest
import torch

import flexdit

from .helpers import toy_config, toy_dit, toy_inputs


def test_load_published_format_pt_and_convert(tmp_path):
    dit = toy_dit()
    path = tmp_path / "DiT-toy.pt"
    torch.save(dit.state_dict(), path)
    sd = flexdit.load_dit_checkpoint(path)
    assert sd.keys() == dit.state_dict().keys()
    flex = flexdit.from_dit(sd, toy_config())
    assert isinstance(flex, flexdit.FlexDiT)


def test_training_checkpoint_yields_ema(tmp_path):
    dit = toy_dit()
    path = tmp_path / "0001000.pt"
    ema = {k: v + 1 for k, v in dit.state_dict().items()}
    torch.save({"model": dit.state_dict(), "ema": ema, "opt": {}, "args": None}, path)
    sd = flexdit.load_dit_checkpoint(path)
    assert torch.equal(sd["pos_embed"], ema["pos_embed"])


def test_safetensors(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    dit = toy_dit()
    path = tmp_path / "dit.safetensors"
    safetensors.save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(path))
    sd = flexdit.load_dit_checkpoint(path)
    assert all(torch.equal(sd[k], v) for k, v in dit.state_dict().items())


def test_partial_checkpoint_names_missing_and_unexpected_keys():
    sd = toy_dit().state_dict()
    del sd["blocks.3.mlp.fc1.weight"]
    sd["blocks.9.extra"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        flexdit.from_dit(sd, toy_config())
    assert "missing keys (1): blocks.3.mlp.fc1.weight" in str(err.value)
    assert "unexpected keys (1): blocks.9.extra" in str(err.value)


def test_shape_mismatch_names_the_key():
    sd = toy_dit().state_dict()
    sd["final_layer.linear.bias"] = torch.zeros(7)
    with pytest.raises(ValueError, match="shape mismatch for final_layer.linear.bias"):
        flexdit.from_dit(sd, toy_config())


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="is not a file"):
        flexdit.load_dit_checkpoint(tmp_path / "none.pt")
    with pytest.raises(ValueError, match="config must be a FlexDiTConfig"):
        flexdit.from_dit(toy_dit(), {"depth": 6})
    with pytest.raises(ValueError, match="dit_or_state_dict"):
        flexdit.from_dit([1, 2], toy_config())
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="does not hold a state dict"):
        flexdit.load_dit_checkpoint(path)


def test_flexdit_save_load_roundtrip(tmp_path):
    flex = flexdit.from_dit(toy_dit(), toy_config()).eval()
    path = tmp_path / "flex.pt"
    flexdit.save_flexdit(flex, path)
    again = flexdit.load_flexdit(path).eval()
    assert again.config == flex.config
    x, t, y = toy_inputs()
    import flexdit_kernels as fk
    with fk.backend("reference"), torch.no_grad():
        torch.testing.assert_close(again(x, t, y), flex(x, t, y), rtol=0, atol=0)


def test_one_loader_reads_every_kind_with_its_config(tmp_path):
    """load_model / load_flexdit rebuild a dense DiT and a FlexDiT from the config their file records; overrides that
    contradict it, unknown ones and names of another family or size are refused, naming both values."""
    import flexdit_kernels as fk
    x, t, y = toy_inputs()
    dense, flex = toy_dit(), flexdit.from_dit(toy_dit(), toy_config()).eval()
    for model, name in ((dense, "DiT-S/2"), (flex, "FlexDiT-S/2")):
        path = tmp_path / f"{type(model).__name__}.pt"
        flexdit.save_flexdit(model, path, name=name)
        again, source = flexdit.load_model(path, return_source=True)
        assert type(again) is type(model) and source.endswith("checkpoint (model weights)")
        with fk.backend("reference"), torch.no_grad():
            assert torch.equal(flexdit.load_flexdit(path).eval()(x, t, y), model(x, t, y))
        other = "DiT-B/2" if name == "DiT-S/2" else "FlexDiT-B/2"
        with pytest.raises(ValueError, match=f"--model {other} conflicts with checkpoint .*, which records {name}"):
            flexdit.load_model(path, other)
        with pytest.raises(ValueError, match="hidden_size=64 conflicts with .*hidden_size=32"):
            flexdit.load_model(path, hidden_size=64)
        with pytest.raises(ValueError, match="unknown field 'hiden_size'"):
            flexdit.load_model(path, hiden_size=32)
    with pytest.raises(ValueError, match="holds a FlexDiT model"):
        flexdit.load_model(tmp_path / "FlexDiT.pt", "DiT-S/2")
    # a dense checkpoint given a FlexDiT name is converted, plan fields allowed
    plan = toy_config().plan
    converted = flexdit.load_model(tmp_path / "DiT.pt", "FlexDiT-S/2", plan=plan)
    assert isinstance(converted, flexdit.FlexDiT) and converted.config.plan == plan
    torch.save(dense.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="does not record its model"):
        flexdit.load_flexdit(tmp_path / "plain.pt")
