"""Graph -> ONNX ModelProto, op by op, with a dynamic batch axis.

The IR is built for one batch size; every IR tensor carries the batch in its first axis
(possibly folded with the channels, as the conv form's (B*C, 1, H/P, W/P)), so each Reshape
is written with -1 there and the same file runs any batch. The stem (patchify + dense) is
written as the strided Conv it is, so the conv form is all Conv/ConvTranspose for conv-only
runtimes; GELU is written out in opset-17 primitives (Erf, or Tanh for the tanh flavour),
which every runtime has.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mixer_compile.ir.graph import Graph, Op

OPSET = 17
BATCH = "batch"


class _Writer:
    def __init__(self, graph: Graph, params: dict[str, np.ndarray]) -> None:
        self.graph = graph
        self.nodes: list[onnx.NodeProto] = []
        self.initializers = {name: numpy_helper.from_array(v, name) for name, v in params.items()}
        self.count = 0

    def const(self, value: np.ndarray | list, dtype: type = np.int64) -> str:
        self.count += 1
        name = f"const_{self.count}"
        self.initializers[name] = numpy_helper.from_array(np.asarray(value, dtype), name)
        return name

    def node(self, kind: str, inputs: list[str], output: str | None = None, **attrs: object) -> str:
        if output is None:
            self.count += 1
            output = f"{kind.lower()}_{self.count}"
        self.nodes.append(helper.make_node(kind, inputs, [output], **attrs))
        return output

    def reshape(self, x: str, shape: tuple[int, ...], output: str | None = None) -> str:
        # The batch (alone or folded with channels) is always the first axis.
        return self.node("Reshape", [x, self.const([-1, *shape[1:]])], output)

    def gelu(self, x: str, flavour: str, output: str | None = None) -> str:
        f32 = np.float32
        if flavour == "erf":
            inner = self.node("Erf", [self.node("Div", [x, self.const(math.sqrt(2.0), f32)])])
        else:
            cube = self.node("Mul", [self.node("Pow", [x, self.const(3.0, f32)]), self.const(0.044715, f32)])
            arg = self.node("Mul", [self.node("Add", [x, cube]), self.const(math.sqrt(2.0 / math.pi), f32)])
            inner = self.node("Tanh", [arg])
        half_x = self.node("Mul", [x, self.const(0.5, f32)])
        return self.node("Mul", [half_x, self.node("Add", [inner, self.const(1.0, f32)])], output)

    def bias(self, x: str, b: str, ndim: int, axis: int, output: str | None = None) -> str:
        n = self.graph.tensor(b).shape[0]
        if axis != ndim - 1:
            b = self.node("Reshape", [b, self.const([n] + [1] * (ndim - 1 - axis))])
        return self.node("Add", [x, b], output)

    def epilogue(self, op: Op, y: str, extra: list[str], axis: int) -> str:
        """Bias, GELU and residual of a fused op; the last step writes the op's output."""
        a, ndim = op.attrs, len(op.output.shape)
        steps = [s for s in ("bias", "gelu", "residual") if a.get(s)]
        for step in steps:
            out = op.output.name if step == steps[-1] else None
            if step == "bias":
                y = self.bias(y, extra.pop(0), ndim, axis, out)
            elif step == "gelu":
                y = self.gelu(y, a["gelu"], out)
            else:
                y = self.node("Add", [y, extra.pop(0)], out)
        if not steps:
            y = self.node("Identity", [y], op.output.name)
        return y

    def transposed(self, kernel: str) -> str:
        return self.node("Transpose", [kernel], perm=[1, 0])

    def dense(self, op: Op, x: str, kernel: str) -> str:
        axis, ndim = op.attrs["axis"], len(op.output.shape)
        assert op.attrs["kernel_layout"] in ("KN", "NK"), "packed kernels are a CPU build's layout, not ONNX's"
        kn = op.attrs["kernel_layout"] == "KN"
        if axis == ndim - 1:  # right product X . W
            return self.node("MatMul", [x, kernel if kn else self.transposed(kernel)])
        if axis == ndim - 2:  # left product W . X
            return self.node("MatMul", [self.transposed(kernel) if kn else kernel, x])
        perm = [i for i in range(ndim) if i != axis] + [axis]
        y = self.node("MatMul", [self.node("Transpose", [x], perm=perm), kernel if kn else self.transposed(kernel)])
        return self.node("Transpose", [y], perm=[int(i) for i in np.argsort(perm)])

    def stem_conv(self, patchify: Op, dense: Op, image: str, params: dict[str, np.ndarray]) -> str:
        """patchify + dense over patches is a PxP conv with stride P; returns the (B, S, C) tokens."""
        p, (b, s, c) = patchify.attrs["patch"], dense.output.shape
        cin = self.graph.input.shape[1]
        kernel = dense.inputs[1]
        w = params[kernel].reshape(p, p, cin, c).transpose(3, 2, 0, 1)  # (P*P*Cin, C) -> OIHW
        self.initializers[kernel] = numpy_helper.from_array(np.ascontiguousarray(w), kernel)
        y = self.node("Conv", [image, kernel], kernel_shape=[p, p], strides=[p, p])
        y = self.reshape(y, (b, c, s))
        return self.node("Transpose", [y], perm=[0, 2, 1])


