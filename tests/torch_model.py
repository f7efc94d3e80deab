"""A plain PyTorch Mixer with timm's module names: the peer our outputs are compared with.

Used by the tests (an independent implementation besides the NumPy reference) and by the
benchmarks, which load it from here (PyTorch eager, torch.compile and, via torch.onnx, ONNX
Runtime run the very same weights as our module); not part of the package. Its state dict
loads into timm's own `MlpMixer` and back.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mixer_compile.frontends.timm import to_state_dict
from mixer_compile.model.spec import MixerSpec


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, approximate: str) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.act = nn.GELU(approximate=approximate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, spec: MixerSpec, approximate: str) -> None:
        super().__init__()
        c, eps = spec.hidden_dim, spec.layer_norm_eps
        self.norm1, self.norm2 = nn.LayerNorm(c, eps=eps), nn.LayerNorm(c, eps=eps)
        self.mlp_tokens = _Mlp(spec.tokens, spec.tokens_mlp_dim, approximate)
        self.mlp_channels = _Mlp(c, spec.channels_mlp_dim, approximate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.mlp_channels(self.norm2(x))


class _Stem(nn.Module):
    def __init__(self, spec: MixerSpec) -> None:
        super().__init__()
        p = spec.patch_size
        self.proj = nn.Conv2d(spec.in_channels, spec.hidden_dim, kernel_size=p, stride=p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, S, C), raster order


class TorchMixer(nn.Module):
    def __init__(self, spec: MixerSpec) -> None:
        super().__init__()
        approximate = "tanh" if spec.resolved_gelu == "tanh" else "none"
        self.stem = _Stem(spec)
        self.blocks = nn.Sequential(*[_Block(spec, approximate) for _ in range(spec.num_blocks)])
        self.norm = nn.LayerNorm(spec.hidden_dim, eps=spec.layer_norm_eps)
        self.head = nn.Linear(spec.hidden_dim, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.stem(x))).mean(dim=1))


def torch_mixer(spec: MixerSpec, weights: dict[str, np.ndarray]) -> TorchMixer:
    """A TorchMixer in eval mode holding the canonical `weights`."""
    model = TorchMixer(spec)
    state = {k: torch.from_numpy(v) for k, v in to_state_dict(weights).items()}
    model.load_state_dict(state, strict=True)
    return model.eval()
