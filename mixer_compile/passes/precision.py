"""Storage precision: weights and activations in float16 or bfloat16, sums in float32.

Half-width storage halves the memory traffic and lets GPU tensor cores run the matmuls,
but a long dot product or a variance summed in 16 bits loses digits it never gets back
(fp16 has an 11-bit significand, bf16 an 8-bit one). So the decision recorded here is:
the matrices (matmul/conv kernels, the bulk of the bytes) and every op output are stored
in `dtype`; the vectors (biases, LayerNorm scale and shift: under 1% of the bytes) stay
float32, because they are only ever added to or multiplied with float32 values, and a
half-precision copy would cost a cast kernel per call on the GPU. The ops that reduce
(dense/conv contractions, LayerNorm's mean and variance, the token average) are marked
`accumulate = float32` and the lowering computes them, and their fused epilogues, in
float32 before rounding the result once to `dtype`. The model's interface stays float32:
float32 images in, float32 logits out (the last op writes float32 directly).

Activations follow `dtype` only where the hardware computes on half precision (GPU tensor
cores). A CPU's arithmetic is float32 whatever the storage, and a half-precision activation
costs a conversion at every use: each A element of a GEMM micro-kernel is re-converted for
every column panel, which made half-precision CPU builds far slower than float32 ones
(benchmarks/results/cpu_matrix_*_dtypes.md). There the backend asks for float32 activations
(`ctx.activation_dtype`) and only the weights, the bytes a small batch streams from memory,
are stored in `dtype`.
"""

from __future__ import annotations

import dataclasses

from mixer_compile.ir.graph import Graph
from mixer_compile.passes.context import ACCUMULATE, PassContext

# Ops whose result is a sum over many terms: computed in ACCUMULATE, then rounded once.
REDUCING = ("dense", "conv2d", "conv2d_transpose", "layer_norm", "mean")


def run(graph: Graph, ctx: PassContext) -> tuple[Graph, list[str]]:
    """`graph` with parameters and activations stored in `ctx.dtype` (float32: unchanged)."""
    dtype = ctx.dtype
    if dtype == "float32":
        return graph, []
    g = graph.copy()
    g.params = {n: dataclasses.replace(p, tensor=dataclasses.replace(p.tensor, dtype=dtype))
                if len(p.tensor.shape) > 1 else p for n, p in g.params.items()}
    matrices = sum(p.tensor.dtype == dtype for p in g.params.values())
    activations = ctx.activation_dtype or dtype
    reducing = 0
    for op in g.ops:
        if op.output.name != g.output:  # the logits stay float32 (see above)
            op.output = dataclasses.replace(op.output, dtype=activations)
        if op.kind in REDUCING:
            op.attrs["accumulate"] = ACCUMULATE
            reducing += 1
    g.meta["precision"] = {"dtype": dtype, "activations": activations, "accumulate": ACCUMULATE}
    return g, [f"{matrices} weight matrices stored in {dtype}, {len(g.ops) - 1} activations in {activations}",
               f"{reducing} reducing ops accumulate in {ACCUMULATE}"]
