"""FlexDiT benchmark harness: `python -m bench [kernels|model|sample|sanitize|overhead|static|tune] ...`.

With no arguments: `model` at its defaults on a GPU; on a machine without one, a small CPU reference run.
Exit status: 0 fine, 1 a kernel gave wrong numbers or a speed ratio regressed, 2 bad arguments or configuration
(unknown flag or sub-command, --device cuda without a GPU, a baseline for another GPU, a baseline too noisy to
write), each reported in one line.
"""
import argparse
import difflib
import importlib
import os
import signal
import sys
from typing import List, Optional

import torch

from . import gates
from .common import (DTYPES, PROG, Parser, Results, env_tags, fraction, has_gpu, open_fraction, positive_int, write_csv,
                     write_json)

# Sub-commands: the module that implements each, and its line in the help.
SUITES = {"kernels": "each flexdit_kernels op vs the PyTorch path it replaces, forward and backward",
          "model": "dense DiT vs FlexDiT forward (default command)",
          "sample": "whole sampling runs with guidance: dense vs FlexDiT, eager / compile / cuda-graph",
          "sanitize": "one tiny launch of every kernel forward and backward, checked against its reference (run it "
                      "under compute-sanitizer)",
          "overhead": "host (CPU) time each flexdit op adds per call over its reference, on tiny CPU tensors"}
# Another module may add a sub-command of its own: `add_parser(subparsers)` and `run(args) -> exit status`.
EXTRA = ("static", "tune")
SUBCOMMANDS = tuple(SUITES) + tuple(EXTRA)
MEASURES = ("kernels", "model", "sample")   # the suites with timings, tables, baselines


class Stopped(BaseException):   # not an Exception: per-case error handling must not swallow it
    """SIGTERM during a run (`timeout` ending a CI step): the rows measured so far are still printed and written."""


def _raise_stopped(signum, frame):
    raise Stopped(f"stopped by signal {signum} before the end (a time limit?)")


def prog_name(argv0: str) -> str:
    """The program's name as the user typed it: `python -m bench`, or the console script (`flexdit-bench`)."""
    name = os.path.basename(argv0)
    return PROG if name in ("__main__.py", "") else name


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """One parser; the flags every sub-command shares are defined once, in parent parsers."""
    base = Parser(add_help=False)
    g = base.add_argument_group("run and output")
    g.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: the GPU when present; cpu: a small reference-path run (indicative only; sanitize: "
                        "the Triton interpreter)")
    g.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="bf16 / fp16 (autocast for models) or fp32 (default: bf16 on a GPU, fp32 on the CPU)")
    g.add_argument("--json", metavar="PATH", help="write long-format rows (one measurement each) as JSON")
    timing = Parser(add_help=False)
    g = timing.add_argument_group("timing")
    g.add_argument("--repeats", type=positive_int, default=None,
                   help="timed calls on the CPU / sampling loops / overhead repeats")
    g.add_argument("--csv", metavar="PATH", help="write the same rows as CSV")
    gate = Parser(add_help=False)
    g = gate.add_argument_group("speed-regression gates")
    g.add_argument("--write-baseline", metavar="PATH",
                   help="write the speed ratios as a baseline file: the run is repeated --baseline-runs times and the "
                        "medians are written, unless the ratios or timings spread too much (exit 2)")
    g.add_argument("--baseline-runs", type=positive_int, default=gates.DEFAULT_RUNS,
                   help="runs measured for --write-baseline (default %(default)s)")
    g.add_argument("--max-spread", type=open_fraction, default=gates.DEFAULT_MAX_SPREAD,
                   help="noise guard of --write-baseline: largest (max - min) / median of a ratio over the runs; a "
                        "timing behind a ratio may spread (p80 - p20) / median up to twice this (default "
                        f"{100 * gates.DEFAULT_MAX_SPREAD:.0f}%%)")
    g.add_argument("--check", metavar="PATH", help="fail (exit 1) when a ratio is more than the tolerance below "
                                                   "this baseline (e.g. bench/baselines/nvidia-h200.json)")
    g.add_argument("--tolerance", type=fraction, default=None,
                   help=f"allowed drop below a baseline ratio (default: the baseline's, else "
                        f"{100 * gates.DEFAULT_TOLERANCE:.0f}%%)")

    parser = Parser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    parents = {"sanitize": [base], "overhead": [base, timing]}
    for name, text in SUITES.items():
        p = sub.add_parser(name, parents=parents.get(name, [base, timing, gate]), help=text)
        importlib.import_module(f"bench.{name}").add_arguments(p)
    for name in EXTRA:
        importlib.import_module(f"bench.{name}").add_parser(sub)
    for p in sub.choices.values():
        p.speaks_as_parent = True   # a sub-command's errors read `<program>: error: ...`
    return parser


