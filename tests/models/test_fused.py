"""Fused adaLN kernels in the model: same function as the unfused layers, far fewer ops per forward."""
import pytest
import torch

import flexdit
import flexdit_kernels as fk

from .helpers import randomize_, toy_config, toy_dit, toy_inputs


def _xl_shaped(name):
    """DiT-XL/2's depth and plan at a toy width: the op count depends on the layers, not on their size."""
    return flexdit.create_model(name, input_size=16, hidden_size=64, num_heads=8).eval()


def _toy_model(kind):
    """A toy FlexDiT converted from a toy DiT ("flexdit") or the DiT itself ("dense"), random weights, eval mode."""
    base = flexdit.from_dit(toy_dit(), toy_config()) if kind == "flexdit" else toy_dit()
    return randomize_(base, seed=3).eval()


def test_fused_flexdit_runs_far_fewer_ops():
    """Ops per forward (aten + flexdit, about one GPU launch each) under bf16 autocast, counted on a sampling loop's
    second step, with the loop opening one autocast region per step or one region for all steps (autocast then holds
    the weights' bf16 casts: ~320 ops fewer per step). FlexDiT-XL/2's layers: unfused 1008 / 686, fused 694 / 372; the
    dense DiT-XL/2: unfused 963 / 673, fused 622 / 332."""
    x, t, y = toy_inputs(batch=2, size=(16, 16))
    flex = _xl_shaped("FlexDiT-XL/2")
    dense = _xl_shaped("DiT-XL/2")

    def ops(model, fused, new_region):
        # The layers take the fused ops where `fk.kernels_active` says the backend runs kernels; forcing that answer
        # under the "reference" backend counts the fused model's ops without running the kernels.
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(fk, "kernels_active", lambda *tensors: fused)
            return sum(flexdit.count_ops(model, x, t, y, autocast_dtype=torch.bfloat16,
                                         new_region=new_region).values())

    with fk.backend("reference"):
        for new_region, ratio, guard in ((True, 0.7, 694), (False, 0.55, 372)):
            fused, unfused = ops(flex, True, new_region), ops(flex, False, new_region)
            dense_fused, dense_unfused = ops(dense, True, new_region), ops(dense, False, new_region)
            assert fused <= ratio * unfused and dense_fused <= ratio * dense_unfused, (
                new_region, fused, unfused, dense_fused, dense_unfused)
            assert fused <= guard, (new_region, fused)   # regression guard on today's count


@pytest.mark.parametrize("kind", ["flexdit", "dense"])
def test_fused_model_equals_unfused(kind):
    """Kernel path (interpreter on the CPU), fp32: outputs and every parameter gradient of the model on the kernels
    backend (fused adaLN ops) match the model under the "reference" backend (the unfused PyTorch composition)."""
    model = _toy_model(kind)
    x, t, y = toy_inputs()

    def run(backend):
        model.zero_grad()
        with fk.backend(backend):
            out = model(x, t, y)
            out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    out_a, grads_a = run("reference")
    out_b, grads_b = run("triton")
    torch.testing.assert_close(out_b, out_a, rtol=1e-4, atol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("kind", ["flexdit", "dense"])
def test_fused_model_within_fp16_noise(kind):
    """The CPU counterpart of the bf16 GPU test below (the interpreter cannot run bf16 dots): under fp16 autocast the
    fused kernel path's error against fp32 is at most 2x the unfused reference path's own fp16 error."""
    model = _toy_model(kind)
    x, t, y = toy_inputs()
    with torch.no_grad():
        with fk.backend("reference"):
            exact = model(x, t, y).double()
            with torch.autocast("cpu", dtype=torch.float16):
                ref = model(x, t, y).double()
        with fk.backend("triton"), torch.autocast("cpu", dtype=torch.float16):
            fused = model(x, t, y).double()
    scale = exact.norm()
    assert (ref - exact).norm() / scale > 1e-5                       # fp16 did run
    assert (fused - exact).norm() / scale <= 2 * (ref - exact).norm() / scale


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_compiled_flexdit_equals_eager(path):
    """torch.compile (AOT autograd, whole graph) of the fused FlexDiT, forward and every gradient, equals eager: the
    flexdit ops' results have the layout their fakes promise, on either path (tests/kernels/test_op_layouts.py checks
    each op on strided inputs)."""
    model = randomize_(flexdit.FlexDiT(toy_config()), seed=3)
    x, t, y = toy_inputs()

    def run(fn):
        model.zero_grad()
        out = fn(x, t, y)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    with fk.backend(path):
        out_a, grads_a = run(model)
        out_b, grads_b = run(torch.compile(model, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
def test_fused_flexdit_xl_within_bf16_noise():
    """FlexDiT-XL/2 at 256², bf16 autocast: the fused kernel path's error against fp32 is at most 2x the error of the
    unfused reference path in bf16."""
    torch.manual_seed(0)
    flex = randomize_(flexdit.create_model("FlexDiT-XL/2", input_size=32), std=0.02).cuda().eval()
    x, t, y = (v.cuda() for v in toy_inputs(batch=4, size=(32, 32)))
    with torch.no_grad():
        with fk.backend("reference"):
            exact = flex(x, t, y).double()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                ref = flex(x, t, y).double()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fused = flex(x, t, y).double()
    scale = exact.norm()
    assert (fused - exact).norm() / scale <= 2 * (ref - exact).norm() / scale + 1e-6


def test_kernels_active_is_the_models_switch():
    """The layers fuse exactly where the backend runs kernels; meta tensors (MAC counts, memory plans) stand for the
    device they plan for."""
    cpu, meta = torch.zeros(2, 4), torch.zeros(2, 4, device="meta")
    with fk.backend("reference"):
        assert not fk.kernels_active(cpu) and not fk.kernels_active(meta)
    with fk.backend("auto"):
        assert fk.kernels_active(cpu) == fk.interpreting() and fk.kernels_active(meta)
