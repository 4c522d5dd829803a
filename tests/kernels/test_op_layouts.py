"""Every flexdit op, forward and backward, on either path, returns tensors laid out as its fake implementation says
(torch.library.opcheck) when fed strided inputs: a compiled graph views an op's results by the fake's strides, so a
path that followed its inputs' strides would fail (or read wrong numbers) inside torch.compile."""
import functools

import pytest
import torch

import flexdit_kernels as fk

B, H, W, GRID, C = 2, 4, 5, (3, 2), 8
N, M = H * W, GRID[0] * GRID[1]


def _strided(*shape, device="cpu"):
    """A random tensor of `shape` whose memory order is not the row-major one: the middle dims are swapped (3-d and
    4-d: tokens are not the second-fastest dim; 2-d: a transpose)."""
    if len(shape) == 2:
        return torch.randn(shape[::-1], device=device).t()
    order = (0, *range(len(shape) - 2, 0, -1), len(shape) - 1) if len(shape) == 4 else (0, 2, 1)
    return torch.randn([shape[i] for i in order], device=device).permute(*order)


def cases(device="cpu"):
    """(name, op, args) for every flexdit op, its tensors on `device` and strided."""
    ops = torch.ops.flexdit
    f32 = torch.float32
    strided = functools.partial(_strided, device=device)
    q, k, v = strided(B, M, 2, C), strided(B, N, 2, C), strided(B, N, 2, C)
    with fk.backend("reference"):
        out, lse = ops.attention(q, k, v, 0.35)
    x, y, gate, shift, scale = strided(B, N, C), strided(B, N, C), strided(B, C), strided(B, C), strided(B, C)
    yield "attention", ops.attention, (q, k, v, 0.35)
    yield "attention_backward", ops.attention_backward, (strided(B, M, 2, C), q, k, v, out.transpose(1, 2)
                                                         .contiguous().transpose(1, 2), lse, 0.35)
    yield "gated_residual", ops.gated_residual, (x, y, gate)
    yield "gated_residual_backward", ops.gated_residual_backward, (strided(B, N, C), y, gate)
    yield "gated_residual_inplace", ops.gated_residual_inplace, (x.clone(), y, gate)
    yield "gated_residual_layernorm_modulate", ops.gated_residual_layernorm_modulate, (x, y, gate, shift, scale,
                                                                                       1e-6, f32)
    yield ("gated_residual_layernorm_modulate_backward", ops.gated_residual_layernorm_modulate_backward,
           (strided(B, N, C), strided(B, N, C), x, y, gate, scale, 1e-6, f32))
    yield "layernorm_modulate", ops.layernorm_modulate, (x, shift, scale, 1e-6, f32)
    yield "layernorm_modulate_backward", ops.layernorm_modulate_backward, (strided(B, N, C), x, scale, 1e-6, f32)
    yield "silu", ops.silu, (shift, f32)
    yield "silu_backward", ops.silu_backward, (strided(B, C), shift)
    yield "token_mean", ops.token_mean, (x, 1e-6)
    yield "token_mean_backward", ops.token_mean_backward, (strided(B, C), x, 1e-6)
    yield "token_pool", ops.token_pool, (x, [H, W], list(GRID))
    yield "token_pool_backward", ops.token_pool_backward, (strided(B, M, C), [H, W], list(GRID))
    yield "upsample_add", ops.upsample_add, (strided(B, M, C), x, [H, W], list(GRID))
    yield "upsample_add_backward", ops.upsample_add_backward, (x, [H, W], list(GRID))


NAMES = [name for name, _, _ in cases()]


def case(name, device):
    """(op, args) of the case `name`, its tensors on `device`."""
    return next((op, args) for n, op, args in cases(device) if n == name)


def test_every_op_is_covered():
    ops = {n for n in dir(torch.ops.flexdit) if not n.startswith("_") and n != "name"}
    assert ops == set(NAMES), ops ^ set(NAMES)


@pytest.mark.parametrize("path", ["reference", "triton"])
@pytest.mark.parametrize("name", NAMES)
def test_results_have_the_fakes_layout(name, path, device):
    op, args = case(name, device)
    with fk.backend(path):
        torch.library.opcheck(op.default, args, test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.gpu
@pytest.mark.parametrize("name", NAMES)
def test_kernel_results_have_the_fakes_layout_on_the_gpu(name):
    """The same check on the compiled Triton kernels (`.ci/gpu` runs only the gpu-marked tests)."""
    op, args = case(name, "cuda")
    with fk.backend("triton"):
        torch.library.opcheck(op.default, args, test_utils=("test_faketensor",))
