"""Right-product GEMMs handed to a kernel library (CUTLASS on NVIDIA GPUs), epilogue included.

A GPU target whose backend provides library GEMMs (`ctx.gemm_library`) gets its patchify and
channel-mixing dense ops, with their fused bias, GELU and residual, as one call each
(backend/cutlass.py): those carry nearly all of the FLOPs, and TVM's own GPU schedules reach a
tenth of the tensor cores there. Conditions: half precision storage (tensor cores), a bias,
16-byte aligned rows (K and N multiples of 8), an output in the storage dtype (the head's
float32 logits stay with TVM, as do the token-mixing left products), and at least MIN_MACS
multiply-adds per call: a smaller GEMM fills a handful of the library's 128x128 tiles, so the
call buys nothing over TVM's kernel (the tiny test models stay on TVM). The kernel is stored
(N, K), K-major, the layout the library reads (a Param step, re-laid once at build time).
"""

from __future__ import annotations

import math

from mixer_compile.ir.graph import Graph
from mixer_compile.passes.context import PassContext

HALF = ("float16", "bfloat16")
ALIGN = 8
MIN_MACS = 1 << 22


def run(graph: Graph, ctx: PassContext) -> tuple[Graph, list[str]]:
    if not ctx.gemm_library or ctx.dtype not in HALF:
        return graph, []
    g = graph.copy()
    changes = []
    for op in g.ops:
        a = op.attrs
        if op.kind != "dense" or a["axis"] != len(op.output.shape) - 1 or a["kernel_layout"] != "KN" \
                or not a.get("bias") or (a.get("gelu") and a.get("residual")) or op.output.dtype != ctx.dtype:
            continue
        name = op.inputs[1]
        k, n = g.params[name].tensor.shape
        m = math.prod(op.output.shape[:-1])
        if k % ALIGN or n % ALIGN or m * n * k < MIN_MACS or len(g.consumers(name)) != 1:
            continue
        g.params[name] = g.params[name].with_step("transpose", (1, 0), (n, k), "NK")
        a["kernel_layout"] = "NK"
        a["library"] = ctx.gemm_library
        epilogue = "residual" if a.get("residual") else f"gelu {a['gelu']}" if a.get("gelu") else "bias"
        changes.append(f"{op.output.name}: ({k} -> {n}) + {epilogue} as one {ctx.gemm_library} GEMM")
    return g, changes