def _split_default(argv: List[str], parser: argparse.ArgumentParser):
    """Insert the default sub-command when none is named (True when it was); a word that is no sub-command is an
    error that names the closest one."""
    if argv[:1] in (["-h"], ["--help"]) or argv[:1] and argv[0] in SUBCOMMANDS:
        return argv, False
    if argv and not argv[0].startswith("-"):
        close = difflib.get_close_matches(argv[0], SUBCOMMANDS, n=1)
        parser.error(f"unknown sub-command {argv[0]!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                     + f"; choose from {', '.join(SUBCOMMANDS)}")
    return ["model"] + argv, True


def main(argv: Optional[List[str]] = None) -> int:
    """The harness; `argv` None reads sys.argv and speaks under the program's own name."""
    prog = prog_name(sys.argv[0]) if argv is None else PROG
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    full_argv, default_run = _split_default(argv, parser)
    args = parser.parse_args(full_argv)
    args.prog = prog                    # the name sub-commands' messages speak under

    if args.command in EXTRA:
        return importlib.import_module(f"bench.{args.command}").run(args)
    if args.device == "cuda" and not has_gpu():
        parser.error("--device cuda: no CUDA GPU is available (torch.cuda.is_available() is False)")
    suite = importlib.import_module(f"bench.{args.command}")
    if args.command == "sanitize":
        return suite.run_cli(args, parser)
    on_cpu = args.device == "cpu" or (args.device == "auto" and (not has_gpu() or args.command == "overhead"))
    device = torch.device("cpu" if on_cpu else "cuda")
    suite.validate(parser, args, device)   # fills the defaults that depend on the device; errors: parser.error
    if on_cpu and args.device == "auto" and not default_run and args.command in MEASURES:
        print(f"no GPU: torch.cuda.is_available() is False on this machine, so `{args.command}` has nothing to "
              f"measure. Pass --device cpu for a tiny run of the reference path (indicative only).")
        return 0
    args.torch_dtype = DTYPES[args.dtype]
    if getattr(args, "worker", None):   # one op family for a parent run that validated the arguments
        return suite.worker_main(args, device)
    if on_cpu and args.command in MEASURES:
        why = "no CUDA GPU found (torch.cuda.is_available() is False)" if args.device == "auto" else "--device cpu"
        print(f"CPU reference mode ({why}): {suite.cpu_banner(args)}, on one intra-op thread "
              f"(torch.set_num_threads(1)) so the times do not swing with the thread count. Times are indicative "
              f"only: they are not a GPU measurement.")

    tags = env_tags(device)
    tags.update(dtype=args.dtype, mode=getattr(args, "mode", "eager"), batch=getattr(args, "batch_size", 0) or 0,
                device=device.type)
    results = Results(tags=tags)
    baseline = None
    if getattr(args, "check", None):
        try:
            baseline = gates.load_baseline(args.check, tags["gpu"])
        except gates.BaselineError as err:
            return _fail(prog, str(err))

    threads = torch.get_num_threads()
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    runs = [results]
    try:
        if on_cpu:
            torch.set_num_threads(1)
        suite.run(args, results, device)
        if getattr(args, "write_baseline", None) and not results.failures:
            for i in range(1, args.baseline_runs):
                print(f"baseline: measuring run {i + 1} of {args.baseline_runs}", flush=True)
                runs.append(Results(tags=dict(tags)))
                suite.run(args, runs[-1], device)
    except Stopped as err:
        results.failures.append(f"{args.command}: {err}; the rows measured until then are kept")
    finally:
        signal.signal(signal.SIGTERM, previous)
        torch.set_num_threads(threads)

    print(f"device: {tags['gpu']} | torch {tags['torch']} | triton {tags['triton']} | flexdit {tags['flexdit']} | "
          f"dtype {args.dtype} | mode {tags['mode']}")
    print(suite.table(results))
    for note in results.notes:
        print(f"note: {note}")
    failures = list(dict.fromkeys(f for run in runs for f in run.failures))
    for failure in failures:
        print(f"FAILED: {failure}")
    try:
        if args.json:
            write_json(results, args.json, full_argv)
        if args.csv:
            write_csv(results, args.csv)
    except OSError as err:
        return _fail(prog, f"cannot write the results: {err}")

    rc = 1 if failures else 0
    if getattr(args, "write_baseline", None):
        if failures:
            print(f"{prog}: error: not writing a baseline from a run with FAILED kernels", file=sys.stderr)
        else:
            try:
                payload = gates.write_baseline(results, args.write_baseline, full_argv,
                                               args.tolerance if args.tolerance is not None
                                               else gates.DEFAULT_TOLERANCE, runs=runs, max_spread=args.max_spread)
                print(f"wrote baseline {args.write_baseline} ({len(payload['ratios'])} ratios, medians of "
                      f"{len(runs)} runs, GPU {payload['gpu']})")
            except gates.BaselineError as err:
                rc = max(rc, _fail(prog, str(err)))
            except OSError as err:
                rc = max(rc, _fail(prog, f"cannot write {args.write_baseline}: {err}"))
    if baseline is not None:
        report = gates.check(results, baseline, args.check, args.tolerance)
        print(report.text())
        rc = rc if report.ok else max(rc, 1)
    return rc


def _fail(prog: str, message: str) -> int:
    """A one-line error in the parser's style; returns exit status 2."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
