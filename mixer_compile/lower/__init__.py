"""Lowerings of the graph IR to executable forms (TVM Relax; ONNX)."""
