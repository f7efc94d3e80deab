"""Right-product kernels stored in panels of `panel` columns: (K, N) becomes (N/panel, K, panel).

At batch 1 a Mixer call streams every weight from DRAM once (240 MB for B/16). In the
(K, N) layout a CPU micro-kernel reads, for each k, a few vectors from a row that lies N
floats (12 KB for fc1) past the previous one: a new page at every step, which the L2's
stream prefetcher does not follow. In panels each vector of the micro-tile reads one
contiguous stream. Timed with cold caches, Mixer-B/16's fc1 + GELU ran faster in panels
than in (K, N); warm, the same.
The panel is the target's SIMD width, so any micro-tile (a whole number of vectors, see
backend/gemm_space.py) reads whole vectors inside one panel. Left products (token mixing) keep
their (N, K) kernel: there the weight is the broadcast operand, and the activations stream.
The weights are re-laid once at build time (a Param step), never per call.
"""

from __future__ import annotations

from mixer_compile.ir.graph import Graph
from mixer_compile.passes.context import PassContext


def run(graph: Graph, ctx: PassContext) -> tuple[Graph, list[str]]:
    panel = ctx.panel
    if not panel:  # GPUs (and the ONNX export) keep the (K, N) layout
        return graph, []
    g = graph.copy()
    changes = []
    for op in g.ops:
        if op.kind != "dense" or op.attrs["axis"] != len(op.output.shape) - 1 or op.attrs["kernel_layout"] != "KN":
            continue
        name = op.inputs[1]
        k, n = g.params[name].tensor.shape
        if n % panel or len(g.consumers(name)) != 1:
            continue
        param = g.params[name].with_step("reshape", (k, n // panel, panel), (k, n // panel, panel), "KNn")
        g.params[name] = param.with_step("transpose", (1, 0, 2), (n // panel, k, panel), "NKn")
        op.attrs["kernel_layout"] = "NKn"
        changes.append(f"%{name}: ({k}, {n}) stored as {n // panel} panels of ({k}, {panel})")
    return g, changes
