"""Regression gates: the check logic on the CPU, and the committed per-GPU baselines on a GPU runner."""
import json
import os

import pytest
import torch

from bench import gates
from bench.__main__ import main
from bench.common import Results

TAGS = {"gpu": "NVIDIA H200", "torch": "2.x", "triton": "3.x", "flexdit": "0.1.0"}


def _results(speedup, gpu="NVIDIA H200"):
    res = Results(tags={**TAGS, "gpu": gpu})
    res.add("model", "DiT-XL/2 512px grid=8", "dense", "ms", 125.0, "ms")
    res.add("model", "DiT-XL/2 512px grid=8", "flexdit", "ms", 125.0 / speedup, "ms")
    res.add("model", "DiT-XL/2 512px grid=8", "flexdit", "speedup", speedup, "x")
    res.add("kernels", "attention B=32 Lq=1024 Lk=64 H=16 D=72 fwd", "flexdit", "speedup", 2.0, "x")
    return res


# ----------------------------------------------------------------------------------------------------------------
# Check logic (CPU)
# ----------------------------------------------------------------------------------------------------------------

def test_baseline_holds_only_ratios():
    base = gates.make_baseline(_results(2.5), ["model", "--batch-size", "32"])
    assert base["gpu"] == "NVIDIA H200" and base["format"] == gates.FORMAT
    assert set(base["ratios"]) == {"model|DiT-XL/2 512px grid=8|flexdit|speedup",
                                   "kernels|attention B=32 Lq=1024 Lk=64 H=16 D=72 fwd|flexdit|speedup"}
    assert not any("|ms" in key for key in base["ratios"])


@pytest.mark.parametrize("speedup, ok", [(2.5, True), (2.6, True), (2.5 * 0.91, True), (2.5 * 0.89, False)])
def test_check_passes_at_baseline_and_fails_11_percent_below(speedup, ok):
    base = gates.make_baseline(_results(2.5), [])
    report = gates.check(_results(speedup), base, "h200.json")
    assert report.ok is ok
    text = report.text()
    assert "NVIDIA H200" in text
    if not ok:
        assert "REGRESSION model|DiT-XL/2 512px grid=8|flexdit|speedup" in text and "-11.0%" in text


def test_check_gpu_mismatch_is_an_error():
    base = gates.make_baseline(_results(2.5), [])
    with pytest.raises(gates.BaselineError, match="is for GPU 'NVIDIA H200'.*'NVIDIA H100 80GB HBM3'"):
        gates.check(_results(2.5, gpu="NVIDIA H100 80GB HBM3"), base, "h200.json")


def test_check_reports_unmeasured_ratios_and_fails_when_nothing_compared():
    base = gates.make_baseline(_results(2.5), [])
    res = Results(tags=dict(TAGS))
    res.add("model", "other", "flexdit", "speedup", 3.0, "x")
    report = gates.check(res, base)
    assert not report.ok and len(report.missing) == 2 and report.new == ["model|other|flexdit|speedup"]


