"""Shared pieces of the harness: argument types and errors, environment tags, timers, measured ceilings, result
rows, table/JSON/CSV output."""
import argparse
import csv
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

QUANTILES = (0.5, 0.2, 0.8)  # median, 20th and 80th percentile

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


PROG = "python -m bench"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors, `<program>: error: ...` and exit status 2, without the usage block; a
    sub-command's parser speaks under its program's name."""

    def error(self, message):
        head, _, last = self.prog.rpartition(" ")
        prog = head if head and getattr(self, "speaks_as_parent", False) else self.prog
        self.exit(2, f"{prog}: error: {message}\n")


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _number(kind, ok: Callable[[float], bool], what: str):
    """An argparse type: `kind(text)` for which `ok` holds, else an error saying that `what` was expected."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value
    return parse


positive_int = _number(int, lambda v: v >= 1, "a positive integer")
positive_float = _number(float, lambda v: v > 0, "a positive number")   # seconds, milliseconds
fraction = _number(float, lambda v: 0 <= v < 1, "a fraction in [0, 1)")
open_fraction = _number(float, lambda v: 0 < v < 1, "a fraction in (0, 1)")


def parse_list(text: Optional[str], allowed: Sequence[str], flag: str) -> Optional[List[str]]:
    """The comma-separated subset of `allowed` that `text` names (None for None), without repeats; ValueError naming
    `--flag` otherwise."""
    if text is None:
        return None
    items = [m.strip() for m in str(text).split(",") if m.strip()]
    if not items or any(m not in allowed for m in items):
        raise ValueError(f"--{flag} takes a comma-separated subset of {', '.join(allowed)}, got {text!r}")
    return list(dict.fromkeys(items))


def fill_defaults(args, defaults: Dict[str, tuple], on_cpu: bool) -> None:
    """Set each option left unset to its (GPU, CPU) default."""
    for name, (gpu_value, cpu_value) in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, cpu_value if on_cpu else gpu_value)


# ----------------------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------------------

def has_gpu() -> bool:
    return torch.cuda.is_available()


def gpu_slug(name: str) -> str:
    """File-name form of a device name: "NVIDIA H100 80GB HBM3" → "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def env_tags(device: torch.device) -> Dict[str, str]:
    """The GPU's marketing name ("NVIDIA H200", or "cpu") and the torch, triton and flexdit versions."""
    import flexdit
    import triton
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "flexdit": flexdit.__version__}


# ----------------------------------------------------------------------------------------------------------------
# Rows (long format: one measured value per row)
# ----------------------------------------------------------------------------------------------------------------

ROW_FIELDS = ("suite", "case", "impl", "metric", "value", "unit", "gpu", "torch", "triton", "flexdit", "dtype",
              "batch", "mode", "note", "route")


@dataclass
class Row:
    """One measurement. `suite`: kernels/model/sample/ceiling; `case`: the shape or configuration; `impl`: which
    implementation (flexdit, torch, sdpa-flash, dense, flexdit-ref, ...); `metric`: ms, ms_p20, ms_p80, GB/s,
    TFLOP/s, frac_copy_bw, frac_matmul, images/s, speedup, GMACs, peak_MiB, share, compile_s, ...; `route`: how
    flexdit_kernels routed the op(s) the row timed (`flexdit_kernels.last_route`)."""

    suite: str
    case: str
    impl: str
    metric: str
    value: float
    unit: str = ""
    gpu: str = ""
    torch: str = ""
    triton: str = ""
    flexdit: str = ""
    dtype: str = ""
    batch: int = 0
    mode: str = ""
    note: str = ""
    route: str = ""

    def key(self) -> str:
        """Identity of a measurement across runs (used by the regression gates)."""
        return f"{self.suite}|{self.case}|{self.impl}|{self.metric}"


@dataclass
class Results:
    """Rows of one run plus its tags; failures are kernels that gave wrong numbers (reported, never timed)."""

    tags: Dict[str, str]
    rows: List[Row] = field(default_factory=list)
    failures: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, payload: dict) -> "Results":
        """The Results of a `--json` payload."""
        return cls(tags=payload.get("tags", {}), rows=[Row(**r) for r in payload.get("rows", [])],
                   failures=list(payload.get("failures", [])), notes=list(payload.get("notes", [])))

    def add(self, suite, case, impl, metric, value, unit="", **extra) -> Row:
        fields = {**{k: v for k, v in self.tags.items() if k in ROW_FIELDS}, **extra}
        row = Row(suite=suite, case=case, impl=impl, metric=metric, value=float(value), unit=unit, **fields)
        self.rows.append(row)
        return row

    def add_timing(self, suite, case, impl, times: Sequence[float], **extra):
        """times = (median, p20, p80) in ms."""
        for metric, value in zip(("ms", "ms_p20", "ms_p80"), times):
            self.add(suite, case, impl, metric, value, "ms", **extra)

    def get(self, suite, case, impl, metric) -> Optional[float]:
        return next((row.value for row in self.rows if (row.suite, row.case, row.impl, row.metric)
                     == (suite, case, impl, metric)), None)


