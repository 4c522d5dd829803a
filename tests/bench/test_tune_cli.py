"""`python -m bench tune` on the CPU: the one-line refusal, the decision table and the export FLEXDIT_TUNE_FILE reads."""
import json

import pytest

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
    monkeypatch.setenv("FLEXDIT_CACHE_DIR", str(tmp_path / "cache"))
    cache = _tune.TuneCache({"device": "cuda", "torch": "x"})
    cache.put("token_pool|32x1024x1152:bfloat16|bfloat16",
              _tune.Decision("triton", {"triton": 0.01, "reference": 0.02}, {}))
    cache.put("token_mean|32x64x1152:bfloat16|bfloat16", _tune.Decision("reference", {"reference": 0.02},
                                                                         {"triton": "max error 1 over the bound"}))
    rows = tune.decision_rows(cache.decisions)
    assert rows[0][:5] == ("token_mean", "32x64x1152:bfloat16", "bfloat16", "FAILED: max error 1 over the bound",
                           "reference")
    assert rows[1][3:] == ("passed", "triton", "0.0100", "0.0200")
    tune.export(cache, tmp_path / "decisions.json")
    again = _tune.TuneCache({"device": "cuda", "torch": "x"}, tmp_path / "decisions.json", read_only=True)
    assert again.decisions == cache.decisions
    assert json.loads((tmp_path / "decisions.json").read_text())["environment"] == {"device": "cuda", "torch": "x"}
