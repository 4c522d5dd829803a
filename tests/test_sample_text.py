"""flexdit-sample --model PIPELINE_DIR --prompt ...: tiny PixArt-α and FLUX pipelines saved to disk, patched, with
the density schedule and a LoRA, end to end on the CPU."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from flexdit.sample import main

from .text_hosts import save_tiny_pipeline

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
PLAN = {"num_pool": 1, "num_modules": 1, "group": [1, 2, 1, 1], "num_top": 0, "grid": 3}     # 6 layers
COMMON = ["--image-size", "32", "--steps", "2", "--model-args", json.dumps({"plan": PLAN}), "--device", "cpu",
          "--no-progress"]


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {kind: save_tiny_pipeline(kind, root / kind) for kind in ("pixart", "flux")}


def images(folder, n):
    return [np.asarray(Image.open(folder / f"{i:06d}.png")) for i in range(n)]


@pytest.mark.parametrize("kind", ["pixart", "flux"])
def test_prompts_to_pngs(pipelines, kind, tmp_path, capsys):
    out = tmp_path / "a"
    assert main(["--model", str(pipelines[kind]), "--prompt", "a red cat", "--prompt", "the mat",
                 "--num-samples", "3", "--guidance-scale", "2.0", "--r-min", "0.5", "--r-max", "0.8",
                 "--out-dir", str(out), *COMMON]) == 0
    assert "patched: P=1, K=1" in capsys.readouterr().out
    got = images(out, 3)
    assert all(im.shape == (32, 32, 3) for im in got) and (out / "grid.png").exists()
    ran = json.loads((out / "args.json").read_text())
    assert ran["prompt"] == ["a red cat", "the mat"] and ran["schedule"]["grids"] == [6, 5, 4, 4]
    assert ran["model_config"]["plan"].startswith("P=1, K=1")
    # sample i takes the seed (seed, i): one batch of 2 or batches of 1 give the same images
    assert main(["--model", str(pipelines[kind]), "--prompt", "a red cat", "--prompt", "the mat",
                 "--num-samples", "2", "--batch-size", "1", "--guidance-scale", "2.0", "--r-min", "0.5",
                 "--r-max", "0.8", "--out-dir", str(tmp_path / "b"), *COMMON]) == 0
    for a, b in zip(got, images(tmp_path / "b", 2)):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert not np.array_equal(got[0], got[1])


def test_lora_is_loaded_and_merged(pipelines, tmp_path):
    pytest.importorskip("peft")
    import diffusers
    from flexdit import Plan, apply_patch
    from flexdit.lora import add_lora, save_adapters
    pipe = diffusers.FluxPipeline.from_pretrained(pipelines["flux"])
    apply_patch(pipe, Plan(**PLAN))
    add_lora(pipe.transformer, 2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    save_adapters(pipe.transformer, tmp_path / "lora.safetensors")
    base = ["--model", str(pipelines["flux"]), "--prompt", "a red cat", *COMMON]
    assert main([*base, "--out-dir", str(tmp_path / "plain")]) == 0
    assert main([*base, "--lora", str(tmp_path / "lora.safetensors"), "--out-dir", str(tmp_path / "lora")]) == 0
    assert not np.array_equal(images(tmp_path / "plain", 1)[0], images(tmp_path / "lora", 1)[0])


def test_bad_flags_get_one_line(pipelines, tmp_path, capsys):
    flux = str(pipelines["flux"])
    cases = [(["--model", flux, "--classes", "1,2"], "--classes is for class-conditional models"),
             (["--model", flux, "--vae", flux], "--vae is for class-conditional models"),
             (["--model", flux, "--cfg-chan", "4"], "--cfg-channels is for class-conditional models"),
             (["--model", str(tmp_path)], "no model_index.json"),
             (["--model", flux, "--image-size", "34"], "multiple of 4"),
             (["--model", flux, "--grid", "20"], "--grid"),
             (["--model", flux, "--r-min", "0.5"], "--r-min and --r-max go together"),
             (["--model", flux, "--model-args", '{"plan": {"depth": 3}}'], "plan takes the fields of flexdit.Plan"),
             (["--model", flux, "--model-args", '{"num_pool": 1}'], "takes only {\"plan\": {...}}"),
             (["--model", flux, "--lora", str(tmp_path / "none.safetensors")], "--lora"),
             (["--model", flux, "--steps", "0"], "--steps must be >= 1")]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exc:
            main(["--prompt", "a cat", "--out-dir", str(tmp_path / "o"), "--device", "cpu", "--no-progress",
                  "--image-size", "32", "--model-args", json.dumps({"plan": PLAN}), *extra])
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and len(err.splitlines()) == 1 and message in err, (message, err)
    with pytest.raises(SystemExit):
        main(["--model", "FlexDiT-S/2", "--lora", "x.safetensors", "--out-dir", str(tmp_path / "o")])
    assert "--lora needs --prompt" in capsys.readouterr().err


def test_encode_finetune_sample_chain(pipelines, tmp_path):
    """python -m flexdit.data --pipeline -> flexdit-finetune --lora-rank -> flexdit-sample --lora on one tiny FLUX
    pipeline folder: the shards, the adapters file and the plan fit together."""
    pytest.importorskip("peft")
    from flexdit.data import main as encode
    from flexdit.train import main as finetune
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
        (tmp_path / "img" / f"{i}.txt").write_text(["a red cat", "the mat"][i % 2])
    flux, plan = str(pipelines["flux"]), json.dumps({"plan": PLAN})
    assert encode([str(tmp_path / "img"), str(tmp_path / "shards"), "--pipeline", flux, "--image-size", "32",
                   "--max-sequence-length", "8", "--device", "cpu", "--no-progress"]) == 0
    assert finetune(["--model", flux, "--data", str(tmp_path / "shards"), "--out-dir", str(tmp_path / "run"),
                     "--steps", "2", "--global-batch-size", "2", "--precision", "fp32", "--ckpt-every", "2",
                     "--quiet", "--lora-rank", "2", "--model-args", plan]) == 0
    assert main(["--model", flux, "--prompt", "a red cat", "--lora", str(tmp_path / "run" / "adapters.safetensors"),
                 "--max-sequence-length", "8", "--out-dir", str(tmp_path / "samples"), *COMMON]) == 0
    assert images(tmp_path / "samples", 1)[0].shape == (32, 32, 3)
