"""`python -m bench tune`: check and time every routed op at a model's shapes on this GPU ahead of time.

Runs the model's forward and backward once per sparse grid with `FLEXDIT_TUNE=on`, which makes each op check every
kernel variant of its config space against its fp32 reference and time those that pass against the PyTorch path at
every shape the model meets (`flexdit_kernels.tune_decisions`), then runs the same passes again with every decision
cached. It prints, per op and shape bucket, the variants checked (passed, failed, pruned), the winner, its time and the
PyTorch path's, and the wall time of both passes: the first is what a first forward and backward costs with an empty
cache. The decisions land in the tuning cache; `--export PATH` also writes them as a file that `FLEXDIT_TUNE_FILE`
reads (a GPU CI runner keeps it beside its baselines). Run it in a process of its own before training or sampling on
a new GPU or Triton version: a CUDA fault in a check ends this process, not yours.
"""
import sys
import time

import torch

from .common import DTYPES, PROG, positive_int
from .fixtures import TARGETS as PATCH_TARGETS


def add_parser(sub):
    p = sub.add_parser("tune", help="check and time the kernels at a model's shapes on this GPU; cache the decisions")
    p.add_argument("--model", default="DiT-XL/2",
                   help="registry name (its FlexDiT is tuned) or a diffusers host patched in place: "
                        f"{', '.join(PATCH_TARGETS)} (default %(default)s)")
    p.add_argument("--image-size", type=int, choices=(256, 512, 1024), default=512)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--grids", default="10,9,8,6", help="sparse grid sides the density schedule uses")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16", help="autocast dtype")
    p.add_argument("--export", metavar="PATH", help="also write the decisions to PATH (for FLEXDIT_TUNE_FILE)")
    return p


def _ms(t) -> str:
    return "-" if t is None else f"{t:.4f}"


def decision_rows(decisions):
    """(op, bucket, dtype, variants checked, winner, winner ms, PyTorch ms) per row of
    `flexdit_kernels.tune_decisions`; the variants as "name ok", "name FAILED: error" or "name pruned: why"."""
    rows = []
    for d in decisions:
        checked = [f"{name} ok" if verdict == "passed" else f"{name} {verdict.replace('failed:', 'FAILED:', 1)}"
                   for name, verdict in d["candidates"].items() if name != "reference"]
        rows.append((d["op"], d["bucket"], d["dtype"], "; ".join(checked) or "-", d["winner"], _ms(d["winner_ms"]),
                     _ms(d["pytorch_ms"])))
    return rows


def format_rows(rows) -> str:
    head = ("op", "shape bucket", "dtype", "variants checked", "winner", "winner ms", "PyTorch ms")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(f"{str(c):<{w}}" if i < 5 else f"{str(c):>{w}}" for i, (c, w) in
                               enumerate(zip(r, widths))) for r in [head, *rows])


def _passes(args, device, dtype, grids):
    """One forward and backward of the model per grid, as a function to call: FlexDiT from the registry, or the
    diffusers host patched at each grid (weights frozen: only the activations' gradients, where the ops' backward
    kernels run)."""
    from .model import FRAMES, PATCH_OVERRIDES, _prediction, build_models, model_inputs
    if args.model in PATCH_TARGETS:
        from .fixtures import build_patched_pair
        # Weights in the autocast dtype (FLUX.1: 12B parameters); the dense twin is dropped at once.
        _, model, make_inputs = build_patched_pair(args.model, args.image_size, device=device, dtype=dtype,
                                                   plan={"grid": grids[0]}, config_overrides=dict(PATCH_OVERRIDES),
                                                   frames=FRAMES)
        model.requires_grad_(False)
        kwargs = make_inputs(args.batch_size)

        def run():
            for grid in grids:                                     # a patched host takes each call's grid
                x = kwargs["hidden_states"].detach().requires_grad_()
                with torch.autocast(device.type, dtype=dtype):
                    out = _prediction(model(**dict(kwargs, hidden_states=x, grid=grid)))
                out.float().square().mean().backward()
        return run
    _, flex = build_models(args.model, args.image_size, grids[0], device)
    flex.requires_grad_(False)
    x, t, y = model_inputs(args.batch_size, args.image_size, device)

    def run():
        for grid in grids:
            with torch.autocast(device.type, dtype=dtype):
                out = flex(x.detach().requires_grad_(), t, y, grid=grid)
            out.float().square().mean().backward()
    return run


def _timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def run(args) -> int:
    prog = getattr(args, "prog", PROG)
    import flexdit_kernels as fk
    from flexdit_kernels import _tune
    from .model import dense_name, registry_names
    from .sample import parse_grids
    try:
        grids = parse_grids(args.grids)
        tune_mode = _tune.mode()
    except ValueError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    if not grids or min(grids) < 1 or max(grids) > args.image_size // 16:
        print(f"{prog}: error: --grids {args.grids!r}: sides from 1 to the token grid's {args.image_size // 16}",
              file=sys.stderr)
        return 2
    args.model = dense_name(args.model, _Refuse(prog), registry_names() + list(PATCH_TARGETS))
    if not torch.cuda.is_available():
        print(f"{prog}: error: tune needs a CUDA GPU (torch.cuda.is_available() is False): there is nothing to check "
              "or time on this machine", file=sys.stderr)
        return 2
    if tune_mode != "on":
        print(f"{prog}: error: tune needs FLEXDIT_TUNE=on (it is {tune_mode!r})", file=sys.stderr)
        return 2
    device, dtype = torch.device("cuda"), DTYPES[args.dtype]
    passes = _passes(args, device, dtype, grids)
    before = {(d["op"], d["bucket"], d["dtype"]) for d in fk.tune_decisions(device)}
    first = _timed(passes)
    second = _timed(passes)
    rows = fk.tune_decisions(device)
    new = sum((d["op"], d["bucket"], d["dtype"]) not in before for d in rows)
    print(format_rows(decision_rows(rows)))
    print(f"{args.model} {args.image_size}px batch {args.batch_size} {args.dtype}, grids {args.grids}: "
          f"{new} new decisions; forward + backward over the grids {first:.2f} s with the checks and timing, "
          f"{second:.2f} s cached")
    print(f"cache: {_tune.cache_path(device)}")
    if args.export:
        fk.export_decisions(args.export, device)
        print(f"exported the decisions to {args.export} (FLEXDIT_TUNE_FILE={args.export} reads them)")
    return 0


class _Refuse:
    """`dense_name`'s parser stand-in: a bad --model is a one-line error (exit 2)."""

    def __init__(self, prog: str):
        self.prog = prog

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)
