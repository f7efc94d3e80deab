"""Tokens-major layout: remove every transpose by contracting along the axis in place.

The literal Mixer transposes (B, S, C) -> (B, C, S) around token mixing. A dense layer
along the last axis of a transposed tensor is the same as one along the matching axis of
the original, so transposes are sunk through dense, bias and GELU ops (axes remapped) until
they meet their inverse and both vanish. Token mixing is then a left product
W^T (D_S x S) . X (S x C), and its kernels are stored transposed (NK) once, at build time.
"""

from __future__ import annotations

import dataclasses

from mixer_compile.ir.graph import Graph, Op, Tensor
from mixer_compile.passes.context import PassContext

SINKABLE = ("dense", "bias_add", "gelu")


def _unpermute(t: Tensor, perm: tuple[int, ...], name: str) -> Tensor:
    """The tensor whose transpose by `perm` is `t`."""
    shape, layout = [0] * len(perm), [""] * len(perm)
    for i, p in enumerate(perm):
        shape[p] = t.shape[i]
        layout[p] = t.layout[i] if t.layout else ""
    return dataclasses.replace(t, name=name, shape=tuple(shape), layout="".join(layout))


def _sink_one(g: Graph) -> str | None:
    """Moves one transpose below its only consumer; returns a description, or None if none can."""
    for t in g.ops:
        if t.kind != "transpose":
            continue
        op = g.only_consumer(t.output.name)
        if op is None or op.kind not in SINKABLE or op.inputs[0] != t.output.name:
            continue
        perm = t.attrs["perm"]
        attrs = dict(op.attrs)
        if "axis" in attrs:
            attrs["axis"] = perm[attrs["axis"]]
        if "axes" in attrs:
            attrs["axes"] = tuple(perm[a] for a in attrs["axes"])
        moved = Op(op.kind, [t.inputs[0]] + op.inputs[1:],
                   _unpermute(op.output, perm, op.output.name + ".t"), attrs)
        after = Op("transpose", [moved.output.name], op.output, {"perm": perm})
        at = g.ops.index(op)
        g.ops[at:at + 1] = [moved, after]
        g.ops.remove(t)
        return f"moved transpose{perm} below {op.kind} %{op.output.name}"
    return None


def _cancel_pair(g: Graph) -> str | None:
    """Removes a transpose followed by its inverse."""
    for t2 in g.ops:
        if t2.kind != "transpose":
            continue
        t1 = next((o for o in g.ops if o.output.name == t2.inputs[0]), None)
        if t1 is None or t1.kind != "transpose":
            continue
        composed = tuple(t1.attrs["perm"][i] for i in t2.attrs["perm"])
        if composed != tuple(range(len(composed))):
            continue
        g.replace_uses(t2.output.name, t1.inputs[0])
        g.ops.remove(t2)
        if not g.consumers(t1.output.name):
            g.ops.remove(t1)
        return f"cancelled transpose pair at %{t2.output.name}"
    return None


def _left_products(g: Graph) -> list[str]:
    """Dense ops contracting the second-to-last axis read an (N, K) kernel: W . X."""
    changes = []
    for op in g.ops:
        ndim = len(op.output.shape)
        if op.kind == "dense" and op.attrs["axis"] == ndim - 2 and op.attrs["kernel_layout"] == "KN":
            name = op.inputs[1]
            k, n = g.params[name].tensor.shape
            g.params[name] = g.params[name].with_step("transpose", (1, 0), (n, k), "NK")
            op.attrs["kernel_layout"] = "NK"
            changes.append(f"%{op.output.name}: left product, kernel %{name} stored (N, K)")
    return changes


def run(graph: Graph, ctx: PassContext) -> tuple[Graph, list[str]]:
    g = graph.copy()
    moved = cancelled = 0
    while True:
        if _sink_one(g):
            moved += 1
        elif _cancel_pair(g):
            cancelled += 1
        else:
            break
    changes = [f"sank {moved} transposes; removed {2 * cancelled} transposes in inverse pairs"] if moved else []
    changes += _left_products(g)
    left = sum(op.kind == "transpose" for op in g.ops)
    if changes:
        changes.append(f"{left} transposes remain")
    return g, changes
