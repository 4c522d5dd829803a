"""flexdit-sample on a video model: a FlexLatte checkpoint samples clips with guidance and the density schedule,
writes (n, T, 4, h, w) latents and, with a VAE, one GIF per clip and a frame grid."""
import json

import numpy as np
import pytest
import torch

import flexdit
import flexdit_kernels as fk
from flexdit import FlexLatte, FlexLatteConfig, Plan, create_diffusion, sample_latents
from flexdit.sample import main

diffusers = pytest.importorskip("diffusers")

TINY = dict(num_attention_heads=2, attention_head_dim=16, num_layers=6, cross_attention_dim=32, caption_channels=16,
            sample_size=8, video_length=3)
PLAN = dict(num_pool=1, num_modules=1, group=[1, 2, 1, 1], num_top=0, grid=2)


@pytest.fixture(scope="module")
def latte_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = FlexLatte(FlexLatteConfig(transformer=TINY, num_classes=2, plan=Plan(**PLAN)))
    with torch.no_grad():     # the output projection starts at zero: perturb so samples depend on the network
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path_factory.mktemp("latte") / "latte.pt"
    flexdit.save_flexdit(model, path)
    return path


def test_load_flexdit_reads_a_flexlatte(latte_ckpt):
    model = flexdit.load_flexdit(latte_ckpt)
    assert isinstance(model, FlexLatte) and model.frames == 3
    again, source = flexdit.load_model(latte_ckpt, "FlexLatte", return_source=True)
    assert source == "FlexLatte checkpoint (model weights)"
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v)


def test_sample_latents_takes_clip_shapes(latte_ckpt):
    model = flexdit.load_flexdit(latte_ckpt).eval()
    sched = flexdit.DensitySchedule([4, 2], token_grid=model.token_grid)
    with fk.backend("reference"):
        z = sample_latents(model, create_diffusion(2), torch.tensor([0, 1]), (4, 3, 8, 8), cfg_scale=2.0,
                           schedule=sched, generator=torch.Generator().manual_seed(0))
    assert z.shape == (2, 4, 3, 8, 8) and torch.isfinite(z).all()
    with pytest.raises(ValueError, match=r"latent_shape must be \(C, T, h, w\) for a video model"):
        sample_latents(model, create_diffusion(2), torch.tensor([0]), (4, 8, 8))
    with pytest.raises(ValueError, match="label 2 is outside"):
        sample_latents(model, create_diffusion(2), torch.tensor([2]), (4, 3, 8, 8))


def test_cli_samples_clips_with_guidance_schedule_and_vae(latte_ckpt, tmp_path, capsys):
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, layers_per_block=1, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    vae.save_pretrained(tmp_path / "vae")
    out = tmp_path / "s"
    assert main(["--model", "FlexLatte", "--ckpt", str(latte_ckpt), "--classes", "0,1", "--steps", "10",
                 "--r-min", "0.5", "--r-max", "0.9", "--vae", str(tmp_path / "vae"), "--out-dir", str(out),
                 "--no-progress", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "model FlexLatte (FlexLatte checkpoint" in text and "density schedule" in text
    with np.load(out / "latents.npz") as z:
        assert z["latents"].shape == (2, 3, 4, 8, 8) and z["labels"].tolist() == [0, 1]
        assert np.isfinite(z["latents"]).all()
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".gif", ".png")) == ["000000.gif", "000001.gif",
                                                                                    "grid.png"]
    from PIL import Image
    with Image.open(out / "000000.gif") as gif:
        assert gif.n_frames == 3
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (3 * 8, 2 * 8)          # one row of 3 frames per clip (the toy VAE keeps the size)
    ran = json.loads((out / "args.json").read_text())
    assert ran["model"] == "FlexLatte" and ran["num_classes"] == 2 and ran["image_size"] == 64
    assert ran["model_config"]["transformer"]["video_length"] == 3


def test_cli_refuses_adm_npz_for_clips(latte_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "FlexLatte", "--ckpt", str(latte_ckpt), "--classes", "0", "--steps", "2", "--vae",
              str(tmp_path), "--adm-npz", str(tmp_path / "a.npz"), "--out-dir", str(tmp_path / "s"), "--device", "cpu"])
    assert exit_info.value.code == 2 and "--adm-npz writes images; FlexLatte samples clips" in capsys.readouterr().err
