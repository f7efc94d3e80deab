"""Token mixing as a full-receptive-field depthwise convolution (paper, section 2).

With X arranged as an image (C, H/P, W/P), the token-mixing MLP's first layer is a
convolution with D_S output maps whose kernel covers the whole grid and is the same for
every channel (groups = C, tied weights); the second layer is the mirror, a transposed
convolution back to the S positions. Tied depthwise weights are the same as folding the
channels into the batch axis and running one single-channel convolution, which is how
this pass writes it: no C-fold copy of the kernel is ever made.
"""

from __future__ import annotations

from mixer_compile.ir.graph import Graph, Op, Tensor
from mixer_compile.passes.context import PassContext
from mixer_compile.passes.match import find_chains, replace_ops

PATTERN = ("transpose", "dense", "bias_add", "gelu", "dense", "bias_add", "transpose")


def run(graph: Graph, ctx: PassContext) -> tuple[Graph, list[str]]:
    g = graph.copy()
    gh, gw = g.meta["grid"]
    changes = []
    for ops in find_chains(g, PATTERN, lambda ops: ops[0].output.layout == "BCS"):
        t_in, fc1, b1, act, fc2, b2, t_out = ops
        B, C, S = t_in.output.shape
        ds = fc1.output.shape[2]
        name = fc1.output.name.removesuffix(".fc1")
        k1 = g.params[fc1.inputs[1]].with_step("transpose", (1, 0), (ds, S), "NK") \
            .with_step("reshape", (ds, 1, gh, gw), (ds, 1, gh, gw), "OIHW")
        k2 = g.params[fc2.inputs[1]].with_step("reshape", (ds, 1, gh, gw), (ds, 1, gh, gw), "IOHW")
        g.params.update({fc1.inputs[1]: k1, fc2.inputs[1]: k2})
        hid = (B * C, ds, 1, 1)
        new = [
            t_in,
            Op("reshape", [t_in.output.name], Tensor(f"{name}.image", (B * C, 1, gh, gw), layout="NCHW"),
               {"shape": (B * C, 1, gh, gw)}),
            Op("conv2d", [f"{name}.image", fc1.inputs[1]], Tensor(fc1.output.name, hid, layout="NCHW"),
               {"stride": 1, "groups": 1}),
            Op("bias_add", [fc1.output.name, b1.inputs[1]], Tensor(b1.output.name, hid, layout="NCHW"), {"axes": (1,)}),
            Op("gelu", [b1.output.name], Tensor(act.output.name, hid, layout="NCHW"), dict(act.attrs)),
            Op("conv2d_transpose", [act.output.name, fc2.inputs[1]],
               Tensor(fc2.output.name, (B * C, 1, gh, gw), layout="NCHW"), {"stride": 1, "groups": 1}),
            Op("reshape", [fc2.output.name], Tensor(f"{name}.tokens", (B, C, S), layout="BCS"), {"shape": (B, C, S)}),
            # The mirror's bias is per token position, so it is added on the (B, C, S) view.
            Op("bias_add", [f"{name}.tokens", b2.inputs[1]],
               Tensor(b2.output.name, (B, C, S), layout="BCS"), {"axes": (2,)}),
            t_out,
        ]
        replace_ops(g, ops, new)
        changes.append(f"{name}: dense->gelu->dense over tokens became conv2d "
                       f"{gh}x{gw} (one kernel, {ds} maps, tied over {C} channels) -> conv2d_transpose")
    return g, changes
