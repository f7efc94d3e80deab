"""GEMMs handed to a kernel library (CUTLASS on NVIDIA GPUs), epilogue included.

A GPU target whose backend provides library GEMMs (`ctx.gemm_library`) gets its patchify and
channel-mixing dense ops (right products) and its token-mixing ones (left products,
tokens-major: one W for every image, a batched GEMM), with their fused bias, GELU and
residual, as one call each
(lower/library.py, backend/cutlass.py): TVM's own GPU schedules reach a tenth of the tensor
cores there. Float32 builds too: their kernels run 3xTF32 on the tensor cores, float32
accuracy (backend/cutlass.py `template`). Conditions: a bias, an output in the storage dtype
(a half-precision build's float32 logits stay with TVM), 16-byte aligned rows on every
contiguous axis a TMA load reads, and at least MIN_MACS multiply-adds per call: a smaller GEMM
fills a handful of the library's 128x128 tiles, so the call buys nothing over TVM's kernel (the
tiny test models stay on TVM).

Layouts: a right product reads W as (N, K), K-major. A left product reads (M, K) when K is
aligned, else (K, M): token fc1 contracts the 196 tokens, so its kernel stays M-major and the
tokens are never a contiguous axis (no padding to 200). Re-laid once at build time (a Param step).
"""

from __future__ import annotations

import math

from mixer_compile.ir.graph import Graph, Op
from mixer_compile.passes.context import PassContext

ALIGN = 8  # elements: 16 bytes of half precision (and two such rows of float32)
MIN_MACS = 1 << 22


def _fused(op: Op, ctx: PassContext) -> bool:
    a = op.attrs
    return op.kind == "dense" and bool(a.get("bias")) and not (a.get("gelu") and a.get("residual")) \
        and op.output.dtype == ctx.dtype


def _right(g: Graph, op: Op) -> str | None:
    """Re-lays a right product's kernel for the library; its (K, N), or None if it does not qualify."""
    name = op.inputs[1]
    if op.attrs["kernel_layout"] != "KN":
        return None
    k, n = g.params[name].tensor.shape
    if k % ALIGN or n % ALIGN or math.prod(op.output.shape[:-1]) * n * k < MIN_MACS:
        return None
    g.params[name] = g.params[name].with_step("transpose", (1, 0), (n, k), "NK")
    op.attrs["kernel_layout"] = "NK"
    return f"({k} -> {n})"


def _left(g: Graph, op: Op) -> str | None:
    """Picks a left product's kernel layout for the library (tokens_major stored it (M, K))."""
    name = op.inputs[1]
    if op.attrs["kernel_layout"] != "NK" or len(op.output.shape) != 3:
        return None
    m, k = g.params[name].tensor.shape
    batch, _, n = op.output.shape
    if n % ALIGN or batch * m * n * k < MIN_MACS or (k % ALIGN and m % ALIGN):
        return None
    if k % ALIGN:  # M-major: K is then no contiguous axis of either operand
        g.params[name] = g.params[name].with_step("transpose", (1, 0), (k, m), "KN")
        op.attrs["kernel_layout"] = "KN"
    return f"({k} -> {m}, left, W {'(K, M)' if k % ALIGN else '(M, K)'})"


def run(graph: Graph, ctx: PassContext) -> tuple[Graph, list[str]]:
    if not ctx.gemm_library:
        return graph, []
    g = graph.copy()
    changes = []
    for op in g.ops:
        if not _fused(op, ctx) or len(g.consumers(op.inputs[1])) != 1:
            continue
        ndim = len(op.output.shape)
        if op.attrs["axis"] == ndim - 1:
            what = _right(g, op)
        elif op.attrs["axis"] == ndim - 2:
            what = _left(g, op)
        else:
            what = None
        if what is None:
            continue
        op.attrs["library"] = ctx.gemm_library
        a = op.attrs
        epilogue = "residual" if a.get("residual") else f"gelu {a['gelu']}" if a.get("gelu") else "bias"
        changes.append(f"{op.output.name}: {what} + {epilogue} as one {ctx.gemm_library} GEMM")
    return g, changes
