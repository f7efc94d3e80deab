"""Weight pictures: the tiles are the token-mixing weights, in the paper's paired order."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from matplotlib import colormaps
from matplotlib.image import imread

from mixer_compile.cli import main
from mixer_compile.model.spec import MixerSpec
from mixer_compile.tools.viz import CMAP, assemble, pair_by_phase, unit_order
from mixer_compile.model.params import random_weights
from mixer_compile.frontends.write import write_weights


@pytest.fixture
def spec() -> MixerSpec:
    """A 3x4 grid (non-square, so a transposed tile cannot pass), 10 token-mixing units."""
    return MixerSpec("viz", (24, 32), 8, 16, 10, 32, 2, num_classes=5)


def test_pairs_are_opposite_phase_and_sorted_by_frequency():
    grid = (4, 4)
    yy, xx = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    slow, fast = np.cos(np.pi * xx / 3), np.cos(np.pi * (xx + yy))
    flat = np.ones((4, 4))  # correlated with nothing: left unpaired, drawn last
    kernel = np.stack([fast, flat, slow, -fast, 0.5 - slow], axis=-1).reshape(16, 5)
    assert pair_by_phase(kernel) == [(0, 3), (2, 4), (1,)]
    assert unit_order(kernel, grid) == [2, 4, 0, 3, 1]  # the low-frequency pair first


def test_tiles_hold_the_weights(spec):
    kernel = random_weights(spec, seed=5)["MixerBlock_1/token_mixing/Dense_0/kernel"].astype(np.float64)
    picture, order, columns = assemble(kernel, spec.grid, columns=4)
    assert sorted(order) == list(range(10)) and columns == 4
    assert picture.shape == (3 * 4 - 1, 4 * 5 - 1)  # 3 rows of 4 tiles, 3x4 each, 1-pixel gaps
    for t, unit in enumerate(order):
        r, c = divmod(t, columns)
        np.testing.assert_array_equal(picture[r * 4:r * 4 + 3, c * 5:c * 5 + 4], kernel[:, unit].reshape(3, 4))
    assert np.isnan(picture[3, :]).all() and np.isnan(picture[:, 4]).all()
    assert np.isnan(picture[8:, 10:]).all()  # tiles 10 and 11 are empty
    assert assemble(kernel, spec.grid, columns=100)[2] == 10  # no columns beyond the units


def test_cli_png_pixels_are_the_weights(spec, tmp_path, capsys):
    w = random_weights(spec, seed=6)
    ckpt = write_weights(w, tmp_path / "w.npz")
    spec_file = tmp_path / "viz.json"
    spec_file.write_text(json.dumps(spec.to_dict()))
    out = tmp_path / "units.png"
    rc = main(["viz", "--weights", str(ckpt), "--spec", str(spec_file), "--block", "0", "--units", "6",
               "--columns", "2", "--scale", "3", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    png = imread(out)
    assert png.shape[:2] == ((3 * 4 - 1) * 3, (2 * 5 - 1) * 3)  # 3x2 tiles of 3x4, 3 px per weight
    kernel = w["MixerBlock_0/token_mixing/Dense_0/kernel"][:, :6].astype(np.float64)
    _, order, _ = assemble(kernel, spec.grid, 2)
    limit = np.abs(kernel).max()
    tile = kernel[:, order[3]].reshape(3, 4)  # row 1, column 1
    expected = colormaps[CMAP]((tile + limit) / (2 * limit))[..., :3]
    got = png[4 * 3:4 * 3 + 9:3, 5 * 3:5 * 3 + 12:3, :3]
    assert np.abs(got - expected).max() <= 1 / 255 + 1e-6
    assert (png[3 * 3, :, :3] == 1.0).all()  # the gap row is white


def test_block_out_of_range_is_refused(spec, tmp_path, capsys):
    ckpt = write_weights(random_weights(spec), tmp_path / "w.npz")
    spec_file = tmp_path / "viz.json"
    spec_file.write_text(json.dumps(spec.to_dict()))
    rc = main(["viz", "--weights", str(ckpt), "--spec", str(spec_file), "--block", "2", "-o", str(tmp_path / "u.png")])
    assert rc == 2
    assert "block 2 does not exist; spec 'viz' has blocks 0..1" in capsys.readouterr().err
    assert not (tmp_path / "u.png").exists()


def test_a_scale_too_large_to_draw_is_refused_with_one_that_fits(spec, tmp_path, capsys):
    ckpt = write_weights(random_weights(spec), tmp_path / "w.npz")
    spec_file = tmp_path / "viz.json"
    spec_file.write_text(json.dumps(spec.to_dict()))
    rc = main(["viz", "--weights", str(ckpt), "--spec", str(spec_file), "--units", "6", "--columns", "2",
               "--scale", "100000", "-o", str(tmp_path / "u.png")])
    assert rc == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: --scale 100000 makes a 900000x1100000 picture \(over 100 megapixels\); "
                        r"use --scale (\d+) or less, or fewer --units\n", err), err
    fits = int(re.search(r"use --scale (\d+)", err).group(1))
    assert main(["viz", "--weights", str(ckpt), "--spec", str(spec_file), "--units", "6", "--columns", "2",
                 "--scale", str(fits + 1), "-o", str(tmp_path / "u.png")]) == 2
    assert not (tmp_path / "u.png").exists()


def test_an_output_under_a_file_is_refused_by_name(spec, tmp_path, capsys):
    ckpt = write_weights(random_weights(spec), tmp_path / "w.npz")
    spec_file = tmp_path / "viz.json"
    spec_file.write_text(json.dumps(spec.to_dict()))
    (tmp_path / "afile").write_text("mine")
    rc = main(["viz", "--weights", str(ckpt), "--spec", str(spec_file), "-o", str(tmp_path / "afile" / "u.png")])
    assert rc == 2 and capsys.readouterr().err == (f"error: cannot write '{tmp_path / 'afile' / 'u.png'}': "
                                                   f"'{tmp_path / 'afile'}' is not a directory\n")
    assert (tmp_path / "afile").read_text() == "mine"
