"""Multiply-accumulate (MAC) counting for DiT and FlexDiT on fvcore, with handles for attention and flexdit ops.

DiT papers call MACs "FLOPs"; fvcore counts one fused multiply-add as one "flop", so its totals are MACs.
Counting rules:
- `aten::scaled_dot_product_attention` and `flexdit::attention`: B·H·Lq·Lk·(d_qk + d_v) (q·kᵀ plus p·v).
  fvcore would otherwise record SDPA as zero.
- The other flexdit ops are counted exactly as fvcore counts the plain-PyTorch path each one replaces, so that a
  FlexDiT total is comparable with the same model written without kernels (all three are < 0.1% of a forward):
  `flexdit::token_pool` = B·N·C (fvcore's `adaptive_avg_pool2d`: one per input element);
  `flexdit::token_mean` = 4·B·N·C (fvcore's affine-free `layer_norm`; the mean is not counted);
  `flexdit::upsample_add` = B·N·C (fvcore's `upsample_nearest2d`: one per output element; adds are not counted);
  the fused `flexdit::layernorm_modulate` and `flexdit::gated_residual_layernorm_modulate` = 4·B·L·C (their
  LayerNorm), `flexdit::gated_residual` = 0 (elementwise).
- Like fvcore, elementwise ops (adds, modulation, GELU, SiLU, softmax) count zero; LayerNorm counts 4 per element.

`count_macs_dispatch` counts with PyTorch's `FlopCounterMode` instead of a trace, by the same rules: it runs the
forward itself (any signature: diffusers models with keyword arguments, patched hosts), sees SDPA and the flexdit ops
by name and counts whatever attention path SDPA decomposes into on the meta device.

With these rules DiT-XL/2 is 118.69 G MACs at 256² and 524.81 G at 512² (the paper: 118.6 G, 524.6 G), and
FlexDiT-XL/2 at 512² with an 8×8 grid is ≈ 222.7 G: this model applies W1 before the upsampling and the
Poolingformer's V/proj on the token mean (the paper's counting, W1 after the upsampling and V/proj on every token,
gives 233.5 G).

Models and inputs may live on the meta device (no memory, no compute: the fast way to count a 675M-parameter
model). fvcore traces with `torch.jit`, and PyTorch's meta convolution fails under the tracer, so on meta tensors
non-overlapping patch convolutions (kernel = stride, no padding: DiT's patch embedding) are traced as the
equivalent reshape + matmul during counting; fvcore gives both the same count, B·h·w·C_in·p²·C_out.
"""
import contextlib
from collections import Counter
from dataclasses import dataclass, field
from math import prod
from typing import Any, Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["count_macs", "count_macs_dispatch", "count_ops", "MacCount"]


# ----------------------------------------------------------------------------------------------------------------
# Op handles: (inputs, outputs) are TorchScript values; shapes come from their types
# ----------------------------------------------------------------------------------------------------------------

def _shape(value) -> List[int]:
    return list(value.type().sizes())


def _sdpa_macs(inputs: List[Any], outputs: List[Any]) -> int:
    """q: (..., Lq, d_qk), k: (..., Lk, d_qk), v: (..., Lk, d_v) → prod(q.shape[:-1])·Lk·(d_qk + d_v)."""
    q, k, v = (_shape(t) for t in inputs[:3])
    return prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def _flexdit_attention_macs(inputs: List[Any], outputs: List[Any]) -> int:
    """q: (B, Lq, H, d), k, v: (B, Lk, H, d) → B·Lq·H·Lk·(d_qk + d_v)."""
    q, k, v = (_shape(t) for t in inputs[:3])
    return prod(q[:-1]) * k[1] * (q[-1] + v[-1])


def _token_pool_macs(inputs: List[Any], outputs: List[Any]) -> int:
    return prod(_shape(inputs[0]))                      # x: (B, N, C), as fvcore's adaptive_avg_pool2d


def _token_mean_macs(inputs: List[Any], outputs: List[Any]) -> int:
    return 4 * prod(_shape(inputs[0]))                  # x: (B, N, C), as fvcore's affine-free layer_norm


def _upsample_add_macs(inputs: List[Any], outputs: List[Any]) -> int:
    return prod(_shape(outputs[0]))                     # (B, N, C), as fvcore's upsample_nearest2d


OP_HANDLES = {
    "aten::scaled_dot_product_attention": _sdpa_macs,
    "flexdit::attention": _flexdit_attention_macs,
    "flexdit::token_pool": _token_pool_macs,
    "flexdit::token_mean": _token_mean_macs,
    "flexdit::upsample_add": _upsample_add_macs,
    "flexdit::layernorm_modulate": _token_mean_macs,                  # the LayerNorm's 4 per element; modulate: 0
    "flexdit::gated_residual_layernorm_modulate": _token_mean_macs,
}

