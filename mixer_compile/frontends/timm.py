"""timm `MlpMixer` state dicts (.pth via torch.load(weights_only=True), or .safetensors).

torch Linear weights are (out, in) and the stem conv is OIHW; the canonical layout is the
JAX one, so every Dense kernel is transposed and the conv kernel permuted to HWIO.
"""

from __future__ import annotations

import re
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mixer_compile.errors import WeightsError
from mixer_compile.frontends.archive import first_line
from mixer_compile.model.params import check_kernel_rank

_BLOCK = re.compile(r"blocks\.(\d+)\.(norm1|norm2|mlp_tokens|mlp_channels)\.(?:(fc1|fc2)\.)?(weight|bias)$")
_MLP = {"mlp_tokens": "token_mixing", "mlp_channels": "channel_mixing"}
_NORM = {"norm1": "LayerNorm_0", "norm2": "LayerNorm_1"}
_TOP = {
    "stem.proj.weight": "stem/kernel", "stem.proj.bias": "stem/bias",
    "norm.weight": "pre_head_layer_norm/scale", "norm.bias": "pre_head_layer_norm/bias",
    "head.weight": "head/kernel", "head.bias": "head/bias",
}


def _read_state_dict(path: Path) -> dict[str, np.ndarray]:
    state = _load_safetensors(path) if path.suffix.lower() == ".safetensors" else _load_torch(path)
    return to_numpy(state, str(path))


def _load_safetensors(path: Path) -> dict[str, Any]:
    """The file's tensors through safetensors' torch backend: its NumPy one cannot make
    bfloat16 (or fp8) arrays, and torch converts those to float32 in to_numpy."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            state = {}
            for key in f.keys():
                try:
                    state[key] = f.get_tensor(key)
                except SafetensorError:  # a dtype this torch has no type for (F6_E2M3...)
                    raise _dtype_error(key, f.get_slice(key).get_dtype(), str(path)) from None
            return state
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"weights file '{path}' is not a readable safetensors file ({exc})") from None


def _load_torch(path: Path) -> dict[str, Any]:
    """The state dict of a torch.save file (also unwrapped from {"state_dict": ...} or
    {"model": ...}), loaded with weights_only so that no pickled code runs."""
    import pickle
    import warnings

    import torch

    _check_crcs(path)
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
                           f"by torch.save ({first_line(exc)})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file '{path}' does not hold a state dict of tensors")
    return state


def _check_crcs(path: Path) -> None:
    """Refuses a torch.save zip whose members fail their CRC-32, naming the damaged one: torch.load
    checks none, so damaged tensor bytes would load as wrong weights. One sequential read."""
    if not zipfile.is_zipfile(path):
        return  # the legacy format (a bare pickle, no CRCs), or a truncated zip: torch.load says which
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()  # reads every member to its end, which checks its CRC-32
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as exc:
        raise WeightsError(f"weights file '{path}' is damaged ({exc}); download or save it again") from None
    if damaged is not None:
        raise WeightsError(f"weights file '{path}' is damaged (Bad CRC-32 for file {damaged!r}); download or save "
                           "it again")


def to_numpy(state: Mapping[str, Any], source: str) -> dict[str, np.ndarray]:
    """A state dict's torch tensors as NumPy arrays, on the CPU. Floating tensors become
    float32 (NumPy has no bfloat16 or fp8); anything else keeps its dtype, so that an integer
    tensor is refused by the shared check exactly as in an .npz. Tensors that are not plain
    dense arrays (quantized, sparse, meta) are refused here, naming the key; `source` names
    where the state dict came from."""
    import torch

    out = {}
    for key, value in state.items():
        if value.is_quantized:
            problem, fix = f"a quantized tensor ({_dtype_name(value)})", "tensor.dequantize()"
        elif value.layout != torch.strided:
            problem, fix = f"a sparse tensor ({str(value.layout).removeprefix('torch.')})", "tensor.to_dense()"
        elif value.is_meta:
            problem, fix = "a meta tensor, with no data", "those of a model whose weights are loaded"
        else:
            problem = None
        if problem:
            raise WeightsError(f"weights in {source}: '{key}' is {problem}; save dense float weights ({fix})")
        value = value.detach()
        try:
            out[key] = (value.float() if value.is_floating_point() else value).cpu().numpy()
        except (TypeError, RuntimeError):  # float4_e2m1fn_x2 and other packed types torch cannot widen
            raise _dtype_error(key, _dtype_name(value), source) from None
    return out


def _dtype_name(tensor: Any) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _dtype_error(key: str, dtype: str, source: str) -> WeightsError:
    return WeightsError(f"weights in {source}: '{key}' has dtype {dtype}, which cannot be read as float32; "
                        "save the weights in float32, float16 or bfloat16")


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
            continue
        check_kernel_rank(name, value, path, key)
        if name == "stem/kernel":
            out[name] = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif name.endswith("/kernel"):
            out[name] = value.T
        else:
            out[name] = value
    return out
