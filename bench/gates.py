"""Speed-regression gates: baselines hold speed RATIOS per GPU model (never absolute times); see baselines/README.md."""
import datetime
import json
import os
import statistics
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from .common import Results, gpu_slug, open_out

FORMAT = 1
DEFAULT_TOLERANCE = 0.10
# Noise guard of --write-baseline: the run is repeated (DEFAULT_RUNS times) and the baseline refused when a ratio moves
# by more than DEFAULT_MAX_SPREAD ((max - min) / median over the runs), or when a timing behind a ratio spreads by
# more than TIMING_SPREAD_FACTOR x that ((p80 - p20) / median within a run). A ratio recorded under machine load
# would otherwise fail every later --check (once, on a loaded CPU: a 34x ratio).
DEFAULT_RUNS = 3
DEFAULT_MAX_SPREAD = 0.05
TIMING_SPREAD_FACTOR = 2.0
# Dimensionless metrics that may be gated: speedups over the PyTorch path / dense model, fractions of ceilings.
RATIO_METRICS = ("speedup",)
GATE_FLAGS = ("--write-baseline", "--check", "--json", "--csv", "--tolerance", "--baseline-runs", "--max-spread")
BASELINE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "baselines")


class BaselineError(Exception):
    """A baseline that cannot be used: missing, malformed, or recorded on another GPU."""


def baseline_path(gpu: str) -> str:
    """Where the committed baseline for a GPU name lives: bench/baselines/<slug>.json."""
    return os.path.join(BASELINE_DIR, gpu_slug(gpu) + ".json")


def ratios(results: Results) -> Dict[str, float]:
    return {row.key(): row.value for row in results.rows if row.metric in RATIO_METRICS}


def make_baseline(results: Results, argv: Sequence[str], tolerance: float = DEFAULT_TOLERANCE) -> dict:
    r = ratios(results)
    if not r:
        raise BaselineError("this run measured no speed ratios; nothing to write")
    return {"format": FORMAT, "gpu": results.tags["gpu"], "torch": results.tags.get("torch", ""),
            "triton": results.tags.get("triton", ""), "flexdit": results.tags.get("flexdit", ""),
            "created": datetime.date.today().isoformat(), "argv": [a for a in argv if a],
            "tolerance": tolerance, "ratios": dict(sorted(r.items()))}


def noise_reasons(runs: Sequence[Results], max_spread: float = DEFAULT_MAX_SPREAD) -> List[str]:
    """Why repeated runs are too noisy for a baseline, worst first (empty: quiet enough).

    Across runs: every ratio must be measured in every run and move by at most `max_spread` ((max - min) / median).
    Within a run: each timing a ratio is made of (the impl and the one it is "over") must have
    (p80 - p20) / median at most TIMING_SPREAD_FACTOR x `max_spread`.
    """
    found = []   # (severity, reason)
    per_run = [ratios(r) for r in runs]
    for key in sorted(set().union(*per_run)):
        values = [r[key] for r in per_run if key in r]
        if len(values) < len(runs):
            found.append((float("inf"), f"{key} was measured in only {len(values)} of {len(runs)} runs"))
            continue
        med = statistics.median(values)
        spread = (max(values) - min(values)) / med if med > 0 else float("inf")
        if spread > max_spread:
            found.append((spread / max_spread, f"{key} moved from {min(values):.3g} to {max(values):.3g} over "
                                               f"{len(runs)} runs ({spread:.1%} > {max_spread:.1%})"))
    limit = TIMING_SPREAD_FACTOR * max_spread
    for i, res in enumerate(runs):
        for row in res.rows:
            if row.metric not in RATIO_METRICS:
                continue
            over = row.note[len("over "):] if row.note.startswith("over ") else None
            for impl in (row.impl, over):
                t = [res.get(row.suite, row.case, impl, m) for m in ("ms", "ms_p20", "ms_p80")] if impl else [None]
                if None in t or t[0] <= 0:
                    continue
                spread = (t[2] - t[1]) / t[0]
                if spread > limit:
                    found.append((spread / limit, f"{row.suite}|{row.case}|{impl} timing spread (p80 - p20) / median "
                                                  f"= {spread:.1%} > {limit:.1%} in run {i + 1}"))
    return list(dict.fromkeys(reason for _, reason in sorted(found, key=lambda f: -f[0])))


