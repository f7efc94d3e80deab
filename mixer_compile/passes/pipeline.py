"""The pass pipelines: which rewrites run, in which order, for each form of the model.

- "matmul": tokens-major, transpose-free; every MLP layer a matmul with a fused epilogue.
  The fast form on CPUs and GPUs.
- "conv": token mixing as a tied full-receptive-field depthwise conv and its mirror,
  channel mixing as 1x1 convs (paper, section 2): the form for conv-only runtimes; built for a
  target with GEMM kernels, its convolutions become GEMMs again (convs_as_gemms).

Every form ends with the GEMMs' rows as the target's kernels take them (batch_as_rows), the
target's weight layout, the storage precision and the GEMMs handed to a kernel library, in
that order, so that no rewrite has to reason about folded rows, packed weights or mixed
precisions; each is a no-op when the context says so (batch 1 or a GPU, no panel on GPUs,
float32, no library).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from mixer_compile.errors import MixerCompileError
from mixer_compile.ir.graph import Graph
from mixer_compile.passes import (batch_as_rows, channel_mixing_as_conv1x1, convs_as_gemms, fuse_epilogues,
                                  library_gemms, pack_kernels, precision, token_mixing_as_conv, tokens_major)
from mixer_compile.passes.context import PassContext

PassFn = Callable[[Graph, PassContext], tuple[Graph, list[str]]]

PASSES: dict[str, PassFn] = {
    "token_mixing_as_conv": token_mixing_as_conv.run,
    "channel_mixing_as_conv1x1": channel_mixing_as_conv1x1.run,
    "tokens_major": tokens_major.run,
    "fuse_epilogues": fuse_epilogues.run,
    "convs_as_gemms": convs_as_gemms.run,
    "batch_as_rows": batch_as_rows.run,
    "pack_kernels": pack_kernels.run,
    "precision": precision.run,
    "library_gemms": library_gemms.run,
}

FORMS: dict[str, tuple[str, ...]] = {
    "matmul": ("tokens_major", "fuse_epilogues", "batch_as_rows", "pack_kernels", "precision", "library_gemms"),
    "conv": ("token_mixing_as_conv", "channel_mixing_as_conv1x1", "fuse_epilogues", "convs_as_gemms", "batch_as_rows",
             "pack_kernels", "precision", "library_gemms"),
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


def run_passes(graph: Graph, names: tuple[str, ...], ctx: PassContext = PassContext()) -> tuple[Graph, list[PassReport]]:
    """Runs the passes `names` in order; one report each."""
    reports = []
    for name in names:
        before = graph.op_counts()
        graph, changes = PASSES[name](graph, ctx)
        graph.remove_unused_params()
        reports.append(PassReport(name, changes, before, graph.op_counts()))
    return graph, reports
