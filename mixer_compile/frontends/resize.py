"""Weights for a higher resolution (paper, Appendix C): token-mixing MLPs expanded block-diagonally.

The patch size stays; the image grows by integer factors (Kh, Kw), so the grid holds Kh x Kw
sub-images of the original size and S' = Kh*Kw*S tokens. Each token-mixing MLP gets one copy
of its pre-trained weights per sub-image (D_S' = Kh*Kw*D_S; W1, W2 block-diagonal, biases
tiled), so at initialisation every sub-image is mixed exactly as the original model mixes a
whole image. Sub-images are contiguous blocks of the large grid: sub-image (a, b) covers grid
rows a*gh .. (a+1)*gh-1 and columns b*gw .. (b+1)*gw-1. Tokens are in raster order over the
whole large grid, so copy k's rows and columns are scattered to its tokens' raster positions.
Everything else (stem, LayerNorms, channel mixing, head) is independent of S and is kept.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mixer_compile.util.atomic import write_bytes
from mixer_compile.errors import SpecError, WeightsError
from mixer_compile.model.spec import MixerSpec
from mixer_compile.frontends import load_weights
from mixer_compile.model.params import Weights
from mixer_compile.frontends import checkpoint_format
from mixer_compile.frontends.write import write_weights


def resized_spec(spec: MixerSpec, image_size: tuple[int, int]) -> MixerSpec:
    """The spec at `image_size`, which must be an integer multiple of the original per axis."""
    (h, w), (nh, nw) = spec.image_size, image_size
    if (nh, nw) == (h, w):
        raise SpecError(f"image size {nh}x{nw} is the model's own; give a larger one, e.g. {2 * h}x{2 * w}")
    if nh % h or nw % w or nh < h or nw < w:
        raise SpecError(f"image size {nh}x{nw} is not an integer multiple of {h}x{w}; "
                        f"use e.g. {2 * h}x{2 * w} (the paper grows the resolution by an integer factor K)")
    kh, kw = nh // h, nw // w
    name = f"{spec.name}_{nh}" if nh == nw else f"{spec.name}_{nh}x{nw}"
    return spec.replace(name=name, image_size=(nh, nw), tokens_mlp_dim=kh * kw * spec.tokens_mlp_dim)


def sub_image_tokens(spec: MixerSpec, large: MixerSpec) -> np.ndarray:
    """(K, S) raster positions in the large grid: row k lists sub-image k's tokens in its own raster order.

    Sub-images are numbered in raster order over the (Kh, Kw) arrangement.
    """
    gh, gw = spec.grid
    big_h, big_w = large.grid
    kh, kw = big_h // gh, big_w // gw
    rows = np.arange(kh)[:, None, None, None] * gh + np.arange(gh)[None, None, :, None]
    cols = np.arange(kw)[None, :, None, None] * gw + np.arange(gw)[None, None, None, :]
    return (rows * big_w + cols).reshape(kh * kw, gh * gw)


def resize_weights(weights: Weights, spec: MixerSpec, image_size: tuple[int, int]) -> tuple[Weights, MixerSpec]:
    """Canonical weights and spec for `image_size`; the token-mixing MLPs expanded block-diagonally."""
    large = resized_spec(spec, image_size)
    pos = sub_image_tokens(spec, large)
    k, ds, s_big = pos.shape[0], spec.tokens_mlp_dim, large.tokens
    out = dict(weights)
    for i in range(spec.num_blocks):
        pre = f"MixerBlock_{i}/token_mixing"
        w1, b1 = weights[f"{pre}/Dense_0/kernel"], weights[f"{pre}/Dense_0/bias"]
        w2, b2 = weights[f"{pre}/Dense_1/kernel"], weights[f"{pre}/Dense_1/bias"]
        big_w1 = np.zeros((s_big, k * ds), w1.dtype)
        big_w2 = np.zeros((k * ds, s_big), w2.dtype)
        big_b2 = np.zeros(s_big, b2.dtype)
        for copy, tokens in enumerate(pos):
            hidden = slice(copy * ds, (copy + 1) * ds)
            big_w1[tokens, hidden] = w1
            big_w2[hidden, tokens] = w2
            big_b2[tokens] = b2
        out[f"{pre}/Dense_0/kernel"], out[f"{pre}/Dense_0/bias"] = big_w1, np.tile(b1, k)
        out[f"{pre}/Dense_1/kernel"], out[f"{pre}/Dense_1/bias"] = big_w2, big_b2
    return out, large


def resize_checkpoint(path: Path, spec: MixerSpec, image_size: tuple[int, int], out: Path,
                      spec_file: Path | None = None) -> tuple[MixerSpec, Path]:
    """Reads a checkpoint, writes the expanded one to `out` in the same format and its spec beside it.

    Returns the new spec and the path of its JSON file (`out` with the suffix .json). Neither
    may be an input (the checkpoint, `spec_file`): both are refused before anything is written.
    """
    spec_path = out.with_suffix(".json")
    if out.resolve() == path.resolve():
        raise WeightsError(f"output '{out}' is the input checkpoint; write the resized one to another file "
                           f"(e.g. '{out.with_name(out.stem + '_resized' + out.suffix)}')")
    if spec_file is not None and spec_path.resolve() == spec_file.resolve():
        raise WeightsError(f"the resized spec would be written over the input spec '{spec_file}'; name the "
                           f"output otherwise (e.g. '{out.with_name(out.stem + '_resized' + out.suffix)}')")
    if out.is_dir() or spec_path.is_dir():
        raise WeightsError(f"'{out if out.is_dir() else spec_path}' is a directory; -o names the checkpoint to "
                           f"write (e.g. '{out.with_suffix(path.suffix).name}'), its spec goes beside it as .json")
    if checkpoint_format(out) != checkpoint_format(path):
        raise WeightsError(f"output '{out}' must have the input's checkpoint format ({path.suffix}); "
                           f"name it e.g. '{out.with_suffix(path.suffix)}'")
    weights, _ = load_weights(path, spec)
    big, large = resize_weights(weights, spec, image_size)
    text = (json.dumps(large.to_dict(), indent=2) + "\n").encode()
    # a .json beside a checkpoint `out` replaced is that checkpoint's spec; one alone may be the user's
    if spec_path.is_file() and not out.exists() and spec_path.read_bytes() != text:
        raise WeightsError(f"'{spec_path}' exists, and is no spec of a checkpoint '{out.name}'; move it or name the "
                           f"output otherwise (the spec goes beside the checkpoint as {spec_path.name})")
    write_weights(big, out)
    write_bytes(spec_path, text)
    return large, spec_path
