"""`python -m bench tune` on the CPU: the one-line refusal, the decision table and the export FLEXDIT_TUNE_FILE reads."""
import json

import pytest
import torch

from bench import tune
from bench.__main__ import main
from flexdit_kernels import _tune


def test_tune_without_a_gpu_is_a_one_line_error(capsys):
    assert main(["tune"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m bench: error: tune needs a CUDA GPU") and "\n" not in err


def test_tune_refuses_bad_grids_models_and_modes(capsys, monkeypatch):
    assert main(["tune", "--grids", "10,a"]) == 2
    assert main(["tune", "--grids", "40"]) == 2 and "--grids '40'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tune", "--model", "nope"])
    assert "--model 'nope' is not a known model" in capsys.readouterr().err
    monkeypatch.setenv("FLEXDIT_TUNE", "sometimes")
    assert main(["tune"]) == 2 and "FLEXDIT_TUNE must be one of" in capsys.readouterr().err


def test_decision_rows_and_export_round_trip(tmp_path, monkeypatch):
    import flexdit_kernels as fk
    monkeypatch.setenv("FLEXDIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FLEXDIT_TUNE_FILE", raising=False)
    monkeypatch.setattr(_tune, "_caches", {})
    cpu = torch.device("cpu")
    cache = _tune.cache_for(cpu)
    cache.put("token_pool|32x1024x1152:bfloat16|bfloat16",
              _tune.Decision("triton:num_warps=8", {"triton": 0.012, "triton:num_warps=8": 0.01, "reference": 0.02},
                             {}, pruned={"triton:num_warps=2": "too much shared memory"}))
    cache.put("token_mean|32x64x1152:bfloat16|bfloat16", _tune.Decision("reference", {"reference": 0.02},
                                                                         {"triton": "max error 1 over the bound"}))
    rows = tune.decision_rows(fk.tune_decisions(cpu))
    assert rows[0][:5] == ("token_mean", "32x64x1152:bfloat16", "bfloat16", "triton FAILED: max error 1 over the bound",
                           "reference")
    assert rows[0][5:] == ("0.0200", "0.0200")
    assert rows[1][3:] == ("triton ok; triton:num_warps=8 ok; triton:num_warps=2 pruned: too much shared memory",
                           "triton:num_warps=8", "0.0100", "0.0200")
    assert "triton:num_warps=8" in tune.format_rows(rows)
    fk.export_decisions(tmp_path / "decisions.json", cpu)
    again = _tune.TuneCache(cache.env, tmp_path / "decisions.json", read_only=True)
    assert again.decisions == cache.decisions
    assert json.loads((tmp_path / "decisions.json").read_text())["environment"] == cache.env


def test_tune_passes_run_a_patched_diffusers_host(monkeypatch):
    """The passes `bench tune --model pixart-alpha` times: the host patched at each grid, forward and backward."""
    pytest.importorskip("diffusers")
    import argparse
    import bench.model
    tiny = dict(num_layers=4, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
                caption_channels=16)
    monkeypatch.setattr(bench.model, "PATCH_OVERRIDES", tiny)
    monkeypatch.setitem(__import__("flexdit.plan", fromlist=["DECIDED_PLANS"]).DECIDED_PLANS, 4,
                        dict(num_pool=1, num_modules=1, group=(1, 1, 1, 0), num_top=0))
    args = argparse.Namespace(model="pixart-alpha", image_size=256, batch_size=1)
    import flexdit_kernels as fk
    seen = []
    real = fk.token_pool
    monkeypatch.setattr(fk, "token_pool", lambda x, hw, grid: seen.append(tuple(grid)) or real(x, hw, grid))
    with fk.backend("reference"):
        tune._passes(args, torch.device("cpu"), torch.bfloat16, [4, 2])()
    assert {(4, 4), (2, 2)} <= set(seen)
