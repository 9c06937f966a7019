"""PNG plots of benchmark results: time and peak memory per case, one line per provider.

Called by ``python -m bench`` after each family (when matplotlib is installed:
``pip install .[bench]``), and on its own to redraw committed results:
``python -m bench.plots bench/results/*.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _elements(case: str) -> int:
    n = 1
    for part in case.replace("x", "×").split("×"):
        n *= int(part)
    return n


def plot_rows(rows: list, title: str, out_png: Path) -> Path:
    """One column per dtype; top: median time (ms), bottom: peak extra memory (MiB); log scales;
    cases ordered by their number of elements."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in rows})
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, axes = plt.subplots(2, len(dtypes), figsize=(6 * len(dtypes), 7), squeeze=False)
    for col, dtype in enumerate(dtypes):
        sel = [r for r in rows if r["dtype"] == dtype]
        cases = sorted({r["case"] for r in sel}, key=_elements)
        for provider in providers:
            pts = {r["case"]: r for r in sel if r["provider"] == provider}
            xs = [i for i, c in enumerate(cases) if c in pts]
            for row, key in enumerate(("median_ms", "peak_extra_mib")):
                ys = [pts[cases[i]][key] for i in xs]
                keep = [(x, y) for x, y in zip(xs, ys) if y is not None and y == y and y > 0]
                if keep:
                    axes[row][col].plot(*zip(*keep), marker="o", label=provider)
        for row, label in enumerate(("median time, forward+backward (ms)", "peak extra memory (MiB)")):
            ax = axes[row][col]
            ax.set_yscale("log")
            ax.set_xticks(range(len(cases)), cases, rotation=20)
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(f"{dtype}")
        axes[0][col].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_json(path: Path) -> Path:
    doc = json.loads(Path(path).read_text())
    return plot_rows(doc["rows"], doc["header"], Path(path).with_suffix(".png"))


def main(argv=None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print("usage: python -m bench.plots RESULTS.json [...]", file=sys.stderr)
        return 2
    for p in paths:
        print(plot_json(Path(p)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
