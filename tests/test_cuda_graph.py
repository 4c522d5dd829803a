"""CUDA-graph sampling (`sample_latents(cuda_graph=...)`, `flexdit-sample --cuda-graph`): the same images as eager
for the same seed, with guidance and every grid of the density schedule; one graph per (grid, batch)."""
import json

import numpy as np
import pytest
import torch

import flexdit_kernels as fk
from flexdit import DensitySchedule, create_diffusion, create_model, flexdit_config, from_dit, sample_latents
from flexdit.diffusion import CudaGraphDenoiser


def _models(device):
    """A DiT-S/2 at 256² (16×16 tokens) with perturbed weights (adaLN-Zero would make every block the identity),
    and the FlexDiT converted from it."""
    torch.manual_seed(0)
    dense = create_model("DiT-S/2", input_size=32).to(device)
    with torch.no_grad():
        for p in dense.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    flex = from_dit(dense, flexdit_config("FlexDiT-S/2", input_size=32))
    return dense.eval(), flex.eval()


def _close_in_bf16(got, want):
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    assert torch.isfinite(got).all() and err <= 2e-2 * scale, (err, scale)


@pytest.mark.gpu
@pytest.mark.parametrize("sampler, steps", [("ddim", 24), ("ddpm", 24)])
def test_cuda_graph_matches_eager_with_guidance_and_schedule(sampler, steps):
    device = torch.device("cuda")
    dense, flex = _models(device)
    sched = DensitySchedule.from_rates(0.61, 0.86, 16)
    assert sched.grids == ((10, 10), (9, 9), (8, 8), (6, 6))
    d = create_diffusion(steps)
    y = torch.tensor([1, 207, 360, 999], device=device)

    def run(model, schedule, cuda_graph):
        gens = [torch.Generator().manual_seed(s) for s in range(4)]
        with torch.autocast("cuda", dtype=torch.bfloat16), fk.backend("auto"):
            return sample_latents(model, d, y, (4, 32, 32), cfg_scale=4.0, schedule=schedule, sampler=sampler,
                                  generator=gens, cuda_graph=cuda_graph, return_info=True)

    eager, _ = run(flex, sched, False)
    graphs = CudaGraphDenoiser(flex)
    got, info = run(flex, sched, graphs)
    _close_in_bf16(got, eager)
    g = info["cuda_graph"]
    assert sorted(x["grid"] for x in g["graphs"]) == [(6, 6), (8, 8), (9, 9), (10, 10)]
    assert {x["batch"] for x in g["graphs"]} == {4}
    assert sum(x["replays"] for x in g["graphs"]) == steps and g["graph_memory_bytes"] > 0
    linear_bytes = sum(p.numel() * 2 for m in flex.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters())
    assert g["cast_memory_bytes"] == linear_bytes                  # one bf16 copy of each linear weight and bias
    again, info2 = run(flex, sched, graphs)            # the graphs are kept: nothing is captured again
    assert info2["cuda_graph"]["num_graphs"] == 4
    _close_in_bf16(again, eager)

    dense_eager, _ = run(dense, None, False)
    dense_graph, dense_info = run(dense, None, True)
    _close_in_bf16(dense_graph, dense_eager)
    assert [x["grid"] for x in dense_info["cuda_graph"]["graphs"]] == [None]


@pytest.mark.gpu
def test_cli_cuda_graph_matches_eager(tmp_path, capsys):
    from flexdit.sample import main
    _, flex = _models("cpu")
    from flexdit import save_flexdit
    save_flexdit(flex, tmp_path / "flex.pt")
    common = ["--model", "FlexDiT-S/2", "--ckpt", str(tmp_path / "flex.pt"), "--classes", "1,2,3",
              "--batch-size", "2", "--steps", "12", "--sampler", "ddim", "--precision", "bf16", "--r-min", "0.61",
              "--r-max", "0.86", "--no-progress"]
    assert main(common + ["--out-dir", str(tmp_path / "eager")]) == 0
    assert main(common + ["--cuda-graph", "--out-dir", str(tmp_path / "graph")]) == 0
    out = capsys.readouterr().out
    assert "CUDA graphs: 8 captured" in out and "graph memory" in out and "weight copies" in out  # 4 grids x (2, 1)
    with np.load(tmp_path / "eager" / "latents.npz") as a, np.load(tmp_path / "graph" / "latents.npz") as b:
        _close_in_bf16(torch.from_numpy(b["latents"]), torch.from_numpy(a["latents"]))
    assert json.loads((tmp_path / "graph" / "args.json").read_text())["cuda_graph"] is True


def test_linear_casts_equal_autocast_without_weight_casts():
    """`with_linear_casts` (what the CUDA graphs run): under bf16 autocast the same output as the model itself,
    bitwise, guided or not, with no linear weight cast left in a forward of a fresh autocast region."""
    from flexdit import count_ops
    from flexdit.diffusion import _guided_forward, _GuidedForward, with_linear_casts

    dense, flex = _models("cpu")
    x, t, y = torch.randn(2, 4, 32, 32), torch.tensor([10, 900]), torch.tensor([1, 207])
    bf16 = torch.bfloat16
    for model in (dense, flex):
        call, casts = with_linear_casts(model, bf16)
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        assert len(casts) == 2 * len(linears) and all(c.dtype == bf16 for c in casts.values())
        with fk.backend("reference"), torch.no_grad(), torch.autocast("cpu", dtype=bf16, cache_enabled=False):
            assert torch.equal(call(x, t, y), model(x, t, y))
            args = (x, t, y, torch.full_like(y, 1000), 4.0, 3, True, None)
            guided = with_linear_casts(_GuidedForward(model), bf16)[0]
            assert torch.equal(guided(*args), _guided_forward(model, *args))
        with fk.backend("reference"):
            fresh = count_ops(call, x, t, y, autocast_dtype=bf16, new_region=True)["aten._to_copy"]
            warm = count_ops(model, x, t, y, autocast_dtype=bf16)["aten._to_copy"]
        # Only the patch embedding's convolution weight and bias are still cast per region; the linears' are not.
        assert fresh == warm + 2, (fresh, warm)
    with pytest.raises(ValueError, match="module must be a torch.nn.Module"):
        with_linear_casts(lambda x: x, bf16)
    with pytest.raises(ValueError, match="dtype must be a floating-point torch.dtype"):
        with_linear_casts(dense, torch.int8)
    with pytest.raises(ValueError, match="dtype must be a floating-point torch.dtype"):
        with_linear_casts(dense, "bf16")
