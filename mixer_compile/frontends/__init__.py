"""Frontends: models given in other formats (ONNX) recognised into a MixerSpec + canonical weights."""
