"""Lowering chosen by measurement: build every IR form of the model, time each on this CPU,
keep the fastest.

Which form is fastest depends on the target and on which kernels have tuning records, so
it is measured, not assumed. A form with unscheduled kernels (plain loops, ~100x slower: a
kernel no default rule of backend/cpu_schedules.py takes) is not timed when another form has
none: timing it would cost minutes and could only lose. Opt-in (`--choose-form`): it builds
the model once per form.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from mixer_compile.backend import cpu
from mixer_compile.backend.cpu import Applied
from mixer_compile.backend.target import TargetInfo
from mixer_compile.compose import compose
from mixer_compile.model.spec import MixerSpec
from mixer_compile.passes.pipeline import FORMS


@dataclass
class FormChoice:
    form: str
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)  # form -> ms, tuned kernels, note

    def summary(self) -> str:
        parts = [f"{f} {d['ms']:.2f} ms" if d.get("ms") is not None else f"{f} not timed ({d['note']})"
                 for f, d in self.figures.items()]
        return f"chose {self.form}: " + ", ".join(parts)


def time_call(executable: Any, args: list[np.ndarray], repeat: int = 5) -> float:
    """Median seconds of `main(*args)` with TVM's time_evaluator (after one warm-up call)."""
    import tvm

    dev = tvm.cpu()
    vm = tvm.relax.VirtualMachine(executable, dev)
    tensors = [tvm.runtime.tensor(a, dev) for a in args]
    evaluator = vm.time_evaluator("main", dev, number=1, repeat=repeat, min_repeat_ms=0)
    return float(np.median(evaluator(*tensors).results))


def choose_form(spec: MixerSpec, weights: dict[str, np.ndarray], target: TargetInfo, database: Any,
                dtype: str = "float32", say: Callable[[str], None] = print) -> FormChoice:
    built: dict[str, tuple[Any, list[np.ndarray], Applied]] = {}
    for form in FORMS:
        model = compose(spec, target, form, dtype, weights)
        applied: list[Applied] = []
        executable = cpu.build(model.module, target, database, on_applied=applied.append)
        built[form] = (executable, list(model.params.values()), applied[0] if applied else Applied(0))
    complete = {f for f, (_, _, a) in built.items() if a.kernels and not a.untuned}
    x = np.random.default_rng(0).standard_normal((spec.batch, spec.in_channels, *spec.image_size)).astype(np.float32)
    choice = FormChoice("")
    for form, (executable, params, applied) in built.items():
        figures = {"tuned": f"{len(applied.tuned)}/{applied.kernels}", "ms": None}
        if complete and form not in complete:
            figures["note"] = f"unscheduled kernels: {', '.join(applied.untuned)}"
        else:
            figures["ms"] = time_call(executable, [x, *params]) * 1e3
            say(f"      form {form}: {figures['ms']:.2f} ms ({figures['tuned']} kernels tuned)")
        choice.figures[form] = figures
    timed = {f: d["ms"] for f, d in choice.figures.items() if d["ms"] is not None}
    choice.form = min(timed, key=timed.get)
    return choice
