"""`python -m bench kernels` checks every op before timing any, refuses to time a wrong one, and keeps the others'
results when one op family fails or its worker process dies."""
import json
import os
import sys

import pytest

import bench.kernels
from bench.__main__ import main


def _record_order(monkeypatch):
    """Log ("check", case) and ("time", None) events in the order they happen."""
    events = []
    check = bench.kernels._Runner.check

    def logged_check(self, case):
        events.append(("check", case.name))
        return check(self, case)

    timer = bench.kernels.bench_fn

    def logged_timer(fn, device, **kwargs):
        events.append(("time", None))
        return timer(fn, device, **kwargs)

    monkeypatch.setattr(bench.kernels._Runner, "check", logged_check)
    monkeypatch.setattr(bench.kernels, "bench_fn", logged_timer)
    return events


def test_broken_op_is_failed_others_still_timed_and_every_check_comes_first(monkeypatch, tmp_path, capsys):
    import flexdit_kernels as fk
    events = _record_order(monkeypatch)
    monkeypatch.setattr(fk, "token_pool", lambda x, hw, grid: fk.token_pool_ref(x, hw, grid) * 1.5)
    jpath = tmp_path / "k.json"
    assert main(["kernels", "--device", "cpu", "--repeats", "1", "--json", str(jpath)]) == 1

    kinds = [kind for kind, _ in events]
    assert "time" in kinds and "check" not in kinds[kinds.index("time"):], "a timing ran before the last check"
    checked = [name for kind, name in events if kind == "check"]
    for op in bench.kernels.OPS:
        assert any(name.startswith(op) for name in checked), op
    for path in ("few_keys", "split_k", "flash"):   # every attention path is checked, forced where not timed
        assert any(name.startswith("attention") and name.endswith(f"[{path} path]") for name in checked) or \
            path == "few_keys", path

    out = capsys.readouterr().out
    assert "FAILED: token_pool: max abs err" in out and "correctness checks against the references" in out
    payload = json.loads(jpath.read_text())
    assert payload["failures"] and all(f.startswith("token_pool") for f in payload["failures"])
    timed = {r["case"].split()[0] for r in payload["rows"] if r["suite"] == "kernels"}
    assert timed == set(bench.kernels.OPS) - {"token_pool"}
    checks = {r["case"]: r["value"] for r in payload["rows"] if r["suite"] == "check"}
    assert all(v == 0.0 for c, v in checks.items() if c.startswith("token_pool"))
    assert all(v == 1.0 for c, v in checks.items() if not c.startswith("token_pool"))


def test_a_raising_op_is_a_failed_check(monkeypatch, capsys):
    import flexdit_kernels as fk

    def boom(x, eps=1e-6):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore lines")

    monkeypatch.setattr(fk, "token_mean", boom)
    assert main(["kernels", "--device", "cpu", "--op", "token_mean", "--repeats", "1"]) == 1
    assert "raised RuntimeError: CUDA error: an illegal memory access was encountered" in capsys.readouterr().out


def test_isolated_families_survive_a_dead_worker(monkeypatch, tmp_path, capsys):
    """--isolate: the token_pool worker dies as a CUDA fault would end it; token_mean, in its own workers, is
    checked and timed, and the dead family's cases are reported as failed with the worker's last line."""
    real = bench.kernels.worker_command

    def command(args, phase, path):
        if "-token_pool-" in os.path.basename(path):
            return [sys.executable, "-c", "import sys; print('RuntimeError: CUDA error: an illegal memory access "
                                          "was encountered', file=sys.stderr); sys.exit(134)"]
        return real(args, phase, path)

    monkeypatch.setattr(bench.kernels, "worker_command", command)
    monkeypatch.setattr(bench.kernels, "OPS", ("token_pool", "token_mean"))
    jpath = tmp_path / "k.json"
    assert main(["kernels", "--device", "cpu", "--isolate", "--repeats", "1", "--json", str(jpath)]) == 1
    payload = json.loads(jpath.read_text())
    assert payload["failures"] == ["token_pool B=2 N=8x8 C=64 G=4: not checked: token_pool worker exited with "
                                   "status 134: RuntimeError: CUDA error: an illegal memory access was encountered"]
    timed = {(r["case"], r["impl"]) for r in payload["rows"] if r["suite"] == "kernels" and r["metric"] == "ms"}
    assert timed == {("token_mean B=2 N=8x8 C=64 fwd", "flexdit-ref"), ("token_mean B=2 N=8x8 C=64 fwd", "torch")}
    assert any("process of its own" in n for n in payload["notes"])


