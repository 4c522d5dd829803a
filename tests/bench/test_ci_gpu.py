"""`.ci/gpu` (the GPU run), its summary (`python -m bench.ci`) and the sanitizer driver (`python -m bench sanitize`)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from bench.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, ".ci", "gpu")


# ----------------------------------------------------------------------------------------------------------------
# .ci/gpu
# ----------------------------------------------------------------------------------------------------------------

def test_script_is_executable_bash_that_parses():
    assert os.access(SCRIPT, os.X_OK)
    assert subprocess.run(["bash", "-n", SCRIPT], capture_output=True).returncode == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour of a machine without a GPU")
def test_no_gpu_stops_at_once_with_one_line_and_exit_3(tmp_path):
    out = tmp_path / "gpu-out"
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run([SCRIPT, str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 3
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(".ci/gpu: no CUDA GPU on this machine: ")
    assert "torch.cuda.is_available() is False" in lines[0]
    assert not out.exists()


def test_bad_usage_exit_2():
    proc = subprocess.run([SCRIPT, "a", "b"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------------------------

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1"
skipped="1" tests="4"><testcase classname="tests.kernels.test_attention" name="test_a[bf16]"/>
<testcase classname="tests.kernels.test_attention" name="test_b[bf16]"><failure message="x">boom</failure></testcase>
<testcase classname="tests.kernels.test_attention" name="test_c"/>
<testcase classname="tests.kernels.test_attention" name="test_d"><skipped message="s"/></testcase>
</testsuite></testsuites>"""


def _step(*fields):
    return "\t".join(str(f) for f in fields) + "\n"


def test_summary_of_a_run(tmp_path):
    from bench.ci import main as ci_main
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw.mkdir()
    (raw / "env.json").write_text(json.dumps({"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0",
                                              "cuda": "13.0", "git": "abc1234", "missing_optional": ["fvcore"]}))
    (raw / "p.xml").write_text(JUNIT)
    (raw / "p.log").write_text("1 failed, 2 passed\n")
    (raw / "s.log").write_text("========= ERROR SUMMARY: 0 errors\n")
    (raw / "s.json").write_text(json.dumps({"device": "cuda", "dtype": "bfloat16", "ok": False, "launches": [
        {"launch": "token_pool", "op": "token_pool", "status": "ok", "reason": ""},
        {"launch": "attention[flash]", "op": "attention", "status": "FAILED", "reason": "max abs err 0.5"}]}))
    rows = [dict(suite="model", case="DiT-XL/2 512px grid=8", impl=impl, metric=m, value=v, unit="", gpu="g",
                 torch="t", triton="t", flexdit="f", dtype="bf16", batch=32, mode="eager", note=n)
            for impl, m, v, n in (("dense", "ms", 133.5, ""), ("flexdit", "ms", 56.6, ""),
                                  ("flexdit", "speedup", 2.36, "over dense"))]
    (raw / "m.json").write_text(json.dumps({"format": 1, "argv": ["model", "--batch-size", "32"], "tags": {},
                                            "failures": [], "notes": ["no GMACs"], "rows": rows}))
    (raw / "m.log").write_text("table\n")
    (raw / "k.log").write_text("compiling\n")
    (raw / "steps.tsv").write_text(
        _step("env", "info", "ok", 0, 1.0, 30, "", "env.json", "")
        + _step("pytest-kernels-test_attention", "pytest", "failed", 1, 50.2, 90, "p.log", "p.xml", "tests/x.py")
        + _step("sanitize-memcheck", "sanitize", "failed", 1, 20.0, 60, "s.log", "s.json", "memcheck")
        + _step("bench-kernels", "bench", "timeout", 124, 100.0, 100, "k.log", "k.json", "")
        + _step("bench-model-512-b32-eager", "bench", "ok", 0, 30.0, 40, "m.log", "m.json", "")
        + _step("bench-sample", "bench", "skipped", "-", 0, 0, "", "", "not started: the 540 s budget was spent"))
    assert ci_main(["summarize", "--raw", str(raw), "--out", str(out), "--budget", "540", "--elapsed", "531"]) == 1
    assert sorted(os.listdir(out)) == ["logs.txt", "summary.json", "summary.md"]
    md = (out / "summary.md").read_text()
    assert md.startswith("# .ci/gpu: NVIDIA H100 80GB HBM3 (torch 2.11.0, triton 3.6.0, CUDA 13.0, commit abc1234)")
    assert "FAILED: 4 of 6 steps did not pass" in md and "531 s of a 540 s budget" in md
    assert "| pytest-kernels-test_attention | **FAILED** (exit 1) | 50.2 | 90 | 2 passed, 1 failed" in md
    assert "- pytest-kernels-test_attention: tests.kernels.test_attention::test_b[bf16]" in md
    assert "- sanitize-memcheck: attention[flash] FAILED: max abs err 0.5" in md and "memcheck: 0 errors" in md
    assert "- bench-kernels: timeout (exit 124): compiling" in md
    assert "not started: the 540 s budget was spent" in md
    assert "## bench-model-512-b32-eager" in md and "flexdit (over dense)" in md and "note: no GMACs" in md
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["ok"] and summary["bench"]["bench-model-512-b32-eager"]["rows"][2]["value"] == 2.36
    assert "== bench-kernels: timeout" in (out / "logs.txt").read_text()