def open_out(path: str, **kwargs):
    """`open(path, "w")` for an output file, creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return open(path, "w", encoding="utf-8", **kwargs)


def write_json(results: Results, path: str, argv: Sequence[str]) -> None:
    with open_out(path) as f:
        json.dump({"format": 1, "argv": list(argv), "tags": results.tags, "failures": results.failures,
                   "notes": results.notes, "rows": [asdict(r) for r in results.rows]}, f, indent=1)


def write_csv(results: Results, path: str) -> None:
    with open_out(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=ROW_FIELDS)
        writer.writeheader()
        writer.writerows(asdict(r) for r in results.rows)


def read_results(path: str) -> Results:
    with open(path, encoding="utf-8") as f:
        return Results.from_json(json.load(f))


# ----------------------------------------------------------------------------------------------------------------
# Table
# ----------------------------------------------------------------------------------------------------------------

def _fmt(v: Optional[float]) -> str:
    if v is None:
        return "-"
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.3g}" if a < 10 else f"{v:.2f}".rstrip("0").rstrip(".")
    return f"{v:.3f}"


def format_table(results: Results, suite: str, columns: Sequence[str], title: str = "") -> str:
    """One line per (case, impl) of a suite, one column per metric ("ms" as "median [p20, p80]"), and the route
    flexdit_kernels took where the rows record one; columns without a value are left out."""
    groups: Dict[tuple, Dict[str, Row]] = {}
    for row in results.rows:
        if row.suite == suite:
            groups.setdefault((row.case, row.impl), {})[row.metric] = row
    if not groups:
        return ""
    header = ["case", "impl", *columns, "route"]
    lines = []
    for (case, impl), metrics in groups.items():
        cells = [_fmt(metrics[col].value) if col in metrics else "-" for col in columns]
        if "ms" in columns and {"ms", "ms_p20", "ms_p80"} <= set(metrics):
            cells[columns.index("ms")] += f" [{_fmt(metrics['ms_p20'].value)}, {_fmt(metrics['ms_p80'].value)}]"
        note = next((r.note for r in metrics.values() if r.note), "")
        route = next((r.route for r in metrics.values() if r.route), "-")
        lines.append([case, f"{impl} ({note})" if note else impl, *cells, route])
    keep = [i for i in range(len(header)) if i < 2 or any(cells[i] != "-" for cells in lines)]
    header = [header[i] for i in keep]
    lines = [[cells[i] for i in keep] for cells in lines]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    out = [title] if title else []
    out += ["  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
            for cells in [header, ["-" * w for w in widths], *lines]]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------------------
# Timers
# ----------------------------------------------------------------------------------------------------------------

def _quantiles(samples: Sequence[float]) -> tuple:
    s = sorted(samples)

    def q(p):  # linear interpolation, as torch.quantile
        pos = p * (len(s) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    return tuple(q(p) for p in QUANTILES)


def bench_fn(fn: Callable[[], object], device: torch.device, warmup: int = 25, rep: int = 100,
             grad_to_none: Optional[Sequence[torch.Tensor]] = None, cpu_repeats: int = 5,
             cpu_warmup: int = 1, wall: bool = False, min_reps: int = 0) -> tuple:
    """(median, p20, p80) ms of fn(); warm-up excluded.

    CUDA: `triton.testing.do_bench` (warmup / rep in ms; it flushes L2 between calls and times with CUDA events);
    `min_reps` stretches rep so that calls longer than rep/min_reps are still timed at least min_reps times.
    CPU, or `wall=True` (seconds-long calls such as a sampling loop): wall-clock over `cpu_repeats` calls after
    `cpu_warmup` calls, synchronizing the device around each (on the CPU: the reference mode, indicative only).
    """
    if device.type == "cuda" and not wall:
        from triton.testing import do_bench
        if min_reps:
            est = _estimate_cuda_ms(fn)
            warmup, rep = max(warmup, 2 * est), max(rep, min_reps * est)
        out = do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, quantiles=list(QUANTILES))
        return tuple(float(v) for v in out)
    for _ in range(cpu_warmup):
        fn()
    samples = []
    for _ in range(max(1, cpu_repeats)):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(samples)


def _estimate_cuda_ms(fn) -> float:  # pragma: no cover - GPU only
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak allocated memory of one call of fn (CUDA only; None on the CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------------------
# Ceilings measured in the same run
# ----------------------------------------------------------------------------------------------------------------

def _ceiling(results: Optional[Results], case: str, impl: str, ms: tuple, metric: str, value: float) -> float:
    if results is not None:
        results.add_timing("ceiling", case, impl, ms)
        results.add("ceiling", case, impl, metric, value, metric)
    return value


def copy_bandwidth(device: torch.device, results: Optional[Results] = None, nbytes: int = 2**30) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written per second), 1 GiB buffers on CUDA."""
    if device.type != "cuda":
        nbytes = 2**26
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = bench_fn(lambda: dst.copy_(src), device, cpu_repeats=5)
    gbps = 2 * nbytes / (ms[0] * 1e-3) / 1e9
    return _ceiling(results, f"copy {nbytes // 2**20} MiB", "torch.copy_", ms, "GB/s", gbps)


def matmul_tflops(device: torch.device, dtype: torch.dtype, results: Optional[Results] = None,
                  n: int = 8192) -> float:
    """Achieved TFLOP/s of an n³ matmul in `dtype` (8192³ on CUDA, fp32 1024³ on the CPU)."""
    if device.type != "cuda":
        n, dtype = 1024, torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = bench_fn(lambda: a @ b, device, cpu_repeats=5)
    return _ceiling(results, f"matmul {n}^3 {str(dtype).replace('torch.', '')}", "torch.matmul", ms, "TFLOP/s",
                    2 * n ** 3 / (ms[0] * 1e-3) / 1e12)
