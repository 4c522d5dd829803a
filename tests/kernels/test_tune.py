"""First-use check and tuning (flexdit_kernels._tune) with injected timers and kernels, on the CPU."""
import json
import multiprocessing
import os
import stat
import warnings

import pytest
import torch

from flexdit_kernels import _tune

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXDIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FLEXDIT_TUNE", raising=False)
    monkeypatch.delenv("FLEXDIT_TUNE_FILE", raising=False)
    monkeypatch.setattr(_tune, "_caches", {})
    monkeypatch.setattr(_tune, "_warned", set())
    monkeypatch.setattr(_tune, "_memo", {})
    yield tmp_path / "cache"


def _case(times, wrong=(), raising=(), calls=None):
    """An op y = 2x: a reference in fp32, a PyTorch path, and kernel variants (wrong ones add 1, raising ones raise)."""
    calls = calls if calls is not None else []

    def make_inputs():
        calls.append("inputs")
        return torch.randn(64, generator=torch.Generator().manual_seed(len(calls)))

    def variant(name):
        def run(x):
            calls.append(name)
            if name in raising:
                raise RuntimeError("launch failed")
            return x * 2 + (1 if name in wrong else 0)
        return run

    def timer(fn):
        fn()
        return times[calls[-1]]

    variants = {name: variant(name) for name in times if name != _tune.REFERENCE}
    return dict(make_inputs=make_inputs, reference=lambda x: x.double() * 2,
                pytorch=lambda x: calls.append(_tune.REFERENCE) or x * 2, variants=variants, timer=timer), calls


def _decide(case, default="fast", bucket="N=64", op="toy"):
    return _tune.decide(op, bucket, CPU, torch.float32, "h0", default=default, **case)


def test_faster_variant_wins():
    case, _ = _case({"reference": 1.0, "slow": 0.9, "fast": 0.5})
    assert _decide(case) == "fast"


def test_pytorch_path_wins_where_faster_or_within_the_margin():
    case, _ = _case({"reference": 1.0, "a": 1.2, "b": 0.99})
    assert _decide(case, default="a") == _tune.REFERENCE


def test_wrong_and_raising_variants_are_rejected_with_one_warning():
    case, _ = _case({"reference": 1.0, "wrong": 0.1, "broken": 0.1, "ok": 0.5}, wrong={"wrong"}, raising={"broken"})
    with pytest.warns(RuntimeWarning) as record:
        assert _decide(case) == "ok"
    messages = [str(w.message) for w in record]
    assert any("wrong failed its first-use check" in m and "N=64" in m and "float32" in m and "triton" in m
               for m in messages)
    assert any("broken" in m and "RuntimeError: launch failed" in m for m in messages)
    decision = _tune.cache_for(CPU).get("toy|N=64|float32")
    assert set(decision.failed) == {"wrong", "broken"} and "wrong" not in decision.times_ms


def test_nan_is_a_failure():
    case, _ = _case({"reference": 1.0, "nan": 0.1})
    case["variants"]["nan"] = lambda x: x * float("nan")
    with pytest.warns(RuntimeWarning, match="nan failed"):
        assert _decide(case) == _tune.REFERENCE


def test_every_variant_failing_takes_the_pytorch_path():
    case, _ = _case({"reference": 1.0, "v": 0.1}, wrong={"v"})
    with pytest.warns(RuntimeWarning):
        assert _decide(case, default="v") == _tune.REFERENCE


