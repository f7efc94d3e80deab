"""Checkpoint formats, by file suffix, read into the canonical weight dict (model/params.py).

The canonical layout is the official JAX checkpoint's (flat keys joined by '/', Dense kernels
(in, out), the stem kernel HWIO), so an official `.npz` needs no conversion and every other
format is converted once, by its reader here, with every shape checked against the spec.
Adding a format is one reader module and one line in FORMATS. ONNX models are recognised
whole (spec and weights) by onnx_import.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mixer_compile.errors import WeightsError
from mixer_compile.model.params import Weights, check_weights, random_weights
from mixer_compile.model.spec import MixerSpec

FORMATS = {".npz": "jax", ".pth": "timm", ".pt": "timm", ".bin": "timm", ".safetensors": "timm"}


def checkpoint_format(path: str | Path) -> str:
    """The weights origin a file name stands for (jax or timm)."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise WeightsError(f"weights file '{path}' has unknown extension '{suffix}'; "
                           "expected .npz (official JAX) or .pth/.safetensors (timm)")
    return FORMATS[suffix]


def read_checkpoint(path: str | Path) -> tuple[Weights, str]:
    """A checkpoint's weights in the canonical keys, unchecked (no spec yet: see load_weights),
    and their origin (jax|timm), by the file's extension."""
    from mixer_compile.frontends import npz, timm  # one module per checkpoint family

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file '{path}' " + ("is not a file" if path.exists() else "does not exist"))
    origin = checkpoint_format(path)
    return (npz.read if origin == "jax" else timm.read)(path), origin


def load_weights(path: str | Path, spec: MixerSpec) -> tuple[Weights, str]:
    """Loads a checkpoint by extension; returns canonical weights checked against `spec`, and
    their origin (jax|timm)."""
    weights, origin = read_checkpoint(path)
    return check_weights(weights, spec, str(path)), origin


@dataclass
class InMemoryWeights:
    """Canonical weights read off a live model (torch_module.py) rather than a file."""

    weights: Weights
    origin: str  # the family whose layout they came in (timm), for the GELU default
    description: str  # what they were read from, for the progress line and the metadata


def weights_for(spec: MixerSpec, path: str | Path | InMemoryWeights | None,
                seed: int) -> tuple[Weights, MixerSpec, dict]:
    """The checkpoint at `path` (or weights already in memory), or the seeded random init; the
    spec with the GELU flavour of that origin (unless the spec set one); and a record of where
    the weights came from."""
    if isinstance(path, InMemoryWeights):
        weights = check_weights(path.weights, spec, path.description)
        return weights, spec.with_gelu_for(path.origin), {"origin": path.origin, "module": path.description}
    if path is not None:
        weights, origin = load_weights(path, spec)
        source: dict = {"origin": origin, "file": str(path)}
    else:
        weights, origin = random_weights(spec, seed), "random"
        source = {"origin": "random", "seed": seed}
    return weights, spec.with_gelu_for(origin), source
