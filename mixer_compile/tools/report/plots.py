"""The report's pictures, as PNG bytes (matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

import io
import math

from mixer_compile.tools.report.compare import Comparison


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def convergence(comparison: Comparison, max_panels: int = 24) -> bytes:
    """Best latency so far against trials, one panel per kernel, one line per input."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    rows = [r for r in comparison.rows if any(c is not None and c.best is not None for c in r.cells)][:max_panels]
    cols = min(3, max(1, len(rows)))
    nrows = max(1, math.ceil(len(rows) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 2.8 * nrows), squeeze=False,
                             layout="constrained")
    for ax, row in zip(axes.flat, rows):
        for log, cell in zip(comparison.logs, row.cells):
            if cell is None:
                continue
            best = cell.task.best_so_far()
            xs = [i + 1 for i, b in enumerate(best) if b is not None]
            ax.step(xs, [b * 1e3 for b in best if b is not None], where="post", label=log.label, marker=".")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(row.name, fontsize=8)
        ax.set_xlabel("trials", fontsize=7)
        ax.set_ylabel("best ms", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.suptitle("Best latency against trials", fontsize=10)
    return _png(fig)


def bars(comparison: Comparison) -> bytes:
    """Each kernel's best latency per input (calls x best: its time in the model)."""
    plt = _pyplot()
    rows = [r for r in comparison.rows if r.in_model]
    n = len(comparison.logs)
    width = 0.8 / n
    # no constrained layout: rotated kernel names longer than the axes are tall collapse it; the
    # tight bounding box of the saved picture makes room for them
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(rows) * n + 2), 4))
    for i, log in enumerate(comparison.logs):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(rows))]
        ys = [(c.calls * c.best * 1e3) if c is not None and c.best is not None else 0.0
              for c in (r.cells[i] for r in rows)]
        ax.bar(xs, ys, width, label=log.label)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r.name for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("ms in the model (calls x best)")
    ax.set_title("Per-kernel time by input")
    ax.legend(fontsize=7)
    return _png(fig)