def test_summary_passes_when_every_step_passed(tmp_path):
    from bench.ci import summarize
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "e.log").write_text("ok\n")
    (raw / "steps.tsv").write_text(_step("env", "info", "ok", 0, 1.0, 30, "e.log", "", ""))
    assert summarize(str(raw), str(tmp_path / "out")) == 0
    assert "PASSED: every step passed" in (tmp_path / "out" / "summary.md").read_text()


# ----------------------------------------------------------------------------------------------------------------
# Sanitizer driver (the Triton interpreter stands in for the GPU here)
# ----------------------------------------------------------------------------------------------------------------

needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available(),
                                       reason="runs the launches through the Triton interpreter")


def test_every_exported_op_has_a_launch():
    from bench.sanitize import LAUNCHES, exported_ops
    covered = {item.op for item in LAUNCHES}
    assert set(exported_ops()) <= covered
    assert {"attention[few_keys]", "attention[split_k]", "attention[flash]"} <= {item.name for item in LAUNCHES}


@needs_interpreter
def test_sanitize_cli_runs_launches(tmp_path, capsys):
    jpath = tmp_path / "s.json"
    assert main(["sanitize", "--device", "cpu", "--op", "token_mean", "--op", "upsample_add",
                 "--json", str(jpath)]) == 0
    report = json.loads(jpath.read_text())
    assert report["ok"] and [r["launch"] for r in report["launches"]] == ["token_mean", "upsample_add"]
    assert "2 of 2 launches ok" in capsys.readouterr().out


@needs_interpreter
def test_sanitize_reports_wrong_and_uncovered_ops(monkeypatch):
    import flexdit_kernels as fk

    import bench.sanitize as sz
    monkeypatch.setattr(fk, "upsample_add", lambda s, d, hw, grid: fk.upsample_add_ref(s, d, hw, grid) + 1.0)
    monkeypatch.setattr(sz, "LAUNCHES", [item for item in sz.LAUNCHES if item.op != "token_mean"])
    lines = []
    with fk.backend("triton"):
        report = sz.run_launches(torch.device("cpu"), torch.float32, ["token_mean", "upsample_add"], lines.append)
    status = {r["launch"]: r["status"] for r in report["launches"]}
    assert status == {"upsample_add": "FAILED", "token_mean": "UNCOVERED"} and not report["ok"]
    assert any(line.startswith("token_mean") and "UNCOVERED" in line for line in lines)


def test_sanitize_without_interpreter_on_cpu_is_one_line_exit_2(monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("checks the behaviour of a machine without a GPU")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(SystemExit) as exc:
        main(["sanitize", "--device", "cpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "TRITON_INTERPRET=1" in err[0]