def test_baseline_file_errors(tmp_path):
    with pytest.raises(gates.BaselineError, match="does not exist"):
        gates.load_baseline(str(tmp_path / "none.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"gpu": "x"}))
    with pytest.raises(gates.BaselineError, match="format"):
        gates.load_baseline(str(bad))


def test_gpu_slug_names_the_file():
    assert gates.baseline_path("NVIDIA H100 80GB HBM3").endswith(os.path.join("baselines",
                                                                             "nvidia-h100-80gb-hbm3.json"))


def _cpu_run_argv():
    return ["kernels", "--device", "cpu", "--op", "token_mean", "--repeats", "1"]


class FakeTimer:
    """Stands in for `bench_fn`: returns (median, p20, p80) from `times(impl_call_index)` without running anything.
    The kernel suite on the CPU times two impls per case (flexdit-ref, then torch), so call 2i is flexdit-ref of
    run i and call 2i + 1 the torch path."""

    def __init__(self, times):
        self.times, self.calls = times, 0

    def __call__(self, fn, device, **kwargs):
        out = self.times(self.calls)
        self.calls += 1
        return out


def _fake_timer(monkeypatch, times):
    import bench.kernels
    timer = FakeTimer(times)
    monkeypatch.setattr(bench.kernels, "bench_fn", timer)
    return timer


def test_write_baseline_then_check_end_to_end(tmp_path, capsys, monkeypatch):
    """Through the CLI on the CPU: write a baseline, then check against it with ratios moved out of noise's reach."""
    _fake_timer(monkeypatch, lambda i: (1.0, 0.99, 1.01) if i % 2 == 0 else (2.0, 1.98, 2.02))
    path = tmp_path / "cpu.json"
    assert main(_cpu_run_argv() + ["--write-baseline", str(path)]) == 0
    base = json.loads(path.read_text())
    assert base["gpu"] == "cpu" and base["argv"] == _cpu_run_argv() and base["ratios"]
    assert base["runs"] == gates.DEFAULT_RUNS and all(v == pytest.approx(2.0) for v in base["ratios"].values())
    base["ratios"] = {k: 1e-6 for k in base["ratios"]}          # far below anything measured: must pass
    path.write_text(json.dumps(base))
    assert main(_cpu_run_argv() + ["--check", str(path)]) == 0
    assert "PASS" in capsys.readouterr().out
    base["ratios"] = {k: 1e6 for k in base["ratios"]}           # far above: must fail with a readable diff
    path.write_text(json.dumps(base))
    assert main(_cpu_run_argv() + ["--check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION kernels|token_mean" in out and "FAIL" in out


def test_write_baseline_refuses_ratios_that_move_between_runs(tmp_path, capsys, monkeypatch):
    """Quiet timings within each run, but the flexdit-ref time doubles from one run to the next: refused."""
    _fake_timer(monkeypatch, lambda i: ((1.0 + i // 2), 0.999 * (1.0 + i // 2), 1.001 * (1.0 + i // 2)) if i % 2 == 0
                else (2.0, 1.999, 2.001))
    path = tmp_path / "noisy.json"
    assert main(_cpu_run_argv() + ["--write-baseline", str(path), "--baseline-runs", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m bench: error: not writing")
    assert "too noisy" in err[0] and "over 3 runs" in err[0] and "--max-spread" in err[0]
    assert not path.exists()


def test_write_baseline_refuses_a_wide_timing_spread(tmp_path, capsys, monkeypatch):
    """Same ratio in every run, but p20..p80 spans the median within a run: refused."""
    _fake_timer(monkeypatch, lambda i: (1.0, 0.5, 1.5) if i % 2 == 0 else (2.0, 1.99, 2.01))
    path = tmp_path / "noisy.json"
    assert main(_cpu_run_argv() + ["--write-baseline", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "timing spread (p80 - p20) / median = 100.0%" in err[0]
    assert not path.exists()


def test_noise_guard_threshold_is_a_flag(tmp_path, monkeypatch):
    """A 10% move between runs passes with --max-spread 0.2 and is refused at the 5% default."""
    _fake_timer(monkeypatch, lambda i: (1.0 + 0.1 * (i // 2 % 2), 1.0, 1.0) if i % 2 == 0 else (2.0, 2.0, 2.0))
    path = tmp_path / "b.json"
    assert main(_cpu_run_argv() + ["--write-baseline", str(path), "--baseline-runs", "2"]) == 2
    assert main(_cpu_run_argv() + ["--write-baseline", str(path), "--baseline-runs", "2", "--max-spread", "0.2"]) == 0
    base = json.loads(path.read_text())
    assert base["runs"] == 2 and base["max_spread"] == 0.2
    assert all(0.09 < s < 0.11 for s in base["spread"].values())


def test_noise_reasons_unit():
    quiet = [_results(2.5), _results(2.52), _results(2.49)]
    assert gates.noise_reasons(quiet, 0.05) == []
    noisy = [_results(2.5), _results(3.5), _results(2.5)]
    reasons = gates.noise_reasons(noisy, 0.05)
    assert reasons and "model|DiT-XL/2 512px grid=8|flexdit|speedup moved from 2.5 to 3.5" in reasons[0]
    missing = [_results(2.5), Results(tags=dict(TAGS))]
    assert any("measured in only 1 of 2 runs" in r for r in gates.noise_reasons(missing, 0.05))


def test_check_against_another_gpus_baseline_exits_2(tmp_path, capsys):
    path = tmp_path / "h200.json"
    path.write_text(json.dumps(gates.make_baseline(_results(2.5), [])))
    assert main(_cpu_run_argv() + ["--check", str(path)]) == 2
    assert "is for GPU 'NVIDIA H200'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Gates on a GPU runner: the committed baseline for this GPU, rerun with the command it was recorded from
# ----------------------------------------------------------------------------------------------------------------

def _this_gpu_baseline():
    name = torch.cuda.get_device_name()
    path = gates.baseline_path(name)
    if not os.path.exists(path):
        pytest.skip(f"no committed baseline for {name!r} ({os.path.relpath(path)}); write one with "
                    f"`python -m bench ... --write-baseline {os.path.relpath(path)}`")
    return path, gates.load_baseline(path)


@pytest.mark.gpu
def test_committed_baseline_holds(capsys):
    path, base = _this_gpu_baseline()
    rc = main(list(base["argv"]) + ["--check", path])
    out = capsys.readouterr().out
    assert rc == 0, out


@pytest.mark.gpu
def test_attention_kernel_speed(benchmark):
    """pytest-benchmark timing of the few-keys attention shape; gated by the baseline's ratio when it holds one."""
    import flexdit_kernels as fk
    from triton.testing import do_bench

    from bench.kernels import sdpa_backends, torch_attention

    path, base = _this_gpu_baseline()
    b, lq, lk, h, d = 32, 1024, 64, 16, 72
    q = torch.randn(b, lq, h, d, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(b, lk, 2, h, d, device="cuda", dtype=torch.bfloat16)
    k, v = kv[:, :, 0], kv[:, :, 1]
    benchmark.pedantic(lambda: (fk.attention(q, k, v), torch.cuda.synchronize()), rounds=50, warmup_rounds=5)
    ms = do_bench(lambda: fk.attention(q, k, v))
    best = float("inf")
    for backend in sdpa_backends().values():
        try:
            best = min(best, do_bench(lambda: torch_attention(q, k, v, backend)))
        except RuntimeError:
            continue
    ratio = best / ms
    benchmark.extra_info["speedup_over_best_sdpa"] = ratio
    key = f"kernels|attention B={b} Lq={lq} Lk={lk} H={h} D={d} fwd|flexdit|speedup"
    if key not in base["ratios"]:
        pytest.skip(f"{path} holds no ratio {key!r}")
    tol = base.get("tolerance", gates.DEFAULT_TOLERANCE)
    assert ratio >= base["ratios"][key] * (1 - tol), f"{ratio:.3f} < {base['ratios'][key]:.3f} - {tol:.0%}"
