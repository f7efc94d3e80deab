"""A readable text form of the graph, for `mixer-compile show` and for debugging passes."""

from __future__ import annotations

from mixer_compile.ir.graph import Graph, Param, Tensor


def _type(t: Tensor) -> str:
    dtype = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}.get(t.dtype, t.dtype)
    return f"{dtype}[{','.join(map(str, t.shape))}]" + (f" {t.layout}" if t.layout else "")


def _attr(value: object) -> str:
    if isinstance(value, tuple):
        return "(" + ",".join(map(str, value)) + ")"
    return str(value)


def _param(p: Param) -> str:
    expr = p.source
    for step, arg in p.steps:
        expr = f"{step}({expr}, {_attr(arg)})"
    return expr


def to_text(graph: Graph) -> str:
    lines = [f"graph {graph.name} {{  // {graph.meta.get('gelu', '')} GELU"]
    lines.append(f"  input %{graph.input.name}: {_type(graph.input)}")
    for name, p in graph.params.items():
        lines.append(f"  param %{name}: {_type(p.tensor)} = {_param(p)}")
    for op in graph.ops:
        attrs = ", ".join(f"{k}={_attr(v)}" for k, v in op.attrs.items() if v not in (None, False))
        args = ", ".join(f"%{i}" for i in op.inputs)
        lines.append(f"  %{op.output.name}: {_type(op.output)} = {op.kind}({args}"
                     + (f"; {attrs}" if attrs else "") + ")")
    lines.append(f"  return %{graph.output}")
    lines.append("}")
    return "\n".join(lines)
