"""Graph rewrites. Each module holds one pass: `run(graph) -> (graph, changes)`.

A pass never mutates its input graph; it returns a new one and a list of one-line
descriptions of what it changed, which the build reports. `pipeline.py` orders them.
"""
