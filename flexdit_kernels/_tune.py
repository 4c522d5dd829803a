"""Trust on first use: a kernel variant runs on a device only after it has checked itself there.

The first time an op meets a (device, shape bucket, dtype), `decide` runs every candidate kernel variant once on
fresh random inputs of that shape (never the caller's data), compares it with the op's fp32 reference, and times the
variants that pass against the op's PyTorch path with CUDA events. An op's variants are its launcher's heuristic
("triton") and the configurations of its config space (`CONFIGS` beside the launcher, e.g. "triton:num_warps=8");
a configuration that cannot launch on the device (`Unfit`: too much shared memory for a block there) is pruned
before anything is timed. The fastest wins; the PyTorch path wins unless a variant beats it by more than `MARGIN`.
A variant that fails (error over twice the PyTorch path's own error in the same dtype, a NaN, or an exception) is
never used on that device, and one warning names the op, variant, shape, dtype, device, Triton version and the
error. Decisions are kept in one JSON file per software and hardware environment.

`FLEXDIT_TUNE`: "on" (default: check and tune on a miss), "cached" (use what the cache holds, the launchers' defaults
for the rest), "off" (defaults only, no check: this skips the safety net). Nothing is checked or timed while a CUDA
graph is captured or while torch.compile, `torch.jit.trace` or a dispatch mode traces: a miss there takes the
default and says so once. A CUDA fault inside an in-process check poisons the CUDA context, so `python -m bench tune`
fills the cache in a process of its own before a model runs.

Cache file: `$FLEXDIT_TUNE_FILE` if set (read only: decisions exported by `bench tune --export`), else
`$FLEXDIT_CACHE_DIR`, else `$XDG_CACHE_HOME/flexdit`, else `~/.cache/flexdit`, one `tune-<key>.json` per
environment key (GPU name and capability, driver and CUDA versions, torch, triton and flexdit versions); each decision
also records the hash of its op's source, and a decision made for other source is a miss. Writes are atomic
(temporary file + rename) under a lock and merge with what another process wrote meanwhile; a corrupt or foreign
file is ignored with one warning and rebuilt; an unwritable folder keeps the decisions in memory.
"""
import contextlib
import hashlib
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence

import torch

MODES = ("on", "cached", "off")
REFERENCE = "reference"          # the name of the op's PyTorch path among the candidates
MARGIN = 0.03                    # a kernel must beat the PyTorch path by 3% (CUDA-event timer noise) to replace it
ERROR_FACTOR = 2.0               # a variant may err at most twice as much as the PyTorch path in the same dtype
FORMAT = 1

_warned = set()
_mode_override: Optional[str] = None


def mode() -> str:
    if _mode_override is not None:
        return _mode_override
    value = os.environ.get("FLEXDIT_TUNE", "on").strip().lower()
    if value not in MODES:
        raise ValueError(f"FLEXDIT_TUNE must be one of {MODES}, got {value!r}")
    return value


