"""examples/cpp: built with g++ against the wheel's TVM runtime, run, compared with Python.

Both sides run the same library on the same weights and image, so the logits must agree to
the 9 significant digits the example prints (rtol 1e-7), and the top-5 classes exactly.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mixer_compile import runtime
from mixer_compile.compiler import CompileOptions, compile_model
from mixer_compile.util.progress import Progress
from mixer_compile.model.spec import MixerSpec
from tests.helpers import REPO

SPEC = MixerSpec("tiny", (32, 48), 8, 32, 16, 64, 2, num_classes=12, batch=2)


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler (g++) on this machine")
    out = tmp_path_factory.mktemp("cpp") / "mixer_infer"
    proc = subprocess.run(["sh", str(REPO / "examples" / "cpp" / "build.sh"), str(out)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("cpp_art") / "art"
    compile_model(CompileOptions(spec=SPEC, seed=5, out_dir=out), Progress(6, quiet=True))
    return out


def _run(binary, *args):
    proc = subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def _python_top5(artifact, image):
    batch = np.broadcast_to(image[None], (SPEC.batch, *image.shape)).copy()  # the example fills every slot
    logits = runtime.load(artifact)(batch)[0]
    top = np.argsort(-logits, kind="stable")[:5]
    return [(int(i), float(logits[i])) for i in top]


def _parse(stdout):
    return [(int(c), float(v)) for c, v in (line.split() for line in stdout.strip().splitlines())]


def _assert_same(cpp, py):
    assert [c for c, _ in cpp] == [c for c, _ in py]
    np.testing.assert_allclose([v for _, v in cpp], [v for _, v in py], rtol=1e-7, atol=0)


def test_cpp_output_matches_python_on_an_image_file(binary, artifact, tmp_path):
    image = np.random.default_rng(7).standard_normal((3, 32, 48)).astype(np.float32)
    image.tofile(tmp_path / "image.bin")
    rc, out, err = _run(binary, artifact, tmp_path / "image.bin")
    assert rc == 0, err
    _assert_same(_parse(out), _python_top5(artifact, image))


def test_cpp_generated_image_matches_python(binary, artifact):
    n = 3 * 32 * 48
    image = (((np.arange(n) * 7919) % 255).astype(np.float32) / np.float32(127.5) - np.float32(1)).reshape(3, 32, 48)
    rc, out, err = _run(binary, artifact)
    assert rc == 0, err
    _assert_same(_parse(out), _python_top5(artifact, image))


def test_cpp_refuses_a_wrong_sized_image(binary, artifact, tmp_path):
    np.zeros(10, np.float32).tofile(tmp_path / "small.bin")
    rc, out, err = _run(binary, artifact, tmp_path / "small.bin")
    assert rc == 1 and out == ""
    assert f"small.bin holds 40 bytes; expected {3 * 32 * 48 * 4} (one float32 NCHW image)" in err
    rc, _, err = _run(binary, tmp_path / "none")
    assert rc == 1 and err == f"error: '{tmp_path / 'none'}' is not a directory; give the artifact directory " \
                              "mixer-compile wrote (-o)\n"
    rc, _, err = _run(binary, tmp_path)
    assert rc == 1 and err == f"error: '{tmp_path}' holds no metadata.json, so it is no mixer-compile artifact; " \
                              "give the directory a compile wrote (-o)\n"


@pytest.fixture(scope="module")
def range_artifact(tmp_path_factory):
    """The same model serving batches 1-4 (entries main_b1, main_b2, main_b4)."""
    out = tmp_path_factory.mktemp("cpp_range") / "art"
    compile_model(CompileOptions(spec=SPEC, seed=5, out_dir=out, batches=(1, 4)), Progress(6, quiet=True))
    return out


def test_cpp_serves_two_batch_sizes_of_a_range(binary, range_artifact, tmp_path):
    images = np.random.default_rng(11).standard_normal((3, 3, 32, 48)).astype(np.float32)
    images.tofile(tmp_path / "three.bin")
    logits = runtime.load(range_artifact)(images)
    rc, out, err = _run(binary, range_artifact, tmp_path / "three.bin")  # batch 3: the file's images, 2+1
    assert rc == 0 and "batch 3 = 2+1" in err, err
    blocks = [block.split("\n", 1)[1] for block in out.strip().split("\n\n")]  # "# image I" then its top-5
    assert len(blocks) == 3
    for block, row in zip(blocks, logits):
        top = np.argsort(-row, kind="stable")[:5]
        _assert_same(_parse(block), [(int(i), float(row[i])) for i in top])
    rc, out, err = _run(binary, range_artifact, tmp_path / "three.bin", "--batch", "4")  # one call of main_b4
    assert rc == 0 and "batch 4 = 4" in err, err
    row = runtime.load(range_artifact)(images[[0, 1, 2, 0]])[0]
    _assert_same(_parse(out.strip().split("\n\n")[0].split("\n", 1)[1]),
                 [(int(i), float(row[i])) for i in np.argsort(-row, kind="stable")[:5]])
    rc, out, err = _run(binary, range_artifact, tmp_path / "three.bin", "--batch", "5")
    assert rc == 1 and out == "" and "batch 5 is outside what this artifact serves (batches 1-4)" in err
