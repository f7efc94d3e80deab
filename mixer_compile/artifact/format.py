"""The artifact's one external contract: its files and the schema of `metadata.json`.

An artifact directory holds `model.so` (the compiled module), `weights.params` (TVM's own
param format, so the runtime and the C++ example need nothing but the TVM runtime to read it;
absent when the weights are embedded) and `metadata.json`, whose fields are the `Metadata`
dataclass below, versioned by `SCHEMA_VERSION` (stored as `format_version`). The writer
(write.py) fills it; the runtime reads it with `read_metadata`, which refuses an edited or
damaged file by field, and a newer schema with one line, before any code of the library runs.
This module is runtime-safe: the standard library and NumPy only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixer_compile.errors import ArtifactError

LIBRARY, WEIGHTS, METADATA = "model.so", "weights.params", "metadata.json"
SCHEMA_VERSION = 1


@dataclass
class Metadata:
    """Everything an artifact says about itself. Nested records stay JSON objects (dicts):
    they are written once and read by key, by us and by the C++ example alike."""

    mixer_compile_version: str
    tvm_version: str
    built_at: str  # UTC, ISO 8601
    built_on: dict[str, Any]  # machine, python
    spec: dict[str, Any]  # MixerSpec.to_dict()
    target: dict[str, Any]  # name, kind, config (the TVM target), requires (what the loading machine needs)
    form: str  # the IR form lowered (passes/pipeline.py)
    precision: dict[str, Any]  # dtype, accumulate
    passes: list[dict[str, Any]]  # one PassReport each, in order
    weights: dict[str, Any]  # origin, file or seed, embedded
    params: list[str]  # the module's parameters, in call order
    input: dict[str, Any]  # name, shape (NCHW), dtype, layout
    output: dict[str, Any]  # shape, dtype
    validation: dict[str, Any]  # check/validate.py's Validation
    tuning: dict[str, Any] | None = None  # CPU: databases, kernels with a record
    gpu_code: dict[str, Any] | None = None  # CUDA: the fatbins the library carries
    timings_s: dict[str, float] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # name -> SHA-256
    file_sizes: dict[str, int] = field(default_factory=dict)
    format_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        fields = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        return {"format_version": fields.pop("format_version"), **fields}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_metadata(artifact_dir: str | Path) -> Metadata:
    """The artifact's metadata, checked field by field (see `_check_fields`)."""
    path = Path(artifact_dir) / METADATA
    if not path.is_file():
        raise ArtifactError(f"'{artifact_dir}' is not an artifact: {METADATA} is missing")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise ArtifactError(f"'{path}' is not valid JSON ({exc}); rebuild the artifact") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise ArtifactError(f"'{path}' has metadata schema {version}, newer than this mixer-compile reads "
                            f"({SCHEMA_VERSION}); upgrade mixer-compile or rebuild the artifact with this one")
    if version != SCHEMA_VERSION:
        raise ArtifactError(f"'{path}' has format version {version!r}; this mixer-compile reads version "
                            f"{SCHEMA_VERSION}; rebuild the artifact")
    _check_fields(meta, path)
    names = {f.name for f in dataclasses.fields(Metadata)}
    unknown = sorted(set(meta) - names)
    if unknown:
        raise ArtifactError(f"'{path}' has fields this schema does not define ({', '.join(unknown)[:200]}); "
                            "the file was edited or damaged, rebuild the artifact")
    missing = sorted(f.name for f in dataclasses.fields(Metadata)
                     if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in meta)
    if missing:
        raise ArtifactError(f"'{path}' lacks the fields {', '.join(missing)}; the file was edited or damaged, "
                            "rebuild the artifact")
    return Metadata(**meta)


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
