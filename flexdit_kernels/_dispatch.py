"""The one place that decides whether an op runs its Triton kernel or its PyTorch reference, and how it is called.

Backends: "reference" never runs a kernel; "triton" always does (CUDA tensors, or CPU tensors under the
interpreter); "auto" runs kernels on CUDA (or under the interpreter) except at the shapes that `AUTO_TABLE` sends
to the reference, where the PyTorch path is the faster one. On the CPU without the interpreter every backend but
"triton" takes the reference.
"""
import contextlib
import functools
import os
from typing import Dict, List, Optional, Tuple

import torch

from . import _tune

_BACKENDS = ("auto", "triton", "reference")
_backend = os.environ.get("FLEXDIT_BACKEND", "auto")
_triton_only = False


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def set_backend(name: str) -> None:
    """Choose "auto" (Triton on CUDA or under the interpreter, reference otherwise), "triton" or "reference"."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def backend(name: str):
    """Context manager form of `set_backend`; restores the previous choice on exit."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


@contextlib.contextmanager
def triton_only():
    """Inside the block no shape is routed to a PyTorch path: attention keeps dense shapes off SDPA and "auto" skips
    `AUTO_TABLE`'s "reference" rows, so every shape that runs a kernel at all runs its own Triton kernel (the bench
    and the sanitizer reach each kernel path this way). The backend still decides whether kernels run at all."""
    global _triton_only
    previous, _triton_only = _triton_only, True
    try:
        yield
    finally:
        _triton_only = previous


def triton_only_active() -> bool:
    """Whether a `triton_only()` block is active."""
    return _triton_only


def custom_op(name: str, mutates_args=()):
    """`torch.library.custom_op` for a flexdit op: its tensor results come back contiguous whichever path made them
    (a reference may follow its inputs' strides), as the op's fake promises; a compiled graph views them by those
    strides."""
    def register(fn):
        @functools.wraps(fn)
        def impl(*args, **kwargs):
            return _contiguous(fn(*args, **kwargs))
        return torch.library.custom_op(name, mutates_args=mutates_args)(impl)
    return register


