"""FlexDiT benchmark harness: `python -m bench [kernels|model|sample|sanitize|static] ...`.

With no arguments: `model` at its defaults on a GPU; on a machine without one, a small CPU reference run.
Exit status: 0 fine, 1 a kernel gave wrong numbers or a speed ratio regressed, 2 bad arguments or configuration
(unknown flag, --device cuda without a GPU, a baseline for another GPU, a baseline too noisy to write), each
reported in one line.
"""
import argparse
import importlib.util
import signal
import sys
from typing import List, Optional

import torch

from . import gates
from . import sample as sample_suite
from .common import DTYPES, Results, env_tags, has_gpu, positive_int, write_csv, write_json

SUBCOMMANDS = ("kernels", "model", "sample", "sanitize", "static")
PROG = "python -m bench"

# Defaults that depend on where the run happens: (GPU, CPU).
MODEL_DEFAULTS = {"model": ("DiT-XL/2", "DiT-S/2"), "image_size": (512, 256), "batch_size": (32, 1),
                  "dtype": ("bf16", "fp32"), "grid": (8, 8)}
SAMPLE_DEFAULTS = sample_suite.DEFAULTS
KERNEL_DEFAULTS = {"dtype": ("bf16", "fp32")}


def _fraction(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {value}")
    return value


def _positive_fraction(text):
    value = _fraction(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a fraction in (0, 1), got 0")
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {value}")
    return value


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `python -m bench: error: ...` and exit status 2, without the usage block."""

    def error(self, message):
        prog = PROG if self.prog.startswith(PROG + " ") else self.prog   # sub-commands speak as the harness
        self.exit(2, f"{prog}: error: {message}\n")


class Stopped(BaseException):   # not an Exception: per-case error handling must not swallow it
    """SIGTERM during a run (`timeout` ending a CI step): the rows measured so far are still printed and written."""


def _raise_stopped(signum, frame):
    raise Stopped(f"stopped by signal {signum} before the end (a time limit?)")


def fail(message: str) -> int:
    """A one-line error in the parser's style; returns exit status 2."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    g = common.add_argument_group("run and output")
    g.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: the GPU when present; cpu: a small reference-path run (indicative only)")
    g.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="bf16 / fp16 (autocast for models) or fp32 (default: bf16 on a GPU, fp32 on the CPU)")
    g.add_argument("--repeats", type=positive_int, default=None, help="timed calls on the CPU / sampling loops")
    g.add_argument("--json", metavar="PATH", help="write long-format rows (one measurement each) as JSON")
    g.add_argument("--csv", metavar="PATH", help="write the same rows as CSV")
    g.add_argument("--write-baseline", metavar="PATH",
                   help="write the speed ratios as a baseline file: the run is repeated --baseline-runs times and the "
                        "medians are written, unless the ratios or timings spread too much (exit 2)")
    g.add_argument("--baseline-runs", type=positive_int, default=gates.DEFAULT_RUNS,
                   help="runs measured for --write-baseline (default %(default)s)")
    g.add_argument("--max-spread", type=_positive_fraction, default=gates.DEFAULT_MAX_SPREAD,
                   help="noise guard of --write-baseline: largest (max - min) / median of a ratio over the runs; a "
                        "timing behind a ratio may spread (p80 - p20) / median up to twice this (default "
                        f"{100 * gates.DEFAULT_MAX_SPREAD:.0f}%%)")
    g.add_argument("--check", metavar="PATH", help="fail (exit 1) when a ratio is more than the tolerance below "
                                                   "this baseline (e.g. bench/baselines/nvidia-h200.json)")
    g.add_argument("--tolerance", type=_fraction, default=None,
                   help=f"allowed drop below a baseline ratio (default: the baseline's, else "
                        f"{100 * gates.DEFAULT_TOLERANCE:.0f}%%)")

    parser = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")

    k = sub.add_parser("kernels", parents=[common], help="each flexdit_kernels op vs the PyTorch path it replaces")
    k.add_argument("--op", choices=("token_pool", "token_mean", "upsample_add", "attention", "all"), default="all")
    k.add_argument("--backward", action="store_true", help="also check gradients and time forward+backward")
    k.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="run each op family's checks and timings in a process of its own, so that a CUDA fault in "
                        "one family cannot hide the others (default: on CUDA yes, on the CPU no)")
    k.add_argument("--family-timeout", type=_positive_float, default=None, metavar="SECONDS",
                   help="with --isolate: stop a family's process after this long and report its unfinished cases "
                        "as failed")
    k.add_argument("--rep-ms", type=_positive_float, default=100.0, metavar="MS",
                   help="CUDA: time window of each measurement (triton.testing.do_bench rep; warm-up a quarter of "
                        "it; default %(default)g)")
    k.add_argument("--worker", choices=("check", "time"), help=argparse.SUPPRESS)
    k.add_argument("--worker-file", help=argparse.SUPPRESS)

    m = sub.add_parser("model", parents=[common], help="dense DiT vs FlexDiT forward (default command)")
    m.add_argument("--model", default=None,
                   help="dense registry name, e.g. DiT-XL/2 (default; DiT-S/2 on the CPU), or a diffusers model "
                        "patched in place: pixart-alpha, diffusers-dit, latte (16-frame clips; needs diffusers)")
    m.add_argument("--image-size", type=int, choices=(256, 512, 1024), default=None,
                   help="pixels; latent = image/8")
    m.add_argument("--batch-size", type=positive_int, default=None)
    m.add_argument("--grid", type=positive_int, default=None, help="FlexDiT sparse grid side G (default 8)")
    m.add_argument("--mode", choices=("eager", "compile", "cuda-graph"), default="eager",
                   help="compile: torch.compile (compile time reported apart); cuda-graph: replay (CUDA only)")
    m.add_argument("--profile", action="store_true",
                   help="per forward: kernel time by family (GEMM, attention, norm, pooling, elementwise) and launch "
                        "count of every variant, and FlexDiT's time by layer kind (PyTorch profiler)")
    m.add_argument("--impls", default=None, metavar="LIST",
                   help="comma-separated subset of dense,dense-fused,flexdit,flexdit-ref to time (default: all that "
                        "run here; dense is always timed, as the speedups are over it)")

    s = sub.add_parser("sample", parents=[common],
                       help="whole sampling runs with guidance: dense vs FlexDiT, eager / compile / cuda-graph")
    sample_suite.add_arguments(s)

    from .sanitize import add_arguments
    z = sub.add_parser("sanitize", help="one tiny launch of every kernel forward and backward, checked against its "
                                        "reference (run it under compute-sanitizer)")
    add_arguments(z)
    from .static import add_parser as add_static
    add_static(sub)
    return parser


