"""flexdit-finetune on text-to-image hosts (tiny PixArt-α, SD3, FLUX): LoRA and full fine-tuning, exact resume,
FSDP2 under torchrun against one process, activation checkpointing, one-line errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flexdit_kernels as fk
from flexdit import apply_patch
from flexdit import train as train_mod
from flexdit.train import main, make_synthetic_text_shards

from .test_mmdit import PLAN, inputs, tiny_flux

pytest.importorskip("diffusers")
pytest.importorskip("peft")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def flux_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux-text")
    make_synthetic_text_shards(root, "flux", n=32, size=8)
    return root


def _args(data, out, steps, extra=(), model="tiny-flux", batch=4):
    return ["--model", model, "--data", str(data), "--out-dir", str(out), "--steps", str(steps),
            "--global-batch-size", str(batch), "--precision", "fp32", "--lr", "1e-3", "--ckpt-every", "2",
            "--log-every", "1", "--quiet", "--r-min", "0.5", "--r-max", "0.9", *extra]     # extra's flags win


def _trained(folder):
    """The trained weights and optimiser state of a sharded checkpoint folder, as one flat dict."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    target = folder.parent / (folder.name + ".pt")
    dcp_to_torch_save(folder, target)
    state = torch.load(target, weights_only=False)
    flat = {f"model.{k}": v for k, v in state["model"].items()}
    for k, st in state["optim"]["state"].items():
        flat.update({f"optim.{k}.{n}": v for n, v in st.items() if isinstance(v, torch.Tensor)})
    return flat


