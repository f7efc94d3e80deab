"""Shared fixtures: the tiny spec (as a spec and as a spec file), and the outside oracle in
../shared/testdata.

The testdata checkpoints and logits were produced by timm's own MlpMixer; they are the
peer implementation our reference and our compiled modules are checked against. The values
behind the fixtures are in helpers.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mixer_compile.model.spec import MixerSpec
from tests.helpers import TESTDATA, TINY, TINY_TOML, testdata_spec


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow (full-size models)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="full-size model: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def testdata() -> Path:
    assert TESTDATA.is_dir(), f"the shared test data is missing: {TESTDATA}"
    return TESTDATA


@pytest.fixture(scope="session")
def kernel_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cache (MIXER_COMPILE_CACHE) the tests' GPU kernels compile into, once per run: a
    fresh one, or $MIXER_TEST_KERNEL_CACHE. Kernels are keyed by their source and compiler, so
    a cache filled beforehand (`KERNELS=1 scripts/gpu_pack.sh`, on a machine with time to spare)
    spares a GPU session the minutes of nvcc its tests would spend."""
    given = os.environ.get("MIXER_TEST_KERNEL_CACHE")
    return Path(given) if given else tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_spec() -> MixerSpec:
    """32x32 image, patch 8 (16 tokens), C=32, 2 blocks, batch 2: compiles in about a second.
    Session-scoped (a MixerSpec is frozen), so module-scoped fixtures can build from it."""
    return TINY


@pytest.fixture
def tiny_toml(tmp_path: Path) -> Path:
    """The tiny spec as `tiny.toml` in the test's tmp_path (batch left to --batch, default 1)."""
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_TOML)
    return path


@pytest.fixture
def wide_spec() -> MixerSpec:
    """Non-square 32x48 grid (4x6 tokens): catches raster-order mistakes."""
    return testdata_spec("tiny_wide")