def _split_default(argv: List[str]):
    """Insert the default sub-command when none is named; True when it was inserted."""
    if any(a in ("-h", "--help") for a in argv[:1]):
        return argv, False
    if not argv or argv[0] not in SUBCOMMANDS:
        return ["model"] + argv, True
    return argv, False


def _resolve(args, defaults, on_cpu):
    for name, (gpu_value, cpu_value) in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, cpu_value if on_cpu else gpu_value)


def _validate(parser, args, device):
    from flexdit import DiT_models, flexdit_config
    from .model import PATCH_TARGETS
    if args.command == "model" and args.model in PATCH_TARGETS:
        if args.profile:
            parser.error(f"--profile needs a registry model, not {args.model!r}")
        if importlib.util.find_spec("diffusers") is None:
            parser.error(f"--model {args.model} needs diffusers: pip install 'flexdit[diffusers]'")
        side = args.image_size // 8 // 2
        if args.grid > side:
            parser.error(f"--grid {args.grid}: larger than the token grid {side}x{side}")
        return
    if args.command in ("model", "sample"):
        if args.model not in DiT_models:
            parser.error(f"--model {args.model!r} is not a dense registry name; known: "
                         f"{', '.join(sorted(DiT_models))}")
    if args.command == "model":
        if args.impls is not None:
            from .model import IMPLS
            impls = [i.strip() for i in args.impls.split(",") if i.strip()]
            unknown = [i for i in impls if i not in IMPLS]
            if not impls or unknown:
                parser.error(f"--impls {args.impls!r}: choose from {','.join(IMPLS)}")
        if args.mode == "cuda-graph" and device.type != "cuda":
            parser.error("--mode cuda-graph needs a CUDA GPU")
        try:
            flexdit_config(args.model, input_size=args.image_size // 8, grid=args.grid)
        except ValueError as err:
            parser.error(f"--grid {args.grid}: {err}")
    if args.command == "sample":
        sample_suite.validate(parser, args, device)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    full_argv, default_run = _split_default(argv)
    args = parser.parse_args(full_argv)
    if args.command == "static":
        from .static import run as run_static
        return run_static(args)

    if args.device == "cuda" and not has_gpu():
        parser.error("--device cuda: no CUDA GPU is available (torch.cuda.is_available() is False)")
    if args.command == "sanitize":
        from .sanitize import run_cli
        return run_cli(args, parser)
    on_cpu = args.device == "cpu" or (args.device == "auto" and not has_gpu())
    device = torch.device("cpu" if on_cpu else "cuda")

    if on_cpu and args.device == "auto" and not default_run:
        print(f"no GPU: torch.cuda.is_available() is False on this machine, so `{args.command}` has nothing to "
              f"measure. Pass --device cpu for a tiny run of the reference path (indicative only).")
        return 0
    _resolve(args, {"kernels": KERNEL_DEFAULTS, "model": MODEL_DEFAULTS, "sample": SAMPLE_DEFAULTS}[args.command],
             on_cpu)
    if on_cpu and default_run:
        why = ("no CUDA GPU found (torch.cuda.is_available() is False)" if args.device == "auto"
               else "--device cpu")
        print(f"CPU reference mode ({why}): a small run of {args.model} at {args.image_size}x{args.image_size}, "
              f"batch {args.batch_size}, {args.dtype}, {args.mode}, dense DiT vs FlexDiT on its PyTorch reference "
              f"path (no kernels). Times are indicative only; the real measurement needs a GPU.")
    args.torch_dtype = DTYPES[args.dtype]
    if args.command == "kernels" and args.worker:   # one op family for a parent run that validated the arguments
        from .kernels import worker_main
        if not args.worker_file:
            parser.error("--worker needs --worker-file")
        return worker_main(args, device)
    _validate(parser, args, device)

    tags = env_tags(device)
    tags.update(dtype=args.dtype, mode=getattr(args, "mode", "eager"), batch=getattr(args, "batch_size", 0) or 0,
                device=device.type)
    results = Results(tags=tags)

    baseline = None
    if args.check:
        try:
            baseline = gates.load_baseline(args.check)
            if baseline["gpu"] != tags["gpu"]:
                raise gates.BaselineError(f"baseline {args.check} is for GPU {baseline['gpu']!r}, but this run is "
                                          f"on {tags['gpu']!r}")
        except gates.BaselineError as err:
            return fail(str(err))

    if args.command == "kernels":
        from . import kernels as suite
    elif args.command == "model":
        from . import model as suite
    else:
        suite = sample_suite
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        suite.run(args, results, device)
    except Stopped as err:
        results.failures.append(f"{args.command}: {err}; the rows measured until then are kept")
    finally:
        signal.signal(signal.SIGTERM, previous)
    runs = [results]
    if args.write_baseline and not results.failures:
        for i in range(1, args.baseline_runs):
            print(f"baseline: measuring run {i + 1} of {args.baseline_runs}", flush=True)
            again = Results(tags=dict(tags))
            suite.run(args, again, device)
            runs.append(again)

    print(f"device: {tags['gpu']} | torch {tags['torch']} | triton {tags['triton']} | flexdit {tags['flexdit']} | "
          f"dtype {args.dtype} | mode {tags['mode']}")
    print(suite.table(results))
    for note in results.notes:
        print(f"note: {note}")
    failures = [f for run in runs for f in run.failures]
    for failure in dict.fromkeys(failures):
        print(f"FAILED: {failure}")

    try:
        if args.json:
            write_json(results, args.json, full_argv)
        if args.csv:
            write_csv(results, args.csv)
    except OSError as err:
        return fail(f"cannot write the results: {err}")

    rc = 1 if failures else 0
    if args.write_baseline:
        if failures:
            print(f"{PROG}: error: not writing a baseline from a run with FAILED kernels", file=sys.stderr)
        else:
            try:
                payload = gates.write_baseline(results, args.write_baseline, full_argv,
                                               args.tolerance if args.tolerance is not None
                                               else gates.DEFAULT_TOLERANCE, runs=runs, max_spread=args.max_spread)
                print(f"wrote baseline {args.write_baseline} ({len(payload['ratios'])} ratios, medians of "
                      f"{len(runs)} runs, GPU {payload['gpu']})")
            except gates.BaselineError as err:
                rc = max(rc, fail(str(err)))
            except OSError as err:
                rc = max(rc, fail(f"cannot write {args.write_baseline}: {err}"))
    if baseline is not None:
        report = gates.check(results, baseline, args.check, args.tolerance)
        print(report.text())
        if not report.ok:
            rc = max(rc, 1)
    return rc


if __name__ == "__main__":
    sys.exit(main())