def _contiguous(out):
    """An op's result (a tensor, a tuple of tensors or None) with every tensor contiguous."""
    if isinstance(out, tuple):
        return tuple(t.contiguous() for t in out)
    return out if out is None else out.contiguous()


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast runs GEMMs in on `device_type` ("cuda", "cpu", ...) when it is on there, else None."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether an op on these tensors runs its Triton kernel (the shape-blind part of the decision).

    "auto": Triton when the tensors are on CUDA, or on the CPU under `TRITON_INTERPRET=1`; the reference otherwise.
    "triton": always Triton (a CPU tensor without the interpreter is an error), "reference": never.
    """
    if _backend == "reference":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if _backend == "triton":
        if not (on_cuda or interpreting()):
            raise ValueError("backend 'triton' needs CUDA tensors or TRITON_INTERPRET=1")
        return True
    return on_cuda or (interpreting() and all(t.device.type == "cpu" for t in tensors))


def kernels_active(*tensors: torch.Tensor) -> bool:
    """Whether the backend runs kernels on these tensors: the models' switch between the fused adaLN ops and their
    PyTorch composition. `use_triton`, except that meta tensors (a shape-only run: MAC counts, memory plans) stand
    for the device the run plans for, where every backend but "reference" runs kernels."""
    if tensors and all(t.is_meta for t in tensors):
        return _backend != "reference"
    return use_triton(*tensors)


# ----------------------------------------------------------------------------------------------------------------
# Shape-aware choice for "auto"
# ----------------------------------------------------------------------------------------------------------------

# Per op (forward and backward apart), rows of (conditions, path); the first row whose conditions all hold decides,
# no matching row means "triton". A condition maps a shape key to an inclusive (low, high) range, None for an open
# end. Keys: "batch" (B, frames folded in), "tokens" (dense N = h*w), "sparse" (M = G_h*G_w; token_mean has none),
# "channels" (C). Example row: ({"tokens": (None, 256), "sparse": (100, None)}, "reference").
#
# The rows are filled from `python -m bench kernels --backward` on a GPU (a row wherever a kernel's speedup over the
# PyTorch path is below 1.0 at a shape). The H100 measurements on record were taken with the previous kernels
# (one window or 16 tokens per program, channel blocks on the slow grid axis, two passes over x in token_mean); they
# do not describe the present kernels, so the table starts empty: every shape runs its kernel until a bench run says
# otherwise.
AUTO_TABLE: Dict[str, List[Tuple[Dict[str, Tuple[Optional[int], Optional[int]]], str]]] = {
    "token_pool": [],
    "token_pool_backward": [],
    "token_mean": [],
    "token_mean_backward": [],
    "upsample_add": [],
    "upsample_add_backward": [],
}


def table_path(op: str, **shape: int) -> str:
    """The path `AUTO_TABLE` names for `op` at this shape: "triton" or "reference"."""
    for conditions, path in AUTO_TABLE[op]:
        for key, (low, high) in conditions.items():
            value = shape[key]
            if (low is not None and value < low) or (high is not None and value > high):
                break
        else:
            return path
    return "triton"


def use_kernel(op: str, *tensors: torch.Tensor, kernel=None, reference=None, params=(), **shape: int) -> bool:
    """Whether `op` runs its Triton kernel on these tensors at this shape (`kernel_variant` is not None)."""
    return kernel_variant(op, *tensors, kernel=kernel, reference=reference, params=params, **shape) is not None


def kernel_variant(op: str, *tensors: torch.Tensor, kernel=None, reference=None, params=(), space=None,
                   derive=None, default: Optional[bool] = None, **shape: int) -> Optional[dict]:
    """The variant `op` runs on these tensors at this shape: None for the PyTorch reference, else the launcher's
    configuration ({}: its heuristic). `use_triton` first; then for "auto" the table (`AUTO_TABLE`, where `op` has
    rows; `default` overrides it) and, on a CUDA device, the first-use check and tuning of `_tune`: given
    `kernel(*tensors, config=...)` and `reference(*tensors)` (the op's two paths on these tensors; `params`: the
    other arguments they close over, part of the shape bucket; `space(*tensors)`: the op's configurations besides
    the heuristic, its `CONFIGS` entry), only a variant that proved right on this device runs, the fastest, and
    only where it beats the PyTorch path; the table's answer (the heuristic or the reference) is the default where
    nothing is measured (FLEXDIT_TUNE=off or cached, tracing, capture, the CPU). On the "triton" backend and in
    `triton_only()` the heuristic runs, or where `default` is False (attention's dense shapes on "triton") the
    reference."""
    if not use_triton(*tensors):
        return _route(op, None, "backend")
    if _backend != "auto" or _triton_only:
        return _route(op, None if default is False else {}, "backend")
    if default is None:
        default = op not in AUTO_TABLE or table_path(op, **shape) == "triton"
    if kernel is None:
        return _route(op, {} if default else None, "default")
    return _route(op, _tune.choose(op, kernel, reference, tensors, {} if default else None, params=params,
                                   space=space, derive=derive), f"tune={_tune.mode()}")


def run_variant(op: str, *tensors: torch.Tensor, kernel, reference, **kwargs):
    """`op` on these tensors: `kernel(*tensors, config=...)` in the variant `kernel_variant` chooses, else
    `reference(*tensors)` (the same arguments as `kernel_variant`)."""
    config = kernel_variant(op, *tensors, kernel=kernel, reference=reference, **kwargs)
    return reference(*tensors) if config is None else kernel(*tensors, config=config)


_routes: Dict[str, str] = {}


def _route(op: str, config: Optional[dict], why: str) -> Optional[dict]:
    _routes[op] = f"{_tune.variant_name(config) if config is not None else 'reference'} ({why})"
    return config


def last_route(op: str) -> Optional[str]:
    """How the latest call of `op` (a forward op's name, or its name + "_backward") was routed: the variant that
    ran ("triton" for the launcher's heuristic, "triton:num_warps=8" for a configuration of the op's space,
    "reference" for the PyTorch path) and why, e.g. "triton:num_warps=8 (tune=on)", "reference (backend)"; None
    before its first call. The bench prints it beside each row."""
    return _routes.get(op)


def opaque_call(*tensors: torch.Tensor) -> bool:
    """Whether an op goes through its registered `torch.ops.flexdit.*` custom op rather than the light eager path.

    The custom op is one opaque node for torch.compile (dynamo), `torch.jit.trace` (fvcore's FLOP counter), dispatch
    modes (FlopCounterMode, FakeTensorMode, make_fx), functorch transforms (vmap: the op's batching fallback) and
    meta / fake / subclass tensors; plain eager calls skip its dispatcher round trip (tens of microseconds) and take
    the op's body or its eager twin instead (`call_op`).
    NOTE: the Functions keep the old `forward(ctx, ...)` form: the `setup_context` form costs 20-30 µs more per
    call (torch 2.13, 2-core CPU).
    """
    if (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._are_functorch_transforms_active()):    # vmap, grad, ...: the op's batching rules
        return True
    for t in tensors:
        if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
            return True
        if t.is_meta:
            return True
    return False


def register_autograd(op, body, backward_op, backward_body, setup_context, backward) -> type:
    """Give the custom op `op` its autograd and return its eager twin (see `call_op`).

    `setup_context(ctx, inputs, output)` saves what the backward needs; `backward(ctx, bwd, *grads)` returns the inputs'
    gradients, computed with `bwd`: the backward custom op `backward_op` for `op`; for the twin, the backward op's
    body `backward_body` (kernel or reference per shape). The twin is a `torch.autograd.Function` that runs `body`
    forward (results contiguous, as the op's): the same computation and saved tensors without the dispatcher round
    trip. Its backward calls the backward custom op itself where that matters: under create_graph=True (the op has no
    derivative: a second derivative raises as it does through the op, rather than silently losing the terms through
    the saved tensors) and for batched gradients (`is_grads_batched`, `jacobian(vectorize=True)`: the op's batching
    fallback).
    """
    op.register_autograd(lambda ctx, *grads: backward(ctx, backward_op, *grads), setup_context=setup_context)

    def function_backward(ctx, *grads):
        through_op = torch.is_grad_enabled() or any(_batched(g) for g in grads)
        return backward(ctx, backward_op if through_op else backward_body, *grads)

    def function_forward(ctx, *inputs):
        output = _contiguous(body(*inputs))
        setup_context(ctx, inputs, output)
        return output

    # A class of its own per op, so that autograd's node names (anomaly mode, profiler) say which op.
    name = op._name.title().replace("_", "")
    return type(f"{name}Function", (torch.autograd.Function,),
                {"forward": staticmethod(function_forward), "backward": staticmethod(function_backward)})


_is_legacy_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", None)


def _batched(t) -> bool:
    """A gradient batched by autograd itself (`torch.autograd.grad(..., is_grads_batched=True)`)."""
    return isinstance(t, torch.Tensor) and _is_legacy_batched is not None and _is_legacy_batched(t)


def call_op(op, function, forward, tensors, *args):
    """Run an op on its checked arguments `args` (`tensors`: the tensors among them).

    - functorch transforms (vmap, grad, ...) on the reference path: the body, i.e. the reference's PyTorch ops, which
      the transforms batch and differentiate;
    - `opaque_call`: the registered custom op `op` (on the Triton path under functorch transforms: vmap through the
      op's batching fallback; PyTorch supports no torch.func.grad of a custom op with autograd);
    - autograd records the call: the op's eager twin `function` (`register_autograd`);
    - else the body `forward`, which picks the Triton kernel or the reference; results contiguous.
    """
    if opaque_call(*tensors):
        if torch._C._are_functorch_transforms_active() and not use_triton(*tensors):
            return _contiguous(forward(*args))
        return op(*args)
    if function is not None and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return function.apply(*args)
    return _contiguous(forward(*args))