def test_full_fine_tuning_resumes(flux_data, tmp_path):
    """Full fine-tuning leaves some parameters without a gradient (and AdamW without their state): resuming from
    step 2 still gives the uninterrupted run's weights and optimiser state."""
    assert main(_args(flux_data, tmp_path / "straight", 4)) == 0
    assert main(_args(flux_data, tmp_path / "broken", 2)) == 0
    assert main(_args(flux_data, tmp_path / "broken", 4)) == 0
    a = _trained(tmp_path / "straight" / "checkpoints" / "0000004")
    b = _trained(tmp_path / "broken" / "checkpoints" / "0000004")
    assert a.keys() <= b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_resume_is_bit_exact(flux_data, tmp_path, monkeypatch):
    """Interrupted in step 4 (the last checkpoint is step 2's) and resumed: the same weights, optimiser state and
    adapters file as an uninterrupted run; only the LoRA weights and W1/W2 are in the checkpoint."""
    lora = ["--lora-rank", "2", "--lora-targets", "to_q,proj_out"]
    assert main(_args(flux_data, tmp_path / "straight", 4, lora)) == 0
    real, calls = train_mod.train_step, {"n": 0}

    def crashing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "train_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        main(_args(flux_data, tmp_path / "broken", 4, lora))
    monkeypatch.setattr(train_mod, "train_step", real)
    assert [p.name for p in (tmp_path / "broken" / "checkpoints").iterdir()] == ["0000002"]
    main(_args(flux_data, tmp_path / "broken", 4, lora))
    a = _trained(tmp_path / "straight" / "checkpoints" / "0000004")
    b = _trained(tmp_path / "broken" / "checkpoints" / "0000004")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    names = [k for k in a if k.startswith("model.")]
    assert names and all("lora_" in k or "fuse_" in k for k in names)
    log = [json.loads(line)["step"] for line in (tmp_path / "broken" / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4]
    with pytest.raises(SystemExit) as exc:      # a resumed run keeps its LoRA settings
        main(_args(flux_data, tmp_path / "straight", 6, ["--lora-rank", "4"]))
    assert exc.value.code == 2
    from safetensors.torch import load_file
    sa, sb = (load_file(tmp_path / d / "adapters.safetensors") for d in ("straight", "broken"))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _recording(monkeypatch, crash_at=None):
    """train_step spied on: the text inputs of each step's batch, appended to the returned list; the call
    `crash_at` raises KeyboardInterrupt instead."""
    real, seen = getattr(train_mod.train_step, "real", train_mod.train_step), []

    def spy(net, objective, optimizer, scaler, micro, *a, **k):
        if crash_at is not None and len(seen) + 1 == crash_at:
            raise KeyboardInterrupt
        seen.append([{k: v.clone() for k, v in data.items()} for data, *_ in micro])
        return real(net, objective, optimizer, scaler, micro, *a, **k)

    spy.real = real                               # a later spy wraps the real step, not this one
    monkeypatch.setattr(train_mod, "train_step", spy)
    return seen


def test_caption_dropout(flux_data, tmp_path, monkeypatch, capsys):
    """--caption-dropout 0 feeds the shards' batches untouched; 0.5 swaps whole samples' text inputs for the empty
    caption's, drawn from (seed, rank, step): a resumed run draws as an uninterrupted one; the flag is recorded and a
    resumed run keeps it."""
    from flexdit.data import TextShards
    ds = TextShards(flux_data)
    null = ds.null_text
    seen = _recording(monkeypatch)
    assert main(_args(flux_data, tmp_path / "p0", 2)) == 0
    sampler = train_mod.EpochSampler(len(ds), 4, 1, 0)
    for step, (data,) in enumerate(seen):
        want = ds.batch(sampler.indices(step, 0))
        assert data.keys() == want.keys() and all(torch.equal(data[k], want[k]) for k in want)
    assert json.loads((tmp_path / "p0" / "args.json").read_text())["caption_dropout"] == 0.0

    drop = ["--caption-dropout", "0.5", "--lora-rank", "2", "--lora-targets", "to_q,proj_out"]
    seen = _recording(monkeypatch)
    assert main(_args(flux_data, tmp_path / "straight", 4, drop)) == 0
    straight = [data for (data,) in seen]
    dropped = 0
    for step, data in enumerate(straight):
        want = ds.batch(sampler.indices(step, 0))
        assert torch.equal(data["latents"], want["latents"])
        for i in range(4):
            is_null = [torch.equal(data[k][i], null[k][0]) for k in null]
            is_own = [torch.equal(data[k][i], want[k][i]) for k in null]
            assert all(is_null) or all(is_own)    # a sample's text inputs are dropped together
            dropped += all(is_null)
    assert 0 < dropped < 16
    assert json.loads((tmp_path / "straight" / "args.json").read_text())["caption_dropout"] == 0.5
    _recording(monkeypatch, crash_at=4)
    with pytest.raises(KeyboardInterrupt):
        main(_args(flux_data, tmp_path / "broken", 4, drop))
    seen = _recording(monkeypatch)
    assert main(_args(flux_data, tmp_path / "broken", 4, drop)) == 0
    assert len(seen) == 2
    for (data,), want in zip(seen, straight[2:]):
        assert all(torch.equal(data[k], want[k]) for k in want)
    a = _trained(tmp_path / "straight" / "checkpoints" / "0000004")
    b = _trained(tmp_path / "broken" / "checkpoints" / "0000004")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:      # a resumed run keeps its caption dropout
        main(_args(flux_data, tmp_path / "straight", 6, [*drop, "--caption-dropout", "0.1"]))
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "--caption-dropout 0.1 conflicts with the run being resumed" in err


def test_drop_captions_at_one_feeds_only_the_empty_caption():
    g = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(3, 4, 2, 2), "encoder_hidden_states": torch.randn(3, 5, 6),
             "encoder_attention_mask": torch.ones(3, 5, dtype=torch.uint8)}
    null = {"encoder_hidden_states": torch.randn(1, 5, 6),
            "encoder_attention_mask": torch.tensor([[1, 0, 0, 0, 0]], dtype=torch.uint8)}
    out = train_mod.drop_captions(batch, null, 1.0, g)
    assert torch.equal(out["latents"], batch["latents"])
    for k, v in null.items():
        assert out[k].dtype == batch[k].dtype and torch.equal(out[k], v.expand_as(batch[k]))
    assert train_mod.drop_captions(batch, null, 0.0, g) is batch
    with pytest.raises(ValueError, match="p must be in"):
        train_mod.drop_captions(batch, null, 1.5, g)
    with pytest.raises(ValueError, match=r"null_text\['encoder_hidden_states'\] must be \(1, 5, 6\)"):
        train_mod.drop_captions(batch, {"encoder_hidden_states": torch.randn(1, 4, 6)}, 0.5, g)
    with pytest.raises(ValueError, match="a key of batch"):
        train_mod.drop_captions(batch, {"pooled_projections": torch.randn(1, 8)}, 0.5, g)


