"""The harness itself on the CPU: argument errors, output schema, the default run, sampling and the profile."""
import csv
import os
import json

import pytest
import torch

from bench.__main__ import main
from bench.common import ROW_FIELDS
from bench.kernels import OPS

NO_GPU = not torch.cuda.is_available()
needs_no_gpu = pytest.mark.skipif(not NO_GPU, reason="checks the behaviour of a machine without a GPU")
TINY_MODEL = ["--model", "DiT-S/8", "--image-size", "256", "--grid", "2", "--repeats", "1"]


@pytest.mark.parametrize("argv", [
    ["--no-such-flag"],
    ["model", "--image-size", "300"],
    ["model", "--batch-size", "0"],
    ["model", "--device", "cpu", "--model", "DiT-Q/2"],
    ["model", "--device", "cpu", "--model", "DiT-S/8", "--grid", "5"],   # 256px / 8 / 8 = 4x4 tokens
    ["model", "--device", "cpu", "--mode", "cuda-graph"],
    ["kernels", "--op", "softmax"],
    ["sample", "--device", "cpu", "--grids", "8,x"],
    ["sample", "--device", "cpu", "--model", "DiT-S/8", "--grids", "5"],
    ["model", "--tolerance", "1.5"],
    ["model", "--device", "cpu", "--impls", "dense,fast"],
    ["kernels", "--max-spread", "0"],
    ["sanitize", "--op", "softmax"],
])
def test_argument_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m bench: error: "), err


