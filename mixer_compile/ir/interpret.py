"""A NumPy interpreter for the graph IR: how passes are proved to preserve meaning.

Each op's meaning is written once here, directly in NumPy, so a pass can be checked by
running the graph before and after it on the same random weights and inputs.
"""

from __future__ import annotations

import numpy as np
from scipy.special import erf

from mixer_compile.ir.graph import Graph, Op


def _gelu(x: np.ndarray, flavour: str) -> np.ndarray:
    if flavour == "erf":
        return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def _bias_shape(ndim: int, axes: tuple[int, ...], bias: np.ndarray) -> tuple[int, ...]:
    shape = [1] * ndim
    for axis, n in zip(axes, bias.shape):
        shape[axis] = n
    return tuple(shape)


def _epilogue(op: Op, y: np.ndarray, extra: list[np.ndarray], axis: int) -> np.ndarray:
    """Fused bias (along the op's output axis `axis`), GELU and residual add."""
    if op.attrs.get("bias"):
        b = extra.pop(0)
        y = y + b.reshape(_bias_shape(y.ndim, (axis,), b))
    if op.attrs.get("gelu"):
        y = _gelu(y, op.attrs["gelu"])
    if op.attrs.get("residual"):
        y = y + extra.pop(0)
    return y


def _conv2d(x: np.ndarray, k: np.ndarray, stride: int, groups: int) -> np.ndarray:
    b, cin, h, w = x.shape
    cout, cg, kh, kw = k.shape
    oh, ow = (h - kh) // stride + 1, (w - kw) // stride + 1
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]
    win = win.reshape(b, groups, cg, oh, ow, kh, kw)
    kg = k.reshape(groups, cout // groups, cg, kh, kw)
    out = np.einsum("bgcyxij,gocij->bgoyx", win, kg, optimize=True)
    return out.reshape(b, cout, oh, ow)


def _conv2d_transpose(x: np.ndarray, k: np.ndarray, stride: int, groups: int) -> np.ndarray:
    b, cin, h, w = x.shape
    _, og, kh, kw = k.shape
    out = np.zeros((b, og * groups, (h - 1) * stride + kh, (w - 1) * stride + kw), x.dtype)
    xg = x.reshape(b, groups, cin // groups, h, w)
    kg = k.reshape(groups, cin // groups, og, kh, kw)
    for y in range(h):
        for xx in range(w):
            contrib = np.einsum("bgc,gcoij->bgoij", xg[:, :, :, y, xx], kg)
            out[:, :, y * stride:y * stride + kh, xx * stride:xx * stride + kw] += contrib.reshape(b, -1, kh, kw)
    return out


def run_op(op: Op, args: list[np.ndarray]) -> np.ndarray:
    a = op.attrs
    x, rest = args[0], list(args[1:])
    if op.kind == "patchify":
        b, c, h, w = x.shape
        p = a["patch"]
        x = x.reshape(b, c, h // p, p, w // p, p).transpose(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)
    if op.kind == "dense":
        kernel = rest.pop(0)
        if a["kernel_layout"] == "NK":
            kernel = kernel.T
        elif a["kernel_layout"] == "NKn":  # panels (N/P, K, P) -> (K, N)
            kernel = kernel.transpose(1, 0, 2).reshape(kernel.shape[1], -1)
        y = np.moveaxis(np.moveaxis(x, a["axis"], -1) @ kernel, -1, a["axis"])
        return _epilogue(op, y, rest, a["axis"])
    if op.kind == "bias_add":
        return x + rest[0].reshape(_bias_shape(x.ndim, a["axes"], rest[0]))
    if op.kind == "gelu":
        return _gelu(x, a["flavour"])
    if op.kind == "add":
        return x + rest[0]
    if op.kind == "layer_norm":
        mean = x.mean(axis=a["axis"], keepdims=True)
        var = ((x - mean) ** 2).mean(axis=a["axis"], keepdims=True)
        shape = _bias_shape(x.ndim, (a["axis"],), rest[0])
        return (x - mean) / np.sqrt(var + a["eps"]) * rest[0].reshape(shape) + rest[1].reshape(shape)
    if op.kind == "mean":
        return x.mean(axis=a["axis"])
    if op.kind == "transpose":
        return x.transpose(a["perm"])
    if op.kind == "reshape":
        return x.reshape(a["shape"])
    if op.kind == "conv2d":
        return _epilogue(op, _conv2d(x, rest.pop(0), a["stride"], a["groups"]), rest, 1)
    if op.kind == "conv2d_transpose":
        return _conv2d_transpose(x, rest[0], a["stride"], a["groups"])
    raise NotImplementedError(op.kind)


def interpret(graph: Graph, params: dict[str, np.ndarray], image: np.ndarray,
              dtype: type = np.float64) -> np.ndarray:
    """Runs the graph op by op; float64 by default so pass checks see only real differences."""
    env = {name: np.asarray(v, dtype) for name, v in params.items()}
    env[graph.input.name] = np.asarray(image, dtype)
    for op in graph.ops:
        out = run_op(op, [env[i] for i in op.inputs])
        assert out.shape == op.output.shape, (op.output.name, out.shape, op.output.shape)
        env[op.output.name] = out
    return env[graph.output]
