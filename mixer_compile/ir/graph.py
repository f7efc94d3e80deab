"""The graph IR: typed tensors, a topologically ordered list of ops, and derived parameters.

Deliberately small. A Graph is a straight-line program over named tensors: one image input,
parameters, ops in execution order, one output. Parameters are *derived* from the canonical
checkpoint weights by a short chain of data-movement steps (transpose, reshape, tile); passes
that change a weight's layout (e.g. store a kernel transposed, or tie a conv kernel across
channels) edit that chain, so the weights are re-laid once at build time, never per call.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

# Every op kind and its meaning (the interpreter and the lowering implement each one):
#   patchify(image)                    NCHW image -> (B, S, P*P*Cin) patches in raster order
#   dense(x, kernel[, bias][, residual])  contract `axis` of x with kernel; optional fused
#                                      bias, gelu (its flavour: tanh|erf), residual add
#   bias_add(x, b)                     x + b broadcast over `axes` (b.shape == x.shape[axes])
#   gelu(x)                            flavour tanh|erf
#   add(x, y)                          elementwise
#   layer_norm(x, scale, bias)         over `axis`, epsilon `eps`
#   mean(x)                            over `axis`, dropping it
#   transpose(x) / reshape(x)          `perm` / `shape`
#   conv2d(x, kernel[, bias])          NCHW, OIHW kernel, `stride`, `groups`, no padding; fused
#                                      bias and gelu as for dense
#   conv2d_transpose(x, kernel)        NCHW, IOHW kernel, `stride`, `groups`, no padding
OP_KINDS = ("patchify", "dense", "bias_add", "gelu", "add", "layer_norm", "mean", "transpose",
            "reshape", "conv2d", "conv2d_transpose")


@dataclass(frozen=True)
class Tensor:
    """A value: its shape, dtype and layout (one letter per axis, e.g. BSC = tokens-major)."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    layout: str = ""


@dataclass(frozen=True)
class Param:
    """A parameter tensor derived from one canonical checkpoint weight.

    `steps` is a chain of ("transpose", perm) | ("reshape", shape) | ("tile", reps) applied
    to `source` in order.
    """

    tensor: Tensor
    source: str
    steps: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def with_step(self, step: str, arg: tuple[int, ...], shape: tuple[int, ...], layout: str) -> "Param":
        tensor = dataclasses.replace(self.tensor, shape=shape, layout=layout)
        return Param(tensor, self.source, self.steps + ((step, tuple(arg)),))

    def materialize(self, weights: dict[str, np.ndarray]) -> np.ndarray:
        value = weights[self.source]
        for step, arg in self.steps:
            if step == "transpose":
                value = value.transpose(arg)
            elif step == "reshape":
                value = value.reshape(arg)
            elif step == "tile":
                value = np.tile(value, arg)
            else:
                raise ValueError(f"unknown param step {step}")
        assert value.shape == self.tensor.shape, (self.tensor.name, value.shape, self.tensor.shape)
        return np.ascontiguousarray(value, dtype=self.tensor.dtype)


@dataclass
class Op:
    kind: str
    inputs: list[str]
    output: Tensor
    attrs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert self.kind in OP_KINDS, self.kind


@dataclass
class Graph:
    name: str
    input: Tensor
    params: dict[str, Param]
    ops: list[Op]
    output: str
    # Facts about the model that passes and lowerings need (grid, gelu flavour, spec...).
    meta: dict[str, Any] = field(default_factory=dict)

    def tensor(self, name: str) -> Tensor:
        if name == self.input.name:
            return self.input
        if name in self.params:
            return self.params[name].tensor
        return self.producer(name).output

    def producer(self, name: str) -> Op:
        for op in self.ops:
            if op.output.name == name:
                return op
        raise KeyError(name)

    def consumers(self, name: str) -> list[Op]:
        return [op for op in self.ops if name in op.inputs]

    def only_consumer(self, name: str) -> Op | None:
        """The single op reading `name`, or None if it is read by several or is the output."""
        users = self.consumers(name)
        return users[0] if len(users) == 1 and name != self.output else None

    def replace_uses(self, old: str, new: str) -> None:
        for op in self.ops:
            op.inputs = [new if i == old else i for i in op.inputs]
        if self.output == old:
            self.output = new

    def remove_unused_params(self) -> None:
        used = {i for op in self.ops for i in op.inputs}
        self.params = {k: p for k, p in self.params.items() if k in used}

    def copy(self) -> "Graph":
        ops = [Op(op.kind, list(op.inputs), op.output, dict(op.attrs)) for op in self.ops]
        return Graph(self.name, self.input, dict(self.params), ops, self.output, dict(self.meta))

    def materialize_params(self, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The arrays of every graph parameter, in `params` order."""
        return {name: p.materialize(weights) for name, p in self.params.items()}

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for op in self.ops:
            counts[op.kind] = counts.get(op.kind, 0) + 1
        return counts

    def __iter__(self) -> Iterator[Op]:
        return iter(self.ops)
