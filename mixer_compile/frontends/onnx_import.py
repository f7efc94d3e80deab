"""ONNX -> MixerSpec + canonical weights, by recognising a Mixer's structure in the graph.

Once a file is a spec and a checkpoint, every pass, lowering and tuning step applies to it as
to any other model. Recognition is structural, not by names: the graph is simplified with
the batch fixed (so shape arithmetic folds to constants), then walked from the image input
along the trunk: a stem Conv with stride == kernel, N blocks (LayerNorm, an MLP over the
tokens, residual add, LayerNorm, an MLP over the channels, residual add), LayerNorm, mean over
the tokens, a linear head. Every value on the way carries, per axis, the logical axes
("atoms") it holds: batch B, channels C, grid rows Y and columns X (tokens = Y X in raster
order), hidden units T (token MLP), H (channel MLP), classes N. Transposes and reshapes just
move atoms, so the same walk reads timm's layout (transposes around a MatMul), our
tokens-major export (left MatMuls), Gemm with flattening reshapes, and our conv form
(full-grid Conv + ConvTranspose with channels folded into the batch, 1x1 Convs). A GELU is
any elementwise subgraph that evaluates to one of the two GELU flavours on probe points; a
LayerNorm is the ONNX op or (opset < 17) its spelled-out subgraph, read off the same way.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NoReturn

import numpy as np
import onnx
from onnx import helper, numpy_helper

from mixer_compile.errors import MixerCompileError
from mixer_compile.model.reference import gelu as reference_gelu
from mixer_compile.model.spec import MixerSpec
from mixer_compile.model.params import Weights, check_weights

LAYOUT_OPS = {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"}
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Erf", "Tanh", "Sqrt", "Neg", "Gelu", "Sigmoid"}
LINEAR_OPS = {"MatMul", "Gemm", "Conv", "ConvTranspose"}
# The batch a dynamic-batch file is simplified at: 2 keeps the batch atom distinct from unit axes.
PROBE_BATCH = 2

Atoms = tuple[str, ...]


@dataclass(frozen=True)
class Val:
    """A tensor on the walk: its name and, per axis, the logical axes it holds in order."""

    name: str
    axes: tuple[Atoms, ...]


@dataclass
class ImportedMixer:
    spec: MixerSpec
    weights: Weights
    batch_fixed: bool


def _describe(node: onnx.NodeProto | None) -> str:
    if node is None:
        return "nothing (the value is not used)"
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    shown = ", ".join(f"{k}={v}" for k, v in attrs.items() if k in ("kernel_shape", "strides", "group", "perm", "axis",
                                                                     "axes", "pads"))
    return f"{node.op_type} '{node.name or node.output[0]}'" + (f" ({shown})" if shown else "")


class _Walk:
    """The graph (simplified, batch fixed) as constants and consumer lists, plus what the walk learnt:
    the size of every atom, the GELU flavours and LayerNorm epsilons met on the way."""

    def __init__(self, model: onnx.ModelProto, sizes: dict[str, int]) -> None:
        g = model.graph
        self.consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        self.users: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self.nodes = list(g.node)
        for n in g.node:
            if n.op_type == "Constant" and n.attribute:
                self.consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
            for i in n.input:
                self.users[i].append(n)
        self.outputs = [o.name for o in g.output]
        self.opsets = list(model.opset_import)
        self.sizes = dict(sizes)
        self.gelus: list[str] = []
        self.eps: list[float] = []

    # -- helpers ---------------------------------------------------------------------------
    def fail(self, expected: str, found: onnx.NodeProto | None | str) -> NoReturn:
        what = found if isinstance(found, str) else _describe(found)
        raise MixerCompileError(f"ONNX graph is not a Mixer this importer recognises: expected {expected}, "
                                f"found {what}")

    def letters(self, atoms: Atoms) -> Atoms:
        return tuple(a for a in atoms if self.sizes[a] != 1)

    def dims(self, v: Val) -> list[int]:
        return [math.prod(self.sizes[a] for a in axis) for axis in v.axes]

    def attrs(self, node: onnx.NodeProto) -> dict:
        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def const(self, name: str, what: str, node: onnx.NodeProto) -> np.ndarray:
        if name not in self.consts:
            self.fail(f"{what} as a constant", f"a computed input '{name}' of {_describe(node)}")
        return self.consts[name]

    def axis_of(self, v: Val, atoms: Atoms) -> int | None:
        want = self.letters(atoms)
        hits = [i for i, axis in enumerate(v.axes) if self.letters(axis) == want]
        return hits[0] if len(hits) == 1 else None

    # -- layout ops --------------------------------------------------------------------------
    def regroup(self, v: Val, shape: list[int], node: onnx.NodeProto) -> Val:
        """Reshape: the atoms keep their order; group them by the target shape."""
        dims = self.dims(v)
        shape = [dims[i] if d == 0 else d for i, d in enumerate(shape)]
        if -1 in shape:
            rest = math.prod(d for d in shape if d != -1)
            shape[shape.index(-1)] = math.prod(dims) // rest
        atoms = [a for axis in v.axes for a in axis]
        groups: list[Atoms] = []
        for d in shape:
            group: list[str] = []
            while math.prod(self.sizes[a] for a in group) < d and atoms:
                group.append(atoms.pop(0))
            if math.prod(self.sizes[a] for a in group) != d:
                self.fail("a reshape that only merges or splits whole axes", node)
            groups.append(tuple(group))
        if any(self.sizes[a] != 1 for a in atoms):
            self.fail("a reshape that keeps every element", node)
        if atoms and groups:
            groups[-1] = groups[-1] + tuple(atoms)
        return Val(node.output[0], tuple(groups))

    def layout(self, node: onnx.NodeProto, v: Val) -> Val:
        a, out, axes = self.attrs(node), node.output[0], v.axes
        if node.op_type == "Identity":
            return Val(out, axes)
        if node.op_type == "Transpose":
            perm = a.get("perm", list(reversed(range(len(axes)))))
            return Val(out, tuple(axes[p] for p in perm))
        if node.op_type == "Reshape":
            return self.regroup(v, [int(d) for d in self.const(node.input[1], "a reshape shape", node)], node)
        if node.op_type == "Flatten":
            k = a.get("axis", 1) % max(len(axes), 1)
            return Val(out, (sum(axes[:k], ()), sum(axes[k:], ())))
        squeeze = a.get("axes")
        if squeeze is None and len(node.input) > 1:
            squeeze = [int(d) for d in self.const(node.input[1], "squeeze axes", node)]
        if node.op_type == "Unsqueeze":
            new = list(axes)
            for ax in sorted(d % (len(axes) + len(squeeze)) for d in squeeze):
                new.insert(ax, ())
            return Val(out, tuple(new))
        dims = self.dims(v)
        drop = {d % len(axes) for d in squeeze} if squeeze else {i for i, d in enumerate(dims) if d == 1}
        kept = [axis for i, axis in enumerate(axes) if i not in drop]
        dropped = tuple(a for i in sorted(drop) for a in axes[i])
        if kept:
            kept[-1] = kept[-1] + dropped
        return Val(out, tuple(kept))

    def follow(self, v: Val) -> list[tuple[onnx.NodeProto, Val]]:
        """The non-layout consumers of `v`, each with the value (layout ops applied) it reads."""
        found = []
        for node in self.users.get(v.name, []):
            if node.op_type in LAYOUT_OPS and node.input[0] == v.name:
                found += self.follow(self.layout(node, v))
            else:
                found.append((node, v))
        return found

    def derived(self, v: Val) -> dict[str, Val]:
        """`v` and every value made from it by layout ops alone."""
        out = {v.name: v}
        for node in self.users.get(v.name, []):
            if node.op_type in LAYOUT_OPS and node.input[0] == v.name:
                out.update(self.derived(self.layout(node, v)))
        return out

    def only(self, v: Val, kinds: set[str], expected: str) -> tuple[onnx.NodeProto, Val]:
        users = self.follow(v)
        if len(users) != 1 or users[0][0].op_type not in kinds:
            self.fail(expected, users[0][0] if users else None)
        return users[0]

    def end(self, v: Val) -> Val:
        """`v` after trailing layout ops, when it is the graph output."""
        for name, d in self.derived(v).items():
            if name in self.outputs:
                return d
        self.fail("the head's output to be the graph output", self.follow(v)[0][0] if self.follow(v) else None)

    def grow(self, atom: str, size: int, node: onnx.NodeProto) -> None:
        if self.sizes.setdefault(atom, size) != size:
            self.fail(f"width {self.sizes[atom]} for {atom}", f"{size} in {_describe(node)}")

    # -- the Mixer's pieces ------------------------------------------------------------------
    def stem(self, image: Val) -> tuple[Val, np.ndarray, np.ndarray]:
        node, x = self.only(image, {"Conv"}, "a Conv stem with stride == kernel on the image")
        a = self.attrs(node)
        k = self.const(node.input[1], "the stem kernel", node)
        p = k.shape[2]
        if (k.ndim != 4 or k.shape[2] != k.shape[3] or list(a.get("strides", [1, 1])) != [p, p]
                or any(a.get("pads", [0])) or a.get("group", 1) != 1):
            self.fail("a Conv stem with stride == kernel (square, no padding, group 1)", node)
        h, w = self.sizes["h"], self.sizes["w"]
        if h % p or w % p:
            self.fail(f"an image size divisible by the patch size {p}", f"{h}x{w}")
        self.sizes.update(P=p, C=k.shape[0], Y=h // p, X=w // p)
        y = Val(node.output[0], (x.axes[0], ("C",), ("Y",), ("X",)))
        bias = self.const(node.input[2], "the stem bias", node) if len(node.input) > 2 and node.input[2] else None
        if bias is None:
            y, bias = self.bias(y, ("C",))
        return y, k.transpose(2, 3, 1, 0), bias

    def bias(self, y: Val, produced: Atoms) -> tuple[Val, np.ndarray]:
        """Absorbs an Add of a constant along the produced axis; zeros if there is none."""
        n = math.prod(self.sizes[a] for a in produced)
        users = self.follow(y)
        if len(users) == 1 and users[0][0].op_type == "Add":
            node, v = users[0]
            other = [i for i in node.input if i != v.name]
            axis = self.axis_of(v, produced)
            if len(other) == 1 and other[0] in self.consts and axis is not None:
                b = self.consts[other[0]]
                pad = (1,) * (len(v.axes) - b.ndim) + b.shape
                if b.size == n and b.ndim <= len(v.axes) and pad[axis] == n:
                    return Val(node.output[0], v.axes), b.reshape(n)
        return y, np.zeros(n, np.float32)

    def linear(self, v: Val, contract: Atoms, produce: Atoms, what: str) -> tuple[Val, np.ndarray, np.ndarray]:
        """One Dense layer over `contract` (as MatMul, Gemm, 1x1 or full-grid Conv, or ConvTranspose).

        Returns the output, the kernel as (in, out) with `in` in `contract` order, and the bias.
        """
        node, x = self.only(v, LINEAR_OPS, what)
        a, want = self.attrs(node), self.letters(contract)
        conv_bias = None
        if node.op_type in ("MatMul", "Gemm"):
            left = node.input[0] != x.name
            w = self.const(node.input[0] if left else node.input[1], f"{what} weights", node)
            if node.op_type == "Gemm":
                if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
                    self.fail(f"{what} as a plain Gemm (no transA, alpha = beta = 1)", node)
                w = w.T if a.get("transB", 0) else w
                if len(node.input) > 2 and node.input[2]:
                    conv_bias = self.const(node.input[2], f"{what} bias", node).reshape(-1)
            kernel = w.T if left else w
            axis = len(x.axes) - (2 if left else 1)
            if w.ndim != 2 or self.letters(x.axes[axis]) != want:
                self.fail(f"{what} contracting {'/'.join(contract)}", node)
            out_axes = list(x.axes)
            out_axes[axis] = produce
        else:
            k = self.const(node.input[1], f"{what} kernel", node)
            if a.get("group", 1) != 1 or any(a.get("pads", [0])) or any(s != 1 for s in a.get("dilations", [1])):
                self.fail(f"{what} as a Conv with group 1, no padding", node)
            n, cin, hh, ww = x.axes
            if node.op_type == "Conv":
                full = self.letters(cin + hh + ww)
                if k.shape[2:] == (1, 1) and self.letters(cin) == want:
                    kernel, out_axes = k[:, :, 0, 0].T, [n, produce, hh, ww]
                elif full == want and k.shape[2:] == tuple(self.dims(x)[2:]):
                    kernel, out_axes = k.reshape(k.shape[0], -1).T, [n, produce, (), ()]
                else:
                    self.fail(f"{what} as a 1x1 or full-receptive-field Conv contracting {'/'.join(contract)}", node)
            else:
                if self.letters(cin) != want or self.dims(x)[2:] != [1, 1] or k.shape[1] != 1 \
                        or any(a.get("output_padding", [0])):
                    self.fail(f"{what} as a ConvTranspose from 1x1 back to the grid", node)
                kernel, out_axes = k.reshape(k.shape[0], -1), [n, (), ("Y",), ("X",)]
                if produce != ("Y", "X") or k.shape[2:] != (self.sizes["Y"], self.sizes["X"]):
                    self.fail(f"{what} mirroring the token grid", node)
            if len(node.input) > 2 and node.input[2]:
                conv_bias = self.const(node.input[2], f"{what} bias", node)
        if len(produce) == 1:
            self.grow(produce[0], kernel.shape[1], node)
        if kernel.shape[1] != math.prod(self.sizes[p] for p in produce):
            self.fail(f"{what} with {math.prod(self.sizes[p] for p in produce)} outputs", node)
        y = Val(node.output[0], tuple(out_axes))
        if conv_bias is None:
            y, conv_bias = self.bias(y, produce)
        return y, kernel, conv_bias.reshape(-1)

    def cone(self, x: str, member: Callable[[onnx.NodeProto], bool]) -> tuple[list[onnx.NodeProto], list[str]]:
        """The nodes computed from `x` alone (plus constants) by `member` ops, and which of their
        results are read outside that subgraph."""
        values, nodes = {x}, []
        for node in self.nodes:
            ins = [i for i in node.input if i]
            if member(node) and any(i in values for i in ins) and all(i in values or i in self.consts for i in ins):
                nodes.append(node)
                values.update(node.output)
        inside = {id(n) for n in nodes}
        outs = [o for n in nodes for o in n.output
                if o in self.outputs or any(id(u) not in inside for u in self.users.get(o, []))]
        return nodes, outs

    def evaluate(self, nodes: list[onnx.NodeProto], x: str, out: str, probe: np.ndarray) -> np.ndarray | None:
        """The subgraph's result on `probe` (ONNX's reference evaluator); None if it cannot run."""
        from onnx.reference import ReferenceEvaluator

        used = {i for n in nodes for i in n.input}
        inits = [numpy_helper.from_array(self.consts[i], i) for i in used if i in self.consts]
        value = helper.make_tensor_value_info
        g = helper.make_graph(nodes, "probe", [value(x, onnx.TensorProto.FLOAT, list(probe.shape))],
                              [value(out, onnx.TensorProto.FLOAT, None)], inits)
        opset = next(o.version for o in self.opsets if o.domain in ("", "ai.onnx"))
        try:
            model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
            return np.asarray(ReferenceEvaluator(model).run(None, {x: probe})[0], np.float64)
        except Exception:  # an op combination the evaluator cannot run is not the function we look for
            return None

    def gelu(self, v: Val, what: str) -> Val:
        """The elementwise subgraph after `v`, checked to compute a GELU on probe points."""
        users = self.follow(v)
        if not users or len({x.name for _, x in users}) != 1 or any(n.op_type not in ELEMENTWISE for n, _ in users):
            self.fail(f"a GELU in {what}", users[0][0] if users else None)
        x = users[0][1]
        nodes, outs = self.cone(x.name, lambda n: n.op_type in ELEMENTWISE
                                and all(self.consts[i].size == 1 for i in n.input if i in self.consts))
        if len(outs) != 1:
            self.fail(f"a GELU in {what} (one elementwise subgraph with one result)", users[0][0])
        probe = np.linspace(-5, 5, 201)
        y = self.evaluate(nodes, x.name, outs[0], probe.astype(np.float32))
        flavour = next((f for f in ("erf", "tanh") if y is not None
                        and np.abs(y - reference_gelu(probe, f)).max() < 2e-5), None)
        if flavour is None:
            self.fail(f"a GELU (erf or tanh form) in {what}", f"elementwise ops {[n.op_type for n in nodes]} "
                      "that compute something else")
        self.gelus.append(flavour)
        return Val(outs[0], x.axes)

    def over_channels(self, x: Val, axis: int, what: str, node: onnx.NodeProto) -> None:
        if self.letters(sum(x.axes[axis % len(x.axes):], ())) != ("C",):
            self.fail(f"{what} over the channels", node)

    def norm(self, x: Val, what: str) -> tuple[Val, np.ndarray, np.ndarray, set[int]]:
        """The LayerNorm over the channels reading `x`: an ONNX LayerNormalization (opset >= 17) or
        its opset < 17 decomposition. Returns its output, scale, bias and the nodes that read `x`."""
        users = self.follow(x)
        node, v = next(((n, v) for n, v in users if n.op_type in ("LayerNormalization", "ReduceMean")),
                       (users[0][0] if users else None, None))
        if v is None:
            self.fail(f"a LayerNormalization before {what}", node)
        if node.op_type == "ReduceMean":
            return self.decomposed_norm(v, what, node)
        a = self.attrs(node)
        self.over_channels(v, a.get("axis", -1), f"the LayerNorm before {what}", node)
        self.eps.append(float(a.get("epsilon", 1e-5)))
        scale = self.const(node.input[1], f"the LayerNorm scale before {what}", node).reshape(-1)
        bias = (self.const(node.input[2], f"the LayerNorm bias before {what}", node).reshape(-1)
                if len(node.input) > 2 and node.input[2] else np.zeros_like(scale))
        return Val(node.output[0], v.axes), scale, bias, {id(node)}

    def reduce_axes(self, node: onnx.NodeProto) -> list[int] | None:
        axes = self.attrs(node).get("axes")
        if axes is None and len(node.input) > 1 and node.input[1] in self.consts:
            axes = [int(d) for d in self.consts[node.input[1]].reshape(-1)]
        return axes

    def decomposed_norm(self, x: Val, what: str, first: onnx.NodeProto) -> tuple[Val, np.ndarray, np.ndarray, set[int]]:
        """mean, subtract, square, mean, add eps, sqrt, divide, scale, shift as separate ops: the
        subgraph is found as for GELU; bias, eps and scale are read off its outputs on probes."""
        rank, c = len(x.axes), self.sizes["C"]
        self.over_channels(x, (self.reduce_axes(first) or [0])[-1], f"the LayerNorm before {what}", first)
        nodes, outs = self.cone(x.name, lambda n: n.op_type in ELEMENTWISE | {"Reciprocal"} or (
            n.op_type == "ReduceMean" and [d % rank for d in self.reduce_axes(n) or []] == [rank - 1]))
        eps_options = sorted({float(self.consts[i].reshape(-1)[0]) for n in nodes for i in n.input
                              if i in self.consts and self.consts[i].size == 1 and 0 < self.consts[i].reshape(-1)[0] < 1e-2})
        probe = np.random.default_rng(0).standard_normal((1,) * (rank - 2) + (16, c))
        y = self.evaluate(nodes, x.name, outs[0], probe.astype(np.float32)) if len(outs) == 1 else None
        zero = self.evaluate(nodes, x.name, outs[0], np.zeros((1,) * (rank - 1) + (c,), np.float32)) \
            if y is not None else None
        for eps in eps_options if zero is not None else []:
            bias = zero.reshape(-1)
            z = (probe - probe.mean(-1, keepdims=True)) / np.sqrt(probe.var(-1, keepdims=True) + eps)
            scale = ((y - bias) * z).reshape(-1, c).sum(0) / (z * z).reshape(-1, c).sum(0)
            if np.abs(z * scale + bias - y).max() <= 1e-5 * max(1.0, np.abs(y).max()):
                self.eps.append(eps)
                readers = {id(n) for n in nodes if x.name in n.input}
                vectors = [self.consts[i].reshape(-1) for n in nodes for i in n.input
                           if i in self.consts and self.consts[i].size == c]
                exact = [next((v for v in vectors if np.abs(v - est).max() <= 1e-5 * max(1.0, np.abs(est).max())),
                              est) for est in (scale, bias)]  # the stored constants, not float32 estimates
                return Val(outs[0], x.axes), exact[0], exact[1], readers
        self.fail(f"a LayerNorm before {what}", f"ops {[n.op_type for n in nodes]} that compute something else")

    def residual(self, trunk: Val, y: Val, what: str) -> tuple[Val, onnx.NodeProto]:
        node, v = self.only(y, {"Add"}, f"the residual add of {what}")
        other = [i for i in node.input if i != v.name]
        mine = self.derived(trunk)
        if len(other) != 1 or other[0] not in mine:
            self.fail(f"the residual add of {what} onto the block input", node)
        if [self.letters(a) for a in mine[other[0]].axes] != [self.letters(a) for a in v.axes]:
            self.fail(f"the residual add of {what} in matching layouts", node)
        return Val(node.output[0], v.axes), node

    def mlp(self, x: Val, outer: Atoms, hidden: str, w: Weights, key: str, what: str) -> Val:
        y, k0, b0 = self.linear(x, outer, (hidden,), f"{what} fc1")
        y = self.gelu(y, what)
        y, k1, b1 = self.linear(y, (hidden,), outer, f"{what} fc2")
        w.update({f"{key}/Dense_0/kernel": k0, f"{key}/Dense_0/bias": b0,
                  f"{key}/Dense_1/kernel": k1, f"{key}/Dense_1/bias": b1})
        return y

    def block(self, x: Val, i: int, first_norm: tuple[Val, np.ndarray, np.ndarray, set[int]], w: Weights) -> Val:
        pre = f"MixerBlock_{i}"
        for part, (outer, hidden, key, norm) in enumerate(((("Y", "X"), "T", "token_mixing", "LayerNorm_0"),
                                                           (("C",), "H", "channel_mixing", "LayerNorm_1"))):
            what = f"block {i} {key.replace('_', ' ')}"
            y, scale, bias, readers = first_norm if part == 0 else self.norm(x, what)
            w.update({f"{pre}/{norm}/scale": scale, f"{pre}/{norm}/bias": bias})
            y = self.mlp(y, outer, hidden, w, f"{pre}/{key}", what)
            trunk_users = {id(n) for n, _ in self.follow(x)}
            x, add = self.residual(x, y, what)
            if trunk_users != readers | {id(add)}:
                self.fail(f"the input of {what} to feed only its LayerNorm and the residual add",
                          f"{len(trunk_users)} consumers")
        return x


def _fixed_batch(model: onnx.ModelProto) -> tuple[str, list[int], bool]:
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise MixerCompileError(f"ONNX graph is not a Mixer this importer recognises: expected one image input and "
                                f"one output, found {len(inputs)} inputs and {len(graph.output)} outputs")
    elem = inputs[0].type.tensor_type.elem_type
    if elem != onnx.TensorProto.FLOAT:
        raise MixerCompileError(f"the model's input is {onnx.TensorProto.DataType.Name(elem).lower()}; export it in "
                                "float32 (model.float() before torch.onnx.export): half precision is a compile "
                                "option (--dtype float16)")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else 0 for d in dims]
    if len(shape) != 4 or any(d <= 0 for d in shape[1:]):
        raise MixerCompileError(f"ONNX graph is not a Mixer this importer recognises: expected an NCHW image input "
                                f"with fixed channels and size, found shape {[d.dim_param or d.dim_value for d in dims]}")
    fixed = shape[0] > 0
    return inputs[0].name, [shape[0] if fixed else PROBE_BATCH, *shape[1:]], fixed


def load_onnx(path: Path) -> onnx.ModelProto:
    if Path(path).is_dir():
        raise MixerCompileError(f"'{path}' is a directory; give the .onnx file")
    if not Path(path).is_file():
        raise MixerCompileError(f"ONNX file '{path}' does not exist")
    if Path(path).stat().st_size == 0:
        raise MixerCompileError(f"'{path}' is empty, not an ONNX model; export it again")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError, a missing external-data file, and friends
        why = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise MixerCompileError(f"'{path}' is not a readable ONNX file ({type(exc).__name__}"
                                f"{': ' + why if why else ''})") from None


def recognise(model: onnx.ModelProto, name: str = "onnx_mixer", batch: int | None = None) -> ImportedMixer:
    """Spec and canonical weights of the Mixer in `model`; MixerCompileError naming what did not match."""
    import onnxsim

    input_name, shape, fixed = _fixed_batch(model)
    try:
        simple, _ = onnxsim.simplify(model, overwrite_input_shapes={input_name: shape})
    except Exception as exc:  # onnxsim raises plain RuntimeErrors for graphs it cannot run
        raise MixerCompileError(f"ONNX graph could not be simplified at input shape {shape}: "
                                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None
    b, cin, h, w = shape
    walk = _Walk(simple, {"B": b, "I": cin, "h": h, "w": w})
    image = Val(input_name, (("B",), ("I",), ("h",), ("w",)))
    x, stem_k, stem_b = walk.stem(image)
    weights: Weights = {"stem/kernel": stem_k, "stem/bias": stem_b}
    blocks = 0
    while True:
        norm = walk.norm(x, f"block {blocks} token mixing (or the head)")
        after = walk.follow(norm[0])
        if len(walk.follow(x)) == len(norm[3]) and len(after) == 1 \
                and after[0][0].op_type in ("ReduceMean", "GlobalAveragePool"):
            break
        x = walk.block(x, blocks, norm, weights)
        blocks += 1
    y, scale, bias, _ = norm
    weights.update({"pre_head_layer_norm/scale": scale, "pre_head_layer_norm/bias": bias})
    y = _pool(walk, y)
    y, head_k, head_b = walk.linear(y, ("C",), ("N",), "the linear head")
    weights.update({"head/kernel": head_k, "head/bias": head_b})
    out = walk.end(y)
    if [walk.letters(a) for a in out.axes if walk.letters(a)] != ([("B",)] if b > 1 else []) + [("N",)]:
        walk.fail("logits (batch, classes) as the output", f"axes {out.axes}")
    if blocks == 0 or len(set(walk.gelus)) != 1:
        walk.fail("at least one block, all with the same GELU", f"{blocks} blocks, GELUs {sorted(set(walk.gelus))}")
    if len(set(walk.eps)) != 1:
        walk.fail("one LayerNorm epsilon for the whole model", f"epsilons {sorted(set(walk.eps))}")
    sizes = walk.sizes
    spec = MixerSpec(name, (h, w), sizes["P"], sizes["C"], sizes["T"], sizes["H"], blocks, num_classes=sizes["N"],
                     in_channels=cin, gelu=walk.gelus[0], layer_norm_eps=float(f"{walk.eps[0]:.6g}"),
                     batch=b if fixed else (batch or 1))
    return ImportedMixer(spec, check_weights(weights, spec, "the ONNX graph"), fixed)


def _pool(walk: _Walk, y: Val) -> Val:
    """The mean over the tokens (ReduceMean over the grid axes, or GlobalAveragePool)."""
    node, x = walk.only(y, {"ReduceMean", "GlobalAveragePool"}, "the mean over the tokens")
    a = walk.attrs(node)
    axes = [2, 3] if node.op_type == "GlobalAveragePool" else walk.reduce_axes(node) or []
    axes = sorted(d % len(x.axes) for d in axes)
    if walk.letters(sum((x.axes[d] for d in axes), ())) != ("Y", "X"):
        walk.fail("the mean over the tokens", node)
    keep = a.get("keepdims", 1) if node.op_type == "ReduceMean" else 1
    out = [() if d in axes else axis for d, axis in enumerate(x.axes) if keep or d not in axes]
    return Val(node.output[0], tuple(out))


def import_onnx(path: Path, batch: int | None = None) -> ImportedMixer:
    """Reads and recognises an ONNX Mixer file; the spec is named after the file."""
    return recognise(load_onnx(path), name=Path(path).stem, batch=batch)
