"""flexdit-finetune on video latent shards (n, T, C, H, W): a class-conditional FlexLatte (diffusers' Latte patched
by the one router) trains, checkpoints and resumes on the CPU."""
import json

import pytest
import torch

import flexdit_kernels as fk
from flexdit import FlexLatte, FlexLatteConfig, Plan
from flexdit.data import LatentShards, make_synthetic_shards
from flexdit.train import main

diffusers = pytest.importorskip("diffusers")

TINY = dict(num_attention_heads=2, attention_head_dim=16, num_layers=6, cross_attention_dim=32, caption_channels=16,
            sample_size=8, video_length=3)
PLAN = dict(num_pool=1, num_modules=1, group=[1, 2, 1, 1], num_top=0, grid=2)


def test_video_shards_load_as_clips(tmp_path):
    make_synthetic_shards(tmp_path, n=6, shard_size=4, size=8, frames=3, num_classes=2)
    data = LatentShards(tmp_path, channels=4, input_size=8, num_classes=2, frames=3)
    x, y = data.batch(torch.tensor([0, 5]))
    assert x.shape == (2, 4, 3, 8, 8) and y.shape == (2,)
    with pytest.raises(ValueError, match=r"video latents must be \(n, 5, 4, h, w\)"):
        LatentShards(tmp_path, channels=4, frames=5)
    with pytest.raises(ValueError, match=r"latents must be \(n, 4, h, w\)"):
        LatentShards(tmp_path, channels=4)


def test_flexlatte_forward_and_grid_per_call():
    model = FlexLatte(FlexLatteConfig(transformer=TINY, num_classes=2, plan=Plan(**PLAN))).eval()
    x, t, y = torch.randn(2, 4, 3, 8, 8), torch.tensor([10, 900]), torch.tensor([0, 2])   # 2: the null class
    with fk.backend("reference"), torch.no_grad():
        a, b = model(x, t, y), model(x, t, y, grid=1)
    assert a.shape == b.shape == (2, 8, 3, 8, 8) and not torch.equal(a, b)
    with pytest.raises(ValueError, match="larger than the token grid"):
        model(x, t, y, grid=5)
    with pytest.raises(ValueError, match=r"x must be \(B, 4, T, H, W\)"):
        model(x[:, :, 0], t, y)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        FlexLatteConfig(transformer=TINY, num_classes=0, plan=Plan(**PLAN))
    with pytest.raises(ValueError, match="but depth is 6"):
        FlexLatteConfig(transformer=TINY, plan=Plan(1, 1, (1, 2, 1, 1), 1))


def test_finetune_cli_on_video_shards_trains_and_resumes(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "run"
    make_synthetic_shards(data, n=8, shard_size=8, size=8, frames=3, num_classes=2)
    args = ["--model", "FlexLatte", "--model-args", json.dumps({"transformer": TINY, "plan": PLAN}),
            "--data", str(data), "--image-size", "64", "--num-classes", "2", "--global-batch-size", "2",
            "--precision", "fp32", "--device", "cpu", "--backend", "reference", "--out-dir", str(out),
            "--log-every", "1", "--ckpt-every", "2", "--r-min", "0.8", "--r-max", "0.95", "--quiet"]
    assert main([*args, "--steps", "2"]) == 0
    ckpt = out / "checkpoints" / "0000002.pt"
    state = torch.load(ckpt, weights_only=True)
    assert state["arch"] == "FlexLatte" and state["config"]["plan"]["num_modules"] == 1
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert main([*args, "--steps", "3"]) == 0                 # resumes from step 2 (--resume auto)
    assert (out / "checkpoints" / "0000003.pt").is_file()
    bad = tmp_path / "bad"
    make_synthetic_shards(bad, n=4, shard_size=4, size=8, num_classes=2)   # images, not clips
    with pytest.raises(SystemExit) as exc:
        main([*args, "--steps", "1", "--data", str(bad), "--out-dir", str(tmp_path / "r2")])
    assert exc.value.code == 2 and "video latents must be" in capsys.readouterr().err
