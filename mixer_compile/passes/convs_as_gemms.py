"""The conv form's convolutions as the GEMMs they are, for targets whose kernels are GEMMs.

Every convolution of the conv form is a GEMM written as one: a 1x1 conv contracts the channels
at each pixel, and token mixing's full-receptive-field conv (channels folded into the batch)
and its transposed mirror contract the whole grid. Built as convolutions, a CPU ran them with
TVM's generic conv kernels, which no micro-kernel schedules, far slower than the matmul form
(benchmarks/bench_forms.py; benchmarks/results/forms_znver3_before.md). Where the backend says its kernels are GEMMs
(`PassContext.gemm_convs`), each becomes a right-product dense op, as the matmul form's GEMMs
are, with the conv's fused epilogue and its kernel re-laid as (K, N) at build time (then in
panels, pack_kernels.py): over its input seen as rows (reshapes, which are views), or for a
1x1 conv over its pixels, transposed to (pixels, channels) and back.
Without that fact (the ONNX export: conv-only runtimes) the convolutions stay.
"""

from __future__ import annotations

from mixer_compile.ir.graph import Graph, Op, Tensor
from mixer_compile.passes.context import PassContext
from mixer_compile.passes.match import replace_ops


def _as_gemm(g: Graph, op: Op) -> tuple[list[Op], str] | None:
    """The ops that compute `op` as a dense op over its input seen as rows (reshapes, and for a
    1x1 conv the transposes to pixels-major and back), its kernel re-laid as (K, N); None for a
    convolution that is no plain GEMM (a stride, groups, a kernel neither 1x1 nor the whole input)."""
    x, w, *epilogue = op.inputs
    n, ci, h, wd = g.tensor(x).shape
    out, name = op.output, op.output.name
    if op.attrs["stride"] != 1 or op.attrs["groups"] != 1:
        return None
    kernel = g.params[w].tensor.shape
    fused = {k: v for k, v in op.attrs.items() if k in ("bias", "gelu")}
    if op.kind == "conv2d" and kernel[2:] == (1, 1):  # per pixel: X (H*W, I) . W^T, as the matmul form's channel GEMMs
        pixels, co = h * wd, kernel[0]
        g.params[w] = g.params[w].with_step("reshape", kernel[:2], kernel[:2], "NK") \
            .with_step("transpose", (1, 0), (ci, co), "KN")
        new = [Op("reshape", [x], Tensor(f"{name}.cs", (n, ci, pixels), out.dtype, "BCS"), {"shape": (n, ci, pixels)}),
               Op("transpose", [f"{name}.cs"], Tensor(f"{name}.sc", (n, pixels, ci), out.dtype, "BSC"), {"perm": (0, 2, 1)}),
               Op("dense", [f"{name}.sc", w, *epilogue], Tensor(f"{name}.gemm", (n, pixels, co), out.dtype, "BSC"),
                  {"axis": 2, "kernel_layout": "KN", **fused}),
               Op("transpose", [f"{name}.gemm"], Tensor(f"{name}.out", (n, co, pixels), out.dtype, "BCS"),
                  {"perm": (0, 2, 1)}),
               Op("reshape", [f"{name}.out"], out, {"shape": out.shape})]
        return new, f"%{name}: 1x1 conv {ci}->{co} as a {n}x{pixels}x{co} dense"
    if op.kind == "conv2d" and kernel[2:] == (h, wd):  # the whole grid: X (N, I*H*W) . W^T
        depth, width = ci * h * wd, kernel[0]
        g.params[w] = g.params[w].with_step("reshape", (width, depth), (width, depth), "NK") \
            .with_step("transpose", (1, 0), (depth, width), "KN")
        what = f"{h}x{wd} conv over the whole grid"
    elif op.kind == "conv2d_transpose" and (h, wd) == (1, 1):  # back onto the grid: X (N, I) . W (I, O*KH*KW)
        depth, width = ci, kernel[1] * kernel[2] * kernel[3]
        g.params[w] = g.params[w].with_step("reshape", (depth, width), (depth, width), "KN")
        what = f"transposed conv onto the {kernel[2]}x{kernel[3]} grid"
    else:
        return None
    new = [Op("reshape", [x], Tensor(f"{name}.rows", (n, depth), out.dtype, "BK"), {"shape": (n, depth)}),
           Op("dense", [f"{name}.rows", w, *epilogue], Tensor(f"{name}.gemm", (n, width), out.dtype, "BN"),
              {"axis": 1, "kernel_layout": "KN", **fused}),
           Op("reshape", [f"{name}.gemm"], out, {"shape": out.shape})]
    return new, f"%{name}: {what} as a {n}x{width} dense"


def run(graph: Graph, ctx: PassContext) -> tuple[Graph, list[str]]:
    if not ctx.gemm_convs:
        return graph, []
    g = graph.copy()
    changes = []
    for op in [op for op in g.ops if op.kind in ("conv2d", "conv2d_transpose")]:
        rewritten = _as_gemm(g, op)
        if rewritten is not None:
            replace_ops(g, [op], rewritten[0])
            changes.append(rewritten[1])
    return g, changes
