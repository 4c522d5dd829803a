"""bench sample: MACs per image averaged over a run, the sub-command's options, and a tiny CPU run with modes."""
import argparse

import pytest
import torch

from bench import sample as bs
from flexdit import DensitySchedule, create_diffusion
from flexdit.diffusion import grid_steps


def test_macs_per_image_weights_each_grid_by_its_steps():
    per_fwd, per_img = bs.macs_per_image({10: 100, 6: 40, None: 999}, {10: 3, 6: 1}, guidance=True)
    assert per_fwd == pytest.approx((3 * 100 + 1 * 40) / 4) and per_img == 2 * (3 * 100 + 40)
    assert bs.macs_per_image({None: 7}, {None: 5}, guidance=False) == (7, 35)
    # the 50-step chain at the paper's 512² operating point spends 13, 12, 12, 13 steps at grids 10, 9, 8, 6
    steps = grid_steps(create_diffusion("50"), DensitySchedule.from_rates(0.90, 0.96, 32))
    assert steps == {(10, 10): 13, (9, 9): 12, (8, 8): 12, (6, 6): 13}
    with pytest.raises(ValueError, match="no count for grids"):
        bs.macs_per_image({10: 1}, {10: 1, 8: 1}, guidance=False)


def _parser():
    p = argparse.ArgumentParser(prog="python -m bench sample")
    bs.add_arguments(p)
    p.add_argument("--repeats", type=int, default=None)
    return p


def test_help_lists_the_modes_and_defaults_resolve(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "eager" in text and "compile" in text and "cuda-graph" in text
    args = _parser().parse_args([])
    bs.resolve(args, torch.device("cuda"))
    assert args.runs == [("ddim", 50), ("ddpm", 250)] and args.mode_list == list(bs.MODES)
    assert args.impl_list == ["dense", "flexdit"]
    bs.resolve(args, torch.device("cpu"))
    assert args.runs == [("ddim", bs.CPU_STEPS)] and args.mode_list == ["eager"]
    paper = ((10, 10), (9, 9), (8, 8), (6, 6))
    assert bs.default_schedule(512, 32).grids == paper == bs.default_schedule(256, 16).grids


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without a GPU")
@pytest.mark.parametrize("argv, message", [
    (["--modes", "cuda-graph"], "needs a CUDA GPU"), (["--modes", "eager,fast"], "--modes takes"),
    (["--impls", "flexdit"], "needs a CUDA GPU"), (["--grids", "9"], "every side must be in 1..8"),
])
def test_validate_errors(argv, message, capsys):
    p = _parser()
    args = p.parse_args(["--model", "DiT-S/4", "--image-size", "256"] + argv)
    with pytest.raises(SystemExit) as exc:
        bs.validate(p, args, torch.device("cpu"))
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_tiny_cpu_run_reports_macs_and_speedup(monkeypatch):
    from bench.common import Results
    monkeypatch.setattr(bs, "count_macs_by_grid", lambda name, size, grids: {None: 10e9, (3, 3): 4e9, (2, 2): 2e9})
    args = _parser().parse_args(["--model", "DiT-S/8", "--image-size", "256", "--batch-size", "1", "--steps", "2",
                                 "--grids", "3,2", "--cfg-scale", "1.5"])
    args.torch_dtype, args.repeats = torch.float32, 1
    bs.validate(_parser(), args, torch.device("cpu"))
    results = Results(tags={})
    bs.run(args, results, torch.device("cpu"))
    case = "DiT-S/8 256px ddim2 b1 cfg=1.5 eager"
    assert results.get("sample", case, "flexdit-ref", "speedup") > 0
    # 2 steps (original t = 999 and 0): one at each grid of the 2-stage schedule; guidance doubles the per-image sum
    assert results.get("sample", case, "flexdit-ref", "GMACs/fwd") == pytest.approx(3.0)
    assert results.get("sample", case, "flexdit-ref", "TMACs/img") == pytest.approx(2 * 6e9 / 1e12)
    assert results.get("sample", case, "dense", "GMACs/fwd") == pytest.approx(10.0)
    assert "eager" in bs.table(results)