# Ops that are zero by the rules above (fvcore would list them as "unsupported").
ZERO_OPS = ("aten::add", "aten::add_", "aten::sub", "aten::mul", "aten::mul_", "aten::div", "aten::silu",
            "aten::gelu", "aten::exp", "aten::cos", "aten::sin", "aten::embedding", "aten::softmax",
            "aten::mean", "aten::rsub", "aten::neg", "aten::expand_as", "flexdit::gated_residual",
            "flexdit::gated_residual_inplace", "flexdit::silu")


# ----------------------------------------------------------------------------------------------------------------
# Result
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class MacCount:
    """MACs of one forward: `total`, per module (`by_module`, "" is the whole model) and per operator."""

    total: int
    by_module: Dict[str, int] = field(default_factory=dict)
    by_operator: Dict[str, int] = field(default_factory=dict)
    unsupported: Dict[str, int] = field(default_factory=dict)
    table_text: str = ""

    @property
    def gmacs(self) -> float:
        return self.total / 1e9

    def table(self) -> str:
        """fvcore's per-module table (modules to depth 3; "#flops" are MACs)."""
        return self.table_text

    def __int__(self):
        return self.total


# ----------------------------------------------------------------------------------------------------------------
# Counting
# ----------------------------------------------------------------------------------------------------------------

def _require_fvcore():
    try:
        from fvcore.nn import FlopCountAnalysis, flop_count_table
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("flexdit.flops needs fvcore: pip install fvcore "
                          "(or the 'test' / 'bench' extras: pip install -e .[bench])") from err
    return FlopCountAnalysis, flop_count_table


@contextlib.contextmanager
def _meta_patch_conv(active: bool):
    """Trace non-overlapping patch convolutions on meta tensors as reshape + matmul (see the module docstring)."""
    if not active:
        yield
        return
    original = F.conv2d

    def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        k = tuple(weight.shape[2:])
        s = (stride, stride) if isinstance(stride, int) else tuple(stride)
        pad = (padding, padding) if isinstance(padding, int) else tuple(padding)
        dil = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
        if not (x.is_meta and k == s and pad == (0, 0) and dil == (1, 1) and groups == 1):
            return original(x, weight, bias, stride, padding, dilation, groups)
        b, cin, hh, ww = x.shape
        ph, pw = k
        h, w = hh // ph, ww // pw
        patches = x[:, :, : h * ph, : w * pw].reshape(b, cin, h, ph, w, pw).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(b, h, w, cin * ph * pw)                       # (B, h, w, C_in·p²)
        out = F.linear(patches, weight.reshape(weight.shape[0], -1), bias)      # (B, h, w, C_out)
        return out.permute(0, 3, 1, 2)

    F.conv2d = conv2d
    try:
        yield
    finally:
        F.conv2d = original


def count_macs(model: nn.Module, *inputs, **kwargs) -> MacCount:
    """MACs of `model(*inputs, **kwargs)` counted by fvcore with flexdit's op handles (module docstring).

    Args:
        model: any module (DiT, FlexDiT, ...), on CPU, CUDA or the meta device; it is put in eval mode for the
            count and restored afterwards.
        inputs: positional inputs, e.g. `(x, t, y)` with x: (B, C_in, H, W). Counts scale with B; pass B = 1 for
            per-image MACs.
        kwargs: keyword inputs (e.g. `grid=8` for FlexDiT), bound into the traced call.
    Returns:
        A `MacCount`: `.total` (int), `.by_module` (module name → MACs, "" = total), `.by_operator`,
        `.unsupported` (ops fvcore met without a handle, beyond the known zero-cost elementwise ops) and `.table()`.
    """
    FlopCountAnalysis, flop_count_table = _require_fvcore()
    target = model
    if kwargs:
        target = _BoundKwargs(model, kwargs)
    was_training = model.training
    model.eval()
    on_meta = any(isinstance(t, torch.Tensor) and t.is_meta for t in inputs)
    try:
        with torch.no_grad(), _meta_patch_conv(on_meta):
            analysis = FlopCountAnalysis(target, tuple(inputs))
            for name, handle in OP_HANDLES.items():
                analysis.set_op_handle(name, handle)
            for name in ZERO_OPS:
                analysis.set_op_handle(name, None)
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            analysis.tracer_warnings("none")
            total = int(analysis.total())
            by_module = {k: int(v) for k, v in analysis.by_module().items()}
            by_operator = {k: int(v) for k, v in analysis.by_operator().items()}
            unsupported = dict(analysis.unsupported_ops())
            table_text = flop_count_table(analysis, max_depth=3, show_param_shapes=False)
    finally:
        model.train(was_training)
    if kwargs:  # drop the wrapper's prefix so names match model.named_modules()
        by_module = {(k[len("model."):] if k.startswith("model.") else ("" if k == "model" else k)): v
                     for k, v in by_module.items()}
    return MacCount(total, by_module, by_operator, unsupported, table_text)


