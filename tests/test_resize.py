"""Higher-resolution weights (paper, Appendix C): the block-diagonal expansion is exact."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mixer_compile.model import reference
from mixer_compile.cli import main
from mixer_compile.errors import SpecError
from mixer_compile.model.spec import MixerSpec, load_spec
from mixer_compile.frontends import load_weights
from mixer_compile.model.params import random_weights
from mixer_compile.frontends.resize import resize_weights, sub_image_tokens
from mixer_compile.frontends.write import write_weights
from tests.helpers import rel_error


@pytest.fixture
def small() -> MixerSpec:
    """Patch 8 on a non-square 16x24 image (2x3 grid): a wrong raster mapping cannot pass."""
    return MixerSpec("small", (16, 24), 8, 16, 8, 32, 2, num_classes=5, gelu="erf", batch=2)


def _mlp(x: np.ndarray, w: dict, pre: str) -> np.ndarray:
    """The token-mixing MLP over the last (token) axis, as the reference computes it."""
    h = reference.gelu(x @ w[f"{pre}/Dense_0/kernel"] + w[f"{pre}/Dense_0/bias"], "erf")
    return h @ w[f"{pre}/Dense_1/kernel"] + w[f"{pre}/Dense_1/bias"]


def test_sub_image_tokens_are_contiguous_blocks_in_raster_order(small):
    large = small.replace(image_size=(32, 48))  # 4x6 grid: 2x2 sub-images of 2x3
    pos = sub_image_tokens(small, large)
    grid = np.arange(24).reshape(4, 6)
    assert pos.tolist() == [grid[:2, :3].ravel().tolist(), grid[:2, 3:].ravel().tolist(),
                            grid[2:, :3].ravel().tolist(), grid[2:, 3:].ravel().tolist()]


def test_token_mixing_on_large_grid_equals_original_on_each_sub_image(small):
    w = random_weights(small, seed=3)
    big, large = resize_weights(w, small, (32, 72))  # Kh = 2, Kw = 3
    assert large.tokens == 6 * small.tokens and large.tokens_mlp_dim == 6 * small.tokens_mlp_dim
    x = np.random.default_rng(0).standard_normal((small.hidden_dim, large.tokens))  # (C, S') columns
    pre = "MixerBlock_1/token_mixing"
    y = _mlp(x, big, pre)
    for tokens in sub_image_tokens(small, large):
        np.testing.assert_allclose(y[:, tokens], _mlp(x[:, tokens], w, pre), rtol=1e-12, atol=1e-12)


def test_whole_model_on_large_image_is_mean_of_sub_image_models(small):
    """Everything but token mixing is per token and the head is affine, so logits average exactly."""
    w = random_weights(small, seed=1)
    big, large = resize_weights(w, small, (32, 48))
    image = np.random.default_rng(2).standard_normal((2, 3, 32, 48))
    subs = [image[:, :, a * 16:(a + 1) * 16, b * 24:(b + 1) * 24] for a in range(2) for b in range(2)]
    expected = np.mean([reference.forward(small, w, s) for s in subs], axis=0)
    assert rel_error(reference.forward(large, big, image), expected) < 1e-12


def test_not_an_integer_multiple_is_refused(small):
    with pytest.raises(SpecError, match="not an integer multiple of 16x24"):
        resize_weights(random_weights(small), small, (24, 48))


@pytest.mark.parametrize("suffix", [".npz", ".pth", ".safetensors"])
def test_cli_keeps_the_format_and_writes_the_spec(small, tmp_path, suffix, capsys):
    spec_file = tmp_path / "small.json"
    spec_file.write_text(json.dumps(small.to_dict()))
    w = random_weights(small, seed=4)
    src = write_weights(w, tmp_path / f"ckpt{suffix}")
    out = tmp_path / f"big{suffix}"
    rc = main(["resize-weights", "--weights", str(src), "--spec", str(spec_file), "--image-size", "32x48",
               "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    large = load_spec(out.with_suffix(".json"))
    assert large.image_size == (32, 48) and large.tokens_mlp_dim == 2 * 2 * small.tokens_mlp_dim
    loaded, origin = load_weights(out, large)
    assert origin == ("jax" if suffix == ".npz" else "timm")
    expected, _ = resize_weights(w, small, (32, 48))
    for key, value in expected.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["small.json", src.name, out.name, "big.json"])


def test_cli_refuses_a_different_output_format(small, tmp_path, capsys):
    src = write_weights(random_weights(small), tmp_path / "ckpt.npz")
    spec_file = tmp_path / "small.json"
    spec_file.write_text(json.dumps(small.to_dict()))
    rc = main(["resize-weights", "--weights", str(src), "--spec", str(spec_file), "--image-size", "32x48",
               "-o", str(tmp_path / "big.pth")])
    assert rc == 2
    assert "must have the input's checkpoint format (.npz)" in capsys.readouterr().err
    assert not (tmp_path / "big.pth").exists()


def test_cli_refuses_to_write_over_its_input(small, tmp_path, capsys):
    src = write_weights(random_weights(small), tmp_path / "ckpt.npz")
    before = src.read_bytes()
    spec_file = tmp_path / "small.json"
    spec_file.write_text(json.dumps(small.to_dict()))
    rc = main(["resize-weights", "--weights", str(src), "--spec", str(spec_file), "--image-size", "32x48",
               "-o", str(tmp_path / "." / "ckpt.npz")])
    assert rc == 2
    assert "is the input checkpoint; write the resized one to another file" in capsys.readouterr().err
    assert src.read_bytes() == before and not (tmp_path / "ckpt.json").exists()


def test_cli_refuses_what_would_clobber_an_input_or_leave_half_an_output(small, tmp_path, capsys):
    """The resized spec over the --spec it was given, a directory where the spec goes, a file of
    the user's there (beside no checkpoint of that name), the model's own size: each refused
    before anything is written."""
    src = write_weights(random_weights(small), tmp_path / "ckpt.npz")
    spec_file = tmp_path / "mine.json"
    spec_file.write_text(json.dumps(small.to_dict()))
    (tmp_path / "x.json").mkdir()
    (tmp_path / "notes.json").write_text("keep me\n")  # the user's, beside no checkpoint 'notes.npz'
    for out, size, message in (
            ("mine.npz", "32x48", "the resized spec would be written over the input spec"),
            ("x.npz", "32x48", "x.json' is a directory; -o names the checkpoint to write"),
            ("notes.npz", "32x48", "notes.json' exists, and is no spec of a checkpoint 'notes.npz'; move it"),
            ("same.npz", "x".join(map(str, small.image_size)), "is the model's own; give a larger one")):
        rc = main(["resize-weights", "--weights", str(src), "--spec", str(spec_file), "--image-size", size,
                   "-o", str(tmp_path / out)])
        assert rc == 2 and message in capsys.readouterr().err, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.npz", "mine.json", "notes.json", "x.json"]
    assert (tmp_path / "notes.json").read_text() == "keep me\n"
    assert json.loads(spec_file.read_text()) == small.to_dict()
