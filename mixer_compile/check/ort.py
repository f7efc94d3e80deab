"""ONNX Runtime as a peer: runs an ONNX Mixer on images so our outputs can be compared with it.

Used by `export-onnx` (our exported file against the float64 reference) and by ONNX import
(our compiled module against the very file it came from).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from mixer_compile.errors import MixerCompileError


def session(model: onnx.ModelProto | str | Path):
    """A CPU inference session; a model ONNX Runtime refuses is a user error, not a crash."""
    import onnxruntime as ort

    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MixerCompileError(f"ONNX Runtime cannot load the model: {first}") from None


def run(sess, images: np.ndarray) -> np.ndarray:
    """The logits of NCHW float32 `images` (the session's only input and first output)."""
    name = sess.get_inputs()[0].name
    return sess.run(None, {name: np.ascontiguousarray(images, np.float32)})[0]
