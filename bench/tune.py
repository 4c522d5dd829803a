"""`python -m bench tune`: check and time every routed op at a model's shapes on this GPU ahead of time.

Runs FlexDiT's forward and backward once per sparse grid with `FLEXDIT_TUNE=on`, which makes each op that routes
through `flexdit_kernels._tune` check its kernel against its reference and time it against the PyTorch path at
every shape the model meets, and prints the decisions: per op and shape bucket, pass/fail, the winner, and the
times. The decisions land in the tuning cache (see `flexdit_kernels._tune`); `--export PATH` also writes them as a
file that `FLEXDIT_TUNE_FILE` reads (a GPU CI runner keeps it beside its baselines). Run it in a process of its own
before training or sampling on a new GPU or Triton version: a CUDA fault in a check ends this process, not yours.
"""
import json
import sys

import torch

from .common import DTYPES, PROG, positive_int


def add_parser(sub):
    p = sub.add_parser("tune", help="check and time the kernels at a model's shapes on this GPU; cache the decisions")
    p.add_argument("--model", default="DiT-XL/2", help="dense registry name; its FlexDiT is tuned (default %(default)s)")
    p.add_argument("--image-size", type=int, choices=(256, 512), default=512)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--grids", default="10,9,8,6", help="sparse grid sides the density schedule uses")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16", help="autocast dtype")
    p.add_argument("--export", metavar="PATH", help="also write the decisions to PATH (for FLEXDIT_TUNE_FILE)")
    return p


def decision_rows(decisions):
    """(op, bucket, dtype, verdict, winner, kernel ms, PyTorch ms) per cached decision."""
    from flexdit_kernels._tune import KERNEL, REFERENCE
    rows = []
    for key, d in sorted(decisions.items()):
        op, bucket, dtype = key.split("|")
        verdict = "FAILED: " + "; ".join(d.failed.values()) if d.failed else "passed"
        times = [d.times_ms.get(KERNEL), d.times_ms.get(REFERENCE)]
        rows.append((op, bucket, dtype, verdict, d.choice, *("-" if t is None else f"{t:.4f}" for t in times)))
    return rows


def export(cache, path) -> None:
    with open(path, "w") as f:
        json.dump(cache.to_json(), f, indent=1)


def run(args) -> int:
    prog = getattr(args, "prog", PROG)
    from flexdit_kernels import _tune
    from .model import build_models, dense_name, model_inputs, registry_names
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
    name = dense_name(args.model, _Refuse(prog), registry_names())
    if not torch.cuda.is_available():
        print(f"{prog}: error: tune needs a CUDA GPU (torch.cuda.is_available() is False): there is nothing to check "
              "or time on this machine", file=sys.stderr)
        return 2
    if tune_mode != "on":
        print(f"{prog}: error: tune needs FLEXDIT_TUNE=on (it is {tune_mode!r})", file=sys.stderr)
        return 2
    device, dtype = torch.device("cuda"), DTYPES[args.dtype]
    _, flex = build_models(name, args.image_size, grids[0], device)
    x, t, y = model_inputs(args.batch_size, args.image_size, device)
    for grid in grids:
        with torch.autocast("cuda", dtype=dtype):
            flex(x.requires_grad_(), t, y, grid=grid).float().square().mean().backward()
    torch.cuda.synchronize()
    cache = _tune.cache_for(device)
    print(f"{'op':<22} {'shape bucket':<60} {'dtype':<9} {'check':<8} {'winner':<10} {'kernel ms':>10} "
          f"{'PyTorch ms':>10}")
    for row in decision_rows(cache.decisions):
        print(f"{row[0]:<22} {row[1]:<60} {row[2]:<9} {row[3]:<8} {row[4]:<10} {row[5]:>10} {row[6]:>10}")
    print(f"cache: {cache.path}")
    if args.export:
        export(cache, args.export)
        print(f"exported the decisions to {args.export} (FLEXDIT_TUNE_FILE={args.export} reads them)")
    return 0


class _Refuse:
    """`dense_name`'s parser stand-in: a bad --model is a one-line error (exit 2)."""

    def __init__(self, prog: str):
        self.prog = prog

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)
