"""The one composition: spec -> IR -> passes -> Relax, for a target, a form and a precision.

Tuning records apply only to kernels whose TIR is identical to the tuned ones, so every
consumer of "the model as it is built" (the compile driver, the form choice, tuning, reports,
benchmarks, tests, `mixer-compile show`) gets it from here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mixer_compile.backend import backend_for
from mixer_compile.backend.target import TargetInfo
from mixer_compile.errors import TuningError
from mixer_compile.ir.build import build_graph
from mixer_compile.ir.graph import Graph
from mixer_compile.model.spec import MixerSpec
from mixer_compile.passes.context import PassContext
from mixer_compile.passes.pipeline import PassReport, passes_for, run_passes


@dataclass
class Composed:
    graph: Graph  # after the form's passes
    reports: list[PassReport]
    module: Any  # the Relax IRModule: weights as parameters, or embedded
    params: dict[str, np.ndarray]  # the graph's parameters materialised from the weights ({} without weights)


def optimized_graph(spec: MixerSpec, form: str = "matmul", ctx: PassContext = PassContext(),
                    after: str | None = None) -> tuple[Graph, list[PassReport]]:
    """The spec's graph after the passes of `form` (up to `after`) under `ctx`. Without a target
    (the ONNX export), the context keeps the plain layout and float32."""
    return run_passes(build_graph(spec), passes_for(form, after), ctx)


def target_graph(spec: MixerSpec, target: TargetInfo, form: str = "matmul", dtype: str = "float32",
                 after: str | None = None) -> tuple[Graph, list[PassReport]]:
    """The graph exactly as a build for `target` lowers it (what `show --target` prints)."""
    return optimized_graph(spec, form, backend_for(target).pass_context(target, dtype), after)


def compose(spec: MixerSpec, target: TargetInfo, form: str = "matmul", dtype: str = "float32",
            weights: dict[str, np.ndarray] | None = None, embed: bool = False) -> Composed:
    """The model built for `target`. Weights are the module's parameters unless `embed` (then
    they are constants, and `weights` is required); the kernels, hence the tuning records, do
    not depend on their values."""
    from mixer_compile.lower.relax import to_relax

    graph, reports = target_graph(spec, target, form, dtype)
    params = graph.materialize_params(weights) if weights is not None else {}
    return Composed(graph, reports, to_relax(graph, embed=params if embed else None), params)


def model_tasks(spec: MixerSpec, target: TargetInfo, form: str = "matmul", dtype: str = "float32",
                trials: int = 1) -> list[Any]:
    """The tuning tasks of the model built for `target` (tune/tasks.py), `trials` the budget of
    each large kernel."""
    from mixer_compile.tune.tasks import extract_tasks

    backend = backend_for(target)
    if not backend.TUNABLE:
        raise TuningError(f"tuning is implemented for CPU (llvm) targets only; '{target.name}' is {target.kind}")
    return extract_tasks(backend.prepare(compose(spec, target, form, dtype).module, target), target, trials)