FAKE_WORKER = """
import json, sys
path = sys.argv[sys.argv.index("--worker-file") + 1]
job = json.load(open(path))
out = open(path + ".out", "w")
for case in job["cases"]:
    out.write(json.dumps({"start": case["name"]}) + "\\n"); out.flush()
    if case["params"]["g"] == 2:
        sys.exit(139)                      # dies inside this case, as a segfault or a CUDA abort would
    out.write(json.dumps({"case": case["name"], "reason": None}) + "\\n"); out.flush()
"""


def test_a_worker_that_dies_in_a_case_fails_that_case_and_a_fresh_one_takes_the_rest(tmp_path, monkeypatch):
    from bench.kernels import CPU_SHAPES, _in_worker, cases

    family = cases("token_pool", dict(CPU_SHAPES, grids=(4, 2, 3)))
    monkeypatch.setattr(bench.kernels, "worker_command",
                        lambda args, phase, path: [sys.executable, "-c", FAKE_WORKER, "--worker-file", path])

    class Args:
        family_timeout = None

    records, died = _in_worker(Args, "check", "token_pool", family, {}, 1.0, str(tmp_path))
    assert [records[c.name]["reason"] for c in family] == [
        None, "the worker died in this case: token_pool worker exited with status 139", None]
    assert died == "token_pool worker exited with status 139"


def test_cuda_faults_are_recognised():
    from bench.kernels import _poisons
    assert _poisons(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not _poisons(ValueError("x must be 3-D"))


def test_sigterm_keeps_the_rows_measured_so_far(monkeypatch, tmp_path, capsys):
    """`timeout` ends a CI step with SIGTERM: the run stops, says so, and still writes what it measured."""
    from bench.__main__ import _raise_stopped
    real = bench.kernels.run_family

    def time_then_stop(runner, phase, family, emit):
        finished = real(runner, phase, family, emit)
        if phase == "time" and family[0].op == "token_mean":
            _raise_stopped(15, None)
        return finished

    monkeypatch.setattr(bench.kernels, "run_family", time_then_stop)
    jpath = tmp_path / "k.json"
    assert main(["kernels", "--device", "cpu", "--repeats", "1", "--json", str(jpath)]) == 1
    payload = json.loads(jpath.read_text())
    assert payload["failures"] == ["kernels: stopped by signal 15 before the end (a time limit?); the rows "
                                   "measured until then are kept"]
    timed = {r["case"].split()[0] for r in payload["rows"] if r["suite"] == "kernels"}
    assert timed == {"token_pool", "token_mean"}


def test_every_exported_op_has_cases():
    from bench.kernels import CPU_SHAPES, OPS, cases, exported_ops
    assert set(exported_ops()) <= set(OPS)
    assert all(cases(op, CPU_SHAPES) for op in OPS)


def test_triton_only_routes_no_shape_to_a_pytorch_path(monkeypatch):
    """Inside `triton_only()` attention keeps a dense shape off SDPA and "auto" skips AUTO_TABLE's reference rows."""
    import torch

    import flexdit_kernels as fk
    from flexdit_kernels import _attention, _dispatch
    monkeypatch.setattr(_attention, "call_op", lambda *args: ("triton",))
    monkeypatch.setattr(_attention, "attention_ref", lambda *args: "sdpa")
    monkeypatch.setattr(_dispatch, "use_triton", lambda *tensors: True)
    monkeypatch.setattr(_attention, "use_triton", lambda *tensors: True)
    monkeypatch.setitem(_dispatch.AUTO_TABLE, "token_mean", [({}, "reference")])
    q = torch.randn(1, 256, 1, 8)
    with fk.backend("auto"):
        assert fk.attention(q, q, q) == "sdpa" and not _dispatch.use_kernel("token_mean", q)
        with fk.triton_only():
            assert fk.triton_only_active()
            assert fk.attention(q, q, q) == "triton" and _dispatch.use_kernel("token_mean", q)
        assert not fk.triton_only_active() and fk.attention(q, q, q) == "sdpa"


def test_a_wrong_second_output_is_failed(monkeypatch, capsys):
    """gated_residual_layernorm_modulate returns (r, u): each output is checked, here u is wrong."""
    import flexdit_kernels as fk
    ref = fk.gated_residual_layernorm_modulate_ref

    def wrong(*args):
        r, u = ref(*args)
        return r, u + 1.0

    monkeypatch.setattr(fk, "gated_residual_layernorm_modulate", wrong)
    assert main(["kernels", "--device", "cpu", "--op", "gated_residual_layernorm_modulate", "--repeats", "1"]) == 1
    assert "FAILED: gated_residual_layernorm_modulate output 1: max abs err" in capsys.readouterr().out
