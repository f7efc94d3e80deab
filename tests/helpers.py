"""Plain helpers shared by the tests: the one tiny spec, the testdata specs, the error figure,
the command line in a fresh process and its one-line errors, metadata edits, and whether code
built for a named CPU target can run on this machine.

Fixtures live in conftest.py and are built from these; a test module imports from here (never
from conftest.py or another test module) only where it needs a value at import time, e.g. in
a `parametrize` list or a module-scoped fixture.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from mixer_compile.model.spec import MixerSpec, spec_from_dict

REPO = Path(__file__).resolve().parent.parent
TESTDATA = REPO.parent / "shared" / "testdata"

# 32x32 image, patch 8 (16 tokens), C=32, D_S=16, D_C=128, 2 blocks, 10 classes: compiles in
# about a second. Batch 2; `TINY.replace(batch=1)` is what a spec file without --batch gives.
TINY = MixerSpec("tiny", (32, 32), 8, 32, 16, 128, 2, num_classes=10, batch=2)

_TOML_KEYS = ("name", "image_size", "patch_size", "hidden_dim", "tokens_mlp_dim", "channels_mlp_dim",
              "num_blocks", "num_classes")


def spec_toml(spec: MixerSpec = TINY) -> str:
    """`spec` as a TOML spec file (`image_size = 32` when square), the batch left to --batch
    (default 1), GELU to the weights."""
    data = spec.to_dict()
    h, w = data["image_size"]
    data["image_size"] = h if h == w else [h, w]
    return "".join(f"{k} = {json.dumps(data[k])}\n" for k in _TOML_KEYS)


TINY_TOML = spec_toml(TINY)

# float32 compiled code against the float64 reference on these tiny specs: measured ~3e-7, so
# 1e-5 still catches a LayerNorm epsilon lost on the way (validation's own bound, 1e-4, is sized
# for full-size models and would not)
FP32 = 1e-5
# half-precision weights with float32 activations (a CPU build) against the reference on TINY:
# measured 3.8e-4 (float16) and 4.2e-3 (bfloat16, whose unit roundoff is 8x float16's); these
# bounds, ~2.5x and ~2x that, sit below validation's 1e-2, which a full-size model needs
HALF_WEIGHTS = {"float16": 1e-3, "bfloat16": 8e-3}


def testdata_spec(name: str, batch: int = 2) -> MixerSpec:
    """The spec of a testdata checkpoint (tiny_square or tiny_wide), GELU left to the weights."""
    config = json.loads((TESTDATA / "configs.json").read_text())[name]
    config.pop("tokens")
    return spec_from_dict(config, name=name).replace(batch=batch)


testdata_spec.__test__ = False  # a helper, not a test, when a test module imports it


def rel_error(out: np.ndarray, ref: np.ndarray) -> float:
    """max |out - ref| / max |ref|: the figure validation uses."""
    return float(np.abs(np.asarray(out, np.float64) - ref).max() / np.abs(ref).max())


def cli(*args: object, cwd: Path | None = None, timeout: float = 300,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`mixer-compile ARGS` in a fresh process, as a shell runs it; output captured as text."""
    return subprocess.run([sys.executable, "-m", "mixer_compile.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=env)


def error_line(code: int, err: str) -> str:
    """The error of a refused command: exit status 2, no traceback, exactly one `error: ...` line."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def edit_metadata(artifact: Path, change: Callable[[dict], object]) -> None:
    """Rewrites the artifact's metadata.json with `change` applied to its JSON object."""
    path = Path(artifact) / "metadata.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def cannot_run(target_name: str) -> str | None:
    """Why code built for the named CPU target cannot run on this machine (the instruction sets
    it lacks, as the runtime's own check says it), or None when it can. Tests that run such code
    skip with this reason: an AVX-512 kernel on an AVX2 machine dies with SIGILL, and takes the
    test process with it."""
    from mixer_compile.backend.target import build_requirements, get_target
    from mixer_compile.errors import ArtifactError
    from mixer_compile.machine import check_cpu

    requires = build_requirements(get_target(target_name).tvm_target())
    try:
        check_cpu(requires["cpu"], f"{target_name} code")
    except ArtifactError as exc:
        return str(exc).split("; rebuild")[0]
    return None


def lines_until_cuda_build(monkeypatch, opts, stages: int) -> list[str]:
    """The progress lines of a compile stopped where its CUDA build would start: what the stages
    before the build say, without a build's minute."""
    import io

    import pytest

    from mixer_compile.backend import cuda
    from mixer_compile.compiler import compile_model
    from mixer_compile.util.progress import Progress

    class Stopped(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stopped

    monkeypatch.setattr(cuda, "build", stop)
    out = io.StringIO()
    with pytest.raises(Stopped):
        compile_model(opts, progress=Progress(stages, stream=out))
    return out.getvalue().splitlines()
