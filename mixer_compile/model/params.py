"""The canonical weight table: every key with its shape, the checks a checkpoint must pass,
and the seeded random init.

The canonical layout is the official JAX checkpoint's (flat keys joined by '/', Dense kernels
(in, out), the stem kernel HWIO), so an official `.npz` needs no conversion and every other
format is converted once, here, with every shape checked against the spec.
"""

from __future__ import annotations

import numpy as np

from mixer_compile.errors import WeightsError
from mixer_compile.model.spec import MixerSpec

Weights = dict[str, np.ndarray]


def expected_shapes(spec: MixerSpec) -> dict[str, tuple[int, ...]]:
    """Every canonical key with the shape the spec implies."""
    c, s, p = spec.hidden_dim, spec.tokens, spec.patch_size
    ds, dc = spec.tokens_mlp_dim, spec.channels_mlp_dim
    shapes: dict[str, tuple[int, ...]] = {
        "stem/kernel": (p, p, spec.in_channels, c),
        "stem/bias": (c,),
    }
    for i in range(spec.num_blocks):
        b = f"MixerBlock_{i}"
        for ln in ("LayerNorm_0", "LayerNorm_1"):
            shapes[f"{b}/{ln}/scale"] = (c,)
            shapes[f"{b}/{ln}/bias"] = (c,)
        for mlp, n, hidden in (("token_mixing", s, ds), ("channel_mixing", c, dc)):
            shapes[f"{b}/{mlp}/Dense_0/kernel"] = (n, hidden)
            shapes[f"{b}/{mlp}/Dense_0/bias"] = (hidden,)
            shapes[f"{b}/{mlp}/Dense_1/kernel"] = (hidden, n)
            shapes[f"{b}/{mlp}/Dense_1/bias"] = (n,)
    shapes["pre_head_layer_norm/scale"] = (c,)
    shapes["pre_head_layer_norm/bias"] = (c,)
    shapes["head/kernel"] = (c, spec.num_classes)
    shapes["head/bias"] = (spec.num_classes,)
    return shapes


def _listing(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_kernel_rank(name: str, value: np.ndarray, source: str, key: str | None = None) -> None:
    """Refuses a kernel of the wrong rank as soon as it is read, before a transpose or the
    spec read off the shapes (spec_from_weights) trips over it: the stem conv kernel is 4-D,
    every Dense kernel 2-D. `name` is the canonical key; `key` the file's own, when it differs."""
    rank = 4 if name == "stem/kernel" else 2 if name.endswith("/kernel") else value.ndim
    if value.ndim != rank:
        raise WeightsError(f"weights in {source}: '{key or name}' has shape {value.shape}; expected a "
                           + ("4-D conv kernel" if rank == 4 else "2-D matrix"))


def check_weights(weights: Weights, spec: MixerSpec, source: str) -> Weights:
    """Refuses missing, extra, mis-shaped or non-finite weights; returns float32 copies."""
    shapes = expected_shapes(spec)
    missing = [k for k in shapes if k not in weights]
    extra = [k for k in weights if k not in shapes]
    wrong = [f"{k} {tuple(weights[k].shape)} (expected {shapes[k]})"
             for k in shapes if k in weights and tuple(weights[k].shape) != shapes[k]]
    problems = []
    if missing:
        problems.append(f"missing {_listing(missing)}")
    if extra:
        problems.append(f"unexpected {_listing(extra)}")
    if wrong:
        problems.append(f"wrong shape {_listing(wrong, 3)}")
    if problems:
        raise WeightsError(f"weights in {source} do not fit spec '{spec.name}' "
                           f"({spec.fingerprint()}): {'; '.join(problems)}")
    out = {}
    for k in shapes:
        v = weights[k]
        if not np.issubdtype(v.dtype, np.floating):
            raise WeightsError(f"weights in {source}: '{k}' has dtype {v.dtype}; expected floating point")
        v = np.ascontiguousarray(v, dtype=np.float32)
        if not np.isfinite(v).all():
            raise WeightsError(f"weights in {source}: '{k}' holds NaN or infinite values")
        out[k] = v
    return out


def random_weights(spec: MixerSpec, seed: int = 0) -> Weights:
    """A deterministic init with the scales of a trained Mixer (LayerNorm near identity)."""
    rng = np.random.default_rng(seed)
    out: Weights = {}
    for key, shape in expected_shapes(spec).items():
        if key.endswith("scale"):
            out[key] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif key.endswith("bias"):
            out[key] = (0.05 * rng.standard_normal(shape)).astype(np.float32)
        else:
            fan_in = int(np.prod(shape[:-1]))
            out[key] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    return out
