"""`python -m bench sanitize`: one tiny launch of every flexdit_kernels kernel, forward and backward, each checked
against its reference; meant to run under `compute-sanitizer --tool memcheck`, which then sees every kernel once.

The launches are the cases of `bench kernels` (`make_inputs`, `check_case`) at small shapes, awkward on purpose
(a 7x9 token grid pooled to 3x4: windows of unequal size; C and head dim 72; inputs as strided views of fused
projections), so masked tails and strides are exercised while memcheck stays fast. They run inside
`flexdit_kernels.triton_only()`, so no shape goes to a PyTorch path; attention runs once per path.

Every op of `flexdit_kernels.__all__` that has a `<op>_ref` must have a launch; an op without one is reported
UNCOVERED and fails the run, so a new kernel cannot slip past the sanitizer: give it a case in
`bench.kernels.make_inputs` and a name in `bench.kernels.OPS`. A launch whose op this `flexdit_kernels` does not
export is listed as absent and skipped.

Exit status: 0 every launch matched its reference, 1 a launch failed or an op is uncovered, 2 bad arguments.
"""
import argparse
import json
import os
import time
import traceback
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

import flexdit_kernels as fk

from .common import DTYPES, first_line, has_gpu, open_out
from .kernels import ATTENTION_PATHS, OPS, PATH_PROBES, check_case, exported_ops, make_inputs, path_probe

SHAPE = dict(b=2, hw=(7, 9), grid=(3, 4), c=72)   # 63 tokens pooled to 12; C not a power of two
HEADS, HEAD_DIM = 2, 72


@dataclass
class Launch:
    op: str                  # the flexdit_kernels attribute it launches
    variant: str             # "" or the attention path
    params: Optional[dict]   # the case (`bench.kernels.make_inputs`); None: no shape reaches this path any more

    @property
    def name(self) -> str:
        return f"{self.op}[{self.variant}]" if self.variant else self.op

    def run(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        """One forward and backward inside `triton_only()`, checked; None or a one-line reason."""
        if self.params is None:
            return f"no shape in {PATH_PROBES} takes the {self.variant} path any more: update bench/kernels.py"
        leaves, views = make_inputs(self.op, self.params, device, dtype)
        with fk.triton_only():
            reason = check_case(self.op, leaves, views, backward=True)
        if reason and self.op == "attention":
            return f"Lq={self.params['lq']} Lk={self.params['lk']} D={HEAD_DIM}: {reason}"
        return reason


def _attention_launch(path: str) -> Launch:
    probe = path_probe(path)
    return Launch("attention", path, None if probe is None else dict(b=1, lq=probe[0], lk=probe[1], h=HEADS,
                                                                     d=HEAD_DIM))


LAUNCHES: List[Launch] = [launch for op in OPS for launch in
                          ([_attention_launch(p) for p in ATTENTION_PATHS] if op == "attention"
                           else [Launch(op, "", SHAPE)])]


def uncovered(only: Optional[List[str]] = None) -> List[str]:
    """The ops of flexdit_kernels (those in `only`, when given) without a launch."""
    return [op for op in exported_ops() if op not in {item.op for item in LAUNCHES} and (not only or op in only)]


def run_launches(device: torch.device, dtype: torch.dtype, only: Optional[List[str]] = None,
                 emit: Callable[[str], None] = print) -> dict:
    """Run every registered launch (or those of the ops in `only`); a report dict with one record per launch."""
    records = []
    for item in LAUNCHES:
        if only and item.op not in only:
            continue
        if not hasattr(fk, item.op):
            records.append(dict(launch=item.name, op=item.op, status="absent", reason="not in this flexdit_kernels"))
            continue
        torch.manual_seed(0)
        start = time.perf_counter()
        try:
            reason = item.run(device, dtype)
            if device.type == "cuda":
                torch.cuda.synchronize(device)    # a fault inside the kernel surfaces here, under its own name
        except Exception as err:
            frames = traceback.extract_tb(err.__traceback__)
            where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
            reason = f"raised {type(err).__name__}{where}: {first_line(err)}"
        records.append(dict(launch=item.name, op=item.op, status="ok" if reason is None else "FAILED",
                            reason=reason or "", seconds=round(time.perf_counter() - start, 3)))
        emit(f"{item.name:34s} {'ok' if reason is None else 'FAILED: ' + reason}")
    why = "no case in bench/kernels.py (add one to OPS and make_inputs)"
    for op in uncovered(only):
        records.append(dict(launch=op, op=op, status="UNCOVERED", reason=why))
        emit(f"{op:34s} UNCOVERED: {why}")
    for rec in records:
        if rec["status"] == "absent":
            emit(f"{rec['launch']:34s} absent (not exported by this flexdit_kernels), skipped")
    ok = all(r["status"] in ("ok", "absent") for r in records)
    return dict(device=str(device), dtype=str(dtype).replace("torch.", ""), ok=ok, launches=records)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The sub-command's own options (--device, --dtype, --json come from the parent parser)."""
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--op", action="append", default=None, metavar="OP",
                   help="only this op (repeatable); default: every registered launch")
    p.add_argument("--list", action="store_true", help="list the registered launches and the uncovered ops, run none")


def run_cli(args, parser) -> int:
    if args.list:
        for item in LAUNCHES:
            print(f"{item.name:34s} {'registered' if item.op in exported_ops() else 'registered, op absent here'}")
        for op in uncovered():
            print(f"{op:34s} UNCOVERED")
        return 0
    if args.op:
        unknown = [op for op in args.op if op not in {item.op for item in LAUNCHES} | set(exported_ops())]
        if unknown:
            parser.error(f"--op {unknown[0]!r}: not an op of flexdit_kernels nor a registered launch")
    on_cpu = args.device == "cpu" or (args.device == "auto" and not has_gpu())
    if on_cpu and args.device == "auto":
        print("no GPU: torch.cuda.is_available() is False on this machine, so `sanitize` has no kernel to launch. "
              "Pass --device cpu with TRITON_INTERPRET=1 to run the launches through the Triton interpreter.")
        return 0
    if on_cpu and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("sanitize --device cpu needs TRITON_INTERPRET=1 (the Triton interpreter); without it the ops "
                     "would run their references")
    dtype = DTYPES[args.dtype or ("fp32" if on_cpu else "bf16")]
    if on_cpu and dtype == torch.bfloat16:
        parser.error("--dtype bf16 on the CPU: the Triton interpreter cannot compute bf16 dots")
    device = torch.device("cpu" if on_cpu else "cuda")
    with fk.backend("triton"):
        report = run_launches(device, dtype, args.op)
    n_ok = sum(r["status"] == "ok" for r in report["launches"])
    print(f"sanitize: {n_ok} of {len(report['launches'])} launches ok on {report['device']} ({report['dtype']})")
    if args.json:
        with open_out(args.json) as f:
            json.dump(report, f, indent=1)
    return 0 if report["ok"] else 1
