"""The float64 reference against the outside oracle (timm's own logits) and a torch module.

Tolerance 2e-5 relative: timm ran in float32 (~1e-6 from float64 here), while the erf and
tanh GELU logits differ by ~2e-4, so the bound also proves the flavour is the right one.
"""

import numpy as np
import pytest
import torch

from mixer_compile.model import reference
from mixer_compile.frontends import load_weights
from mixer_compile.model.params import random_weights
from tests.torch_model import torch_mixer
from tests.helpers import rel_error, testdata_spec

BOUND = 2e-5


@pytest.mark.parametrize("name", ["tiny_square", "tiny_wide"])
@pytest.mark.parametrize("ext", ["npz", "pth", "safetensors"])
def test_reference_matches_timm(testdata, name, ext):
    spec = testdata_spec(name)
    weights, origin = load_weights(testdata / f"{name}.{ext}", spec)
    images = np.load(testdata / f"{name}_input.npy")
    for flavour in ("erf", "tanh"):
        out = reference.forward(spec.replace(gelu=flavour), weights, images)
        right = np.load(testdata / f"{name}_logits_{flavour}.npy")
        wrong = np.load(testdata / f"{name}_logits_{'tanh' if flavour == 'erf' else 'erf'}.npy")
        assert rel_error(out, right) < BOUND
        assert rel_error(out, wrong) > BOUND  # the bound tells the flavours apart
    assert spec.with_gelu_for(origin).gelu == ("tanh" if ext == "npz" else "erf")


@pytest.mark.parametrize("gelu", ["tanh", "erf"])
def test_reference_matches_torch_module(tiny_spec, gelu):
    """At LayerNorm epsilon 1e-2: timm's 1e-6 (the oracle above) moves the logits by ~1e-6 against
    1e-5, under the bound, so only a large epsilon shows that the spec's reaches the reference."""
    spec = tiny_spec.replace(gelu=gelu, batch=3, layer_norm_eps=1e-2)
    weights = random_weights(spec, seed=5)
    images = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        out = torch_mixer(spec, weights)(torch.from_numpy(images)).numpy()
    assert rel_error(out, reference.forward(spec, weights, images)) < BOUND
    assert rel_error(out, reference.forward(spec.replace(layer_norm_eps=1e-6), weights, images)) > BOUND


def test_validation_runs_the_whole_batch_and_checks_its_first_images(tiny_spec):
    from mixer_compile.errors import ValidationError
    from mixer_compile.check.validate import REFERENCE_IMAGES, validate

    spec = tiny_spec.replace(batch=REFERENCE_IMAGES + 2)
    weights = random_weights(spec, 0)
    seen = []

    def run(images, corrupt=None):
        seen.append(images.shape[0])
        out = reference.forward(spec, weights, images)
        if corrupt is not None:
            out[corrupt] += 1.0
        return out

    result = validate(run, spec, weights)
    assert seen == [spec.batch] and result.max_rel_error < 1e-12
    assert (result.batch, result.checked) == (spec.batch, REFERENCE_IMAGES)
    with pytest.raises(ValidationError, match="disagrees with the reference"):
        validate(lambda x: run(x, corrupt=REFERENCE_IMAGES - 1), spec, weights)


def test_weights_beyond_float32_are_blamed_not_the_build(tiny_spec):
    """A checkpoint whose activations overflow float32 (damaged, or scaled by mistake): no float32
    build can agree with the float64 reference, and the error says the weights are at fault. The
    reference in float32 stays in float32 (a NumPy float64 constant would widen it)."""
    from mixer_compile.check.validate import validate
    from mixer_compile.errors import WeightsError

    weights = random_weights(tiny_spec, 0)
    images = np.ones((1, 3, *tiny_spec.image_size), np.float32)
    assert reference.forward(tiny_spec, weights, images, np.float32).dtype == np.float32
    weights["stem/bias"] = np.full_like(weights["stem/bias"], 3e38)
    with pytest.raises(WeightsError, match=r"^these weights overflow float32 \(the reference forward pass overflows "
                                           r"in float32; the largest \|weight\| is 3e\+38\): the checkpoint is damaged"):
        validate(lambda x: np.zeros((len(x), tiny_spec.num_classes), np.float32), tiny_spec, weights)
