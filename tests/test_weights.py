"""Checkpoint loading: official .npz and timm .pth/.safetensors, written by the tests."""

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from mixer_compile.errors import WeightsError
from mixer_compile.frontends import load_weights
from mixer_compile.model.params import expected_shapes, random_weights
from mixer_compile.frontends.timm import to_state_dict


def _write(path, weights):
    if path.suffix == ".npz":
        np.savez(path, **weights)
    elif path.suffix == ".safetensors":
        save_file(to_state_dict(weights), str(path))
    else:
        torch.save({k: torch.from_numpy(v) for k, v in to_state_dict(weights).items()}, path)


@pytest.mark.parametrize("ext, origin", [(".npz", "jax"), (".pth", "timm"), (".safetensors", "timm")])
def test_round_trip_each_format(tmp_path, wide_spec, ext, origin):
    weights = random_weights(wide_spec, seed=3)
    path = tmp_path / f"ckpt{ext}"
    _write(path, weights)
    loaded, got_origin = load_weights(path, wide_spec)
    assert got_origin == origin
    assert loaded.keys() == weights.keys()
    for k in weights:
        np.testing.assert_array_equal(loaded[k], weights[k], err_msg=k)


def test_testdata_formats_agree(testdata, wide_spec):
    npz, _ = load_weights(testdata / "tiny_wide.npz", wide_spec)
    for ext in (".pth", ".safetensors"):
        other, _ = load_weights(testdata / f"tiny_wide{ext}", wide_spec)
        for k in npz:
            np.testing.assert_allclose(other[k], npz[k], rtol=0, atol=0, err_msg=k)


def test_random_init_is_deterministic(tiny_spec):
    a, b, c = random_weights(tiny_spec, 1), random_weights(tiny_spec, 1), random_weights(tiny_spec, 2)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["head/kernel"], c["head/kernel"])
    assert {k: v.shape for k, v in a.items()} == expected_shapes(tiny_spec)


def test_wrong_spec_lists_mismatches(tmp_path, tiny_spec, wide_spec):
    path = tmp_path / "square.npz"
    _write(path, random_weights(tiny_spec))
    with pytest.raises(WeightsError) as err:
        load_weights(path, wide_spec)
    msg = str(err.value)
    assert "do not fit spec 'tiny_wide'" in msg and "\n" not in msg
    assert "unexpected MixerBlock_0" not in msg  # both have blocks 0 and 1
    assert "missing MixerBlock_2/LayerNorm_0/scale" in msg
    assert "wrong shape stem/kernel (8, 8, 3, 32) (expected (8, 8, 3, 24))" in msg


def test_missing_and_extra_keys(tmp_path, tiny_spec):
    weights = random_weights(tiny_spec)
    del weights["head/bias"]
    weights["head/extra"] = np.zeros(3, np.float32)
    path = tmp_path / "w.npz"
    _write(path, weights)
    with pytest.raises(WeightsError, match=r"missing head/bias; unexpected head/extra"):
        load_weights(path, tiny_spec)


def test_non_finite_and_integer_weights(tmp_path, tiny_spec):
    weights = random_weights(tiny_spec)
    weights["head/bias"][0] = np.nan
    _write(tmp_path / "nan.npz", weights)
    with pytest.raises(WeightsError, match="'head/bias' holds NaN"):
        load_weights(tmp_path / "nan.npz", tiny_spec)
    weights = random_weights(tiny_spec)
    weights["head/bias"] = weights["head/bias"].astype(np.int32)
    _write(tmp_path / "int.npz", weights)
    with pytest.raises(WeightsError, match="'head/bias' has dtype int32"):
        load_weights(tmp_path / "int.npz", tiny_spec)


def test_unreadable_files(tmp_path, tiny_spec):
    for name in ("trunc.npz", "trunc.pth", "trunc.safetensors"):
        (tmp_path / name).write_bytes(b"PK\x03\x04 not really")
        with pytest.raises(WeightsError, match=f"weights file '.*{name}' is not a readable"):
            load_weights(tmp_path / name, tiny_spec)
    with pytest.raises(WeightsError, match="unknown extension '.ckpt'"):
        (tmp_path / "w.ckpt").write_bytes(b"")
        load_weights(tmp_path / "w.ckpt", tiny_spec)
    with pytest.raises(WeightsError, match="does not exist"):
        load_weights(tmp_path / "absent.npz", tiny_spec)


class _Payload:
    def __reduce__(self):
        return (print, ("pickle payload ran",))


def test_pickle_payload_is_refused(tmp_path, tiny_spec, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"stem.proj.weight": _Payload()}, path)
    with pytest.raises(WeightsError, match="was refused: it pickles objects, not only tensors"):
        load_weights(path, tiny_spec)
    assert "pickle payload ran" not in capsys.readouterr().out


def test_unsupported_npz_layout_names_keys(tmp_path, tiny_spec):
    np.savez(tmp_path / "new.npz", **{"MixerBlock_0/kernel16": np.zeros((2, 2), np.float32)})
    with pytest.raises(WeightsError, match="unsupported Mixer key layout .*MixerBlock_0/kernel16"):
        load_weights(tmp_path / "new.npz", tiny_spec)


def test_integer_tensor_in_pth_is_refused_like_npz(tmp_path, tiny_spec):
    state = {k: torch.from_numpy(v) for k, v in to_state_dict(random_weights(tiny_spec)).items()}
    state["head.bias"] = state["head.bias"].to(torch.int64)
    torch.save(state, tmp_path / "int.pth")
    with pytest.raises(WeightsError, match="'head/bias' has dtype int64; expected floating point"):
        load_weights(tmp_path / "int.pth", tiny_spec)
