"""The pass pipelines: which rewrites run, in which order, for each form of the model.

- "matmul": tokens-major, transpose-free; every MLP layer a matmul with a fused epilogue.
  The fast form on CPUs and GPUs.
- "conv": token mixing as a tied full-receptive-field depthwise conv and its mirror,
  channel mixing as 1x1 convs (paper, section 2): the form for conv-only runtimes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from mixer_compile.errors import MixerCompileError
from mixer_compile.ir.build import build_graph
from mixer_compile.ir.graph import Graph
from mixer_compile.passes import channel_mixing_as_conv1x1, fuse, layout, pack_kernels, precision, token_mixing_as_conv
from mixer_compile.spec import MixerSpec

PassFn = Callable[[Graph], tuple[Graph, list[str]]]

PASSES: dict[str, PassFn] = {
    "token_mixing_as_conv": token_mixing_as_conv.run,
    "channel_mixing_as_conv1x1": channel_mixing_as_conv1x1.run,
    "tokens_major": layout.run,
    "fuse_epilogues": fuse.run,
}

FORMS: dict[str, tuple[str, ...]] = {
    "matmul": ("tokens_major", "fuse_epilogues"),
    "conv": ("token_mixing_as_conv", "channel_mixing_as_conv1x1", "fuse_epilogues"),
}


@dataclass
class PassReport:
    name: str
    changes: list[str]
    ops_before: dict[str, int] = field(default_factory=dict)
    ops_after: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        before, after = sum(self.ops_before.values()), sum(self.ops_after.values())
        what = "; ".join(self.changes[:3]) + (f"; +{len(self.changes) - 3} more" if len(self.changes) > 3 else "")
        return f"{self.name}: {before} -> {after} ops" + (f" ({what})" if what else " (no change)")

    def to_dict(self) -> dict:
        return {"name": self.name, "changes": self.changes,
                "ops_before": self.ops_before, "ops_after": self.ops_after}


def passes_for(form: str, after: str | None = None) -> tuple[str, ...]:
    """The passes of `form`, stopping after `after` if given."""
    if form not in FORMS:
        raise MixerCompileError(f"unknown form '{form}'; choose one of {', '.join(FORMS)}")
    names = FORMS[form]
    if after is None:
        return names
    if after not in names:
        raise MixerCompileError(f"pass '{after}' is not in the {form} pipeline ({', '.join(names)})")
    return names[: names.index(after) + 1]


def run_passes(graph: Graph, names: tuple[str, ...], dtype: str = "float32",
               panel: int = 0) -> tuple[Graph, list[PassReport]]:
    """Runs `names` in order, then the target's weight layout (`panel`: a CPU's SIMD width,
    see pack_kernels.py; 0 keeps the layout) and (for float16/bfloat16) the precision pass,
    last, so that no rewrite has to reason about packed weights or mixed precisions."""
    steps: list[tuple[str, PassFn]] = [(name, PASSES[name]) for name in names]
    if panel:
        steps.append((f"pack_kernels_{panel}", lambda g: pack_kernels.run(g, panel)))
    if precision.check_dtype(dtype) != "float32":
        steps.append((f"precision_{dtype}", lambda g: precision.run(g, dtype)))
    reports = []
    for name, fn in steps:
        before = graph.op_counts()
        graph, changes = fn(graph)
        graph.remove_unused_params()
        reports.append(PassReport(name, changes, before, graph.op_counts()))
    return graph, reports


def optimized_graph(spec: MixerSpec, form: str = "matmul", dtype: str = "float32",
                    panel: int = 0) -> tuple[Graph, list[PassReport]]:
    """The spec's graph after the passes of `form`: what every lowering and tuning starts from."""
    return run_passes(build_graph(spec), passes_for(form), dtype, panel)
