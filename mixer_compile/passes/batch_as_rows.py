"""A right product over a batch of images as one GEMM over all their rows: (B, S, K) . W as
(B*S, K) . W, through reshapes (views, no copies).

Per image, the channel GEMMs of a /32 model have 49 rows: a CPU micro-kernel then streams every
panel of the weight from L3 once per image, for a few row tiles each, and splits its parallel
loop over the images. Over all B*S rows, each panel is read once per call and re-read from L2 by
every row tile, and the parallel loop splits the weight's columns (backend/gemm_space.py
`parallel_split`). One model lost a little by it (S/16 at batch 8), not in its kernels but
between them (benchmarks/README.md, "A batch as one GEMM"). Consecutive GEMMs (channel
fc1 -> fc2) pass rows to each other: a reshape back to images is emitted only where something
else reads the tensor (the residual path, the next LayerNorm). A batch of one has nothing to
fold: the graph is left as it was. Where the backend's GEMM kernels take the batch as rows already (`PassContext.batch_rows` False: GPUs,
the ONNX export), nothing changes either.
"""

from __future__ import annotations

import math

from mixer_compile.ir.graph import Graph, Op, Tensor
from mixer_compile.passes.context import PassContext


def _foldable(op: Op) -> bool:
    shape = op.output.shape
    return (op.kind == "dense" and len(shape) >= 3 and op.attrs["axis"] == len(shape) - 1
            and math.prod(shape[:-2]) > 1)


def _rows_of(t: Tensor, name: str) -> Tensor:
    return Tensor(name, (math.prod(t.shape[:-1]), t.shape[-1]), t.dtype, "R" + t.layout[-1:])


def _as_rows(g: Graph, rows: dict[str, str], name: str, new: list[Op]) -> str:
    """`name` as rows: the tensor that already holds it so, else a reshape appended to `new`."""
    if name not in rows:
        t = _rows_of(g.tensor(name), f"{name}.rows")
        new.append(Op("reshape", [name], t, {"shape": t.shape}))
        rows[name] = t.name
    return rows[name]


def run(graph: Graph, ctx: PassContext) -> tuple[Graph, list[str]]:
    if not ctx.batch_rows:
        return graph, []
    g = graph.copy()
    rows: dict[str, str] = {}  # a tensor of images -> the same values as rows, where one exists
    changes = []
    for op in [op for op in g.ops if _foldable(op)]:
        at, new = g.ops.index(op), []
        out = op.output
        op.inputs[0] = _as_rows(g, rows, op.inputs[0], new)
        if op.attrs.get("residual"):
            op.inputs[-1] = _as_rows(g, rows, op.inputs[-1], new)
        op.output, op.attrs["axis"] = _rows_of(out, f"{out.name}.rows"), 1
        rows[out.name] = op.output.name
        g.ops[at:at + 1] = [*new, op, Op("reshape", [op.output.name], out, {"shape": out.shape})]
        changes.append(f"%{out.name}: {'x'.join(map(str, out.shape[:-2]))} images of {out.shape[-2]} rows "
                       f"as one {op.output.shape[0]}x{op.output.shape[1]} GEMM")
    # the reshapes back to images that nothing reads any more (fc1's output, read as rows by fc2)
    g.ops = [op for op in g.ops if not (op.kind == "reshape" and op.output.name != g.output
                                        and op.output.name in rows and not g.consumers(op.output.name))]
    return g, changes
