"""Pattern helpers shared by the passes: follow single-consumer chains of ops."""

from __future__ import annotations

from typing import Callable, Iterator

from mixer_compile.ir.graph import Graph, Op


def chain(graph: Graph, first: Op, kinds: tuple[str, ...]) -> list[Op] | None:
    """The ops `first, c1, c2...` of the given kinds, each the only consumer of the previous."""
    if first.kind != kinds[0]:
        return None
    ops = [first]
    for kind in kinds[1:]:
        nxt = graph.only_consumer(ops[-1].output.name)
        if nxt is None or nxt.kind != kind or nxt.inputs[0] != ops[-1].output.name:
            return None
        ops.append(nxt)
    return ops


def replace_ops(graph: Graph, old: list[Op], new: list[Op]) -> None:
    """Puts `new` where the first of `old` was; the last new op takes over the last old output."""
    at = graph.ops.index(old[0])
    for op in old:
        graph.ops.remove(op)
    graph.ops[at:at] = new


def find_chains(graph: Graph, kinds: tuple[str, ...], accept: Callable[[list[Op]], bool]) -> Iterator[list[Op]]:
    """Every chain of `kinds` that `accept` takes; safe to rewrite each one as it is yielded."""
    for first in list(graph.ops):
        if first in graph.ops and (ops := chain(graph, first, kinds)) and accept(ops):
            yield ops
