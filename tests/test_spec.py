"""Spec presets, files and validation errors."""

import json

import pytest

from mixer_compile.errors import SpecError
from mixer_compile.model.spec import PRESETS, MixerSpec, load_spec


@pytest.mark.parametrize("name, params", [("mixer_b16", 59_880_472), ("mixer_b32", 60_293_428),
                                          ("mixer_l16", 208_196_168)])
def test_preset_parameter_counts_match_the_paper(name, params):
    assert PRESETS[name].param_count() == params


def test_preset_table_and_flops():
    assert list(PRESETS) == ["mixer_s32", "mixer_s16", "mixer_b32", "mixer_b16", "mixer_l32", "mixer_l16", "mixer_h14"]
    b16 = PRESETS["mixer_b16"]
    assert b16.tokens == 196 and b16.grid == (14, 14)
    assert b16.macs_per_image() / 1e9 == pytest.approx(12.6, abs=0.05)
    assert PRESETS["mixer_h14"].tokens == 256


def test_toml_file_with_base_and_overrides(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('base = "mixer_s16"\nimage_size = 448\nnum_classes = 10\ngelu = "erf"\n')
    spec = load_spec(path, batch=4)
    assert spec.image_size == (448, 448) and spec.tokens == 784 and spec.hidden_dim == 512
    assert (spec.num_classes, spec.gelu, spec.batch, spec.name) == (10, "erf", 4, "mixer_s16")


def test_json_file_full_spec(tmp_path):
    path = tmp_path / "wide.json"
    path.write_text(json.dumps({"image_size": [32, 48], "patch_size": 8, "hidden_dim": 24, "tokens_mlp_dim": 12,
                                "channels_mlp_dim": 96, "num_blocks": 3, "num_classes": 7}))
    spec = load_spec(path)
    assert spec.name == "wide" and spec.grid == (4, 6) and spec.gelu is None and spec.resolved_gelu == "tanh"


def test_gelu_follows_weights_unless_set():
    spec = PRESETS["mixer_s32"]
    assert spec.with_gelu_for("timm").gelu == "erf"
    assert spec.with_gelu_for("jax").gelu == "tanh"
    assert spec.replace(gelu="tanh").with_gelu_for("timm").gelu == "tanh"


@pytest.mark.parametrize("changes, message", [
    ({"image_size": (225, 224)}, "image size 225x224 is not divisible by patch size 16"),
    ({"hidden_dim": 0}, "'hidden_dim' must be positive"),
    ({"num_blocks": -1}, "'num_blocks' must be positive"),
    ({"batch": 1.5}, "'batch' must be an integer"),
    ({"gelu": "relu"}, "'gelu' must be one of tanh, erf"),
    ({"layer_norm_eps": 0}, "'layer_norm_eps' must be a number in (0, 1)"),
    ({"hidden_dim": 10**6}, "parameters; more than 4e9"),
])
def test_invalid_fields_are_refused(changes, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PRESETS["mixer_b16"].replace(**changes)


def test_unknown_key_names_the_nearest(tmp_path):
    path = tmp_path / "typo.toml"
    path.write_text('base = "mixer_s16"\nhidden_dims = 3\n')
    with pytest.raises(SpecError, match="unknown spec key 'hidden_dims'; did you mean 'hidden_dim'"):
        load_spec(path)


def test_unknown_preset_and_missing_keys(tmp_path):
    with pytest.raises(SpecError, match="unknown preset 'mixer_b17'; did you mean 'mixer_b16'"):
        load_spec("mixer_b17")
    path = tmp_path / "partial.json"
    path.write_text('{"patch_size": 8}')
    with pytest.raises(SpecError, match="missing required keys: image_size, hidden_dim"):
        load_spec(path)
    bad = tmp_path / "bad.toml"
    bad.write_text("patch_size = [")
    with pytest.raises(SpecError, match="is not valid TOML"):
        load_spec(bad)
    huge = tmp_path / "huge.json"  # Python refuses to parse an integer of over 4300 digits
    huge.write_text('{"base": "mixer_s32", "num_classes": ' + "9" * 5000 + "}")
    with pytest.raises(SpecError, match=r"^spec file '.*huge.json' is not valid JSON: Exceeds the limit \(4300 "
                                        r"digits\) for integer string conversion: value has 5000 digits$"):
        load_spec(huge)


def test_fingerprint_names_shape_batch_and_gelu():
    spec = MixerSpec("t", (32, 48), 8, 24, 12, 96, 3, batch=2, gelu="erf")
    assert spec.fingerprint() == "t-32x48-b2-erf"
    # a name is never a path: the default output out/<fingerprint> stays inside out/
    assert spec.replace(name="../../etc/x").fingerprint() == "_.._etc_x-32x48-b2-erf"
    assert spec.replace(name="..").fingerprint() == "spec-32x48-b2-erf"