class _BoundKwargs(nn.Module):
    """Wraps a module so that keyword arguments (FlexDiT's `grid`) are fixed during tracing."""

    def __init__(self, model, kwargs):
        super().__init__()
        self.model = model
        self.kwargs = kwargs

    def forward(self, *inputs):
        return self.model(*inputs, **self.kwargs)


class _OpCounter(TorchDispatchMode):
    """Counts the aten and flexdit ops that reach the kernels (views and metadata-only ops excluded)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("aten", "flexdit") and not func.is_view and torch.Tag.view_copy not in func.tags:
            self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_ops(model: nn.Module, *inputs, autocast_dtype=None, new_region: bool = False, **kwargs) -> Counter:
    """The ops one `model(*inputs, **kwargs)` runs, by name: each is one kernel launch on a GPU (or a few).

    With `autocast_dtype` the forward runs under autocast on the inputs' device, counted on a second forward, as
    in a sampling loop after its first step: inside the same autocast region as the first (autocast's cache holds
    the cast weights), or with `new_region` in an autocast region of its own (a loop that opens one per step). Call
    it outside any autocast region: autocast's cache lives until the outermost region ends.
    """
    counter = _OpCounter()
    with torch.no_grad():
        if not autocast_dtype:
            with counter:
                model(*inputs, **kwargs)
            return counter.ops
        device = next(t.device for t in inputs if isinstance(t, torch.Tensor))
        with torch.autocast(device.type, dtype=autocast_dtype):
            model(*inputs, **kwargs)
            if not new_region:
                with counter:
                    model(*inputs, **kwargs)
                return counter.ops
        with torch.autocast(device.type, dtype=autocast_dtype), counter:
            model(*inputs, **kwargs)
    return counter.ops


# ----------------------------------------------------------------------------------------------------------------
# Counting by dispatch (PyTorch's FlopCounterMode): any forward, same rules
# ----------------------------------------------------------------------------------------------------------------

def _dispatch_handles() -> Dict[Any, Any]:
    """FlopCounterMode formulas (in FLOPs = 2 x MACs) for the ops its own table lacks, by the rules above."""
    import flexdit_kernels  # noqa: F401  (registers torch.ops.flexdit)

    def attention(q, k, v, scale=None, *, out_shape=None, **_):
        return 2 * prod(q[:-1]) * k[1] * (q[-1] + v[-1])     # q: (B, Lq, H, D), k, v: (B, Lk, H, D)

    def per_input(factor):
        def formula(x, *args, out_shape=None, **_):
            return 2 * factor * prod(x)
        return formula

    def per_output(x, *args, out_shape=None, **_):
        return 2 * prod(out_shape)

    def sdpa_cpu(q, k, v, *args, out_shape=None, **_):
        return 2 * prod(q[:-1]) * k[-2] * (q[-1] + v[-1])   # q: (B, H, Lq, D), k, v: (B, H, Lk, D)

    ops, aten = torch.ops.flexdit, torch.ops.aten
    return {ops.attention: attention, ops.token_pool: per_input(1), ops.token_mean: per_input(4),
            ops.upsample_add: per_output, aten.native_layer_norm: per_input(4), ops.layernorm_modulate: per_input(4),
            ops.gated_residual_layernorm_modulate: per_input(4),
            aten._scaled_dot_product_flash_attention_for_cpu: sdpa_cpu}


def count_macs_dispatch(model: nn.Module, *inputs, **kwargs) -> MacCount:
    """MACs of `model(*inputs, **kwargs)` counted by PyTorch's `FlopCounterMode` with the rules above.

    Runs the forward once under `torch.no_grad()` in eval mode (restored afterwards); model and inputs may live on
    the meta device. Attention is counted whichever way it runs: SDPA (its fused kernels, or the matmuls it
    decomposes into on meta tensors) and `flexdit::attention`. Returns a `MacCount` whose `by_module` keys are the
    model's module names ("" is the whole model) and `by_operator` keys the aten/flexdit op names.
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_dispatch_handles()) as counter:
            model(*inputs, **kwargs)
    finally:
        model.train(was_training)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    by_module = {}
    for name, ops in counts.items():
        key = "" if name == "Global" else (name[len(root) + 1:] if name.startswith(root + ".") else name)
        if key == root:
            continue
        by_module[key] = sum(ops.values()) // 2
    by_operator = {str(op): flops // 2 for op, flops in counts.get("Global", {}).items()}
    return MacCount(counter.get_total_flops() // 2, by_module, by_operator)
