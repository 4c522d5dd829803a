"""flexdit-finetune: data checks, checkpoints, exact resume, per-rank randomness, and the CPU end-to-end proof."""
import json

import numpy as np
import pytest
import torch

import flexdit_kernels
from flexdit import DensitySchedule, create_diffusion
from flexdit import train as train_mod
from flexdit.data import LatentShards, make_synthetic_shards, synthetic_latents, write_shard
from flexdit.sample import build_model
from flexdit.train import EpochSampler, _mix, heldout_loss, main, update_ema

TINY = dict(depth=6, hidden_size=32, num_heads=2)
PLAN = dict(num_pool=1, num_modules=1, group=[1, 2, 1, 1], num_top=0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("latents")
    make_synthetic_shards(root, n=96, shard_size=40, num_classes=4)
    return root


def _args(data, out, steps, extra=()):
    return ["--model", "FlexDiT-S/2", "--model-args", json.dumps({**TINY, **PLAN}), "--data", str(data),
            "--image-size", "128", "--num-classes", "4", "--out-dir", str(out), "--steps", str(steps),
            "--global-batch-size", "8", "--precision", "fp32", "--lr", "1e-3", "--ckpt-every", "2",
            "--log-every", "2", "--quiet", "--r-min", "0.61", "--r-max", "0.86", *extra]


# --- data -----------------------------------------------------------------------------------------------------------

def test_synthetic_shards_roundtrip(data_dir):
    d = LatentShards(data_dir, channels=4, input_size=16, num_classes=4)
    assert len(d) == 96 and d.latents.dtype == torch.float16 and len(d.files) == 3
    lat, lab = synthetic_latents(96, num_classes=4)
    torch.testing.assert_close(d.latents.float(), torch.from_numpy(lat), atol=2e-3, rtol=1e-3)
    assert torch.equal(d.labels, torch.from_numpy(lab))
    assert np.array_equal(synthetic_latents(8, seed=5)[0], synthetic_latents(8, seed=5)[0])


def _bad(tmp_path, kind):
    root = tmp_path / kind
    root.mkdir()
    lat, lab = synthetic_latents(8, num_classes=4)
    if kind == "shape":
        write_shard(root / "a.npz", lat[:, :, :8, :8], lab)
    elif kind == "labels":
        write_shard(root / "a.npz", lat, lab + 4)
    elif kind == "corrupt":
        (root / "a.npz").write_bytes(b"PK\x03\x04 this is not a zip file")
    elif kind == "missing":
        np.savez(root / "a.npz", latents=lat)
    elif kind == "nan":
        lat[0, 0, 0, 0] = np.nan
        write_shard(root / "a.npz", lat, lab)
    return root


@pytest.mark.parametrize("kind, message", [
    ("empty", "no .npz shards"), ("shape", "latents are 8x8"), ("labels", r"labels must lie in \[0, 4\)"),
    ("corrupt", "cannot read"), ("missing", "missing arrays"), ("nan", "NaN"),
])
def test_bad_data_stops_before_training(tmp_path, capsys, kind, message):
    data = _bad(tmp_path, kind)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        LatentShards(data, channels=4, input_size=16, num_classes=4)
    with pytest.raises(SystemExit) as exc:
        main(_args(data, out, 2))
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.startswith("flexdit-finetune: error: data:") and "\n" not in err
    assert not (out / "checkpoints").exists()


def test_cli_errors_are_one_line(data_dir, tmp_path, capsys):
    other = tmp_path / "other.pt"
    torch.save(build_model("DiT-S/2", None, input_size=16, num_classes=4, depth=2, hidden_size=64,
                           num_heads=2)[0].state_dict(), other)
    (tmp_path / "empty.pt").write_bytes(b"")
    cases = [(["--init", str(other)], "holds a model of depth 2, hidden 64, the model built has depth 6"),
             (["--resume", str(tmp_path / "empty.pt")], "is empty (0 bytes)"),
             (["--ckpt-every", "0"], "--ckpt-every must be >= 1"),
             (["--grid", "3"], "give either --r-min/--r-max or --grid")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device cuda: no CUDA GPU"))
    for extra, message in cases:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main(_args(data_dir, tmp_path / "run", 2, extra))
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and len(err.splitlines()) == 1 and message in err, (extra, err)
        assert len(err) < 1200


# --- pieces ---------------------------------------------------------------------------------------------------------

def test_update_ema_formula():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    expected = [0.9 * pa.detach() + 0.1 * pb.detach() for pa, pb in zip(a.parameters(), b.parameters())]
    update_ema(a, b, 0.9)
    for pa, e in zip(a.parameters(), expected):
        torch.testing.assert_close(pa.detach(), e)


def test_epoch_sampler_covers_each_epoch_once_across_ranks():
    s = EpochSampler(n=24, batch_size=3, world_size=2, seed=0)
    epoch0 = torch.cat([s.indices(step, rank) for step in range(4) for rank in range(2)])
    assert sorted(epoch0.tolist()) == list(range(24))
    epoch1 = torch.cat([s.indices(step, rank) for step in range(4, 8) for rank in range(2)])
    assert sorted(epoch1.tolist()) == list(range(24)) and not torch.equal(epoch0, epoch1)
    assert torch.equal(EpochSampler(24, 3, 2, 0).indices(5, 1), s.indices(5, 1))


def test_ranks_draw_different_stages():
    sched = DensitySchedule.from_rates(0.61, 0.86, 8)
    draws = {r: [sched.sample_timesteps(4, torch.Generator().manual_seed(_mix(0, r, step)))[0]
                 for step in range(40)] for r in range(2)}
    assert draws[0] != draws[1]
    assert len({_mix(0, r, s) for r in range(4) for s in range(1000)}) == 4000


# --- checkpoints and resume -----------------------------------------------------------------------------------------

def _ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_checkpoint_contents(data_dir, tmp_path):
    assert main(_args(data_dir, tmp_path, 2)) == 0
    ck = _ckpt(tmp_path / "checkpoints" / "0000002.pt")
    assert ck["arch"] == "FlexDiT" and ck["step"] == 2 and ck["schedule"]["grids"] == [5, 4, 4, 3]
    assert {"model", "ema", "opt", "scaler", "config", "rng", "args"} <= set(ck)
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2 and len(log[-1]["loss_per_stage"]) == 4


def test_resume_after_interruption_is_exact(data_dir, tmp_path, monkeypatch):
    main(_args(data_dir, tmp_path / "straight", 6))
    calls = {"n": 0}
    real_step = train_mod.train_step

    def crashing_step(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:                 # dies in step 4: the last checkpoint is step 2's
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(train_mod, "train_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        main(_args(data_dir, tmp_path / "broken", 6))
    monkeypatch.setattr(train_mod, "train_step", real_step)
    assert sorted(p.name for p in (tmp_path / "broken" / "checkpoints").iterdir()) == ["0000002.pt"]
    main(_args(data_dir, tmp_path / "broken", 6))       # --resume auto
    a = _ckpt(tmp_path / "straight" / "checkpoints" / "0000006.pt")
    b = _ckpt(tmp_path / "broken" / "checkpoints" / "0000006.pt")
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for k, st in a["opt"]["state"].items():
        for name, v in st.items():
            assert torch.equal(v, b["opt"]["state"][k][name]), (k, name)


# --- the end-to-end proof -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_end_to_end_dense_convert_finetune(tmp_path, capsys):
    """Train a tiny dense DiT on synthetic latents, convert it, fine-tune with the density schedule: the fine-tuned
    FlexDiT's held-out loss comes within 10% of the dense model's; the converted one, untrained, is worse."""
    make_synthetic_shards(tmp_path / "data", n=1024, shard_size=512, num_classes=4, seed=0)
    lat, lab = synthetic_latents(256, num_classes=4, seed=123)
    lat, lab = torch.from_numpy(lat), torch.from_numpy(lab)
    size = dict(depth=6, hidden_size=32, num_heads=2)
    common = ["--data", str(tmp_path / "data"), "--image-size", "128", "--num-classes", "4", "--precision", "fp32",
              "--global-batch-size", "16", "--lr", "2e-3", "--quiet", "--log-every", "100"]
    main(["--model", "DiT-S/2", "--model-args", json.dumps(size), "--out-dir", str(tmp_path / "dense"),
          "--steps", "400", "--ckpt-every", "400"] + common)
    dense_ckpt = tmp_path / "dense" / "checkpoints" / "0000400.pt"
    main(["--model", "FlexDiT-S/2", "--model-args", json.dumps({**size, **PLAN}), "--init", str(dense_ckpt),
          "--init-weights", "model", "--out-dir", str(tmp_path / "flex"), "--steps", "300", "--ckpt-every", "300",
          "--r-min", "0.61", "--r-max", "0.86"] + common)
    d = create_diffusion()
    sched = DensitySchedule.from_rates(0.61, 0.86, 8)
    with flexdit_kernels.backend("reference"):
        dense, _ = build_model("DiT-S/2", dense_ckpt, weights="model", input_size=16, num_classes=4, **size)
        converted, _ = build_model("FlexDiT-S/2", dense_ckpt, weights="model", input_size=16, num_classes=4,
                                   **size, **PLAN)
        tuned, _ = build_model("FlexDiT-S/2", tmp_path / "flex" / "checkpoints" / "0000300.pt", weights="model")
        losses = {name: heldout_loss(m, d, lat, lab, None if name == "dense" else sched)
                  for name, m in (("dense", dense), ("converted", converted), ("finetuned", tuned))}
    with capsys.disabled():
        print(f"\nheld-out denoising MSE: {losses}")
    assert losses["finetuned"] <= 1.10 * losses["dense"]
    assert losses["converted"] >= 1.10 * losses["dense"]


@pytest.mark.slow
def test_torchrun_ddp_two_processes(data_dir, tmp_path):
    """DDP over two CPU processes (gloo): trains, logs per stage across ranks, writes one checkpoint."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29518",
           "-m", "flexdit.train"] + _args(data_dir, tmp_path, 2)
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=300)
    ck = _ckpt(tmp_path / "checkpoints" / "0000002.pt")
    assert ck["step"] == 2
    log = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert log["step"] == 2 and sum(v is not None for v in log["loss_per_stage"]) >= 1
