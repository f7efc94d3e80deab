"""Canonical weights -> a checkpoint file in one of the formats `load_weights` reads.

The format follows the file's extension: `.npz` keeps the official JAX layout (already
canonical); `.pth`/`.pt`/`.bin` and `.safetensors` get timm's state-dict names and layouts.
Written atomically, so a failed write leaves no half checkpoint behind.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mixer_compile.util.atomic import atomic_path
from mixer_compile.frontends import checkpoint_format
from mixer_compile.frontends.timm import to_state_dict

def write_weights(weights: dict[str, np.ndarray], path: str | Path) -> Path:
    suffix = Path(path).suffix.lower()
    checkpoint_format(path)
    with atomic_path(path) as tmp:
        if suffix == ".npz":
            with open(tmp, "wb") as f:
                np.savez(f, **weights)
        elif suffix == ".safetensors":
            from safetensors.numpy import save_file

            save_file({k: np.ascontiguousarray(v) for k, v in to_state_dict(weights).items()}, str(tmp))
        else:
            import torch

            torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in to_state_dict(weights).items()}, tmp)
    return Path(path)