def _stem_pair(graph: Graph, op: Op) -> Op | None:
    """The dense op that a patchify feeds, when the pair is a plain strided conv."""
    if op.kind != "patchify":
        return None
    nxt = graph.only_consumer(op.output.name)
    if nxt is None or nxt.kind != "dense" or nxt.inputs[0] != op.output.name:
        return None
    return nxt if nxt.attrs["axis"] == 2 and nxt.attrs["kernel_layout"] == "KN" else None


def to_onnx(graph: Graph, params: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The ONNX model of `graph` with `params` (Graph.materialize_params) as initializers."""
    w = _Writer(graph, params)
    image = graph.input.name
    stem: Op | None = None
    for op in graph.ops:
        x, rest = op.inputs[0], list(op.inputs[1:])
        a, out, shape = op.attrs, op.output.name, op.output.shape
        if (pair := _stem_pair(graph, op)) is not None:
            stem = pair
            continue
        if op is stem:
            y = w.stem_conv(graph.producer(x), op, graph.producer(x).inputs[0], params)
            w.epilogue(op, y, rest[1:], 2)
        elif op.kind == "patchify":
            b, c, h, wd = graph.tensor(x).shape
            p = a["patch"]
            y = w.reshape(x, (b, c, h // p, p, wd // p, p))
            y = w.node("Transpose", [y], perm=[0, 2, 4, 3, 5, 1])
            w.reshape(y, shape, out)
        elif op.kind == "dense":
            w.epilogue(op, w.dense(op, x, rest[0]), rest[1:], a["axis"])
        elif op.kind == "bias_add":
            (axis,) = a["axes"]
            w.bias(x, rest[0], len(shape), axis, out)
        elif op.kind == "gelu":
            w.gelu(x, a["flavour"], out)
        elif op.kind == "add":
            w.node("Add", [x, rest[0]], out)
        elif op.kind == "layer_norm":
            w.node("LayerNormalization", [x, rest[0], rest[1]], out, axis=a["axis"], epsilon=a["eps"])
        elif op.kind == "mean":
            w.node("ReduceMean", [x], out, axes=[a["axis"]], keepdims=0)
        elif op.kind == "transpose":
            w.node("Transpose", [x], out, perm=list(a["perm"]))
        elif op.kind == "reshape":
            w.reshape(x, a["shape"], out)
        elif op.kind in ("conv2d", "conv2d_transpose"):
            kh, kw = graph.tensor(rest[0]).shape[2:]
            kind = "Conv" if op.kind == "conv2d" else "ConvTranspose"
            inputs = [x, rest.pop(0)] + ([rest.pop(0)] if a.get("bias") else [])
            y = w.node(kind, inputs, kernel_shape=[kh, kw], strides=[a["stride"]] * 2, group=a["groups"])
            w.epilogue(_without_bias(op), y, rest, 1)
        else:
            raise NotImplementedError(op.kind)
    b, cin, h, wd = graph.input.shape
    n_out = graph.tensor(graph.output).shape[1:]
    inputs = [helper.make_tensor_value_info(image, TensorProto.FLOAT, [BATCH, cin, h, wd])]
    outputs = [helper.make_tensor_value_info(graph.output, TensorProto.FLOAT, [BATCH, *n_out])]
    onnx_graph = helper.make_graph(w.nodes, graph.name, inputs, outputs, list(w.initializers.values()))
    model = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="mixer-compile")
    model.ir_version = 8  # with opset 17: loadable by runtimes back to ONNX 1.12 / ORT 1.12
    return model


def _without_bias(op: Op) -> Op:
    """The op with its bias taken by the Conv node itself, so the epilogue skips it."""
    return Op(op.kind, op.inputs, op.output, {**op.attrs, "bias": False})