@pytest.mark.parametrize("command", [[], ["kernels"], ["model"], ["sample"], ["sanitize"]])
def test_every_subcommand_help_exits_0(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main(command + ["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m bench")
    if command:
        assert "--device" in out


def test_other_entry_points_help_exits_0(capsys):
    from bench.ci import main as ci_main
    from bench.plot import main as plot_main
    for entry in (ci_main, plot_main):
        with pytest.raises(SystemExit) as exc:
            entry(["--help"])
        assert exc.value.code == 0
    assert "usage" in capsys.readouterr().out


@needs_no_gpu
@pytest.mark.parametrize("command", ["model", "kernels", "sample", "sanitize"])
def test_device_cuda_without_gpu_is_an_error(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--device", "cuda"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA GPU" in err[0]


def test_unwritable_json_is_one_line_exit_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    rc = main(["kernels", "--device", "cpu", "--op", "token_mean", "--repeats", "1",
               "--json", str(blocker / "out.json")])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m bench: error: cannot write the results")


@needs_no_gpu
@pytest.mark.parametrize("command", ["kernels", "model", "sample", "sanitize"])
def test_gpu_commands_without_gpu_exit_0(command, capsys):
    assert main([command]) == 0
    assert "no GPU" in capsys.readouterr().out


@needs_no_gpu
def test_default_run_is_cpu_reference_mode(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "CPU reference mode" in out and "no CUDA GPU" in out
    assert "dense" in out and "flexdit-ref" in out and "speedup" in out


def test_json_and_csv_schema(tmp_path):
    jpath, cpath = tmp_path / "out.json", tmp_path / "out.csv"
    rc = main(["kernels", "--device", "cpu", "--op", "token_pool", "--repeats", "1", "--json", str(jpath),
               "--csv", str(cpath)])
    assert rc == 0
    payload = json.loads(jpath.read_text())
    assert payload["format"] == 1 and payload["failures"] == []
    assert payload["tags"]["gpu"] == "cpu" and payload["tags"]["torch"] == torch.__version__
    rows = payload["rows"]
    assert rows and all(set(r) == set(ROW_FIELDS) for r in rows)
    assert all(r["gpu"] == "cpu" and r["dtype"] == "fp32" and r["triton"] and r["flexdit"] for r in rows)
    metrics = {(r["impl"], r["metric"]) for r in rows if r["suite"] == "kernels"}
    for metric in ("ms", "ms_p20", "ms_p80", "GB/s", "frac_copy_bw"):
        assert ("flexdit-ref", metric) in metrics and ("torch", metric) in metrics
    assert ("flexdit-ref", "speedup") in metrics
    assert any(r["suite"] == "ceiling" and r["metric"] == "GB/s" for r in rows)
    for r in rows:
        if r["metric"] == "ms":
            p20 = next(x["value"] for x in rows if x["case"] == r["case"] and x["impl"] == r["impl"]
                       and x["metric"] == "ms_p20")
            assert p20 <= r["value"]
    with open(cpath, newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert tuple(csv_rows[0]) == ROW_FIELDS and len(csv_rows) == len(rows)


def test_kernels_cpu_all_ops_with_backward(tmp_path):
    jpath = tmp_path / "k.json"
    assert main(["kernels", "--device", "cpu", "--backward", "--repeats", "1", "--json", str(jpath)]) == 0
    rows = json.loads(jpath.read_text())["rows"]
    cases = {r["case"] for r in rows if r["suite"] == "kernels"}
    for op in OPS:
        assert any(c.startswith(op) and c.endswith(" fwd") for c in cases), op
        assert any(c.startswith(op) and c.endswith(" fwd+bwd") for c in cases), op
    attn = [r for r in rows if r["case"].startswith("attention") and r["metric"] == "TFLOP/s"]
    assert any(r["impl"].startswith("sdpa-") for r in attn)


def test_wrong_kernel_is_failed_and_not_reported(monkeypatch, tmp_path, capsys):
    import flexdit_kernels as fk
    monkeypatch.setattr(fk, "token_mean", lambda x, eps=1e-6: fk.token_mean_ref(x, eps) + 1.0)
    jpath = tmp_path / "bad.json"
    rc = main(["kernels", "--device", "cpu", "--op", "token_mean", "--repeats", "1", "--json", str(jpath)])
    assert rc == 1
    assert "FAILED" in capsys.readouterr().out
    payload = json.loads(jpath.read_text())
    assert payload["failures"] and not any(r["suite"] == "kernels" for r in payload["rows"])


def test_model_profile_by_layer_kind(tmp_path):
    jpath = tmp_path / "m.json"
    assert main(["model", "--device", "cpu", *TINY_MODEL, "--profile", "--json", str(jpath)]) == 0
    rows = json.loads(jpath.read_text())["rows"]
    model = {(r["impl"], r["metric"]): r["value"] for r in rows if r["suite"] == "model"}
    assert model[("dense", "GMACs")] > model[("flexdit-ref", "GMACs")] > 0
    assert ("flexdit-ref", "speedup") in model and ("dense", "frac_matmul") in model
    routes = {r["impl"]: r["route"] for r in rows if r["suite"] == "model" and r["metric"] == "ms"}
    assert routes["flexdit-ref"] == "reference (backend)", routes   # the decision column: every op on its reference
    shares = {r["impl"]: r["value"] for r in rows if r["suite"] == "profile" and r["metric"] == "share"}
    for kind in ("Poolingformer", "generation", "sparse", "recovery", "dense", "final"):
        assert kind in shares, kind
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-6)
    families = [r for r in rows if r["suite"] == "families"]
    for impl in ("dense", "flexdit-ref"):
        got = {r["impl"]: r["value"] for r in families if r["case"].endswith(impl)}
        assert {"GEMM", "attention", "norm", "elementwise", "launches"} <= set(got), got
        assert sum(v for k, v in got.items() if k != "launches") > 0 and got["launches"] > 10


def test_sample_cpu(tmp_path):
    jpath = tmp_path / "s.json"
    rc = main(["sample", "--device", "cpu", "--model", "DiT-S/8", "--steps", "2", "--batch-size", "2",
               "--json", str(jpath)])
    assert rc == 0
    rows = json.loads(jpath.read_text())["rows"]
    got = {(r["impl"], r["metric"]) for r in rows if r["suite"] == "sample"}
    assert {("dense", "images/s"), ("flexdit-ref", "images/s"), ("flexdit-ref", "speedup")} <= got


def test_plot_writes_pngs(tmp_path):
    from bench.plot import main as plot_main
    jpath = tmp_path / "m.json"
    assert main(["model", "--device", "cpu", *TINY_MODEL, "--profile", "--json", str(jpath)]) == 0
    assert plot_main([str(jpath), "--out-dir", str(tmp_path / "plots")]) == 0
    for name in ("speedup.png", "breakdown.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"


def test_kernel_rows_carry_their_batch_and_route(tmp_path, capsys):
    jpath = tmp_path / "b.json"
    assert main(["kernels", "--device", "cpu", "--op", "token_mean", "--backward", "--repeats", "1",
                 "--json", str(jpath)]) == 0
    rows = [r for r in json.loads(jpath.read_text())["rows"] if r["suite"] == "kernels"]
    assert rows and all(r["batch"] == int(r["case"].split("B=")[1].split()[0]) for r in rows)
    routes = {(r["case"].split()[-1], r["impl"]): r["route"] for r in rows if r["metric"] == "ms"}
    assert routes == {("fwd", "flexdit-ref"): "reference (backend)", ("fwd", "torch"): "",
                      ("fwd+bwd", "flexdit-ref"): "reference (backend)", ("fwd+bwd", "torch"): ""}
    headers = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("case ")]
    assert headers[-1][-1] == "route"   # the kernels table (after the ceiling's) ends with the decision column


def test_wrong_attention_gradient_is_failed(monkeypatch, capsys):
    """Right forward, wrong backward: caught by the gradient check of --backward."""
    import flexdit_kernels as fk
    ref = fk.attention_ref
    monkeypatch.setattr(fk, "attention", lambda q, k, v, scale=None: ref(q, k, v) + 0.5 * (q - q.detach()))
    assert main(["kernels", "--device", "cpu", "--op", "attention", "--backward", "--repeats", "1"]) == 1
    assert "attention grad 0" in capsys.readouterr().out


@pytest.mark.parametrize("target", ["pixart-alpha", "diffusers-dit", "latte"])
def test_model_patched_diffusers_targets(target, monkeypatch, tmp_path):
    pytest.importorskip("diffusers")
    import bench.model
    # A tiny host (the real sizes are 28 layers of 1152 channels); 4 layers take the plan P=1, K=1 x (1,1,1,0), T=0.
    tiny = dict(num_layers=4, num_attention_heads=2, attention_head_dim=16)
    if target in ("pixart-alpha", "latte"):
        tiny.update(cross_attention_dim=32, caption_channels=16)
    monkeypatch.setattr(bench.model, "PATCH_OVERRIDES", tiny)
    monkeypatch.setattr(bench.model, "FRAMES", 3)
    monkeypatch.setitem(__import__("flexdit.plan", fromlist=["DECIDED_PLANS"]).DECIDED_PLANS, 4,
                        dict(num_pool=1, num_modules=1, group=(1, 1, 1, 0), num_top=0))
    jpath = tmp_path / "p.json"
    assert main(["model", "--device", "cpu", "--model", target, "--image-size", "256", "--grid", "4",
                 "--repeats", "1", "--json", str(jpath)]) == 0
    rows = json.loads(jpath.read_text())["rows"]
    got = {(r["impl"], r["metric"]) for r in rows if r["suite"] == "model"}
    assert {("dense", "ms"), ("flexdit-ref", "ms"), ("flexdit-ref", "speedup"), ("flexdit-ref", "GMACs")} <= got
    macs = {r["impl"]: r["value"] for r in rows if r["metric"] == "GMACs"}
    assert macs["flexdit-ref"] < macs["dense"]


def test_model_patched_target_refuses_profile(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["model", "--device", "cpu", "--model", "pixart-alpha", "--profile"])
    assert exc.value.code == 2


def test_model_impls_subset_and_missing_fvcore(monkeypatch, tmp_path):
    """--impls limits what is timed (dense always); without fvcore the times stand and a note says why no MACs."""
    import sys
    monkeypatch.setitem(sys.modules, "fvcore", None)
    monkeypatch.setitem(sys.modules, "fvcore.nn", None)
    jpath = tmp_path / "m.json"
    assert main(["model", "--device", "cpu", *TINY_MODEL, "--impls", "dense", "--json", str(jpath)]) == 0
    payload = json.loads(jpath.read_text())
    impls = {r["impl"] for r in payload["rows"] if r["suite"] == "model"}
    assert impls == {"dense"} and not any(r["metric"] == "GMACs" for r in payload["rows"])
    assert any("fvcore" in n for n in payload["notes"]) and any("not timed (--impls): flexdit-ref" in n
                                                                 for n in payload["notes"])


def test_plot_of_a_missing_file_is_one_line_exit_2(tmp_path, capsys):
    from bench.plot import main as plot_main
    with pytest.raises(SystemExit) as exc:
        plot_main([str(tmp_path / "none.json")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m bench.plot: error: ")


@pytest.mark.parametrize("name, family", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "GEMM"), ("aten::addmm", "GEMM"),
    ("aten::mm", "GEMM"), ("cutlass::Kernel2<cutlass_80_wmma_tensorop>", "GEMM"),
    ("flash_fwd_kernel", "attention"), ("_attention_fwd_few_keys_kernel", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("void at::native::vectorized_layer_norm_kernel<float>", "norm"), ("_layernorm_modulate_fwd_kernel", "norm"),
    ("_token_mean_fwd_kernel", "norm"), ("_token_pool_fwd_kernel", "pooling"), ("aten::mul", "elementwise"),
    ("_gated_residual_fwd_kernel", "elementwise"), ("void at::native::vectorized_elementwise_kernel<4>", "elementwise"),
    ("aten::_to_copy", "elementwise")])
def test_kernel_family(name, family):
    from bench.model import kernel_family
    assert kernel_family(name) == family


def test_overhead_covers_every_op_with_an_eager_path(tmp_path, capsys):
    """`python -m bench overhead` measures every op, forward and forward+backward (a very short run: the numbers are
    not checked, only that each row exists)."""
    from bench import overhead
    path = tmp_path / "overhead.json"
    assert main(["overhead", "--calls", "4", "--repeats", "1", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    cases = {(r["case"], r["impl"]) for r in rows if r["metric"] == "overhead_us"}
    assert cases == {(f"{op} {mode}", impl) for op in overhead.OPS for mode in ("fwd", "fwd+bwd")
                     for impl in ("reference",)}
    assert "host overhead per call" in capsys.readouterr().out


@pytest.mark.parametrize("argv0, prog", [("/usr/local/bin/flexdit-bench", "flexdit-bench"),
                                         ("/src/bench/__main__.py", "python -m bench")])
def test_a_typo_names_the_closest_subcommand_under_the_programs_own_name(argv0, prog, monkeypatch, capsys):
    for argv, said in ((["kernals"], "unknown sub-command 'kernals' (did you mean 'kernels'?)"),
                       (["kernels", "--op", "softmax"], "invalid choice: 'softmax'")):
        monkeypatch.setattr("sys.argv", [argv0] + argv)
        with pytest.raises(SystemExit) as exc:
            main()
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"{prog}: error: ") and said in err[0], err


@pytest.mark.parametrize("device", [["--device", "cpu"], []])   # a bad argument comes before "no GPU"
def test_unknown_model_lists_every_model_of_the_registry(device, capsys):
    from flexdit import DiT_models, FlexDiT_models
    from bench.fixtures import TARGETS
    with pytest.raises(SystemExit) as exc:
        main(["model", *device, "--model", "nope"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert all(f" {name}," in err or err.rstrip().endswith(name)
               for name in [*DiT_models, *FlexDiT_models, *TARGETS]), err


def test_cpu_runs_pin_one_thread_and_say_so(monkeypatch, capsys):
    import bench.kernels
    seen = []
    monkeypatch.setattr(bench.kernels, "run", lambda args, results, device: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    assert main(["kernels", "--device", "cpu"]) == 0
    assert seen == [1] and torch.get_num_threads() == before
    out = " ".join(capsys.readouterr().out.split())
    assert "all 8 ops" in out and "torch.set_num_threads(1)" in out and "not a GPU measurement" in out


def test_no_import_cycle_in_bench():
    """No module of bench imports bench.__main__, and the imports between bench's modules form no cycle."""
    import ast
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[2] / "bench"
    graph = {}
    for path in root.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level == 1 or (node.module or "").startswith("bench")):
                module = (node.module or "").split(".")[-1]
                deps |= {module} if module and module != "bench" else {a.name for a in node.names}
            elif isinstance(node, ast.Call) and "bench.__main__" in ast.unparse(node):
                deps.add("__main__")
        graph[path.stem] = deps & {p.stem for p in root.glob("*.py")} - {path.stem}
    assert not any("__main__" in deps for name, deps in graph.items() if name != "__main__"), graph

    def reaches(start, node, seen):
        return any(dep == start or (dep not in seen and reaches(start, dep, seen | {dep})) for dep in graph[node])
    assert not [name for name in graph if reaches(name, name, {name})], graph


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs a kernel through the Triton interpreter")
def test_model_routes_name_only_the_ops_a_forward_calls():
    """The decision column of `model`: on a GPU a forward under another backend comes first, so an op the forward
    does not call (token_pool here, routed earlier) stays out of the summary."""
    import flexdit_kernels as fk
    from bench.model import forward_routes
    x = torch.randn(2, 16, 8)
    with fk.backend("reference"):
        fk.token_pool(x, (4, 4), (2, 2))

    def forward(backend):
        with fk.backend(backend):
            return fk.token_mean(x)

    gpu = torch.device("cuda")   # the GPU's logic, on CPU tensors that the interpreter runs
    assert forward_routes(forward, "reference", gpu) == "reference (backend)"
    assert forward_routes(forward, "triton", gpu) == "triton (backend)"
    assert forward_routes(forward, "reference", torch.device("cpu")) == "reference (backend)"


def test_cuda_graph_mode_captures_flexdit_at_its_grid(monkeypatch):
    """`model --mode cuda-graph` replays FlexDiT at --grid (the graph is captured with a one-grid schedule), the dense
    DiT without one."""
    import bench.model
    seen = []

    class Graphs:   # CudaGraphDenoiser's interface, without a GPU
        def __init__(self, model, warmup):
            self.model = model

        def model_fn(self, y, schedule=None):
            seen.append(schedule and schedule.grid(500))
            return lambda x, t: self.model(x, t, y, **({"grid": schedule.grid(500)} if schedule else {}))

    monkeypatch.setattr(bench.model, "CudaGraphDenoiser", Graphs)
    inputs = (torch.zeros(1), torch.zeros(1), torch.zeros(1))
    for kwargs in ({"grid": 3}, {}):
        fwd, _ = bench.model.make_forward(lambda x, t, y, **kw: kw, inputs, kwargs, "cuda-graph", torch.device("cpu"),
                                          torch.float32, "reference")
        assert fwd() == ({"grid": (3, 3)} if kwargs else {})
    assert seen == [(3, 3), None]