def write_baseline(results: Results, path: str, argv: Sequence[str], tolerance: float = DEFAULT_TOLERANCE,
                   runs: Optional[Sequence[Results]] = None, max_spread: float = DEFAULT_MAX_SPREAD):
    """Write the baseline of one run, or of the medians of repeated `runs` after the noise guard (BaselineError:
    too noisy, with the worst reason in one line)."""
    payload = make_baseline(results, _strip_gate_flags(argv), tolerance)
    if runs is not None:
        reasons = noise_reasons(runs, max_spread)
        if reasons:
            more = f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""
            raise BaselineError(f"not writing {path}: the measurement is too noisy for a baseline: {reasons[0]}{more}; "
                                f"rerun on a quiet machine or raise --max-spread")
        per_run = [ratios(r) for r in runs]   # the noise guard made sure that every run has every ratio
        payload["ratios"] = {k: statistics.median(r[k] for r in per_run) for k in payload["ratios"]}
        payload.update(runs=len(runs), max_spread=max_spread, spread={
            k: (max(r[k] for r in per_run) - min(r[k] for r in per_run)) / v if v else 0.0
            for k, v in payload["ratios"].items()})
    with open_out(path) as f:
        json.dump(payload, f, indent=1)
        f.write("\n")
    return payload


def _strip_gate_flags(argv: Sequence[str]) -> List[str]:
    """The command that reproduces a run, without output and gate flags (so `--check` can rerun it)."""
    out, skip = [], False
    for a in argv:
        name = a.split("=", 1)[0]
        if not skip and name not in GATE_FLAGS:
            out.append(a)
        skip = not skip and name in GATE_FLAGS and "=" not in a   # the flag's value is the next word
    return out


def load_baseline(path: str, gpu: Optional[str] = None) -> dict:
    """The baseline at `path`; BaselineError when it is missing or malformed, or recorded on another `gpu`."""
    if not os.path.exists(path):
        raise BaselineError(f"baseline {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise BaselineError(f"baseline {path} is not valid JSON: {err}") from err
    if data.get("format") != FORMAT or not isinstance(data.get("ratios"), dict) or "gpu" not in data:
        raise BaselineError(f"baseline {path} is not a format-{FORMAT} baseline (needs 'format', 'gpu', 'ratios')")
    if gpu is not None and data["gpu"] != gpu:
        raise BaselineError(f"baseline {path} is for GPU {data['gpu']!r}, but this run is on {gpu!r}")
    return data


@dataclass
class CheckReport:
    gpu: str
    path: str
    tolerance: float
    passed: List[str] = field(default_factory=list)
    regressions: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    new: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.regressions and bool(self.passed)

    def text(self) -> str:
        lines = [f"regression check against {self.path} (baseline for GPU: {self.gpu}; "
                 f"fails when a ratio is more than {self.tolerance:.0%} below its baseline)"]
        lines += [f"  REGRESSION {line}" for line in self.regressions]
        lines += [f"  ok         {line}" for line in self.passed]
        lines += [f"  not measured in this run: {key}" for key in self.missing]
        if self.new:
            lines.append(f"  {len(self.new)} ratio(s) measured that the baseline does not hold (not gated)")
        if not self.passed and not self.regressions:
            lines.append("  nothing compared: this run measured none of the baseline's ratios")
        lines.append(f"  => {'PASS' if self.ok else 'FAIL'}: {len(self.passed)} ok, "
                     f"{len(self.regressions)} regression(s), {len(self.missing)} not measured")
        return "\n".join(lines)


def check(results: Results, baseline: dict, path: str = "", tolerance: Optional[float] = None) -> CheckReport:
    """Compare this run's ratios with a baseline. A GPU mismatch raises BaselineError."""
    gpu = results.tags["gpu"]
    if baseline["gpu"] != gpu:
        raise BaselineError(f"baseline {path} is for GPU {baseline['gpu']!r}, this run is on {gpu!r}; "
                            f"use {baseline_path(gpu)} or write one with --write-baseline")
    tol = float(baseline.get("tolerance", DEFAULT_TOLERANCE) if tolerance is None else tolerance)
    report = CheckReport(gpu=baseline["gpu"], path=path, tolerance=tol)
    current = ratios(results)
    for key, base in sorted(baseline["ratios"].items()):
        if key not in current:
            report.missing.append(key)
            continue
        now = current[key]
        change = now / base - 1 if base else 0.0
        line = f"{key}: {now:.3f} vs baseline {base:.3f} ({change:+.1%})"
        (report.regressions if now < base * (1 - tol) else report.passed).append(line)
    report.new = sorted(set(current) - set(baseline["ratios"]))
    return report
