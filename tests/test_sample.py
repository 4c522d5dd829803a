"""flexdit-sample: CLI smoke runs (dense → FlexDiT conversion, FlexDiT checkpoints, DDIM, VAE decoding), per-sample
seeds, torchrun, and at most one torch.compile per density stage."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import flexdit_kernels
from flexdit import DensitySchedule, create_diffusion, create_model, from_dit, sample_latents
from flexdit.sample import build_model, main

TINY = dict(depth=6, hidden_size=32, num_heads=2)
PLAN = dict(num_pool=1, num_modules=1, group=[1, 2, 1, 1], num_top=0)
COMMON = ["--image-size", "128", "--num-classes", "4", "--classes", "0,1,2,3", "--steps", "4", "--no-progress"]


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("DiT-S/2", input_size=16, num_classes=4, **TINY)
    # adaLN-Zero starts with a zero output; perturb so that samples depend on the network
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path_factory.mktemp("ckpt") / "dit.pt"
    torch.save(model.state_dict(), path)
    return path


def _flex_args(dense_ckpt):
    return ["--model", "FlexDiT-S/2", "--ckpt", str(dense_ckpt), "--model-args", json.dumps({**TINY, **PLAN})]


def test_cli_dense_checkpoint_converted(dense_ckpt, tmp_path, capsys):
    out = tmp_path / "s"
    main(_flex_args(dense_ckpt) + COMMON + ["--r-min", "0.61", "--r-max", "0.86", "--out-dir", str(out)])
    text = capsys.readouterr().out
    assert "converted to FlexDiT" in text and "VAE missing" in text and "grids=(5x5, 4x4, 4x4, 3x3)" in text
    with np.load(out / "latents.npz") as z:
        assert z["latents"].shape == (4, 4, 16, 16) and z["labels"].tolist() == [0, 1, 2, 3]
        assert np.isfinite(z["latents"]).all()


def test_cli_reproducible_across_batch_sizes_and_ddim(dense_ckpt, tmp_path):
    runs = []
    for bs in (1, 4):
        out = tmp_path / f"b{bs}"
        main(_flex_args(dense_ckpt) + COMMON + ["--grid", "4", "--sampler", "ddim", "--cfg-scale", "2",
                                                "--batch-size", str(bs), "--seed", "7", "--out-dir", str(out)])
        with np.load(out / "latents.npz") as z:
            runs.append(z["latents"])
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-4, atol=1e-5)


def test_cli_dense_model_and_flexdit_checkpoint(dense_ckpt, tmp_path):
    main(["--model", "DiT-S/2", "--ckpt", str(dense_ckpt), "--model-args", json.dumps(TINY)] + COMMON
         + ["--out-dir", str(tmp_path / "dense")])
    assert (tmp_path / "dense" / "latents.npz").exists()
    cfg = dict(input_size=16, num_classes=4, **TINY, **PLAN)
    from flexdit import flexdit_config, save_flexdit
    flex = from_dit(torch.load(dense_ckpt, weights_only=True), flexdit_config("FlexDiT-S/2", **cfg))
    save_flexdit(flex, tmp_path / "flex.pt")
    model, source = build_model("FlexDiT-S/2", tmp_path / "flex.pt")
    assert "FlexDiT checkpoint" in source
    for k, v in flex.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
    main(["--model", "FlexDiT-S/2", "--ckpt", str(tmp_path / "flex.pt")] + COMMON + ["--out-dir", str(tmp_path / "f")])
    assert (tmp_path / "f" / "latents.npz").exists()


def usage_error(main_fn, argv, capsys) -> str:
    """The one-line error of a CLI run that must stop with exit status 2 (argparse's convention)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main_fn(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and ": error: " in lines[0], err
    assert "weights_only=False" not in err and "Traceback" not in err
    return lines[0]


def test_cli_errors(dense_ckpt, tmp_path, capsys):
    flex = _flex_args(dense_ckpt) + COMMON
    out = ["--out-dir", str(tmp_path)]
    assert "--r-min and --r-max" in usage_error(main, flex + ["--r-min", "0.5"] + out, capsys)
    assert "FlexDiT" in usage_error(main, ["--model", "DiT-S/2", "--model-args", json.dumps(TINY)] + COMMON
                                    + ["--grid", "4"] + out, capsys)
    assert "grids" in usage_error(main, flex + ["--grid", "9"] + out, capsys)
    assert "--classes: label 4 is outside [0, 4)" in usage_error(main, flex + ["--classes", "4"] + out, capsys)
    assert "--classes must be comma-separated integer" in usage_error(main, flex + ["--classes", "a,b"] + out,
                                                                      capsys)
    assert "--model-args" in usage_error(main, flex + ["--model-args", "{bad"] + out, capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cli_gpu_flags_without_gpu(dense_ckpt, tmp_path, capsys):
    flex = _flex_args(dense_ckpt) + COMMON + ["--out-dir", str(tmp_path)]
    assert "--device cuda: no CUDA GPU" in usage_error(main, flex + ["--device", "cuda"], capsys)
    assert "--cuda-graph needs a CUDA GPU" in usage_error(main, flex + ["--cuda-graph"], capsys)
    with pytest.raises(ValueError, match="CUDA GPU"):
        sample_latents(create_model("DiT-S/2", input_size=16, num_classes=4, **TINY), create_diffusion(2),
                       torch.tensor([0]), (4, 16, 16), cuda_graph=True)


@pytest.mark.parametrize("kind, message", [
    ("empty", "is empty (0 bytes)"), ("truncated", "truncated or not a PyTorch checkpoint"),
    ("garbage", "not a PyTorch checkpoint"), ("pickle", "holds a numpy"),
    ("other-size", "missing keys (40)"),
])
def test_cli_bad_checkpoint_is_one_line(dense_ckpt, tmp_path, capsys, kind, message):
    path = tmp_path / f"{kind}.pt"
    data = dense_ckpt.read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif kind == "garbage":
        path.write_bytes(b"not a checkpoint at all" * 8)
    elif kind == "pickle":
        torch.save({"pos_embed": np.zeros(3)}, path)
    else:   # a DiT of another depth and width
        torch.save(create_model("DiT-S/2", input_size=16, num_classes=4, depth=2, hidden_size=64,
                                num_heads=2).state_dict(), path)
    line = usage_error(main, ["--model", "FlexDiT-S/2", "--ckpt", str(path), "--model-args",
                              json.dumps({**TINY, **PLAN})] + COMMON + ["--out-dir", str(tmp_path / "s")], capsys)
    assert str(path) in line and message in line, line
    if kind == "other-size":
        assert "holds a model of depth 2, hidden 64, the model built has depth 6, hidden 32" in line
        assert len(line) < 1200


def test_main_returns_zero_and_exit_status(dense_ckpt, tmp_path):
    assert main(_flex_args(dense_ckpt) + COMMON + ["--num-samples", "1", "--steps", "1",
                                                   "--out-dir", str(tmp_path)]) == 0
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "flexdit.sample", "--classes", "x", "--out-dir", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "flexdit-sample: error: --classes must be comma-separated integer labels, got 'x'")


def test_cli_vae_decodes_pngs(dense_ckpt, tmp_path, capsys):
    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, layers_per_block=1, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    vae.save_pretrained(tmp_path / "vae")
    out = tmp_path / "s"
    main(_flex_args(dense_ckpt) + COMMON + ["--vae", str(tmp_path / "vae"), "--out-dir", str(out),
                                            "--adm-npz", str(tmp_path / "adm.npz")])
    assert sorted(p.name for p in out.glob("*.png")) == ["000000.png", "000001.png", "000002.png", "000003.png",
                                                         "grid.png"]
    from PIL import Image
    with np.load(tmp_path / "adm.npz") as adm, np.load(out / "latents.npz") as z:
        assert adm["arr_0"].dtype == np.uint8 and adm["arr_0"].shape[0] == 4 and adm["arr_0"].shape[-1] == 3
        assert adm["arr_1"].tolist() == z["labels"].tolist()
        assert np.array_equal(adm["arr_0"][2], np.asarray(Image.open(out / "000002.png").convert("RGB")))


def test_cli_adm_npz_needs_the_vae(dense_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(_flex_args(dense_ckpt) + COMMON + ["--adm-npz", str(tmp_path / "a.npz"), "--out-dir", str(tmp_path)])
    assert exit_info.value.code == 2 and "--adm-npz needs --vae" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(_flex_args(dense_ckpt) + COMMON + ["--adm-npz", str(tmp_path / "no" / "a.npz"), "--vae", str(tmp_path),
                                                "--out-dir", str(tmp_path)])
    assert exit_info.value.code == 2 and "must be a .npz file in an existing folder" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_processes_match_one(dense_ckpt, tmp_path):
    args = _flex_args(dense_ckpt) + COMMON + ["--num-samples", "5", "--batch-size", "2", "--r-min", "0.61",
                                              "--r-max", "0.86", "--backend", "reference"]
    main(args + ["--out-dir", str(tmp_path / "one")])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "flexdit.sample"] + args + ["--out-dir", str(tmp_path / "two")]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=300)
    with np.load(tmp_path / "one" / "latents.npz") as a, np.load(tmp_path / "two" / "latents.npz") as b:
        assert b["indices"].tolist() == [0, 1, 2, 3, 4]
        np.testing.assert_allclose(a["latents"], b["latents"], rtol=1e-4, atol=1e-5)
    assert not list((tmp_path / "two").glob("latents_rank*"))


@pytest.mark.slow
def test_compile_at_most_once_per_stage():
    torch._dynamo.reset()
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    cfg = dict(input_size=16, num_classes=4, **TINY, **PLAN)
    from flexdit import flexdit_config
    model = from_dit(create_model("DiT-S/2", input_size=16, num_classes=4, **TINY),
                     flexdit_config("FlexDiT-S/2", **cfg)).eval()
    sched = DensitySchedule.from_rates(0.61, 0.86, 8)        # grids (5, 4, 4, 3): three distinct
    model.forward = torch.compile(model.forward, backend=counting_backend)
    with flexdit_kernels.backend("reference"):
        sample_latents(model, create_diffusion(16), torch.tensor([0, 1]), (4, 16, 16), cfg_scale=2.0,
                       schedule=sched, generator=torch.Generator().manual_seed(0))
    print(f"compilations: {len(compiles)} for grids {sched.grids}")
    assert 1 <= len(compiles) <= len(set(sched.grids)), len(compiles)
    torch._dynamo.reset()
