"""The numbers of a report: per kernel and per input, computed from the records alone.

Every latency is the best valid trial of a kernel (MetaSchedule's mean over its repeats). The
model's estimated latency is the sum over the model's kernels of calls x best latency; a
kernel without a valid record in an input leaves that input's estimate incomplete, and says
so. Speedups are against the first input: best(first) / best(this), > 1 is faster; the
whole-model speedup is taken over the kernels both inputs have, so that a kernel missing
from one log does not pass for a gain.
"""

from __future__ import annotations

from dataclasses import dataclass

from mixer_compile.tools.report.logs import Kernel, ModelTask, TaskLog, TuningLog


@dataclass
class Cell:
    """One kernel in one input."""
    task: TaskLog
    calls: int
    share: float | None  # of this input's estimated model time
    speedup: float | None  # against the first input

    @property
    def trials(self) -> int:
        return len(self.task.trials)

    @property
    def best(self) -> float | None:
        return self.task.best

    @property
    def gflops(self) -> float | None:
        return self.task.kernel.flops / self.best / 1e9 if self.best else None


@dataclass
class Row:
    kernel: Kernel
    name: str  # the model's task name when known, else the operator
    in_model: bool
    calls: int | None  # in the model; None: the model is unknown
    cells: list[Cell | None]  # per input; None: the kernel is not in that input


@dataclass
class ModelEstimate:
    latency: float  # seconds, over the kernels that have a valid record
    counted: int  # kernels with a valid record
    kernels: int  # kernels of the model (or of the log, when the model is unknown)
    speedup: float | None  # against the first input, over the kernels both have
    common: int  # how many kernels that speedup is over

    @property
    def complete(self) -> bool:
        return self.counted == self.kernels


@dataclass
class Comparison:
    logs: list[TuningLog]
    rows: list[Row]
    estimates: list[ModelEstimate]
    weights_known: bool  # False: every kernel counted once

    def missing(self) -> list[tuple[Row, list[str], list[str]]]:
        """Kernels not present in every input: (row, in which inputs, missing from which)."""
        out = []
        for row in self.rows:
            have = [log.label for log, c in zip(self.logs, row.cells) if c is not None]
            lack = [log.label for log, c in zip(self.logs, row.cells) if c is None]
            if lack:
                out.append((row, have, lack))
        return out


def compare(logs: list[TuningLog]) -> Comparison:
    model = next((log.model for log in logs if log.model is not None), None)
    keys = list(dict.fromkeys(k for log in logs for k in log.tasks))
    if model is not None:
        keys += [k for k in model if k not in keys]  # model kernels no input has a record for
    kernels = {k: log.tasks[k].kernel for log in logs for k in log.tasks}

    def calls(log: TuningLog, key: int) -> int:
        m = log.model if log.model is not None else model
        if m is None:
            return 1
        return m[key].calls if key in m else 0

    def model_keys(log: TuningLog) -> list[int]:
        m = log.model if log.model is not None else model
        return list(m) if m is not None else list(log.tasks)

    def time_of(log: TuningLog, key: int) -> float | None:
        task, n = log.tasks.get(key), calls(log, key)
        return n * task.best if task is not None and task.best is not None and n else None

    estimates = []
    for log in logs:
        times = [time_of(log, k) for k in model_keys(log)]
        valid = [t for t in times if t is not None]
        common = [k for k in model_keys(log) if time_of(log, k) is not None and time_of(logs[0], k) is not None]
        mine = sum(time_of(log, k) or 0.0 for k in common)
        first = sum(time_of(logs[0], k) or 0.0 for k in common)
        estimates.append(ModelEstimate(sum(valid), len(valid), len(times),
                                       first / mine if common and mine > 0 else None, len(common)))

    rows = []
    for key in keys:
        cells: list[Cell | None] = []
        for i, log in enumerate(logs):
            task = log.tasks.get(key)
            if task is None:
                cells.append(None)
                continue
            t = time_of(log, key)
            total = estimates[i].latency
            base = logs[0].tasks.get(key)
            speedup = base.best / task.best if base is not None and base.best and task.best else None
            cells.append(Cell(task, calls(log, key), t / total if t is not None and total > 0 else None, speedup))
        named: ModelTask | None = model.get(key) if model is not None else None
        kernel = kernels[key] if key in kernels else named.kernel
        rows.append(Row(kernel, named.name if named else kernel.operator, model is None or key in model,
                        (named.calls if named else 0) if model is not None else None, cells))
    first_share = {id(r): (r.cells[0].share or 0.0) if r.cells[0] is not None else -1.0 for r in rows}
    rows.sort(key=lambda r: (not r.in_model, -first_share[id(r)]))
    return Comparison(logs, rows, estimates, model is not None)


def fmt_ms(seconds: float | None) -> str:
    return f"{seconds * 1e3:.4f}" if seconds is not None else "-"


def table(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    """The per-kernel table as text cells (shared by the Markdown and the HTML page)."""
    multi = len(comparison.logs) > 1
    header = ["kernel", "operator", "shapes", "MFLOP", "calls"]
    for i, log in enumerate(comparison.logs):
        tag = f" [{log.label}]" if multi else ""
        header += [f"trials{tag}", f"best ms{tag}", f"GFLOP/s{tag}", f"share{tag}"]
        if multi and i > 0:
            header.append(f"speedup{tag}")
    rows = []
    for row in comparison.rows:
        line = [row.name + ("" if row.in_model else " (not in model)"), row.kernel.operator, row.kernel.shapes,
                f"{row.kernel.flops / 1e6:.4g}", "-" if row.calls is None else str(row.calls)]
        for i, cell in enumerate(row.cells):
            if cell is None:
                line += ["absent", "-", "-", "-"] + (["-"] if multi and i > 0 else [])
                continue
            failed = sum(t is None for t in cell.task.trials)
            line += [f"{cell.trials} ({failed} failed)" if failed else str(cell.trials), fmt_ms(cell.best),
                     f"{cell.gflops:.3g}" if cell.gflops is not None else "-",
                     f"{cell.share * 100:.1f}%" if cell.share is not None else "-"]
            if multi and i > 0:
                line.append(f"{cell.speedup:.2f}x" if cell.speedup is not None else "-")
        rows.append(line)
    return header, rows


def estimate_lines(comparison: Comparison) -> list[str]:
    """One line per input: the whole model's estimated latency and its speedup."""
    lines = []
    for i, (log, est) in enumerate(zip(comparison.logs, comparison.estimates)):
        text = f"{log.label}: {est.latency * 1e3:.4f} ms over {est.counted} of {est.kernels} kernels"
        if not est.complete:
            text += " (incomplete: kernels without a valid record are not counted)"
        if i > 0 and est.speedup is not None:
            text += f"; {est.speedup:.2f}x vs {comparison.logs[0].label} on the {est.common} kernels both have"
        lines.append(text)
    return lines
