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
from mixer_compile.locking import exclusive

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
    tmp = _temp_dir_beside(out)
    try:
        try:
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
        meta = {"format_version": FORMAT_VERSION, **metadata, "files": files, "file_sizes": sizes}
        (tmp / METADATA).write_text(json.dumps(meta, indent=2, default=_json_default) + "\n")
        with exclusive(out):  # a concurrent compile into `out` swaps before or after, never between
            _swap_into_place(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ArtifactError(f"cannot write artifact to '{out}': {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_writable(out_dir: str | Path) -> None:
    """Fails now, not after a long build, when the artifact could not be written to `out_dir`
    (no permission, a read-only or full file system, a file or a foreign directory in the way).
    Creates nothing that outlives the check, not even the missing parent directories."""
    out = Path(out_dir).resolve()
    _refuse_foreign(out)
    existing = next(p for p in out.parents if p.exists())
    if not existing.is_dir():
        raise ArtifactError(f"cannot write artifact to '{out}': '{existing}' is not a directory")
    try:
        shutil.rmtree(tempfile.mkdtemp(prefix=f".{out.name}.", dir=existing))
    except OSError as exc:
        raise ArtifactError(f"cannot write artifact to '{out}': {exc.strerror or exc}") from None


def _temp_dir_beside(out: Path) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the artifact private
    except OSError as exc:
        raise ArtifactError(f"cannot write artifact to '{out}': {exc.strerror or exc}") from None
    return tmp


def _linker_problem(exc: RuntimeError) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    failed = [line for line in lines if "failed" in line or "No space" in line or "Permission" in line]
    return (failed or lines or [type(exc).__name__])[0]


def _refuse_foreign(out: Path) -> None:
    if out.exists() and (not out.is_dir() or not (out / METADATA).is_file() and any(out.iterdir())):
        raise ArtifactError(f"'{out}' exists and is not a mixer-compile artifact; "
                            "choose another output directory")


def _swap_into_place(tmp: Path, out: Path) -> None:
    _refuse_foreign(out)
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
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise ArtifactError(f"'{path}' is not valid JSON ({exc}); rebuild the artifact") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"'{path}' has format version {meta.get('format_version') if isinstance(meta, dict) else None!r}; "
                            f"this mixer-compile reads version {FORMAT_VERSION}")
    _check_fields(meta, path)
    return meta


def _is_list_of(kind: type) -> Any:
    return lambda v: isinstance(v, list) and all(isinstance(x, kind) and not isinstance(x, bool) for x in v)


def _is_dict_of(kind: type) -> Any:
    return lambda v: isinstance(v, dict) and all(isinstance(x, kind) and not isinstance(x, bool) for x in v.values())


# The fields a loader acts on, with the test each must pass (dotted paths into the JSON).
_FIELDS: dict[str, tuple[Any, str]] = {
    "tvm_version": (lambda v: isinstance(v, str), "a string"),
    "target": (lambda v: isinstance(v, dict), "an object"),
    "target.kind": (lambda v: isinstance(v, str), "a string"),
    "target.requires": (lambda v: v is None or isinstance(v, dict), "an object"),
    "files": (_is_dict_of(str), "an object of SHA-256 strings"),
    "file_sizes": (lambda v: v is None or _is_dict_of(int)(v), "an object of byte counts"),
    "input": (lambda v: isinstance(v, dict), "an object"),
    "input.shape": (lambda v: _is_list_of(int)(v) and len(v) == 4 and min(v) > 0, "4 positive integers (NCHW)"),
    "input.dtype": (lambda v: isinstance(v, str), "a string"),
    "params": (_is_list_of(str), "a list of parameter names"),
    "weights": (lambda v: isinstance(v, dict) and isinstance(v.get("embedded"), bool), "an object with 'embedded'"),
    "spec": (lambda v: isinstance(v, dict), "an object"),
}


def _check_fields(meta: dict[str, Any], path: Path) -> None:
    """An edited or damaged metadata.json is refused here, by field, rather than surfacing as a
    KeyError in the loader or a shape mismatch inside TVM on the first call."""
    def field(dotted: str) -> Any:
        value: Any = meta
        for key in dotted.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        return value

    def refuse(problem: str) -> None:
        raise ArtifactError(f"'{path}': {problem}; the file was edited or damaged, rebuild the artifact")

    for dotted, (ok, want) in _FIELDS.items():
        if not ok(field(dotted)):
            refuse(f"field '{dotted}' must be {want}, got {field(dotted)!r}"[:300])
    needed = {LIBRARY} | (set() if meta["weights"]["embedded"] else {WEIGHTS})
    if not needed <= set(meta["files"]):
        refuse(f"'files' lacks {', '.join(sorted(needed - set(meta['files'])))}")
    spec = meta["spec"]
    size = spec.get("image_size")
    expected = [spec.get("batch"), spec.get("in_channels"), *(size if isinstance(size, list) else [size])]
    if meta["input"]["shape"] != expected:
        refuse(f"input shape {meta['input']['shape']} does not match the spec's {expected}")
    if meta["target"]["kind"] == "cuda" and "gpu_arch" not in (meta["target"].get("requires") or {}):
        refuse("a CUDA build without 'target.requires.gpu_arch'")
