"""Reading the machine code (SASS) of the GPU kernels a CUDA build carries: test-only tools.

The tests check that half-precision matmuls really run on tensor cores (HMMA instructions);
nothing in the package or its benchmarks reads SASS, so these helpers live here, beside the
tests. `fatbins` (finding the compiled GPU code in a library) is the package's: builds and
metadata use it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from mixer_compile.backend.cuda import fatbins
from mixer_compile.errors import TargetError


def cuobjdump() -> str | None:
    """cuobjdump from PATH or from the `nvidia-cuda-cuobjdump` wheel (with nvdisasm beside it)."""
    try:
        import nvidia

        bundled = [str(Path(p) / "cu13" / "bin") for p in nvidia.__path__]
    except ImportError:
        bundled = []
    return shutil.which("cuobjdump", path=os.pathsep.join(bundled + [os.environ.get("PATH", "")]))


def sass(library: Path) -> dict[str, str]:
    """The machine code (SASS) of every kernel a library carries, by kernel name."""
    tool = cuobjdump()
    if tool is None:
        raise TargetError("cuobjdump is not installed; pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm")
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(tool).parent), os.environ.get("PATH", "")])}
    kernels: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, blob in enumerate(fatbins(library)):
            (Path(tmp) / f"{i}.fatbin").write_bytes(blob)
            text = subprocess.run([tool, "-sass", f"{i}.fatbin"], cwd=tmp, env=env, check=True,
                                  capture_output=True, text=True).stdout
            for chunk in text.split("Function : ")[1:]:
                name, _, body = chunk.partition("\n")
                kernels[name.strip()] = body
    return kernels
