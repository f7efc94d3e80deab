"""The graph IR of a Mixer: build it from a spec, run it in NumPy, print it."""

from mixer_compile.ir.build import build_graph
from mixer_compile.ir.graph import Graph, Op, Param, Tensor
from mixer_compile.ir.interpret import interpret
from mixer_compile.ir.text import to_text

__all__ = ["Graph", "Op", "Param", "Tensor", "build_graph", "interpret", "to_text"]
