"""The artifact directory: library, weights and metadata, written atomically.

Layout: `model.so` (the compiled module), `weights.params` (TVM's own param format, so the
runtime and the C++ example need nothing but the TVM runtime to read it; absent when the
weights are embedded) and `metadata.json` (spec, target, versions, hashes, validation,
passes). Everything is written into a temporary sibling directory and renamed into place
only when complete, so a crash or a failed validation never leaves a half-written artifact
where a good one is expected.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mixer_compile.errors import ArtifactError

LIBRARY, WEIGHTS, METADATA = "model.so", "weights.params", "metadata.json"
FORMAT_VERSION = 1


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_artifact(out_dir: str | Path, executable: Any, params: dict[str, np.ndarray] | None,
                   metadata: dict[str, Any]) -> Path:
    """Writes the artifact; `params` None means the weights are embedded in the library."""
    import tvm

    out = Path(out_dir).resolve()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the artifact private
    except OSError as exc:
        raise ArtifactError(f"cannot write artifact to '{out}': {exc.strerror}") from None
    try:
        executable.export_library(str(tmp / LIBRARY))
        files = {LIBRARY: sha256(tmp / LIBRARY)}
        if params is not None:
            tensors = {k: tvm.runtime.tensor(v) for k, v in params.items()}
            tvm.runtime.save_param_dict_to_file(tensors, str(tmp / WEIGHTS))
            files[WEIGHTS] = sha256(tmp / WEIGHTS)
        sizes = {name: (tmp / name).stat().st_size for name in files}
        meta = {"format_version": FORMAT_VERSION, **metadata, "files": files, "file_sizes": sizes}
        (tmp / METADATA).write_text(json.dumps(meta, indent=2, default=_json_default) + "\n")
        _swap_into_place(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ArtifactError(f"cannot write artifact to '{out}': {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _swap_into_place(tmp: Path, out: Path) -> None:
    if out.exists() and not (out / METADATA).is_file() and any(out.iterdir()):
        raise ArtifactError(f"'{out}' exists and is not a mixer-compile artifact; "
                            "choose another output directory")
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


def read_metadata(artifact_dir: str | Path) -> dict[str, Any]:
    path = Path(artifact_dir) / METADATA
    if not path.is_file():
        raise ArtifactError(f"'{artifact_dir}' is not an artifact: {METADATA} is missing")
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"'{path}' is not valid JSON ({exc}); rebuild the artifact") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"'{path}' has format version {meta.get('format_version') if isinstance(meta, dict) else None}; "
                            f"this mixer-compile reads version {FORMAT_VERSION}")
    return meta
