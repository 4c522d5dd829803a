"""The summary of a `.ci/gpu` run: `python -m bench.ci summarize --raw DIR --out DIR`.

Reads the step table that `.ci/gpu` writes (steps.tsv: name, kind, status, rc, seconds, timeout, log, artifact,
note), each step's log and artifact (pytest JUnit XML, bench JSON, sanitizer JSON), and writes into --out:
summary.md (step table, failures, bench tables), summary.json (the same as data, every bench row included) and
logs.txt (every step's output). Exit status: 0 when every step passed, 1 otherwise, 2 bad arguments.
"""
import argparse
import importlib
import json
import os
import re
import sys
import xml.etree.ElementTree as ET
from typing import List, Optional

STEP_FIELDS = ("name", "kind", "status", "rc", "seconds", "timeout", "log", "artifact", "note")


def read_steps(raw: str) -> List[dict]:
    path = os.path.join(raw, "steps.tsv")
    lines = _read(path).splitlines() if os.path.exists(path) else []
    return [dict(zip(STEP_FIELDS, line.split("\t") + [""] * len(STEP_FIELDS))) for line in lines]


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _load_json(path: str) -> Optional[dict]:
    try:
        return json.loads(_read(path) or "null")
    except ValueError:
        return None


def pytest_detail(xml_path: str):
    """(counts text, failed test ids) from a JUnit XML file; (None, []) when there is none."""
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError):
        return None, []
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total, failed, errors, skipped = (sum(int(s.get(k, 0)) for s in suites)
                                      for k in ("tests", "failures", "errors", "skipped"))
    bad = [f"{case.get('classname', '')}::{case.get('name', '')}" for case in root.iter("testcase")
           if case.find("failure") is not None or case.find("error") is not None]
    return f"{total - failed - errors - skipped} passed, {failed} failed, {errors} errors, {skipped} skipped", bad


def sanitizer_errors(log: str) -> Optional[int]:
    counts = [int(m) for m in re.findall(r"ERROR SUMMARY: (\d+) error", log)]
    return sum(counts) if counts else None


def bench_table(payload: dict) -> str:
    command = (payload.get("argv") or [""])[0]
    if command not in ("kernels", "model", "sample", "overhead"):
        return ""
    from .common import Results   # torch: only when there is a table to print
    try:
        return importlib.import_module(f"bench.{command}").table(Results.from_json(payload))
    except Exception as err:   # a table is a convenience; the rows are in summary.json whatever happens
        return f"(no table: {type(err).__name__}: {err})"


def _step_detail(st: dict, log: str, artifact: str, env: dict, bench: dict, failures: List[str]) -> List[str]:
    """The detail column of one step (filling `st`, `bench` and `failures` with what its artifact says)."""
    detail = []
    if st["kind"] == "pytest":
        counts, bad = pytest_detail(artifact)
        st.update(tests=counts, failed_tests=bad)
        detail += [counts] if counts else []
        failures += [f"{st['name']}: {t}" for t in bad[:20]]
        if len(bad) > 20:
            failures.append(f"{st['name']}: ... and {len(bad) - 20} more failed tests")
    elif st["kind"] == "sanitize":
        errors, report = sanitizer_errors(log), _load_json(artifact)
        st.update(memcheck_errors=errors, report=report)
        if report:
            n_ok = sum(r["status"] == "ok" for r in report["launches"])
            detail.append(f"{n_ok}/{len(report['launches'])} launches right")
            failures += [f"{st['name']}: {r['launch']} {r['status']}: {r['reason']}" for r in report["launches"]
                         if r["status"] not in ("ok", "absent")]
        if errors is not None:
            detail.append(f"memcheck: {errors} errors")
            if errors:
                failures.append(f"{st['name']}: compute-sanitizer reported {errors} memcheck errors (see logs.txt)")
    elif st["kind"] == "bench":
        payload = _load_json(artifact)
        if payload is None and st["status"] == "ok":
            st["status"], st["note"] = "failed", "; ".join(filter(None, ["exited 0 without writing its JSON",
                                                                          st["note"]]))
        if payload is not None:
            bench[st["name"]] = payload
            fails = payload.get("failures", [])
            detail.append(f"{len(payload.get('rows', []))} rows" + (f", {len(fails)} FAILED" if fails else ""))
            failures += [f"{st['name']}: {f}" for f in fails]
            st["speedups"] = {f"{r['case']} | {r['impl']}": r["value"] for r in payload.get("rows", [])
                              if r["metric"] == "speedup"}
    elif st["kind"] == "info" and env:
        missing = env.get("missing_optional") or []
        detail.append(f"{env.get('gpu', '?')}, torch {env.get('torch', '?')}, triton {env.get('triton', '?')}"
                      + (f"; not installed: {', '.join(missing)}" if missing else ""))
    if st["status"] in ("failed", "timeout") and not any(f.startswith(st["name"] + ":") for f in failures):
        last = [line.rstrip() for line in log.splitlines()[::-1] if line.strip()][:1]
        last = [line for line in last if not line.startswith("$ ")]   # not the command echo
        failures.append(f"{st['name']}: {st['status']} (exit {st['rc']})" + (f": {last[0][:300]}" if last else ""))
    if st["status"] == "timeout":
        detail.append(f"stopped after {st['timeout']} s")
    return detail + ([st["note"]] if st["note"] else [])