@contextlib.contextmanager
def tuning(value: str):
    """Inside the block the tuning mode is `value` whatever FLEXDIT_TUNE says (the bench checks and times the
    kernels themselves with tuning("off"))."""
    global _mode_override
    if value not in MODES:
        raise ValueError(f"value must be one of {MODES}, got {value!r}")
    previous, _mode_override = _mode_override, value
    try:
        yield
    finally:
        _mode_override = previous


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def cache_dir() -> Path:
    if os.environ.get("FLEXDIT_CACHE_DIR"):
        return Path(os.environ["FLEXDIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flexdit"


def tracing() -> bool:
    """True inside CUDA-graph capture, torch.compile, `torch.jit.trace` or a dispatch mode: no checks, no timing."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack() > 0:
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def source_hash(*sources: str) -> str:
    digest = hashlib.sha256()
    for text in sources:
        digest.update(text.encode())
    return digest.hexdigest()[:16]


def environment(device: torch.device) -> Dict[str, Any]:
    """What every decision depends on besides the shape and the op's source: the GPU, its driver and CUDA, the
    libraries."""
    import triton
    from flexdit import __version__ as flexdit_version
    env = {"format": FORMAT, "torch": torch.__version__, "triton": triton.__version__, "flexdit": flexdit_version,
           "cuda": torch.version.cuda, "device": device.type}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                   driver=str(torch.cuda.driver_version()) if hasattr(torch.cuda, "driver_version") else None)
    return env


class Decision(NamedTuple):
    choice: str                          # a variant's name, or REFERENCE
    times_ms: Dict[str, float]           # median time of each candidate that was timed
    failed: Dict[str, str]               # variant -> the error found by the check
    source: str = ""                     # the hash of the op's source the decision was made for
    pruned: Mapping[str, str] = {}       # variant -> why it cannot launch on the device (never run)

    def to_json(self) -> Dict[str, Any]:
        return {"choice": self.choice, "times_ms": self.times_ms, "failed": self.failed, "source": self.source,
                "pruned": dict(self.pruned)}

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> "Decision":
        return Decision(str(data["choice"]), dict(data.get("times_ms", {})), dict(data.get("failed", {})),
                        str(data.get("source", "")), dict(data.get("pruned", {})))


class TuneCache:
    """The decisions of one environment, in memory and in one JSON file (see the module docstring)."""

    def __init__(self, env: Mapping[str, Any], path: Optional[Path] = None, read_only: bool = False):
        self.env = dict(env)
        key = source_hash(json.dumps(self.env, sort_keys=True))
        self.path = Path(path) if path is not None else cache_dir() / f"tune-{key}.json"
        self.read_only = read_only
        self.decisions: Dict[str, Decision] = {}
        self.decisions.update(self._read())

    def _read(self) -> Dict[str, Decision]:
        try:
            text = self.path.read_text()
        except (FileNotFoundError, NotADirectoryError):
            return {}
        except OSError as err:
            warn_once(f"flexdit: cannot read the tuning cache {self.path} ({err}); tuning again")
            return {}
        try:
            data = json.loads(text)
            if data.get("environment") != self.env:
                raise ValueError("it was written for another environment")
            return {k: Decision.from_json(v) for k, v in data["decisions"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            warn_once(f"flexdit: ignoring the tuning cache {self.path}: {err}; it will be rebuilt")
            return {}

    def get(self, key: str) -> Optional[Decision]:
        return self.decisions.get(key)

    def put(self, key: str, decision: Decision) -> None:
        self.decisions[key] = decision
        if not self.read_only:
            self._write()

    def to_json(self) -> Dict[str, Any]:
        """The file's content: the environment and every decision (what `bench tune --export` writes too)."""
        return {"environment": self.env, "decisions": {k: d.to_json() for k, d in sorted(self.decisions.items())}}

    def _write(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _locked(self.path.with_name(self.path.name + ".lock")):
                merged = self._read()              # what another process wrote meanwhile
                merged.update(self.decisions)
                self.decisions = merged
                data = self.to_json()
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
                try:
                    with os.fdopen(fd, "w") as f:
                        json.dump(data, f, indent=1)
                    os.replace(tmp, self.path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
        except OSError as err:
            self.read_only = True
            warn_once(f"flexdit: cannot write the tuning cache in {self.path.parent} ({err}); "
                      "decisions are kept in memory for this process")


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a") as f:
        try:
            import fcntl
            fcntl.flock(f, fcntl.LOCK_EX)
        except ImportError:                        # no POSIX locks: the atomic rename still keeps the file whole
            pass
        yield


_caches: Dict[str, TuneCache] = {}


def cache_for(device: torch.device) -> TuneCache:
    env = environment(device)
    exported = os.environ.get("FLEXDIT_TUNE_FILE")
    key = json.dumps(env, sort_keys=True) + (exported or "") + str(cache_dir())
    if key not in _caches:
        _caches[key] = TuneCache(env, Path(exported), read_only=True) if exported else TuneCache(env)
    return _caches[key]


# ----------------------------------------------------------------------------------------------------------------
# Check and time
# ----------------------------------------------------------------------------------------------------------------

def _tensors(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in out if isinstance(t, torch.Tensor)]


def max_error(out, ref) -> float:
    """The largest absolute difference over the outputs (and gradients) against the fp32 reference; inf on NaN."""
    worst = 0.0
    outs, refs = _tensors(out), _tensors(ref)
    if len(outs) != len(refs):
        raise ValueError(f"a variant returned {len(outs)} tensors where the reference returned {len(refs)}")
    for o, r in zip(outs, refs):
        if o.shape != r.shape:
            raise ValueError(f"a variant returned shape {tuple(o.shape)} where the reference has {tuple(r.shape)}")
        o = o.float()
        if not bool(torch.isfinite(o).all()) and bool(torch.isfinite(r).all()):
            return math.inf
        worst = max(worst, float((o - r.float()).abs().max()) if o.numel() else 0.0)
    return worst


def cuda_timer(fn: Callable[[], Any], reps: int = 20) -> float:
    """Median milliseconds of `fn` by CUDA events, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


class Unfit(ValueError):
    """A launcher's configuration that cannot launch on the device (its compiled kernel needs more shared memory
    than a block may have there, or the shape admits no such tile): pruned, not a failure of the check."""


def run_trials(make_inputs: Callable[[], Any], reference: Callable[[Any], Any], pytorch: Callable[[Any], Any],
               variants: Mapping[str, Callable[[Any], Any]], timer: Callable[[Callable[[], Any]], float],
               floor: float = 1e-6) -> Decision:
    """Check every variant against `reference` (fp32) on one set of random inputs, time those that pass and the
    PyTorch path, and pick the winner (see the module docstring)."""
    inputs = make_inputs()
    ref = reference(inputs)
    out = pytorch(inputs)
    # At least one unit of rounding of the outputs' dtype at the reference's magnitude: a PyTorch path that rounds
    # exactly like the reference must not make a kernel that rounds once differently fail.
    floor = max([floor] + [torch.finfo(o.dtype).eps * float(r.float().abs().max())
                           for o, r in zip(_tensors(out), _tensors(ref)) if o.is_floating_point() and r.numel()])
    bound = ERROR_FACTOR * max(max_error(out, ref), floor)
    failed, passed, pruned = {}, [], {}
    for name, run in variants.items():
        try:
            err = max_error(run(inputs), ref)
        except Unfit as exc:
            pruned[name] = str(exc).splitlines()[0]
            continue
        except Exception as exc:                   # a launch error is a failure of the variant, not of the caller
            failed[name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            continue
        if not err <= bound:
            failed[name] = f"max error {err:.3g} over the bound {bound:.3g} (2x the PyTorch path's)"
        else:
            passed.append(name)
    times = {REFERENCE: timer(lambda: pytorch(inputs))}
    for name in passed:
        times[name] = timer(lambda run=variants[name]: run(inputs))
    best = min(passed, key=times.get, default=None)
    choice = best if best is not None and times[best] < (1.0 - MARGIN) * times[REFERENCE] else REFERENCE
    return Decision(choice, times, failed, pruned=pruned)


def decide(op: str, bucket: str, device: torch.device, dtype: torch.dtype, kernels_hash: str,
           make_inputs: Callable[[], Any], reference: Callable[[Any], Any], pytorch: Callable[[Any], Any],
           variants: Mapping[str, Callable[[Any], Any]], default: str,
           timer: Optional[Callable[[Callable[[], Any]], float]] = None) -> str:
    """The candidate `op` runs at this shape bucket on `device`: a variant's name or REFERENCE.

    `default` is what runs where nothing is measured (FLEXDIT_TUNE=off, "cached" on a miss, during tracing or
    capture, and off the GPU unless a `timer` is given)."""
    tune = mode()
    if tune == "off" or (device.type != "cuda" and timer is None):
        return default
    cache = cache_for(device)
    key = f"{op}|{bucket}|{str(dtype).replace('torch.', '')}"
    hit = cache.get(key)
    if hit is not None and hit.source == kernels_hash:
        return hit.choice
    if tune == "cached" or tracing():
        if tracing():
            warn_once(f"flexdit: {op} at {bucket} ({dtype}) is not in the tuning cache and is being traced or "
                      f"captured, where nothing is checked or timed: it runs {default!r} (run `python -m bench tune` "
                      "or one eager forward first)")
        return default
    decision = run_trials(make_inputs, reference, pytorch, variants, timer or cuda_timer)._replace(source=kernels_hash)
    cache.put(key, decision)
    if decision.failed:
        import triton
        for name, error in decision.failed.items():
            warn_once(f"flexdit: {op} kernel variant {name} failed its first-use check at {bucket} {dtype} on "
                      f"{_device_name(device)} (triton {triton.__version__}): {error}; it will not be used there")
    return decision.choice


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)


# ----------------------------------------------------------------------------------------------------------------
# An op's kernel or its PyTorch path
# ----------------------------------------------------------------------------------------------------------------

KERNEL = "triton"
_hashes: Dict[str, str] = {}


def _module_hash(fn: Callable) -> str:
    """The hash of the source file that holds `fn` (the op's kernels, launcher and reference)."""
    module = getattr(fn, "__module__", "")
    if module not in _hashes:
        import inspect
        import sys
        try:
            _hashes[module] = source_hash(inspect.getsource(sys.modules[module]))
        except (OSError, TypeError, KeyError):
            _hashes[module] = "unknown"
    return _hashes[module]


def _random_like(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Fresh random values in `t`'s shape, dtype, device, strides and storage offset (the kernel specialises on the
    layout): a view of a new random buffer, so stride-0 (expanded) and overlapping layouts are reproduced too."""
    if not t.is_floating_point():
        return t.clone()                                 # integer arguments (indices) keep their values
    span = t.storage_offset() + 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()) if n > 0)
    base = torch.empty(span if t.numel() else t.storage_offset(), dtype=t.dtype, device=t.device)
    return base.normal_(generator=generator).as_strided(t.shape, t.stride(), t.storage_offset())


def bucket_of(args: Sequence[Any]) -> str:
    """The shape bucket of an op call: every tensor's shape and dtype, every other argument's value."""
    parts = []
    for a in args:
        if isinstance(a, torch.Tensor):
            parts.append("x".join(map(str, a.shape)) + ":" + str(a.dtype).replace("torch.", ""))
        else:
            parts.append(repr(a))
    return ",".join(parts)


def variant_name(config: Optional[Mapping[str, Any]]) -> str:
    """A variant's name: KERNEL for the launcher's heuristic (no configuration), "triton:num_warps=8,..." else."""
    return KERNEL + ":" + ",".join(f"{k}={v}" for k, v in config.items()) if config else KERNEL


def alternatives(default: Mapping[str, Any], **choices: Sequence[Any]) -> List[Dict[str, Any]]:
    """An op's config space besides its heuristic: each of `choices`' values changed alone from the value
    `default` gives that key (the heuristic's own value is left out: the heuristic is always a candidate)."""
    return [{key: value} for key, values in choices.items() for value in values if value != default.get(key)]


_memo: Dict[tuple, Optional[Dict[str, Any]]] = {}
# A timer for devices without CUDA events (tests inject one to drive the whole path on the CPU).
timer_override: Optional[Callable[[Callable[[], Any]], float]] = None


def choose(op: str, kernel: Callable[..., Any], pytorch: Callable[..., Any], args: Sequence[Any],
           default: Optional[Dict[str, Any]] = None, timer: Optional[Callable[[Callable[[], Any]], float]] = None,
           params: Sequence[Any] = (), space: Optional[Callable[..., Sequence[Mapping[str, Any]]]] = None,
           derive: Optional[Callable[[List[Any]], List[Any]]] = None) -> Optional[Dict[str, Any]]:
    """The variant `op` runs at this call's shape: None for its PyTorch path `pytorch(*args)`, else the
    configuration to launch `kernel(*args, config=...)` with ({} is the launcher's heuristic, which is called
    without `config`). Decided once per device and shape bucket by `decide` (the reference is `pytorch` on fp32
    copies of the inputs) and then remembered in the process: a warm call costs one dictionary look-up.
    `default`: what runs where nothing is measured. `params`: the call's other arguments that `kernel` and
    `pytorch` close over (grids, eps, output dtypes); they are part of the bucket. `space(*args)`: the op's
    configurations besides the heuristic. `derive(inputs)`: the random inputs with the arguments that depend on the
    others recomputed (attention's backward needs the forward's output and log-sum-exp of its q, k, v)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    device = tensors[0].device
    timer = timer or timer_override
    if device.type != "cuda" and timer is None:
        return default
    tune = mode()
    if tune == "off":
        return default
    key = (op, str(device), tune, variant_name(default) if default is not None else REFERENCE, tuple(params),
           tuple((tuple(a.shape), a.dtype, a.stride()) if isinstance(a, torch.Tensor) else a for a in args))
    if key in _memo:
        return _memo[key]

    def make_inputs():
        g = torch.Generator(device=device).manual_seed(0)
        inputs = [(_random_like(a, g) if isinstance(a, torch.Tensor) else a) for a in args]
        return derive(inputs) if derive is not None else inputs

    def fp32(inputs):
        return pytorch(*[(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a)
                         for a in inputs])

    configs = {KERNEL: {}}
    for config in (space(*args) if space is not None else ()):
        configs.setdefault(variant_name(config), dict(config))
    variants = {name: (lambda inputs, c=c: kernel(*inputs, config=c) if c else kernel(*inputs))
                for name, c in configs.items()}
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), tensors[0].dtype)
    default_name = variant_name(default) if default is not None else REFERENCE
    choice = decide(op, bucket_of([*args, *params]), device, dtype, _module_hash(kernel), make_inputs, fp32,
                    lambda inputs: pytorch(*inputs), variants, default_name, timer)
    chosen = None if choice == REFERENCE else configs.get(choice, default)
    if not tracing():                    # a default taken while tracing is not a decision
        _memo[key] = chosen
    return chosen


def kernel_or_reference(op: str, kernel: Callable[..., Any], pytorch: Callable[..., Any],
                        args: Sequence[Any], default: bool = True,
                        timer: Optional[Callable[[Callable[[], Any]], float]] = None,
                        params: Sequence[Any] = ()) -> bool:
    """Whether `op` runs `kernel(*args)` (True) or its PyTorch path `pytorch(*args)`: `choose` with the kernel's
    heuristic as its only variant."""
    return choose(op, kernel, pytorch, args, {} if default else None, timer, params) is not None


# ----------------------------------------------------------------------------------------------------------------
# What the bench reads: every decision of a device, and the file FLEXDIT_TUNE_FILE reads
# ----------------------------------------------------------------------------------------------------------------

def tune_decisions(device: Optional[torch.device] = None) -> List[Dict[str, Any]]:
    """The tuning cache's decisions for `device` (the current CUDA device by default), one row per op, shape
    bucket and dtype: {"op", "bucket", "dtype", "candidates": {variant: "passed" | "failed: ..." | "pruned: ..."},
    "winner", "times_ms": {variant: median ms}, "winner_ms", "pytorch_ms"}. The PyTorch path is the candidate
    named "reference"."""
    cache = cache_for(_device(device))
    rows = []
    for key, d in sorted(cache.decisions.items()):
        op, bucket, dtype = key.split("|")
        candidates = {name: "passed" for name in d.times_ms}
        candidates.update({name: f"failed: {err}" for name, err in d.failed.items()})
        candidates.update({name: f"pruned: {why}" for name, why in d.pruned.items()})
        rows.append(dict(op=op, bucket=bucket, dtype=dtype, candidates=candidates, winner=d.choice,
                         times_ms=dict(d.times_ms), winner_ms=d.times_ms.get(d.choice),
                         pytorch_ms=d.times_ms.get(REFERENCE)))
    return rows


def export_decisions(path, device: Optional[torch.device] = None) -> Path:
    """Write the tuning cache's decisions for `device` to `path` (what `FLEXDIT_TUNE_FILE` reads); returns it."""
    path = Path(path)
    with open(path, "w") as f:
        json.dump(cache_for(_device(device)).to_json(), f, indent=1)
    return path


def cache_path(device: Optional[torch.device] = None) -> Path:
    """The file the decisions for `device` are kept in."""
    return cache_for(_device(device)).path


def _device(device: Optional[torch.device]) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device)
