"""The one composition: spec -> IR -> passes -> Relax, for a target, a form and a precision.

Tuning records apply only to kernels whose TIR is identical to the tuned ones, so every
consumer of "the model as it is built" (the compile driver, the form choice, tuning, reports,
benchmarks, tests, `mixer-compile show`) gets it from here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mixer_compile.artifact.format import BatchRange
from mixer_compile.backend import backend_for
from mixer_compile.backend.target import TargetInfo
from mixer_compile.errors import MixerCompileError, TuningError
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
            weights: dict[str, np.ndarray] | None = None, embed: bool = False,
            batches: BatchRange | None = None) -> Composed:
    """The model built for `target`. Weights are the module's parameters unless `embed` (then
    they are constants, and `weights` is required); the kernels, hence the tuning records, do
    not depend on their values. With `batches` (a range), the module has one function per
    entry batch (`BatchRange.function`), each the spec's graph at that batch, over the same
    parameters; `graph` and `reports` are those of the largest."""
    from mixer_compile.lower.relax import to_relax

    graph, reports = target_graph(spec.replace(batch=batches.max) if batches else spec, target, form, dtype)
    params = graph.materialize_params(weights) if weights is not None else {}
    graphs: Graph | dict[str, Graph] = graph
    if batches is not None and batches.is_range:
        graphs = {batches.function(b): graph if b == batches.max else
                  target_graph(spec.replace(batch=b), target, form, dtype)[0] for b in batches.entries}
        for b, g in zip(batches.entries, graphs.values()):
            _same_params(g, graph, b, batches.max)
    return Composed(graph, reports, to_relax(graphs, embed=params if embed else None), params)


def _same_params(small: Graph, large: Graph, batch: int, top: int) -> None:
    """The entry functions of a range take one set of weights: every entry's graph must want
    them in the same layouts. (A pass whose choice depends on the batch, e.g. handing a GEMM to
    a kernel library only above a size, could store a weight differently at one batch.)"""
    if list(small.params.items()) == list(large.params.items()):
        return
    differ = next((n for n in large.params if small.params.get(n) != large.params[n]), None) or "their order"
    raise MixerCompileError(f"the batch-{batch} and batch-{top} entries of the range store the weights differently "
                            f"({differ}); build a narrower range, or fixed batches")


def model_tasks(spec: MixerSpec, target: TargetInfo, form: str = "matmul", dtype: str = "float32",
                trials: int = 1, batches: BatchRange | None = None) -> list[Any]:
    """The tuning tasks of the model built for `target` (tune/tasks.py), `trials` the budget of
    each large kernel; with `batches`, those of every entry batch."""
    from mixer_compile.tune.tasks import extract_tasks

    backend = backend_for(target)
    if not backend.TUNABLE:
        raise TuningError(f"tuning is implemented for CPU (llvm) targets only; '{target.name}' is {target.kind}")
    return extract_tasks(backend.prepare(compose(spec, target, form, dtype, batches=batches).module, target),
                         target, trials)
