"""Checkpoint loading: official .npz and timm .pth/.safetensors, written by the tests."""

import re

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from safetensors.torch import save_file as save_torch_file

from mixer_compile.errors import WeightsError
from mixer_compile.frontends import load_weights
from mixer_compile.frontends.torch_module import checkpoint_spec
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


def _exactly(message):
    """A `match=` pattern for the whole error message, literally."""
    return "^" + re.escape(message) + "$"


def _state(spec, dtype=torch.float32):
    """A timm state dict of tensors of `dtype`."""
    return {k: torch.from_numpy(v).to(dtype) for k, v in to_state_dict(random_weights(spec)).items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_low_precision_safetensors_load_as_float32(tmp_path, tiny_spec, dtype):
    state = _state(tiny_spec, dtype)
    path = tmp_path / "low.safetensors"
    save_torch_file(state, str(path))
    loaded, _ = load_weights(path, tiny_spec)
    back = to_state_dict(loaded)
    for k, v in state.items():
        assert back[k].dtype == np.float32, k
        np.testing.assert_array_equal(back[k], v.float().numpy(), err_msg=k)
    assert checkpoint_spec(path).hidden_dim == tiny_spec.hidden_dim  # without a spec too


def test_unreadable_float_dtype_is_named(tmp_path, tiny_spec):
    state = _state(tiny_spec)
    state["head.bias"] = torch.zeros(16, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    path = tmp_path / "f4.safetensors"
    save_torch_file(state, str(path))
    with pytest.raises(WeightsError, match=_exactly(
            f"weights in {path}: 'head.bias' has dtype float4_e2m1fn_x2, which cannot be read as float32; "
            "save the weights in float32, float16 or bfloat16")):
        load_weights(path, tiny_spec)


@pytest.mark.parametrize("key, shape, expected", [
    ("stem/kernel", (8, 3, 32), "4-D conv kernel"),
    ("MixerBlock_0/token_mixing/Dense_0/kernel", (16,), "2-D matrix"),
    ("head/kernel", (), "2-D matrix"),
])
def test_misranked_npz_kernel_is_named_without_spec(tmp_path, tiny_spec, key, shape, expected):
    weights = random_weights(tiny_spec)
    weights[key] = np.zeros(shape, np.float32)
    path = tmp_path / "w.npz"
    _write(path, weights)
    message = f"weights in {path}: '{key}' has shape {shape}; expected a {expected}"
    with pytest.raises(WeightsError, match=_exactly(message)):
        checkpoint_spec(path)


def _npy(path):
    with open(path, "wb") as f:
        np.save(f, np.zeros(3, np.float32))


def _torchscript(path):
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)


def _bytes(data):
    return lambda path: path.write_bytes(data)


LFS = b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a2146\nsize 12345\n"
HTML = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>\n"
NOT_CHECKPOINTS = [
    *(pytest.param(name, _bytes(LFS), "is not a checkpoint: it is a Git LFS pointer (run `git lfs pull`)",
                   id=f"lfs{name[1:]}") for name in ("w.pth", "w.npz", "w.safetensors")),
    *(pytest.param(name, _bytes(HTML), "is not a checkpoint: it looks like an HTML page (a download that failed? "
                   "download the file itself)", id=f"html{name[1:]}") for name in ("w.pth", "w.npz", "w.safetensors")),
    pytest.param("w.pth", _torchscript, "is not a checkpoint: it is a TorchScript archive; save model.state_dict() "
                 "with torch.save", id="torchscript.pth"),
    pytest.param("w.npz", _npy, "is not a checkpoint: it is a single NumPy array (.npy); save the weights dict "
                 "with np.savez", id="npy.npz"),
    pytest.param("w.pth", _bytes(b"hello world"), "is not a torch checkpoint (it starts with b'hello world'); save "
                 "one with torch.save(model.state_dict(), path)", id="text.pth"),
    pytest.param("w.npz", _bytes(b"hello world"), "is not a readable .npz archive (it starts with b'hello world'); "
                 "save one with np.savez", id="text.npz"),
    pytest.param("w.npz", lambda p: torch.save({"x": torch.zeros(2)}, p), "is not an .npz archive of arrays: "
                 "'w/data.pkl' is not a .npy array (a torch checkpoint? rename it to .pth)", id="torch.npz"),
]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script
@pytest.mark.parametrize("name, write, message", NOT_CHECKPOINTS)
def test_files_that_are_not_checkpoints_say_what_they_are(tmp_path, tiny_spec, name, write, message):
    path = tmp_path / name
    write(path)
    with pytest.raises(WeightsError, match=_exactly(f"weights file '{path}' {message}")):
        load_weights(path, tiny_spec)


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
@pytest.mark.parametrize("change, problem", [
    (lambda t: torch.quantize_per_tensor(t, 0.1, 0, torch.qint8), "a quantized tensor (qint8); save dense float "
                                                                  "weights (tensor.dequantize())"),
    (lambda t: t.to_sparse(), "a sparse tensor (sparse_coo); save dense float weights (tensor.to_dense())"),
    (lambda t: t.to("meta"), "a meta tensor, with no data; save dense float weights (those of a model whose "
                             "weights are loaded)"),
])
def test_non_dense_tensors_are_refused_by_key(tmp_path, tiny_spec, change, problem):
    state = _state(tiny_spec)
    state["head.weight"] = change(state["head.weight"])
    path = tmp_path / "w.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=_exactly(f"weights in {path}: 'head.weight' is {problem}")):
        load_weights(path, tiny_spec)
