"""Charts from a `python -m bench ... --json PATH` file (matplotlib, PNG).

    python -m bench.plot results.json [more.json ...] --out-dir plots/

speedup.png: every speedup row (kernels over the PyTorch path / best SDPA backend, FlexDiT over dense), one bar
each, with the 1x line. breakdown.png: FlexDiT time by layer kind (from `model --profile`), one stacked bar per
implementation. A chart whose rows are absent is skipped with a message.
"""
import argparse
import os
import sys
from typing import List, Optional

from .common import Parser, Row, read_results

KIND_ORDER = ("embedding", "Poolingformer", "generation", "sparse", "recovery", "dense", "final", "other")


def _barh(path: str, labels: List[str], height: float, draw, xlabel: str, title: str = "") -> str:
    """A horizontal bar chart, one bar (or stack) per label, first label on top; `draw(ax)` draws the bars."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover
        raise SystemExit("bench.plot needs matplotlib: pip install matplotlib (or the 'bench' extra)") from err
    fig, ax = plt.subplots(figsize=(10, height))
    draw(ax)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_speedups(rows: List[Row], path: str) -> Optional[str]:
    rows = [r for r in rows if r.metric == "speedup"]
    values = [r.value for r in rows]

    def draw(ax):
        ax.barh(range(len(rows)), values, color=["tab:green" if v >= 1 else "tab:red" for v in values])
        ax.axvline(1.0, color="black", linewidth=0.8)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.2f}x", va="center", fontsize=7)

    labels = [f"{r.case} | {r.impl}" + (f" [{r.gpu}]" if r.gpu else "") for r in rows]
    return _barh(path, labels, 0.35 * len(rows) + 1.5, draw,
                 "speedup (x) over the PyTorch path / best SDPA / dense DiT") if rows else None


def plot_breakdown(rows: List[Row], path: str) -> Optional[str]:
    rows = [r for r in rows if r.suite == "profile" and r.metric == "ms"]
    groups = sorted({r.case for r in rows})

    def draw(ax):
        left = [0.0] * len(groups)
        for kind in KIND_ORDER:
            widths = [sum(r.value for r in rows if r.case == g and r.impl == kind) for g in groups]
            if any(widths):
                ax.barh(range(len(groups)), widths, left=left, label=kind)
                left = [a + b for a, b in zip(left, widths)]
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))

    return _barh(path, groups, 0.6 * len(groups) + 1.8, draw, "ms per forward",
                 "FlexDiT time by layer kind") if rows else None


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m bench.plot", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+", help="files written by `python -m bench ... --json`")
    parser.add_argument("--out-dir", default=".", help="where the PNGs go")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    rows: List[Row] = []
    for path in args.json:
        try:
            rows.extend(read_results(path).rows)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            parser.error(f"{path}: not a `python -m bench --json` file ({type(err).__name__}: {err})")
    os.makedirs(args.out_dir, exist_ok=True)
    for name, fn in (("speedup.png", plot_speedups), ("breakdown.png", plot_breakdown)):
        out = fn(rows, os.path.join(args.out_dir, name))
        print(f"wrote {out}" if out else f"skipped {name}: no matching rows in the input")
    return 0


if __name__ == "__main__":
    sys.exit(main())
