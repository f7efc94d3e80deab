"""Pictures of token-mixing units (paper, section 3.4 and Figure 5).

Each hidden unit of a token-mixing MLP's first layer has one input weight per patch, so its
weights (a column of `Dense_0/kernel`, S values in raster order) are an (H/P x W/P) image.
As in the paper, units are paired with the unit of most opposite phase (the most negative
correlation) and the pairs are sorted by spatial frequency, low to high; pairs sit side by
side, tiles are separated by a blank line. The colours use one symmetric scale for the whole
picture, so every pixel is a weight as it is, not rescaled per tile.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mixer_compile.util.atomic import atomic_path
from mixer_compile.errors import MixerCompileError
from mixer_compile.model.spec import MixerSpec

CMAP = "RdBu_r"


def pair_by_phase(units: np.ndarray) -> list[tuple[int, ...]]:
    """Pairs of units of opposite phase: greedily the most anti-correlated pair of free units first.

    Each pair is listed in column order, pairs in the order they were formed; an odd unit out
    (or one with constant weights, correlated with nothing) is left alone at the end.
    """
    z = units - units.mean(axis=0)
    norms = np.linalg.norm(z, axis=0)
    z = z / np.where(norms > 1e-12, norms, np.inf)
    corr = z.T @ z
    n = units.shape[1]
    i, j = np.triu_indices(n, k=1)
    free = set(range(n))
    pairs: list[tuple[int, ...]] = []
    for k in np.argsort(corr[i, j], kind="stable"):
        a, b = int(i[k]), int(j[k])
        if a in free and b in free and corr[a, b] < 0:
            pairs.append((a, b))
            free -= {a, b}
    return pairs + [(u,) for u in sorted(free)]


def frequency(tile: np.ndarray) -> float:
    """Spectral centroid of a tile: the mean spatial frequency weighted by the FFT magnitude."""
    mag = np.abs(np.fft.fft2(tile - tile.mean()))
    fy = np.fft.fftfreq(tile.shape[0])[:, None]
    fx = np.fft.fftfreq(tile.shape[1])[None, :]
    radius = np.sqrt(fy**2 + fx**2)
    return float((mag * radius).sum() / max(mag.sum(), 1e-12))


def unit_order(kernel: np.ndarray, grid: tuple[int, int]) -> list[int]:
    """The paper's order of the kernel's columns: opposite-phase pairs sorted by frequency, then
    the units left unpaired (so pairs stay side by side in a grid with an even column count)."""
    pairs = pair_by_phase(kernel)
    key = [(len(pair) == 1, np.mean([frequency(kernel[:, u].reshape(grid)) for u in pair])) for pair in pairs]
    return [u for _, pair in sorted(zip(key, pairs), key=lambda t: t[0]) for u in pair]


def assemble(kernel: np.ndarray, grid: tuple[int, int], columns: int | None = None) -> tuple[np.ndarray, list[int], int]:
    """The picture as an array (NaN between tiles), the unit shown in each tile, and the column count.

    Tile t (row t // columns, column t % columns) is unit order[t], at rows
    r*(gh+1) .. r*(gh+1)+gh-1 and columns c*(gw+1) .. c*(gw+1)+gw-1.
    """
    n = kernel.shape[1]
    columns = min(columns or 2 * max(1, math.ceil(math.sqrt(n / 2))), n)  # no empty columns
    if columns % 2 and n > 1:
        columns += 1  # pairs stay side by side
    order = unit_order(kernel, grid)
    gh, gw = grid
    rows = math.ceil(n / columns)
    out = np.full((rows * (gh + 1) - 1, columns * (gw + 1) - 1), np.nan)
    for t, unit in enumerate(order):
        r, c = divmod(t, columns)
        out[r * (gh + 1):r * (gh + 1) + gh, c * (gw + 1):c * (gw + 1) + gw] = kernel[:, unit].reshape(grid)
    return out, order, columns


def token_mixing_units(weights: dict[str, np.ndarray], spec: MixerSpec, block: int, units: int) -> np.ndarray:
    """The first `units` columns of a block's token-mixing Dense_0 kernel, (S, units)."""
    if not 0 <= block < spec.num_blocks:
        raise MixerCompileError(f"block {block} does not exist; spec '{spec.name}' has blocks 0..{spec.num_blocks - 1}")
    if units < 1:
        raise MixerCompileError(f"--units must be at least 1, got {units}")
    kernel = weights[f"MixerBlock_{block}/token_mixing/Dense_0/kernel"]
    return kernel[:, :min(units, kernel.shape[1])].astype(np.float64)


MAX_PIXELS = 100 * 10**6  # a PNG beyond this is no picture anyone looks at, and takes GBs to draw


def save_picture(picture: np.ndarray, out: str | Path, scale: int = 8) -> tuple[int, int]:
    """Writes the picture as a PNG, each weight a `scale` x `scale` block; returns (height, width) in pixels."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import colormaps
    from matplotlib.image import imsave

    if scale < 1:
        raise MixerCompileError(f"--scale must be at least 1, got {scale}")
    height, width = picture.shape[0] * scale, picture.shape[1] * scale
    if height * width > MAX_PIXELS:
        fits = max(1, int((MAX_PIXELS / picture.size) ** 0.5))
        raise MixerCompileError(f"--scale {scale} makes a {width}x{height} picture (over {MAX_PIXELS // 10**6} "
                                f"megapixels); use --scale {fits} or less, or fewer --units")
    if Path(out).suffix.lower() != ".png":
        raise MixerCompileError(f"output '{out}' must be a .png file")
    limit = float(np.nanmax(np.abs(picture))) or 1.0
    big = np.kron(picture, np.ones((scale, scale)))
    cmap = colormaps[CMAP].with_extremes(bad="white")
    with atomic_path(out) as tmp:
        imsave(tmp, np.ma.masked_invalid(big), cmap=cmap, vmin=-limit, vmax=limit, format="png")
    return big.shape
