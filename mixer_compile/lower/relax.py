"""Graph -> TVM Relax IRModule, built op by op with a BlockBuilder.

The module's `main(image, *params)` takes the weights as inputs (in `graph.params` order),
so one compiled library serves any checkpoint of the spec; `embed` binds them as constants
instead. A batch-range build has one such function per entry batch (`main_b1`, `main_b2`,
...), sharing the parameters. Ops are emitted as plain Relax ops inside one dataflow block: the matmul + bias +
GELU + residual of a fused IR op become adjacent Relax ops that FuseOps turns into one
kernel, which is what MetaSchedule then tunes.

Precision (passes/precision.py): tensors carry their storage dtype; an op marked
`accumulate` computes in that dtype (matmul/conv with `out_dtype`, LayerNorm and mean on
upcast inputs), runs its fused epilogue there too, and is rounded once to its output dtype.
The image input and the logits stay float32 whatever the storage dtype.
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax, te
from tvm.relax import op as R

from mixer_compile.errors import MixerCompileError
from mixer_compile.ir.graph import Graph, Op
from mixer_compile.lower.library import form_of, kernel_for

OUT_ELEMWISE_FUSABLE = 4  # relax's OpPatternKind kOutEWiseFusable


def _broadcast(bias: relax.Expr, ndim: int, axes: tuple[int, ...], shape: tuple[int, ...]) -> relax.Expr:
    target = [1] * ndim
    for axis in axes:
        target[axis] = shape[axis]
    return R.reshape(bias, target)


def _as(x: relax.Expr, dtype: str) -> relax.Expr:
    return x if str(x.ty.dtype) == dtype else R.astype(x, dtype)


def _gelu(bb: relax.BlockBuilder, x: relax.Expr, flavour: str) -> relax.Expr:
    """GELU spelt out with `tanh`/`erf`, not as `R.nn.gelu*`: the CPU build's FastMathTransform
    (tune.prepare) then swaps those for TOPI's vectorisable rational approximations. LLVM
    scalarises the exact ones into one libm call per element, which made the GELU epilogue
    cost as much as its 196x768x3072 matmul."""
    dtype = str(x.ty.dtype)

    def c(v: float) -> relax.Expr:
        return relax.const(v, dtype)

    if flavour == "tanh":
        inner = R.multiply(c(0.7978845608028654), R.add(x, R.multiply(c(0.044715), R.multiply(x, R.multiply(x, x)))))
        core = R.tanh(inner)
    else:
        core = R.erf(R.multiply(x, c(0.7071067811865476)))
    return bb.emit(R.multiply(R.multiply(c(0.5), x), R.add(c(1.0), core)))


def _compute_dtype(op: Op) -> str:
    return op.attrs.get("accumulate", op.output.dtype)


def _epilogue(bb: relax.BlockBuilder, op: Op, y: relax.Expr, extra: list[relax.Expr], axis: int) -> relax.Expr:
    a, shape, dtype = op.attrs, op.output.shape, _compute_dtype(op)
    if a.get("bias"):
        y = bb.emit(R.add(y, _broadcast(_as(extra.pop(0), dtype), len(shape), (axis,), shape)))
    if a.get("gelu"):
        y = _gelu(bb, y, a["gelu"])
    if a.get("residual"):
        y = bb.emit(R.add(y, _as(extra.pop(0), dtype)))
    return y


def _widened(weight: te.Tensor, dtype: str) -> te.Tensor:
    """A half-precision weight read as `dtype` through a stage of its own. Converted inside the
    product, each element is re-converted at every use: for every row tile of a micro-kernel
    (a right product's B panel) or every column tile (a left product's broadcast A), which made
    half-weight CPU builds slower than float32 ones (benchmarks/README.md, "Half precision on
    a CPU"). As a stage, the CPU schedule converts each panel once into cache, or the whole
    (small) token weight once per call (backend/gemm_space.py `apply`)."""
    if weight.dtype == dtype:
        return weight
    return te.compute(weight.shape, lambda *i: weight(*i).astype(dtype), name="widen")


def _panel_matmul(x: te.Tensor, panels: te.Tensor, out_dtype: str) -> te.Tensor:
    """X . W with W stored as (N/P, K, P) panels (passes/pack_kernels.py)."""
    *lead, depth = x.shape
    panels = _widened(panels, out_dtype)
    count, _, width = panels.shape
    k = te.reduce_axis((0, depth), name="k")
    return te.compute((*lead, count * width), lambda *i: te.sum(
        x[(*i[:-1], k)].astype(out_dtype) * panels[i[-1] // width, k, i[-1] % width], axis=k), name="matmul")


def _left_matmul(weight: te.Tensor, x: te.Tensor, out_dtype: str) -> te.Tensor:
    """W . X with W (N, K) in another dtype than X (half weights, float32 activations: a CPU)."""
    *lead, depth, cols = x.shape
    weight = _widened(weight, out_dtype)
    k = te.reduce_axis((0, depth), name="k")
    return te.compute((*lead, weight.shape[0], cols), lambda *i: te.sum(
        weight[i[-2], k] * x[(*i[:-2], k, i[-1])].astype(out_dtype), axis=k), name="matmul")


def _dense(bb: relax.BlockBuilder, op: Op, x: relax.Expr, kernel: relax.Expr) -> relax.Expr:
    axis, ndim = op.attrs["axis"], len(op.output.shape)
    kn, out = op.attrs["kernel_layout"] == "KN", _compute_dtype(op)
    if op.attrs["kernel_layout"] == "NKn":  # a Relax matmul cannot read panels: TE, marked fusable
        # like the legalized matmul (kOutEWiseFusable), so its bias/GELU/residual still fuse into it
        return bb.emit_te(_panel_matmul, x, kernel, out, primfunc_name_hint="matmul",
                          primfunc_attrs={"op_pattern": OUT_ELEMWISE_FUSABLE})
    if axis == ndim - 1:  # right product X . W
        return bb.emit(R.matmul(x, kernel if kn else R.permute_dims(kernel), out_dtype=out))
    if axis == ndim - 2 and not kn and kernel.ty.dtype != x.ty.dtype:  # half weights: TE, to widen
        # them in a stage of their own (`_widened`), fusable like the panel matmul above
        return bb.emit_te(_left_matmul, kernel, x, out, primfunc_name_hint="matmul",
                          primfunc_attrs={"op_pattern": OUT_ELEMWISE_FUSABLE})
    if axis == ndim - 2:  # left product W . X (tokens-major token mixing)
        return bb.emit(R.matmul(R.permute_dims(kernel) if kn else kernel, x, out_dtype=out))
    perm = [i for i in range(ndim) if i != axis] + [axis]
    inverse = list(np.argsort(perm))
    y = bb.emit(R.matmul(R.permute_dims(x, perm), kernel if kn else R.permute_dims(kernel), out_dtype=out))
    return bb.emit(R.permute_dims(y, inverse))


def _emit(bb: relax.BlockBuilder, graph: Graph, op: Op, args: list[relax.Expr]) -> relax.Expr:
    a, dtype = op.attrs, _compute_dtype(op)
    x, rest = args[0], list(args[1:])
    if op.kind == "patchify":
        b, c, h, w = graph.tensor(op.inputs[0]).shape
        p = a["patch"]
        y = R.reshape(x, (b, c, h // p, p, w // p, p))
        y = R.permute_dims(y, (0, 2, 4, 3, 5, 1))
        return bb.emit(R.reshape(y, op.output.shape))
    if op.kind == "dense" and a.get("library"):  # one library call, epilogue included (passes/library_gemms.py)
        form = form_of(a["axis"], len(op.output.shape), a["kernel_layout"])
        symbol = kernel_for(op.output.dtype, a.get("gelu"), bool(a.get("residual")), form).symbol
        return bb.emit(R.call_dps_packed(symbol, [x, *rest], relax.TensorType(op.output.shape, op.output.dtype)))
    if op.kind == "dense":
        y = _dense(bb, op, x, rest.pop(0))
        return _epilogue(bb, op, y, rest, a["axis"])
    if op.kind == "bias_add":  # at the bias's precision (float32 under precision.py), rounded after
        bias = _broadcast(rest[0], len(op.output.shape), a["axes"], op.output.shape)
        return bb.emit(R.add(_as(x, str(rest[0].ty.dtype)), bias))
    if op.kind == "gelu":
        return _gelu(bb, x, a["flavour"])
    if op.kind == "add":
        return bb.emit(R.add(x, rest[0]))
    if op.kind == "layer_norm":
        return bb.emit(R.nn.layer_norm(_as(x, dtype), _as(rest[0], dtype), _as(rest[1], dtype),
                                       axes=[a["axis"]], epsilon=a["eps"]))
    if op.kind == "mean":
        return bb.emit(R.mean(_as(x, dtype), axis=[a["axis"]]))
    if op.kind == "transpose":
        return bb.emit(R.permute_dims(x, a["perm"]))
    if op.kind == "reshape":
        return bb.emit(R.reshape(x, a["shape"]))
    if op.kind == "conv2d":
        y = bb.emit(R.nn.conv2d(x, rest.pop(0), strides=a["stride"], groups=a["groups"], out_dtype=dtype))
        return _epilogue(bb, op, y, rest, 1)
    if op.kind == "conv2d_transpose":
        return bb.emit(R.nn.conv2d_transpose(x, rest[0], strides=a["stride"], groups=a["groups"],
                                             out_dtype=dtype))
    raise NotImplementedError(op.kind)


INDEX_LIMIT = 2**31  # elements: TVM 0.27's Relax passes build int32 literals of a tensor's size


def check_indexable(graph: Graph) -> None:
    """Refuses, in one line, a batch that makes a tensor TVM's own kernels index hold 2^31
    elements or more: TVM 0.27 fails deep in its pipeline on such a size (RewriteDataflowReshape:
    "Literal value ... exceeds range of int32"), whatever the target. Tensors that only library
    GEMMs read and write (the channel-mixing hidden layer on a GPU) do not count: the kernels
    index with 64 bits."""
    shapes = {graph.input.name: graph.input.shape, **{op.output.name: op.output.shape for op in graph.ops}}
    # in graph order, so that of tensors of one size (B/16's image and activations) the first is named
    indexed = dict.fromkeys(n for op in graph.ops if not op.attrs.get("library") for n in (*op.inputs, op.output.name))
    name, shape = max(((n, shapes[n]) for n in indexed if n in shapes), key=lambda item: math.prod(item[1]))
    size, batch = math.prod(shape), graph.input.shape[0]
    if size >= INDEX_LIMIT:
        largest = (INDEX_LIMIT - 1) // (size // batch)
        raise MixerCompileError(
            f"batch {batch} makes the {'x'.join(map(str, shape))} tensor {name} ({size:.2e} elements), beyond the "
            f"2^31 TVM's compiler can index; the largest batch is {largest}: run larger batches as several calls")


def to_relax(graph: Graph | dict[str, Graph], embed: dict[str, np.ndarray] | None = None) -> tvm.IRModule:
    """The Relax module of `graph` (one function, `main`), or of several graphs of the one model
    at different batch sizes (a batch-range build: `{"main_b1": g1, "main_b4": g4, ...}`), each
    a function `name(image, *params)` over the same parameters. They are built by one
    BlockBuilder, so a kernel two functions share (identical TIR) is emitted once. With
    `embed`, the weights become constants in every function."""
    graphs = {"main": graph} if isinstance(graph, Graph) else dict(graph)
    for g in graphs.values():
        check_indexable(g)
    bb = relax.BlockBuilder()
    for name, g in graphs.items():
        _function(bb, name, g)
    mod = bb.get()
    for name, g in graphs.items():
        mod[name] = mod[name].with_attr("num_input", 1)
        if embed is not None:
            constants = {n: tvm.runtime.tensor(embed[n]) for n in g.params}
            mod = relax.transform.BindParams(name, constants)(mod)
    return mod


def _function(bb: relax.BlockBuilder, name: str, graph: Graph) -> None:
    image = relax.Var(graph.input.name, relax.TensorType(graph.input.shape, graph.input.dtype))
    params = {n: relax.Var(n, relax.TensorType(p.tensor.shape, p.tensor.dtype)) for n, p in graph.params.items()}
    with bb.function(name, [image, *params.values()]):
        with bb.dataflow():
            env: dict[str, relax.Expr] = {graph.input.name: image, **params}
            for op in graph.ops:
                y = _emit(bb, graph, op, [env[i] for i in op.inputs])
                env[op.output.name] = y if str(y.ty.dtype) == op.output.dtype else bb.emit(R.astype(y, op.output.dtype))
            out = bb.emit_output(_as(env[graph.output], "float32"))
        bb.emit_func_output(out)
