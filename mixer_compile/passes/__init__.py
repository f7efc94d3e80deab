"""Graph rewrites. Each module holds one pass: `run(graph, ctx) -> (graph, changes)`, named as its file.

A pass never mutates its input graph; it returns a new one and a list of one-line
descriptions of what it changed, which the build reports. `pipeline.py` orders them;
`context.py` holds what a pass may know of the target (SIMD panel width, storage dtype).
"""