def test_decision_is_cached_and_not_measured_again(fresh_cache):
    case, calls = _case({"reference": 1.0, "fast": 0.5})
    assert _decide(case) == "fast"
    n = len(calls)
    _tune._caches.clear()                                  # a new process reads the file
    assert _decide(case) == "fast" and len(calls) == n
    files = list(fresh_cache.glob("tune-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["decisions"]["toy|N=64|float32"]["choice"] == "fast"


@pytest.mark.parametrize("field", ["torch", "triton", "flexdit", "cuda", "capability"])
def test_any_key_change_invalidates(monkeypatch, field):
    case, calls = _case({"reference": 1.0, "fast": 0.5})
    _decide(case)
    n = len(calls)
    env = _tune.environment
    monkeypatch.setattr(_tune, "environment", lambda d: {**env(d), field: "other"})
    _tune._caches.clear()
    _decide(case)
    assert len(calls) > n


def test_corrupt_or_foreign_file_is_ignored_with_one_warning_and_rebuilt(fresh_cache):
    case, calls = _case({"reference": 1.0, "fast": 0.5})
    _decide(case)
    path = next(fresh_cache.glob("tune-*.json"))
    path.write_text("{not json")
    _tune._caches.clear()
    with pytest.warns(RuntimeWarning, match="ignoring the tuning cache"):
        assert _decide(case) == "fast"
    assert json.loads(path.read_text())["decisions"]
    data = json.loads(path.read_text())
    data["environment"]["torch"] = "0.0"
    path.write_text(json.dumps(data))
    _tune._caches.clear()
    with pytest.warns(RuntimeWarning, match="another environment"):
        _decide(case)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_keeps_decisions_in_memory(fresh_cache):
    fresh_cache.mkdir(parents=True)
    fresh_cache.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        case, calls = _case({"reference": 1.0, "fast": 0.5})
        with pytest.warns(RuntimeWarning, match="kept in memory"):
            assert _decide(case) == "fast"
        n = len(calls)
        assert _decide(case) == "fast" and len(calls) == n
    finally:
        fresh_cache.chmod(stat.S_IRWXU)


def test_unwritable_cache_path_keeps_decisions_in_memory(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("FLEXDIT_CACHE_DIR", str(blocker / "cache"))        # a folder under a file
    case, calls = _case({"reference": 1.0, "fast": 0.5})
    with pytest.warns(RuntimeWarning, match="kept in memory"):
        assert _decide(case) == "fast"
    n = len(calls)
    assert _decide(case) == "fast" and len(calls) == n


def _writer(cache_dir, op, queue):
    os.environ["FLEXDIT_CACHE_DIR"] = cache_dir
    case, _ = _case({"reference": 1.0, "fast": 0.5})
    for i in range(20):
        _tune.decide(op, f"N={i}", CPU, torch.float32, "h0", default="fast", **case)
    queue.put(op)


def test_two_processes_tuning_at_once_lose_nothing(fresh_cache):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(fresh_cache), op, queue)) for op in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    data = json.loads(next(fresh_cache.glob("tune-*.json")).read_text())
    assert len(data["decisions"]) == 40


def test_off_runs_no_check(monkeypatch):
    monkeypatch.setenv("FLEXDIT_TUNE", "off")
    case, calls = _case({"reference": 1.0, "fast": 0.5})
    assert _decide(case, default="fast") == "fast" and calls == []


def test_cached_mode_uses_the_cache_and_defaults_on_a_miss(monkeypatch):
    case, calls = _case({"reference": 1.0, "fast": 0.5})
    assert _decide(case, default="fast", bucket="seen") == "fast"
    monkeypatch.setenv("FLEXDIT_TUNE", "cached")
    n = len(calls)
    assert _decide(case, default="slow", bucket="seen") == "fast"
    assert _decide(case, default="slow", bucket="unseen") == "slow" and len(calls) == n


def test_bad_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("FLEXDIT_TUNE", "sometimes")
    case, _ = _case({"reference": 1.0})
    with pytest.raises(ValueError, match="FLEXDIT_TUNE"):
        _decide(case)


def test_nothing_is_checked_inside_a_capture(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    case, calls = _case({"reference": 1.0, "fast": 0.5})
    with pytest.warns(RuntimeWarning, match="captured"):
        assert _decide(case, default="dflt") == "dflt"
    assert calls == []


def test_nothing_is_checked_under_torch_compile():
    case, calls = _case({"reference": 1.0, "fast": 0.5})
    seen = []

    def f(x):
        seen.append(_decide(case, default="dflt"))
        return x + 1

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.compile(f, backend="eager", fullgraph=False)(torch.ones(2))
    assert seen == ["dflt"] and calls == []


def test_exported_file_is_read_only(tmp_path, monkeypatch):
    case, calls = _case({"reference": 1.0, "fast": 0.5})
    _decide(case)
    exported = next(p for p in (tmp_path / "cache").glob("tune-*.json"))
    monkeypatch.setenv("FLEXDIT_TUNE_FILE", str(exported))
    monkeypatch.setenv("FLEXDIT_CACHE_DIR", str(tmp_path / "other"))
    _tune._caches.clear()
    n = len(calls)
    assert _decide(case) == "fast" and len(calls) == n
    before = exported.read_text()
    _decide(case, bucket="new")
    assert exported.read_text() == before and not (tmp_path / "other").exists()


def test_off_the_gpu_without_a_timer_the_default_runs():
    case, calls = _case({"reference": 1.0, "fast": 0.5})
    case.pop("timer")
    assert _tune.decide("toy", "b", CPU, torch.float32, "h0", default="dflt", **case) == "dflt"
    assert calls == []


def test_kernel_or_reference_checks_on_random_inputs_in_the_callers_layout():
    seen = []
    x = torch.full((8, 6), 7.0).t()                       # a transposed view: the layout must be kept

    def kernel(a, k):
        seen.append((a.stride(), float(a.abs().sum())))
        return a * k

    def pytorch(a, k):
        return a * k

    assert _tune.kernel_or_reference("scale", kernel, pytorch, (x, 3), timer=lambda fn: (fn(), 1.0)[1]) is False
    assert seen and all(stride == x.stride() for stride, _ in seen)
    assert all(total != 7.0 * 48 for _, total in seen)      # never the caller's data
    _tune._caches.clear()


def test_kernel_or_reference_rejects_a_wrong_kernel_and_keeps_a_right_faster_one():
    x = torch.randn(4, 5)
    times = {}

    def timer(fn):
        fn()
        return times["last"]

    def good(a):
        times["last"] = 0.5
        return a + 1

    def bad(a):
        times["last"] = 0.1
        return a + 2

    def pytorch(a):
        times["last"] = 1.0
        return a + 1

    assert _tune.kernel_or_reference("good", good, pytorch, (x,), timer=timer) is True
    with pytest.warns(RuntimeWarning, match="bad kernel variant triton failed"):
        assert _tune.kernel_or_reference("bad", bad, pytorch, (x,), timer=timer) is False
    assert _tune.kernel_or_reference("bad", bad, pytorch, (x,), timer=timer) is False   # cached, no new warning


def test_an_op_takes_the_pytorch_path_where_its_kernel_fails_the_check(monkeypatch):
    """The whole path through a real op: token_pool on the interpreter with an injected timer; a kernel that returns
    wrong numbers is caught on first use and the op's result comes from the reference."""
    import flexdit_kernels as fk
    from flexdit_kernels import _dispatch, _token_pool
    monkeypatch.setattr(_tune, "timer_override", lambda fn: (fn(), 1.0)[1])
    real = _token_pool._token_pool_fwd
    monkeypatch.setattr(_token_pool, "_token_pool_fwd", lambda x, *a: real(x, *a) + 1)
    x = torch.randn(2, 36, 16)
    with _dispatch.backend("auto"), pytest.warns(RuntimeWarning, match="token_pool kernel variant triton failed"):
        out = fk.token_pool(x, hw=(6, 6), grid=3)
    torch.testing.assert_close(out, fk.token_pool_ref(x, (6, 6), (3, 3)))
    assert fk.last_route("token_pool") == "reference (tune=on)"
    with _dispatch.backend("reference"):
        fk.token_pool(x, hw=(6, 6), grid=3)
    assert fk.last_route("token_pool") == "reference (backend)"


def test_an_op_keeps_a_right_kernel_that_is_faster(monkeypatch):
    import flexdit_kernels as fk
    from flexdit_kernels import _dispatch, _token_pool
    calls = []
    real = _token_pool._token_pool_fwd

    def kernel(x, *a):
        calls.append("kernel")
        return real(x, *a)

    monkeypatch.setattr(_token_pool, "_token_pool_fwd", kernel)
    monkeypatch.setattr(_tune, "timer_override", lambda fn: (calls.append("t"), fn(), 0.5 if calls[-1] == "kernel"
                                                                               else 1.0)[2])
    x = torch.randn(2, 36, 16)
    with _dispatch.backend("auto"):
        fk.token_pool(x, hw=(6, 6), grid=3)
        n = calls.count("kernel")
        fk.token_pool(x, hw=(6, 6), grid=3)
    assert calls.count("kernel") == n + 1                  # decided once, then the kernel runs


def test_an_adaln_op_takes_the_pytorch_path_where_its_kernel_fails_the_check(monkeypatch):
    import flexdit_kernels as fk
    from flexdit_kernels import _adaln, _dispatch
    monkeypatch.setattr(_tune, "timer_override", lambda fn: (fn(), 1.0)[1])
    real = _adaln.layernorm_modulate_fwd
    monkeypatch.setattr(_adaln, "layernorm_modulate_fwd", lambda *a: real(*a) * 2)
    x, shift, scale = torch.randn(2, 8, 40), torch.randn(2, 40), torch.randn(2, 40)
    with _dispatch.backend("auto"), pytest.warns(RuntimeWarning, match="layernorm_modulate kernel variant triton"):
        out = fk.layernorm_modulate(x, shift, scale)
    torch.testing.assert_close(out, fk.layernorm_modulate_ref(x, shift, scale))


def test_random_inputs_keep_expanded_and_offset_layouts():
    g = torch.Generator().manual_seed(0)
    shared = torch.ones(2, 1, 8).expand(2, 5, 8)                 # the Poolingformer's stride-0 vector
    view = torch.ones(3, 16)[1:, 4:12]                           # a view with a storage offset
    for t in (shared, view, torch.ones(0, 4)):
        r = _tune._random_like(t, g)
        assert (r.shape, r.stride(), r.storage_offset()) == (t.shape, t.stride(), t.storage_offset())
        assert not (r == 1).any()
    assert torch.equal(_tune._random_like(torch.arange(5), g), torch.arange(5))


def test_a_change_of_the_ops_source_invalidates_and_one_file_holds_every_op(fresh_cache):
    case, calls = _case({"reference": 1.0, "fast": 0.5})
    _decide(case)
    n = len(calls)
    _tune.decide("toy", "N=64", CPU, torch.float32, "h1", default="fast", **case)     # the op's source changed
    assert len(calls) > n
    _decide(case, op="other")
    assert len(list(fresh_cache.glob("tune-*.json"))) == 1


def test_tuning_overrides_the_environment(monkeypatch):
    monkeypatch.setenv("FLEXDIT_TUNE", "on")
    case, calls = _case({"reference": 1.0, "fast": 0.5})
    with _tune.tuning("off"):
        assert _decide(case, default="dflt") == "dflt" and calls == []
    assert _tune.mode() == "on"
    with pytest.raises(ValueError, match="value must be one of"):
        with _tune.tuning("never"):
            pass


def test_an_ops_scalar_arguments_are_part_of_the_bucket(monkeypatch):
    """token_pool at two grids on the same tensor: two decisions, not one reused."""
    import flexdit_kernels as fk
    from flexdit_kernels import _dispatch
    buckets = []
    real = _tune.decide
    monkeypatch.setattr(_tune, "timer_override", lambda fn: (fn(), 1.0)[1])
    monkeypatch.setattr(_tune, "decide", lambda op, bucket, *a, **k: buckets.append(bucket) or real(op, bucket, *a, **k))
    x = torch.randn(2, 64, 16)
    with _dispatch.backend("auto"):
        fk.token_pool(x, hw=(8, 8), grid=4)
        fk.token_pool(x, hw=(8, 8), grid=2)
    assert len(buckets) == 2 and buckets[0] != buckets[1]
