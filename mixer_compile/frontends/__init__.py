"""Checkpoint formats, by file suffix, read into the canonical weight dict (model/params.py).

The canonical layout is the official JAX checkpoint's (flat keys joined by '/', Dense kernels
(in, out), the stem kernel HWIO), so an official `.npz` needs no conversion and every other
format is converted once, by its reader here, with every shape checked against the spec.
Adding a format is one reader module and one line in FORMATS. ONNX models are recognised
whole (spec and weights) by onnx_import.py.
"""

from __future__ import annotations

import zipfile
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
    _refuse_non_checkpoint(path)
    return (npz.read if origin == "jax" else timm.read)(path), origin


# What each format's files start with; a file that starts otherwise is not one, whatever its reader
# would guess (torch's reads any bytes as a pickle, NumPy's any non-zip as a pickled object).
_TORCH = ("a torch checkpoint", (b"PK", b"\x80"), "save one with torch.save(model.state_dict(), path)")
_SIGNATURES = {".npz": ("a readable .npz archive", (b"PK",), "save one with np.savez"),
               ".pth": _TORCH, ".pt": _TORCH, ".bin": _TORCH}


def _refuse_non_checkpoint(path: Path) -> None:
    """Refuses, by its first bytes, a file that is no checkpoint at all (a Git LFS pointer, a
    web page saved by a failed download, a TorchScript archive, text), saying what it is and what
    to do: the format readers would report these as a pickle, a truncated file or worse."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"version https://git-lfs"):
        what = "it is a Git LFS pointer (run `git lfs pull`)"
    elif head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        what = "it looks like an HTML page (a download that failed? download the file itself)"
    elif head.startswith(b"\x93NUMPY"):
        what = "it is a single NumPy array (.npy); save the weights dict with np.savez"
    elif head.startswith(b"PK") and _is_torchscript(path):
        what = "it is a TorchScript archive; save model.state_dict() with torch.save"
    else:
        name, starts, fix = _SIGNATURES.get(path.suffix.lower(), (None, (), None))
        # empty files are left to the readers ("truncated"); b"ustar": the legacy .tar torch.save
        if name and head and not head.startswith(starts) and head[257:262] != b"ustar":
            raise WeightsError(f"weights file '{path}' is not {name} (it starts with {head[:16]!r}); {fix}")
        return
    raise WeightsError(f"weights file '{path}' is not a checkpoint: {what}")


def _is_torchscript(path: Path) -> bool:
    """Whether a zip file is a TorchScript archive (torch.jit.save), as torch itself tells."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False  # a truncated zip: the reader says so


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
