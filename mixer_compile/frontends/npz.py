"""Official JAX checkpoints (google-research/vision_transformer `.npz`): already canonical."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from mixer_compile.errors import WeightsError
from mixer_compile.model.params import check_kernel_rank


def read(path: Path) -> dict[str, np.ndarray]:
    """The archive's arrays by key, each kernel's rank checked (a spec is read off their shapes)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            weights = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise WeightsError(f"weights file '{path}' is not a readable .npz archive ({exc})") from None
    stray = [k for k, v in weights.items() if not isinstance(v, np.ndarray)]  # non-.npy members come as bytes
    if stray:
        torch_zip = any(k.endswith("data.pkl") for k in stray)
        hint = "a torch checkpoint? rename it to .pth" if torch_zip else "save one with np.savez"
        raise WeightsError(f"weights file '{path}' is not an .npz archive of arrays: '{stray[0]}' is not a .npy "
                           f"array ({hint})")
    if any("/kernel" in k and "MixerBlock" in k and "token_mixing" not in k and "channel_mixing" not in k
           for k in weights):
        found = sorted(k for k in weights if k.startswith("MixerBlock_0/"))
        raise WeightsError(f"weights file '{path}' uses an unsupported Mixer key layout "
                           f"(found {', '.join(found[:6])}); supported: the released "
                           "MixerBlock_i/token_mixing/Dense_{0,1} layout")
    for key, value in weights.items():
        check_kernel_rank(key, value, str(path))
    return weights
