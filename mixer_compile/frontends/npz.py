"""Official JAX checkpoints (google-research/vision_transformer `.npz`): already canonical."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from mixer_compile.errors import WeightsError


def read(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            weights = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise WeightsError(f"weights file '{path}' is not a readable .npz archive ({exc})") from None
    if any("/kernel" in k and "MixerBlock" in k and "token_mixing" not in k and "channel_mixing" not in k
           for k in weights):
        found = sorted(k for k in weights if k.startswith("MixerBlock_0/"))
        raise WeightsError(f"weights file '{path}' uses an unsupported Mixer key layout "
                           f"(found {', '.join(found[:6])}); supported: the released "
                           "MixerBlock_i/token_mixing/Dense_{0,1} layout")
    return weights