def summarize(raw: str, out: str, budget: Optional[float] = None, elapsed: Optional[float] = None) -> int:
    steps = read_steps(raw)
    env = _load_json(os.path.join(raw, "env.json")) or {}
    bench, failures = {}, []
    for st in steps:
        log = _read(os.path.join(raw, st["log"])) if st["log"] else ""
        artifact = os.path.join(raw, st["artifact"]) if st["artifact"] else ""
        st["detail"] = "; ".join(_step_detail(st, log, artifact, env, bench, failures))
    n_bad = sum(st["status"] != "ok" for st in steps)
    ok = bool(steps) and n_bad == 0

    title = f"# .ci/gpu: {env.get('gpu', 'GPU')}"
    if env:
        title += f" (torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}"
        title += f", commit {env['git']})" if env.get("git") else ")"
    verdict = "PASSED: every step passed" if ok else f"FAILED: {n_bad} of {len(steps)} steps did not pass"
    timing = f" | {elapsed:.0f} s of a {budget:.0f} s budget" if elapsed is not None and budget is not None else ""
    md = [title, "", f"**{verdict}**{timing}", "", "| step | status | seconds | limit | detail |",
          "|---|---|---|---|---|"]
    for st in steps:
        status = st["status"] if st["status"] in ("ok", "skipped") else f"**{st['status'].upper()}** (exit {st['rc']})"
        md.append(f"| {st['name']} | {status} | {st['seconds']} | {st['timeout']} | "
                  f"{st['detail'].replace('|', '/')} |")
    if failures:
        md += ["", "## Failures", ""] + [f"- {f}" for f in failures]
    for name, payload in bench.items():
        table, notes = bench_table(payload), payload.get("notes", [])
        if table or notes:
            md += ["", f"## {name}", "", f"`python -m bench {' '.join(payload.get('argv', []))}`", "", "```", table]
            md += [f"note: {n}" for n in notes] + ["```"]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")
    summary = {"format": 1, "ok": ok, "budget_s": budget, "elapsed_s": elapsed, "env": env, "steps": steps,
               "failures": failures, "bench": bench}
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out, "logs.txt"), "w", encoding="utf-8") as f:
        for st in steps:
            f.write(f"\n{'=' * 100}\n== {st['name']}: {st['status']} (exit {st['rc']}, {st['seconds']} s)\n"
                    f"{'=' * 100}\n")
            f.write(_read(os.path.join(raw, st["log"])) if st["log"] else f"({st['note']})\n")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.ci", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("summarize", help="write summary.md, summary.json and logs.txt from a .ci/gpu raw folder")
    s.add_argument("--raw", required=True, help="the folder .ci/gpu wrote steps.tsv, logs and artifacts into")
    s.add_argument("--out", required=True, help="the output folder")
    s.add_argument("--budget", type=float, default=None, help="the run's time budget in seconds")
    s.add_argument("--elapsed", type=float, default=None, help="seconds the steps took")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not os.path.isdir(args.raw):
        parser.error(f"--raw {args.raw}: not a folder")
    return summarize(args.raw, args.out, args.budget, args.elapsed)


if __name__ == "__main__":
    sys.exit(main())
