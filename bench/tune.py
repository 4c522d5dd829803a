"""`python -m bench tune`: check and time every routed op at a model's shapes on this GPU ahead of time.

Runs FlexDiT's forward and backward once per sparse grid with `FLEXDIT_TUNE=on`, which makes each op that routes
through `flexdit_kernels._tune` check its kernel against its reference and time it against the PyTorch path at
every shape the model meets, and prints the decisions: per op and shape bucket, pass/fail, the winner, and the
times. The decisions land in the tuning cache (see `flexdit_kernels._tune`); `--export PATH` also writes them as a
file that `FLEXDIT_TUNE_FILE` reads (a GPU CI runner keeps it beside its baselines). Run it in a process of its own
before training or sampling on a new GPU or Triton version: a CUDA fault in a check ends this process, not yours.
"""
import json
import os
import sys

import torch

from .common import PROG


def add_parser(sub):
    p = sub.add_parser("tune", help="check and time the kernels at a model's shapes on this GPU; cache the decisions")
    p.add_argument("--model", default="DiT-XL/2", help="dense registry name; its FlexDiT is tuned (default %(default)s)")
    p.add_argument("--image-size", type=int, choices=(256, 512), default=512)
    p.add_argument("--batch-size", type=int, default=32)
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
    data = {"environment": cache.env, "decisions": {k: d.to_json() for k, d in sorted(cache.decisions.items())}}
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def run(args) -> int:
    if not torch.cuda.is_available():
        print(f"{PROG}: error: tune needs a CUDA GPU (torch.cuda.is_available() is False): there is nothing to check "
              "or time on this machine", file=sys.stderr)
        return 2
    if os.environ.get("FLEXDIT_TUNE", "on") != "on":
        print(f"{PROG}: error: tune needs FLEXDIT_TUNE=on (it is {os.environ['FLEXDIT_TUNE']!r})", file=sys.stderr)
        return 2
    from flexdit_kernels import _tune
    from .model import build_models, model_inputs
    grids = [int(g) for g in args.grids.split(",")]
    device = torch.device("cuda")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    _, flex = build_models(args.model, args.image_size, grids[0], device)
    x, t, y = model_inputs(args.batch_size, args.image_size, device)
    for grid in grids:
        with torch.autocast("cuda", dtype=dtype):
            flex(x.requires_grad_(), t, y, grid=grid).float().square().mean().backward()
    torch.cuda.synchronize()
    caches = [c for c in _tune._caches.values() if c.env.get("device") == "cuda"]
    print(f"{'op':<22} {'shape bucket':<60} {'dtype':<9} {'check':<8} {'winner':<10} {'kernel ms':>10} "
          f"{'PyTorch ms':>10}")
    for cache in caches:
        for row in decision_rows(cache.decisions):
            print(f"{row[0]:<22} {row[1]:<60} {row[2]:<9} {row[3]:<8} {row[4]:<10} {row[5]:>10} {row[6]:>10}")
        print(f"cache: {cache.path}")
    if args.export and caches:
        export(caches[0], args.export)
        print(f"exported the decisions to {args.export} (FLEXDIT_TUNE_FILE={args.export} reads them)")
    return 0
