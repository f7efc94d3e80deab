"""Tuning-log comparison reports: `mixer-compile report DB_OR_ARTIFACT [...] -o DIR`.

Reads MetaSchedule databases (or the databases an artifact was built with) and writes
`report.html` (self-contained: plots embedded) and `report.md` (the summary): per kernel its
operator, shapes, FLOPs, calls in the model, trials, best latency, GFLOP/s, share of the
model's time and the speedup of each input against the first; the model's estimated latency
per input; kernels not in every input are listed. Works across targets and across runs: a
kernel is the same kernel wherever its TIR is the same.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mixer_compile.errors import TuningError
from mixer_compile.tools.report.compare import Comparison, compare
from mixer_compile.tools.report.logs import read_input
from mixer_compile.tune.database import TuningWarning
from mixer_compile.util.atomic import write_bytes


@dataclass
class ReportFiles:
    html: Path
    markdown: Path
    comparison: Comparison


def write_report(inputs: list[str | Path], out_dir: str | Path, model: tuple[Any, str, str, dict] | None = None,
                 warn: Callable[[str], None] | None = None) -> ReportFiles:
    """Reads `inputs` (database or artifact directories), writes the report into `out_dir`.

    `model` = (spec, form, dtype, target config) gives the calls per kernel for bare databases; `warn`
    receives one message per skipped line of the inputs (default: a TuningWarning each).
    """
    from mixer_compile.tools.report import plots, render

    if not inputs:
        raise TuningError("give at least one tuning database or artifact directory")
    logs = [read_input(p, model) for p in inputs]
    labels = [log.label for log in logs]
    for log in logs:  # two runs in directories of the same name must stay apart
        if labels.count(log.label) > 1:
            log.label = str(log.source)
    for log in logs:
        for problem in log.problems:
            if warn is not None:
                warn(problem)
            else:
                warnings.warn(problem, TuningWarning, stacklevel=2)
    comparison = compare(logs)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise TuningError(f"'{out}' is a file; -o names the report directory (report.html, report.md)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TuningError(f"cannot create report directory '{out}': {exc.strerror}") from None
    page = render.page(comparison, plots.convergence(comparison), plots.bars(comparison))  # before any write
    md = render.markdown(comparison)
    return ReportFiles(_write(out / "report.html", page), _write(out / "report.md", md), comparison)


def _write(path: Path, text: str) -> Path:
    """Atomically: a reader never sees half a report."""
    return write_bytes(path, text.encode())
