"""Speed-regression gates: baselines hold speed RATIOS per GPU model (never absolute times); see baselines/README.md."""
import datetime
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from .common import Results, gpu_slug

FORMAT = 1
DEFAULT_TOLERANCE = 0.10
# Dimensionless metrics that may be gated: speedups over the PyTorch path / dense model, fractions of ceilings.
RATIO_METRICS = ("speedup",)
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
            "created": datetime.date.today().isoformat(), "argv": [a for a in argv if a not in ("",)],
            "tolerance": tolerance, "ratios": dict(sorted(r.items()))}


def write_baseline(results: Results, path: str, argv: Sequence[str], tolerance: float = DEFAULT_TOLERANCE):
    payload = make_baseline(results, _strip_gate_flags(argv), tolerance)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")
    return payload


def _strip_gate_flags(argv: Sequence[str]) -> List[str]:
    """The command that reproduces a run, without output and gate flags (so `--check` can rerun it)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in ("--write-baseline", "--check", "--json", "--csv", "--tolerance"):
            skip = "=" not in a
            continue
        out.append(a)
    return out


def load_baseline(path: str) -> dict:
    if not os.path.exists(path):
        raise BaselineError(f"baseline {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise BaselineError(f"baseline {path} is not valid JSON: {err}") from err
    if data.get("format") != FORMAT or not isinstance(data.get("ratios"), dict) or "gpu" not in data:
        raise BaselineError(f"baseline {path} is not a format-{FORMAT} baseline (needs 'format', 'gpu', 'ratios')")
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
