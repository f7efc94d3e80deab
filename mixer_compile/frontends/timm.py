"""timm `MlpMixer` state dicts (.pth via torch.load(weights_only=True), or .safetensors).

torch Linear weights are (out, in) and the stem conv is OIHW; the canonical layout is the
JAX one, so every Dense kernel is transposed and the conv kernel permuted to HWIO.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from mixer_compile.errors import WeightsError

_BLOCK = re.compile(r"blocks\.(\d+)\.(norm1|norm2|mlp_tokens|mlp_channels)\.(?:(fc1|fc2)\.)?(weight|bias)$")
_MLP = {"mlp_tokens": "token_mixing", "mlp_channels": "channel_mixing"}
_NORM = {"norm1": "LayerNorm_0", "norm2": "LayerNorm_1"}
_TOP = {
    "stem.proj.weight": "stem/kernel", "stem.proj.bias": "stem/bias",
    "norm.weight": "pre_head_layer_norm/scale", "norm.bias": "pre_head_layer_norm/bias",
    "head.weight": "head/kernel", "head.bias": "head/bias",
}


def _read_state_dict(path: Path) -> dict[str, np.ndarray]:
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"weights file '{path}' is not a readable safetensors file ({exc})") from None
        # bfloat16 (common on the Hub) arrives as ml_dtypes' type, which NumPy does not call floating
        return {k: v.astype(np.float32) if v.dtype.name == "bfloat16" else v for k, v in state.items()}
    import pickle
    import warnings

    import torch

    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of files it then refuses
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        named = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        raise WeightsError(f"weights file '{path}' was refused: it pickles objects, not only tensors"
                           + (f" ({named.group(1)})" if named else "") + ", and loading those would run code "
                           "from the file; save the state dict instead (torch.save(model.state_dict(), path)) "
                           "or a .safetensors file") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise WeightsError(f"weights file '{path}' is not a readable torch checkpoint: truncated, or not written "
                           f"by torch.save ({_first_line(exc)})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file '{path}' does not hold a state dict of tensors")
    # Floating tensors become float32 (numpy has no bfloat16); anything else keeps its dtype,
    # so an integer tensor is refused by the shared check exactly as in an .npz.
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).numpy() for k, v in state.items()}


def _first_line(exc: BaseException) -> str:
    """The first line of a library's error, without terminal colour codes or torch's
    "(Could this error message be improved? ...)" request."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    text = text.split("(Could this error message be improved?")[0].strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _canonical_key(key: str) -> str | None:
    if key in _TOP:
        return _TOP[key]
    m = _BLOCK.match(key)
    if not m:
        return None
    i, part, fc, kind = m.groups()
    if part in _NORM:
        return f"MixerBlock_{i}/{_NORM[part]}/{'scale' if kind == 'weight' else 'bias'}"
    if fc is None:
        return None
    dense = "Dense_0" if fc == "fc1" else "Dense_1"
    return f"MixerBlock_{i}/{_MLP[part]}/{dense}/{'kernel' if kind == 'weight' else 'bias'}"


def to_state_dict(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The timm `MlpMixer` state dict of canonical weights (the inverse of `read`)."""
    inverse = {v: k for k, v in _TOP.items()}
    out = {}
    for name, value in weights.items():
        if name in inverse:
            key = inverse[name]
        else:
            block, part, *rest = name.split("/")
            i = block.removeprefix("MixerBlock_")
            if part.startswith("LayerNorm"):
                norm = {v: k for k, v in _NORM.items()}[part]
                key = f"blocks.{i}.{norm}.{'weight' if rest[0] == 'scale' else 'bias'}"
            else:
                mlp = {v: k for k, v in _MLP.items()}[part]
                fc = "fc1" if rest[0] == "Dense_0" else "fc2"
                key = f"blocks.{i}.{mlp}.{fc}.{'weight' if rest[1] == 'kernel' else 'bias'}"
        if name == "stem/kernel":
            value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        elif name.endswith("/kernel"):
            value = value.T
        out[key] = np.ascontiguousarray(value)
    return out


def read(path: Path) -> dict[str, np.ndarray]:
    """Canonical weights; keys that are not a Mixer's are kept as-is so the check names them."""
    return canonical(_read_state_dict(path), str(path))


def canonical(state: dict[str, np.ndarray], path: str) -> dict[str, np.ndarray]:
    """A timm `MlpMixer` state dict (NumPy arrays, torch layouts) in the canonical layout; keys
    that are not a Mixer's are kept as-is so the check names them. `path` names the source."""
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        name = _canonical_key(key.removeprefix("module."))
        if name is None:
            out[key] = value
        elif name == "stem/kernel":
            if value.ndim != 4:
                raise WeightsError(f"weights in {path}: '{key}' has shape {value.shape}; expected a 4-D conv kernel")
            out[name] = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif name.endswith("/kernel"):
            if value.ndim != 2:
                raise WeightsError(f"weights in {path}: '{key}' has shape {value.shape}; expected a 2-D matrix")
            out[name] = value.T
        else:
            out[name] = value
    return out
