"""Fuse bias, GELU and the residual add into the dense/conv op that produces their input.

After this pass each MLP layer is one op with an epilogue (bias -> GELU -> residual),
which the lowering emits as one fused kernel: the intermediate never makes a round trip
through memory, and MetaSchedule sees a matmul with its epilogue rather than separate
elementwise kernels with no search space of their own.
"""

from __future__ import annotations

from mixer_compile.ir.graph import Graph, Op
from mixer_compile.passes.context import PassContext

PRODUCERS = ("dense", "conv2d")


def _out_axis(op: Op) -> int:
    return op.attrs["axis"] if op.kind == "dense" else 1


def _defined_before(g: Graph, name: str, op: Op) -> bool:
    if name == g.input.name or name in g.params:
        return True
    return g.ops.index(g.producer(name)) < g.ops.index(op)


def _absorb(g: Graph, op: Op) -> str | None:
    """Folds the only consumer of `op` into its epilogue when it fits, in epilogue order."""
    nxt = g.only_consumer(op.output.name)
    if nxt is None:
        return None
    a = op.attrs
    extra: str | None
    stage = 3 if a.get("residual") else 2 if a.get("gelu") else 1 if a.get("bias") else 0
    if nxt.kind == "bias_add" and stage < 1 and nxt.inputs[0] == op.output.name \
            and nxt.attrs["axes"] == (_out_axis(op),):
        a["bias"] = True
        extra = nxt.inputs[1]
    elif nxt.kind == "gelu" and stage < 2:
        a["gelu"] = nxt.attrs["flavour"]
        extra = None
    elif nxt.kind == "add" and stage < 3 and op.kind == "dense":
        a["residual"] = True
        extra = nxt.inputs[1] if nxt.inputs[0] == op.output.name else nxt.inputs[0]
    else:
        return None
    if extra is not None and not _defined_before(g, extra, op):
        return None
    if extra is not None:
        op.inputs.append(extra)
    op.output = nxt.output
    g.ops.remove(nxt)
    return nxt.kind


def run(graph: Graph, ctx: PassContext) -> tuple[Graph, list[str]]:
    g = graph.copy()
    counts: dict[str, int] = {}
    for op in list(g.ops):
        if op.kind not in PRODUCERS:
            continue
        while (kind := _absorb(g, op)) is not None:
            counts[kind] = counts.get(kind, 0) + 1
    changes = [f"fused {n} {kind} op(s) into their producers" for kind, n in counts.items()]
    return g, changes