@pytest.mark.parametrize("model", ["tiny-pixart", "tiny-sd3"])
def test_full_finetune_of_other_hosts(model, tmp_path):
    host = model.split("-")[1]
    data = tmp_path / "data"
    make_synthetic_text_shards(data, host, n=8, size=8)
    assert main(_args(data, tmp_path / "run", 2, model=model)) == 0
    log = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert log["step"] == 2 and torch.isfinite(torch.tensor(log["loss"]))
    assert (tmp_path / "run" / "patched" / "patched.safetensors").is_file()      # save_patched at the end


@pytest.mark.slow
def test_fsdp_two_processes_equal_one_process(flux_data, tmp_path):
    """torchrun, 2 CPU processes (gloo), FSDP2, LoRA: the same weights as one process accumulating the two ranks'
    micro-batches (--grad-accum 2), within fp32 tolerance."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    lora = ["--lora-rank", "2", "--lora-targets", "to_q,proj_out"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           "-m", "flexdit.train", *_args(flux_data, tmp_path / "fsdp", 2, lora + ["--fsdp"])]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(_args(flux_data, tmp_path / "one", 2, lora + ["--grad-accum", "2"])) == 0
    a, b = (_trained(tmp_path / run / "checkpoints" / "0000002") for run in ("fsdp", "one"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
    la = [json.loads(x)["loss"] for x in (tmp_path / "fsdp" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), atol=1e-5, rtol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients(flux_data, tmp_path):
    """The host's own enable_gradient_checkpointing on a patched FLUX: the same gradients; --grad-checkpointing
    trains the same adapters."""
    grads = []
    for checkpointing in (False, True):
        model = apply_patch(tiny_flux(), PLAN).train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        with fk.backend("reference"):
            model(**inputs("flux"))[0].square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], msg=n)
    from safetensors.torch import load_file
    lora = ["--lora-rank", "2", "--lora-targets", "to_q,proj_out"]
    for name, extra in (("plain", []), ("checkpointed", ["--grad-checkpointing"])):
        assert main(_args(flux_data, tmp_path / name, 2, lora + extra)) == 0
    a, b = (load_file(tmp_path / d / "adapters.safetensors") for d in ("plain", "checkpointed"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)


def test_bad_flags_and_data_are_one_line_errors(flux_data, tmp_path, capsys):
    pixart = tmp_path / "pixart"
    make_synthetic_text_shards(pixart, "pixart", n=4, size=8)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "meta.json").write_text("{not json")
    from flexdit.data import make_synthetic_shards
    latents = tmp_path / "latents"
    make_synthetic_shards(latents, n=8, shard_size=8)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    old = tmp_path / "old"                        # text shards written before caption dropout: no null_text
    make_synthetic_text_shards(old, "flux", n=4, size=8)
    meta = json.loads((old / "meta.json").read_text())
    (old / meta.pop("null_text")).unlink()
    (old / "meta.json").write_text(json.dumps(meta))
    cases = [
        (_args(flux_data, tmp_path / "r", 2, ["--fsdp"]), "--fsdp needs torchrun"),
        (_args(flux_data, tmp_path / "r", 2, ["--lora-rank", "0"]), "--lora-rank must be >= 1"),
        (_args(flux_data, tmp_path / "r", 2, ["--lora-rank", "2", "--lora-targets", "nothing"]), "match no linear"),
        (_args(flux_data, tmp_path / "r", 2, ["--lora-targets", "to_q"]), "need --lora-rank"),
        (_args(flux_data, tmp_path / "r", 2, ["--ema-decay", "0.9"]), "--ema-decay does not apply"),
        (_args(pixart, tmp_path / "r", 2), "holds pixart inputs, --model tiny-flux is a flux host"),
        (_args(bad, tmp_path / "r", 2), "meta.json"),
        (_args(flux_data, tmp_path / "r", 2, model=str(folder)), "is a UNet2DConditionModel"),
        (_args(flux_data, tmp_path / "r", 2, ["--global-batch-size", "6", "--grad-accum", "4"]), "not divisible"),
        (_args(flux_data, tmp_path / "r", 2, ["--model-args", '{"plan": {"num_pool": 40}}']), "--model-args"),
        (_args(flux_data, tmp_path / "r", 2, ["--model-args", '{"num_pool": 1}']), "not FluxTransformer2DModel"),
        (["--model", "FlexDiT-S/2", "--data", str(flux_data)], "holds text shards"),
        (["--model", "FlexDiT-S/2", "--data", str(latents), "--lora-rank", "4"], "for text-to-image hosts"),
        (["--model", "FlexDiT-S/2", "--data", str(latents), "--caption-dropout", "0.1"], "for text-to-image hosts"),
        (_args(flux_data, tmp_path / "r", 2, ["--caption-dropout", "1"]), "--caption-dropout must be in [0, 1)"),
        (_args(flux_data, tmp_path / "r", 2, ["--caption-dropout", "-0.1"]), "--caption-dropout must be in [0, 1)"),
        (_args(old, tmp_path / "r", 2, ["--caption-dropout", "0.1"]),
         "--caption-dropout 0.1: --data " + str(old) + " has no encoding of the empty caption"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and len(err.splitlines()) == 1 and message in err, (argv, err)
        assert err.startswith("flexdit-finetune: error:")


def test_dry_run_prints_the_memory_plan(flux_data, tmp_path, capsys):
    pytest.importorskip("flexdit.memory", reason="flexdit.memory comes with the t2idata branch")
    argv = _args(flux_data, tmp_path / "r", 2, ["--lora-rank", "4", "--dry-run", "--fsdp", "--world-size", "2"])
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "LoRA rank 4, FSDP2 on 2 GPU(s), batch 2 per GPU" in out and "total per GPU" in out
    assert not (tmp_path / "r").exists()
    with pytest.raises(SystemExit):
        main(_args(flux_data, tmp_path / "r", 2, ["--world-size", "2"]))
    assert "--world-size is for --dry-run" in capsys.readouterr().err


def test_lora_finetune_of_tiny_flux_learns(tmp_path):
    """The CPU example of docs/training.md, shorter: a LoRA rank 8 fine-tune of tiny FLUX on caption-conditioned
    synthetic data; the loss falls."""
    data = tmp_path / "data"
    make_synthetic_text_shards(data, "flux", n=64)
    argv = _args(data, tmp_path / "run", 24, ["--lora-rank", "8", "--lr", "2e-3", "--ckpt-every", "100"], batch=8)
    assert main(argv) == 0
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 24 and sum(losses[-6:]) < 0.75 * sum(losses[:6]), losses


def test_pipeline_folder_trains_with_its_scheduler(tmp_path, monkeypatch):
    """--model a saved diffusers FluxPipeline folder: its transformer (from_pretrained) and its scheduler's sigmas."""
    from flexdit import objectives

    from .text_hosts import POOLED, T5_WIDTH, save_tiny_pipeline
    folder = save_tiny_pipeline("flux", tmp_path / "pipe")
    data = tmp_path / "data"
    make_synthetic_text_shards(data, "flux", n=8, size=8, text_dim=T5_WIDTH, pooled_dim=POOLED)
    seen = []
    real = objectives.FlowMatchingObjective.__init__

    def spy(self, host, scheduler=None, *a, **k):
        seen.append(scheduler.config.shift)
        real(self, host, scheduler, *a, **k)

    monkeypatch.setattr(objectives.FlowMatchingObjective, "__init__", spy)
    plan = {"plan": {"num_pool": 1, "num_modules": 1, "group": [1, 1, 1, 1], "num_top": 1}}     # depth 6
    assert main(_args(data, tmp_path / "run", 1, ["--lora-rank", "2", "--lora-targets", "to_q", "--model-args",
                                                  json.dumps(plan)], model=str(folder))) == 0
    assert seen == [3.0] and (tmp_path / "run" / "adapters.safetensors").is_file()


def test_bf16_lora_keeps_the_base_in_bf16_and_trains_in_fp32(flux_data, tmp_path, monkeypatch):
    seen = {}
    real = train_mod.train_step

    def spy(model, *a, **k):
        seen.update({n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()})
        return real(model, *a, **k)

    monkeypatch.setattr(train_mod, "train_step", spy)
    assert main(_args(flux_data, tmp_path / "run", 1, ["--lora-rank", "2", "--precision", "bf16"])) == 0
    assert {d for d, trained in seen.values() if trained} == {torch.float32}
    assert {d for d, trained in seen.values() if not trained} == {torch.bfloat16}
