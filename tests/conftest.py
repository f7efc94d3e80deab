"""Shared fixtures: tiny specs and the outside oracle in ../shared/testdata.

The testdata checkpoints and logits were produced by timm's own MlpMixer; they are the
peer implementation our reference and our compiled modules are checked against.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mixer_compile.model.spec import MixerSpec, spec_from_dict

REPO = Path(__file__).resolve().parent.parent
TESTDATA = REPO.parent / "shared" / "testdata"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow (full-size models)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="full-size model: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def testdata_spec(name: str, batch: int = 2) -> MixerSpec:
    """The spec of a testdata checkpoint (tiny_square or tiny_wide), GELU left to the weights."""
    config = json.loads((TESTDATA / "configs.json").read_text())[name]
    config.pop("tokens")
    return spec_from_dict(config, name=name).replace(batch=batch)


testdata_spec.__test__ = False  # a helper, not a test, when a test module imports it


@pytest.fixture(scope="session")
def testdata() -> Path:
    assert TESTDATA.is_dir(), f"the shared test data is missing: {TESTDATA}"
    return TESTDATA


@pytest.fixture
def tiny_spec() -> MixerSpec:
    """32x32 image, patch 8 (16 tokens), C=32, 2 blocks: compiles in about a second."""
    return MixerSpec("tiny", (32, 32), 8, 32, 16, 128, 2, num_classes=10, batch=2)


@pytest.fixture
def wide_spec() -> MixerSpec:
    """Non-square 32x48 grid (4x6 tokens): catches raster-order mistakes."""
    return testdata_spec("tiny_wide")


def rel_error(out: np.ndarray, ref: np.ndarray) -> float:
    """max |out - ref| / max |ref|: the figure validation uses."""
    return float(np.abs(np.asarray(out, np.float64) - ref).max() / np.abs(ref).max())
