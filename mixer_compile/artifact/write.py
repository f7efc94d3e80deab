"""The artifact directory (format.py says what it holds), written atomically.

Everything is written into a temporary sibling directory and renamed into place only when
complete (place.py), so a crash or a failed validation never leaves a half-written artifact
where a good one is expected.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mixer_compile.artifact.format import LIBRARY, METADATA, WEIGHTS, Metadata, sha256
from mixer_compile.artifact.place import refuse_foreign, staged
from mixer_compile.errors import ArtifactError
from mixer_compile.util.atomic import why_unwritable
from mixer_compile.util.stderr import TVM_SAVE_NOISE, without_stderr_lines


def write_artifact(out_dir: str | Path, executable: Any, params: dict[str, np.ndarray] | None,
                   metadata: Metadata) -> Path:
    """Writes the artifact; `params` None means the weights are embedded in the library. The
    file hashes and sizes are filled into a copy of `metadata`."""
    import tvm

    out = Path(out_dir).resolve()
    with staged(out, "cannot write artifact to") as tmp:
        try:
            with without_stderr_lines(TVM_SAVE_NOISE):
                executable.export_library(str(tmp / LIBRARY))
        except RuntimeError as exc:  # TVM reports the linker's failure (a full disk, say) so
            raise ArtifactError(f"cannot write artifact to '{out}': {_linker_problem(exc)}") from None
        files = {LIBRARY: sha256(tmp / LIBRARY)}
        if params is not None:
            tensors = {k: tvm.runtime.tensor(v) for k, v in params.items()}
            # written by Python, not TVM: TVM's writer reports a full disk without its errno
            (tmp / WEIGHTS).write_bytes(tvm.runtime.save_param_dict(tensors))
            files[WEIGHTS] = sha256(tmp / WEIGHTS)
        sizes = {name: (tmp / name).stat().st_size for name in files}
        meta = dataclasses.replace(metadata, files=files, file_sizes=sizes)
        (tmp / METADATA).write_text(json.dumps(meta.to_json(), indent=2, default=_json_default) + "\n")
    return out


TEMP_SPACE = 64 << 20  # what a build may write to the temporary directory before its output


def check_writable(out_dir: str | Path) -> None:
    """Fails now, not after a long build, when the artifact could not be written to `out_dir`
    (no permission, a read-only or full file system, a file or a foreign directory in the way,
    a mount point, a read-only artifact there, a temporary directory without room). Creates
    nothing that outlives the check, not even the missing parent directories."""
    out = Path(out_dir).resolve()
    limit = os.pathconf(next(p for p in out.parents if p.exists()), "PC_NAME_MAX")
    if len(os.fsencode(out.name)) > limit:  # below a missing directory, nothing says so before the write
        raise ArtifactError(f"the artifact's name '{out.name[:32]}...' is {len(os.fsencode(out.name))} bytes, over "
                            f"the file system's limit of {limit}; give a shorter -o (or spec name)")
    refuse_foreign(out)
    if out.is_mount():  # a bind mount (docker -v): renaming onto it fails after the whole build
        raise ArtifactError(f"'{out}' is a mount point, which an artifact cannot be swapped onto; "
                            f"write it into the mount, e.g. -o {out / 'model'}")
    if out.is_dir() and any(not os.access(p, os.W_OK) for p in (out, *out.iterdir())):
        raise ArtifactError(f"'{out}' holds a read-only artifact (or another user's); make it writable "
                            f"(chmod -R u+w '{out}') or choose another -o")
    problem = why_unwritable(out.parent)  # the artifact is built beside `out`, then swapped in
    if problem:
        raise ArtifactError(f"cannot write artifact to '{out}': {problem}")
    temp = tempfile.gettempdir()
    problem = why_unwritable(temp)
    free = shutil.disk_usage(temp).free if not problem else 0
    if problem or free < TEMP_SPACE:  # the build's objects are written there first
        raise ArtifactError(f"the temporary directory '{temp}' "
                            f"{'is unusable: ' + problem if problem else f'has {free >> 20} MB free'}; "
                            f"set TMPDIR to a directory with at least {TEMP_SPACE >> 20} MB free")


def _linker_problem(exc: RuntimeError) -> str:
    """The line of TVM's linker error that says what went wrong: TVM heads the compiler's output
    with "Compilation error:" and ends it with the command line."""
    lines = [line.strip() for line in str(exc).splitlines()
             if line.strip() and not line.startswith(("Compilation error", "Command line:", "collect2:"))]
    failed = [line for line in lines if any(word in line for word in ("failed", "No space", "Permission", "cannot"))]
    return (failed or lines or [type(exc).__name__])[0]


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")
