"""The first-use check and tuning on a real GPU: every variant of an op's config space checked and timed with CUDA
events on first use, the decision cached on disk and read by a second process without timing again, a wrong variant
rejected; attention's paths and SDPA compete forward and backward."""
import json
import os
import subprocess
import sys

import pytest
import torch

import flexdit_kernels as fk
from flexdit_kernels import _token_pool, _tune

from .test_tune_configs import fresh_cache  # noqa: F401  (autouse: FLEXDIT_TUNE=on, "auto", an empty cache)

pytestmark = pytest.mark.gpu
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _row(op):
    rows = [r for r in fk.tune_decisions() if r["op"] == op]
    assert len(rows) == 1, rows
    return rows[0]


def test_first_call_checks_and_times_every_variant_and_writes_the_cache(fresh_cache):
    x = torch.randn(8, 32 * 32, 1152, device="cuda", dtype=torch.bfloat16)
    out = fk.token_pool(x, hw=(32, 32), grid=8)
    torch.testing.assert_close(out, fk.token_pool_ref(x, (32, 32), 8), atol=2e-2, rtol=2e-2)
    row = _row("token_pool")
    names = {"triton"} | {_tune.variant_name(c) for c in _token_pool.CONFIGS["token_pool"](x)}
    assert set(row["candidates"]) == names | {"reference"}
    assert all(v == "passed" for v in row["candidates"].values()), row["candidates"]
    assert set(row["times_ms"]) == names | {"reference"} and all(t > 0 for t in row["times_ms"].values())
    assert fk.last_route("token_pool") == f"{row['winner']} (tune=on)"
    data = json.loads(next(fresh_cache.glob("tune-*.json")).read_text())
    assert any(k.startswith("token_pool|") for k in data["decisions"])


def test_a_second_process_reads_the_cache_without_timing_again(fresh_cache):
    x = torch.randn(8, 32 * 32, 1152, device="cuda", dtype=torch.bfloat16)
    fk.token_pool(x, hw=(32, 32), grid=8)
    winner = _row("token_pool")["winner"]
    script = (
        "import torch, flexdit_kernels as fk\n"
        "from flexdit_kernels import _tune\n"
        "def refuse(*a, **k):\n"
        "    raise AssertionError('timed again')\n"
        "_tune.run_trials = refuse\n"
        "x = torch.randn(8, 32 * 32, 1152, device='cuda', dtype=torch.bfloat16)\n"
        "fk.token_pool(x, hw=(32, 32), grid=8)\n"
        "print(fk.last_route('token_pool'))\n")
    env = dict(os.environ, FLEXDIT_CACHE_DIR=str(fresh_cache), FLEXDIT_TUNE="on", FLEXDIT_BACKEND="auto")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{winner} (tune=on)"


def test_a_wrong_variant_is_rejected_on_the_gpu(monkeypatch):
    real = _token_pool._token_pool_fwd

    def launcher(x, h, w, gh, gw, config=None):
        out = real(x, h, w, gh, gw, config)
        return out * 1.5 if config == {"num_warps": 8} else out

    monkeypatch.setattr(_token_pool, "_token_pool_fwd", launcher)
    x = torch.randn(4, 16 * 16, 1152, device="cuda", dtype=torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="token_pool kernel variant triton:num_warps=8 failed"):
        fk.token_pool(x, hw=(16, 16), grid=4)
    row = _row("token_pool")
    assert row["candidates"]["triton:num_warps=8"].startswith("failed")
    assert row["winner"] != "triton:num_warps=8"


@pytest.mark.parametrize("lq,lk", [(1024, 64), (64, 1024)])
def test_attention_paths_and_sdpa_compete_forward_and_backward(lq, lk):
    q = torch.randn(4, lq, 16, 72, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(4, lk, 16, 72, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    fk.attention(q, k, v).float().square().sum().backward()
    fwd, bwd = _row("attention"), _row("attention_backward")
    assert {"reference", "triton", "triton:path=flash"} <= set(fwd["candidates"])
    assert fwd["candidates"]["triton"] == "passed", fwd["candidates"]               # the heuristic's path
    assert {"reference", "triton"} <= set(bwd["candidates"])
    for row in (fwd, bwd):                                # the winner is the PyTorch path or a variant that passed
        assert row["candidates"][row["winner"]] == "passed" and row["winner_ms"] == row["times_ms"][row["winner"]]
    assert fk.last_route("attention") == f"{fwd['winner']} (tune=on)"
    grads = [t.grad for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    fk.attention_ref(q, k, v).float().square().sum().backward()
    for got, want in zip(grads, (q.grad, k.grad, v.grad)):
        assert float((got.float() - want.float()).abs().max()) <= 0.05 * float(want.float().abs().max())
