"""Channel mixing as 1x1 convolutions (paper, section 2).

With X arranged as an image (C, H/P, W/P), the channel-mixing MLP is a 1x1 convolution
C -> D_C, GELU, and a 1x1 convolution D_C -> C: the form conv-only runtimes and NPUs take.
"""

from __future__ import annotations

from mixer_compile.ir.graph import Graph, Op, Tensor
from mixer_compile.passes.context import PassContext
from mixer_compile.passes.match import find_chains, replace_ops

PATTERN = ("dense", "bias_add", "gelu", "dense", "bias_add")


def run(graph: Graph, ctx: PassContext) -> tuple[Graph, list[str]]:
    g = graph.copy()
    gh, gw = g.meta["grid"]
    changes = []
    for ops in find_chains(g, PATTERN, lambda ops: ops[0].output.layout == "BSC" and ops[0].attrs["axis"] == 2):
        fc1, b1, act, fc2, b2 = ops
        x = fc1.inputs[0]
        B, S, C = g.tensor(x).shape
        dc = fc1.output.shape[2]
        name = fc1.output.name.removesuffix(".fc1")
        for dense, n_out, n_in in ((fc1, dc, C), (fc2, C, dc)):
            g.params[dense.inputs[1]] = g.params[dense.inputs[1]] \
                .with_step("transpose", (1, 0), (n_out, n_in), "NK") \
                .with_step("reshape", (n_out, n_in, 1, 1), (n_out, n_in, 1, 1), "OIHW")
        image, hid = (B, C, gh, gw), (B, dc, gh, gw)
        new = [
            Op("transpose", [x], Tensor(f"{name}.chw", (B, C, S), layout="BCS"), {"perm": (0, 2, 1)}),
            Op("reshape", [f"{name}.chw"], Tensor(f"{name}.image", image, layout="NCHW"), {"shape": image}),
            Op("conv2d", [f"{name}.image", fc1.inputs[1]], Tensor(fc1.output.name, hid, layout="NCHW"),
               {"stride": 1, "groups": 1}),
            Op("bias_add", [fc1.output.name, b1.inputs[1]], Tensor(b1.output.name, hid, layout="NCHW"), {"axes": (1,)}),
            Op("gelu", [b1.output.name], Tensor(act.output.name, hid, layout="NCHW"), dict(act.attrs)),
            Op("conv2d", [act.output.name, fc2.inputs[1]], Tensor(fc2.output.name, image, layout="NCHW"),
               {"stride": 1, "groups": 1}),
            Op("bias_add", [fc2.output.name, b2.inputs[1]], Tensor(f"{name}.conv_out", image, layout="NCHW"),
               {"axes": (1,)}),
            Op("reshape", [f"{name}.conv_out"], Tensor(f"{name}.cs", (B, C, S), layout="BCS"), {"shape": (B, C, S)}),
            Op("transpose", [f"{name}.cs"], Tensor(b2.output.name, (B, S, C), layout="BSC"), {"perm": (0, 2, 1)}),
        ]
        replace_ops(g, ops, new)
        changes.append(f"{name}: dense->gelu->dense over channels became 1x1 conv2d {C}->{dc}->{C}")
    return g, changes
