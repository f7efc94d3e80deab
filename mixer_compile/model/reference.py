"""The oracle: a NumPy float64 forward pass written straight from the paper's equations.

It shares no code with the IR, the passes or TVM on purpose: every compiled module is
checked against it, so a bug in our lowering cannot hide by being repeated here.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf

from mixer_compile.model.spec import MixerSpec


def gelu(x: np.ndarray, flavour: str) -> np.ndarray:
    # Python floats for the constants: a NumPy float64 scalar would widen a float32 `x`
    if flavour == "erf":
        return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def layer_norm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def forward(spec: MixerSpec, weights: dict[str, np.ndarray], images: np.ndarray,
            dtype: type = np.float64) -> np.ndarray:
    """Logits (B, classes) for NCHW images, computed in float64: the check of every build. In
    float32 (under np.errstate(over="raise")) it tells weights beyond float32's range, which no
    float32 build can follow, from a wrong build."""
    w = {k: np.asarray(v, dtype=dtype) for k, v in weights.items()}
    x = np.asarray(images, dtype=dtype)
    b, _, h, wd = x.shape
    p, (gh, gw) = spec.patch_size, spec.grid
    # Stem: non-overlapping PxP patches in raster order, each flattened as (row, col, channel).
    patches = x.reshape(b, spec.in_channels, gh, p, gw, p).transpose(0, 2, 4, 3, 5, 1)
    patches = patches.reshape(b, gh * gw, p * p * spec.in_channels)
    tokens = patches @ w["stem/kernel"].reshape(-1, spec.hidden_dim) + w["stem/bias"]  # (B, S, C)
    act, eps = spec.resolved_gelu, spec.layer_norm_eps
    for i in range(spec.num_blocks):
        pre = f"MixerBlock_{i}"
        # Token mixing acts on columns: each channel's S values go through the same MLP.
        y = layer_norm(tokens, w[f"{pre}/LayerNorm_0/scale"], w[f"{pre}/LayerNorm_0/bias"], eps)
        y = y.swapaxes(1, 2)  # (B, C, S)
        y = gelu(y @ w[f"{pre}/token_mixing/Dense_0/kernel"] + w[f"{pre}/token_mixing/Dense_0/bias"], act)
        y = y @ w[f"{pre}/token_mixing/Dense_1/kernel"] + w[f"{pre}/token_mixing/Dense_1/bias"]
        tokens = tokens + y.swapaxes(1, 2)
        # Channel mixing acts on rows: each token's C values go through the same MLP.
        y = layer_norm(tokens, w[f"{pre}/LayerNorm_1/scale"], w[f"{pre}/LayerNorm_1/bias"], eps)
        y = gelu(y @ w[f"{pre}/channel_mixing/Dense_0/kernel"] + w[f"{pre}/channel_mixing/Dense_0/bias"], act)
        tokens = tokens + y @ w[f"{pre}/channel_mixing/Dense_1/kernel"] + w[f"{pre}/channel_mixing/Dense_1/bias"]
    y = layer_norm(tokens, w["pre_head_layer_norm/scale"], w["pre_head_layer_norm/bias"], eps)
    return y.mean(axis=1) @ w["head/kernel"] + w["head/bias"]
