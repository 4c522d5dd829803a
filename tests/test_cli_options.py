"""Options are honoured or refused: what a checkpoint records wins, a flag that contradicts it is a one-line error
naming both values; bad numbers, out-dirs and batch sizes stop both CLIs with exit 2; resume falls back to the newest
readable checkpoint, log.jsonl keeps each step once, Ctrl-C checkpoints and exits 130; the library refuses bad labels
and timesteps with a ValueError naming the argument."""
import json
import os
import signal

import numpy as np
import pytest
import torch

import flexdit
from flexdit import sample as sample_mod
from flexdit import train as train_mod
from flexdit.data import make_synthetic_shards

from .test_sample import usage_error

TINY = dict(depth=6, hidden_size=32, num_heads=2)
PLAN = dict(num_pool=1, num_modules=1, group=[1, 2, 1, 1], num_top=0)
SAMPLE = ["--classes", "0,1", "--steps", "2", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("latents")
    make_synthetic_shards(root, n=16, shard_size=16, num_classes=4)
    return root


def _finetune(data, out, model="FlexDiT-S/2", steps=2, extra=()):
    args = ["--model", model, "--model-args", json.dumps({**TINY, **(PLAN if "Flex" in model else {})}),
            "--data", str(data), "--image-size", "128", "--num-classes", "4", "--out-dir", str(out),
            "--steps", str(steps), "--global-batch-size", "4", "--precision", "fp32", "--ckpt-every", "2",
            "--log-every", "2", "--quiet", "--device", "cpu", *extra]
    return train_mod.main(args)


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    _finetune(data_dir, root / "flex")
    _finetune(data_dir, root / "dense", model="DiT-S/2")
    return {"flex": root / "flex" / "checkpoints" / "0000002.pt",
            "dense": root / "dense" / "checkpoints" / "0000002.pt", "root": root}


# --- flexdit-sample: the checkpoint's config is used, and contradicting it is refused ---------------------------------

def test_sample_uses_the_checkpoint_config_dense_too(runs, tmp_path):
    for kind in ("flex", "dense"):
        out = tmp_path / kind
        assert sample_mod.main(["--ckpt", str(runs[kind]), "--out-dir", str(out), *SAMPLE]) == 0
        with np.load(out / "latents.npz") as z:
            assert z["latents"].shape == (2, 4, 16, 16)
        ran = json.loads((out / "args.json").read_text())
        assert ran["model"] == ("FlexDiT-S/2" if kind == "flex" else "DiT-S/2")
        assert ran["image_size"] == 128 and ran["num_classes"] == 4 and ran["model_config"]["depth"] == 6
    # a dense finetune checkpoint converts to FlexDiT with only the plan given
    assert sample_mod.main(["--model", "FlexDiT-S/2", "--ckpt", str(runs["dense"]), "--model-args",
                            json.dumps(PLAN), "--out-dir", str(tmp_path / "conv"), *SAMPLE]) == 0


@pytest.mark.parametrize("extra, message", [
    (["--model", "FlexDiT-B/2"], "--model FlexDiT-B/2 conflicts with checkpoint"),
    (["--model", "DiT-S/2"], "holds a FlexDiT model"),
    (["--model-args", '{"hiden_size": 3}'], "--model-args: unknown field 'hiden_size'"),
    (["--model-args", '{"hidden_size": 64}'], "--model-args: hidden_size=64 conflicts with checkpoint"),
    (["--image-size", "256"], "--image-size: input_size=32 conflicts with checkpoint"),
    (["--num-classes", "10"], "--num-classes: num_classes=10 conflicts with checkpoint"),
])
def test_sample_options_that_contradict_the_checkpoint(runs, tmp_path, capsys, extra, message):
    line = usage_error(sample_mod.main, ["--ckpt", str(runs["flex"]), "--out-dir", str(tmp_path), *SAMPLE, *extra],
                       capsys)
    assert message in line, line
    if extra[0] == "--model" and "B/2" in extra[1]:
        assert "FlexDiT-S/2" in line
    if "hidden_size" in message:
        assert "hidden_size=32" in line
    if "--image-size" in message:
        assert "input_size=16" in line


@pytest.mark.parametrize("extra, message", [
    (["--cfg-scale", "-1"], "--cfg-scale must be >= 0"),
    (["--eta", "0.5"], "--eta 0.5 is DDIM's; it needs --sampler ddim"),
    (["--steps", "0"], "--steps must be in 1..1000"),
    (["--num-samples", "0"], "--num-samples must be >= 1"),
])
def test_sample_bad_numbers(runs, tmp_path, capsys, extra, message):
    assert message in usage_error(sample_mod.main, ["--ckpt", str(runs["flex"]), "--out-dir", str(tmp_path),
                                                    *SAMPLE, *extra], capsys)


def _bad_out_dirs(tmp_path):
    afile = tmp_path / "a-file"
    afile.write_text("x")
    cases = [(afile, "exists and is not a folder"), (afile / "sub", "cannot write there")]
    if os.geteuid() != 0:            # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases.append((locked / "out", "cannot write there"))
    return cases


def test_bad_out_dir_is_one_line_in_both_clis(runs, data_dir, tmp_path, capsys):
    for path, message in _bad_out_dirs(tmp_path):
        line = usage_error(sample_mod.main, ["--ckpt", str(runs["flex"]), "--out-dir", str(path), *SAMPLE], capsys)
        assert f"--out-dir {path}: {message}" in line, line
        with pytest.raises(SystemExit) as exc:
            _finetune(data_dir, path)
        assert exc.value.code == 2 and f"--out-dir {path}: {message}" in capsys.readouterr().err


# --- flexdit-finetune ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--lr", "-1"], "--lr must be > 0, got -1.0"), (["--lr", "0"], "--lr must be > 0"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--global-batch-size", "32"], "--global-batch-size 32 is larger than the data (16 latents"),
    (["--model-args", '{"hiden_size": 3}'], "--model-args"),
])
def test_finetune_bad_numbers(data_dir, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        _finetune(data_dir, tmp_path / "r", extra=extra)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not list((tmp_path / "r").glob("checkpoints/*.pt"))


def test_resume_with_another_model_or_size_is_refused(runs, data_dir, tmp_path, capsys):
    out = runs["root"] / "flex"
    with pytest.raises(SystemExit) as exc:
        _finetune(data_dir, out, model="FlexDiT-B/2", steps=4)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--model FlexDiT-B/2 conflicts" in err and "FlexDiT-S/2" in err
    with pytest.raises(SystemExit) as exc:
        _finetune(data_dir, out, steps=4, extra=["--num-classes", "3"])
    assert exc.value.code == 2 and "num_classes=3 conflicts" in capsys.readouterr().err


def test_resume_falls_back_and_log_keeps_each_step_once(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    _finetune(data_dir, out, steps=4)
    (out / "checkpoints" / "0000004.pt").write_bytes(b"truncated")
    capsys.readouterr()
    _finetune(data_dir, out, steps=6)
    text = capsys.readouterr().out
    assert "skipping unreadable checkpoint" in text and "0000004.pt" in text
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]
    ran = json.loads((out / "args.json").read_text())
    assert ran["start_step"] == 2 and ran["resumed_from"].endswith("0000002.pt") and ran["image_size"] == 128


def test_sigint_writes_a_checkpoint_then_exits_130(data_dir, tmp_path, monkeypatch, capsys):
    real_step, calls = train_mod.train_step, {"n": 0}

    def interrupted_step(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)       # Ctrl-C during step 3
        return real_step(*a, **k)

    monkeypatch.setattr(train_mod, "train_step", interrupted_step)
    with pytest.raises(SystemExit) as exc:
        _finetune(data_dir, tmp_path / "run", steps=6, extra=["--ckpt-every", "100"])
    assert exc.value.code == 130 and "interrupted: wrote checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.pt")) == ["0000003.pt"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler     # the handler is put back


def test_progress_bar_on_a_terminal_only(data_dir, tmp_path, monkeypatch, capsys):
    base = ["--log-every", "100"]
    _finetune(data_dir, tmp_path / "a", extra=base)
    assert "loss=" not in capsys.readouterr().err            # stderr is not a terminal here
    monkeypatch.setattr(type(__import__("sys").stderr), "isatty", lambda self: True, raising=False)
    args = ["--model", "DiT-S/2", "--model-args", json.dumps(TINY), "--data", str(data_dir), "--image-size", "128",
            "--num-classes", "4", "--steps", "2", "--global-batch-size", "4", "--precision", "fp32", "--device", "cpu"]
    train_mod.main([*args, "--out-dir", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert "flexdit-finetune" in err and "loss=" in err and "2/2" in err
    train_mod.main([*args, "--out-dir", str(tmp_path / "c"), "--no-progress"])
    assert "loss=" not in capsys.readouterr().err


# --- the library -----------------------------------------------------------------------------------------------------

def test_library_refuses_bad_labels_and_timesteps():
    model = flexdit.create_model("DiT-S/2", input_size=8, num_classes=4, **TINY).eval()
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([0, 1])
    with torch.no_grad():
        assert model(x, 5, y).shape == (2, 8, 8, 8)                  # a Python int is every sample's timestep
        assert torch.equal(model(x, 5, y), model(x, torch.tensor([5, 5]), y))
        for t, message in ((torch.tensor([5000, 1]), r"t must lie in \[0, 1000\)"),
                           (torch.tensor([-5, 1]), r"t must lie in \[0, 1000\)"),
                           (torch.tensor([0.5, 1.0]), "t must hold whole timesteps"),
                           ("7", "t must be a tensor of timesteps")):
            with pytest.raises(ValueError, match=message):
                model(x, t, y)
        with pytest.raises(ValueError, match=r"y: label 5 is outside \[0, 4\)"):
            model(x, torch.tensor([1, 2]), torch.tensor([0, 5]))
        with pytest.raises(ValueError, match="y must be an integer tensor"):
            model(x, torch.tensor([1, 2]), torch.tensor([0.0, 1.0]))
    d = flexdit.create_diffusion()
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1000\)"):
        d.training_losses(lambda xt, tt: model(xt, tt, y), x, torch.tensor([1000, 3]))
    with pytest.raises(ValueError, match="label 4 is outside"):
        flexdit.sample_latents(model, flexdit.create_diffusion(2), torch.tensor([4]), (4, 8, 8))
    with pytest.raises(ValueError, match="cfg_scale must be >= 0"):
        flexdit.sample_latents(model, flexdit.create_diffusion(2), torch.tensor([1]), (4, 8, 8), cfg_scale=-1)
    with pytest.raises(ValueError, match="eta is DDIM's"):
        flexdit.sample_latents(model, flexdit.create_diffusion(2), torch.tensor([1]), (4, 8, 8), eta=0.5)


def test_resume_without_model_takes_the_runs(data_dir, tmp_path):
    _finetune(data_dir, tmp_path / "run", model="DiT-S/2")
    args = ["--data", str(data_dir), "--out-dir", str(tmp_path / "run"), "--steps", "4", "--global-batch-size", "4",
            "--precision", "fp32", "--quiet", "--device", "cpu"]
    assert train_mod.main(args) == 0
    ran = json.loads((tmp_path / "run" / "args.json").read_text())
    assert ran["model"] == "DiT-S/2" and ran["start_step"] == 2 and ran["model_config"]["hidden_size"] == 32
    assert torch.load(tmp_path / "run" / "checkpoints" / "0000004.pt", weights_only=True)["name"] == "DiT-S/2"


def test_finetune_refuses_zero_classes_and_resumes_past_a_half_written_log_line(tmp_path, capsys):
    from flexdit.train import main as finetune, trim_log
    with pytest.raises(SystemExit) as exit_info:
        finetune(["--model", "FlexDiT-S/2", "--data", str(tmp_path), "--num-classes", "0",
                  "--out-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2 and "--num-classes must be >= 1, got 0" in capsys.readouterr().err
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste')
    trim_log(log, 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_grid_flag_takes_a_side_or_a_pair():
    from types import SimpleNamespace

    from flexdit._cli import schedule_from_args
    model = SimpleNamespace(config=SimpleNamespace(plan=flexdit.Plan(1, 1, (1, 1, 1, 1), 1, 4)), token_grid=(8, 8))
    args = lambda grid: SimpleNamespace(r_min=None, r_max=None, grid=grid)  # noqa: E731
    assert schedule_from_args(args("4"), model).grids == ((4, 4),)
    assert schedule_from_args(args("4x2"), model).grids == ((4, 2),)
    with pytest.raises(ValueError, match="--grid"):
        schedule_from_args(args("9x2"), model)
