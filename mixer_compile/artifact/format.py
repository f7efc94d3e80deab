"""The artifact's one external contract: its files and the schema of `metadata.json`.

An artifact directory holds `model.so` (the compiled module), `weights.params` (TVM's own
param format, so the runtime and the C++ example need nothing but the TVM runtime to read it;
absent when the weights are embedded) and `metadata.json`, whose fields are the `Metadata`
dataclass below, versioned by `SCHEMA_VERSION` (stored as `format_version`). The writer
(write.py) fills it; the runtime reads it with `read_metadata`, which refuses an edited or
damaged file by field, and a newer schema with one line, before any code of the library runs.
This module is runtime-safe: the standard library and NumPy only.

Batch ranges: an artifact built for a range of batch sizes (`--batch 1-16`) holds several
static-batch entry functions in its one library (`BatchRange.entries`: the powers of two up
to the top of the range, plus the top; `main_b1`, `main_b2`, ...), all taking the one set of
weights. A batch of n runs as the binary decomposition of n over those entries (11 = 8+2+1,
no padding); the logits are concatenated. The record is the optional `batch` field of the
metadata; without it (a single-batch build, and every artifact written before ranges) the
library has one entry, `main`, at the batch of `input.shape`.

Run-time libraries: a library beyond TVM's and CUDA's runtimes that `model.so` links (cuBLASLt,
where a build chose it for some GEMMs) is named in the optional `runtime_libraries` field, by
file name (soname), and the loader loads each before the library (machine.py). Without the
field (every older artifact, and every build that links none) nothing more is needed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixer_compile.errors import ArtifactError

LIBRARY, WEIGHTS, METADATA = "model.so", "weights.params", "metadata.json"
SCHEMA_VERSION = 1  # `batch` and `runtime_libraries` are optional: artifacts without them read as before


@dataclass(frozen=True)
class BatchRange:
    """The batch sizes an artifact serves, and the static-batch entry function of each piece."""

    min: int
    max: int
    entries: tuple[int, ...]  # ascending; the last is `max`

    @classmethod
    def of(cls, low: int, high: int) -> "BatchRange":
        """A single batch (low == high: one entry, `main`) or a range: entries at the powers of
        two up to `high`, and `high` itself, so any n in the range splits without padding."""
        if low == high:
            return cls(low, high, (high,))
        powers = {1 << k for k in range(high.bit_length()) if 1 << k <= high}
        return cls(low, high, tuple(sorted(powers | {high})))

    @property
    def is_range(self) -> bool:
        return self.min != self.max

    def function(self, entry: int) -> str:
        """The name of the entry function of batch `entry` in the library."""
        return f"main_b{entry}" if self.is_range else "main"

    def describe(self) -> str:
        return f"{self.min}-{self.max}" if self.is_range else str(self.max)

    def split(self, n: int) -> list[int]:
        """The entry batches that make up a batch of `n`, largest first (greedy: with entries at
        every power of two this is n's binary decomposition; n == max is one call)."""
        if not self.min <= n <= self.max:
            raise ValueError(f"batch {n} is outside {self.describe()}")
        pieces, left = [], n
        for entry in reversed(self.entries):
            while entry <= left:
                pieces.append(entry)
                left -= entry
        if left:  # cannot happen with an entry of 1; a hand-written record might lack it
            raise ValueError(f"batch {n} cannot be made of the entries {list(self.entries)}")
        return pieces

    def to_dict(self) -> dict[str, Any]:
        return {"min": self.min, "max": self.max, "entries": list(self.entries),
                "functions": [self.function(e) for e in self.entries]}

    @classmethod
    def from_metadata(cls, batch: dict[str, Any] | None, input_shape: list[int]) -> "BatchRange":
        """The metadata's `batch` record, or the single batch of `input.shape` without one."""
        if batch is None:
            return cls.of(input_shape[0], input_shape[0])
        return cls(batch["min"], batch["max"], tuple(batch["entries"]))


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
    precision: dict[str, Any]  # dtype (weights), activations, accumulate
    passes: list[dict[str, Any]]  # one PassReport each, in order
    weights: dict[str, Any]  # origin, file or seed, embedded
    params: list[str]  # the module's parameters, in call order
    input: dict[str, Any]  # name, shape (NCHW), dtype, layout
    output: dict[str, Any]  # shape, dtype
    validation: dict[str, Any]  # check/validate.py's Validation
    tuning: dict[str, Any] | None = None  # CPU: databases, kernels with a record
    batch: dict[str, Any] | None = None  # a range build: min, max, entries, functions (BatchRange)
    gpu_code: dict[str, Any] | None = None  # CUDA: the fatbins the library carries
    runtime_libraries: list[str] | None = None  # sonames model.so needs beyond TVM's and CUDA's runtimes
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
    directory = Path(artifact_dir)
    try:
        is_dir = directory.is_dir()
    except OSError as exc:  # a name longer than the file system takes
        raise ArtifactError(f"artifact directory '{artifact_dir}': {exc.strerror}") from None
    if not is_dir:
        raise ArtifactError(f"artifact directory '{artifact_dir}' "
                            + ("is not a directory" if directory.exists() else "does not exist"))
    path = directory / METADATA
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
    "tvm_version": (lambda v: isinstance(v, str) and re.match(r"\d+\.\d+", v), "a version (0.27.0, say)"),
    "target": (lambda v: isinstance(v, dict), "an object"),
    "target.kind": (lambda v: v in ("llvm", "cuda"), "'llvm' or 'cuda'"),
    "target.requires": (lambda v: v is None or isinstance(v, dict), "an object"),
    "target.requires.cpu": (lambda v: v is None or isinstance(v, dict) and isinstance(v.get("arch"), str)
                            and isinstance(v.get("mcpu"), str) and _is_list_of(str)(v.get("features")),
                            "an object with 'arch', 'mcpu' and a list of 'features'"),
    "target.requires.gpu_arch": (lambda v: v is None or isinstance(v, str) and re.fullmatch(r"sm_\d+[a-z]?", v),
                                 "an architecture (sm_90a, say)"),
    "files": (lambda v: _is_dict_of(str)(v) and set(v) <= {LIBRARY, WEIGHTS},
              f"an object of SHA-256 strings of {LIBRARY} and {WEIGHTS}"),
    "file_sizes": (lambda v: v is None or _is_dict_of(int)(v) and min(v.values(), default=0) >= 0,
                   "an object of byte counts"),
    "input": (lambda v: isinstance(v, dict), "an object"),
    "input.shape": (lambda v: _is_list_of(int)(v) and len(v) == 4 and min(v) > 0, "4 positive integers (NCHW)"),
    "input.dtype": (lambda v: v in ("float32", "float16", "bfloat16"), "'float32', 'float16' or 'bfloat16'"),
    "output": (lambda v: isinstance(v, dict), "an object"),
    "output.shape": (lambda v: _is_list_of(int)(v) and len(v) == 2 and min(v) > 0, "2 positive integers (batch, classes)"),
    "params": (_is_list_of(str), "a list of parameter names"),
    "weights": (lambda v: isinstance(v, dict) and isinstance(v.get("embedded"), bool), "an object with 'embedded'"),
    "spec": (lambda v: isinstance(v, dict), "an object"),
    "runtime_libraries": (lambda v: v is None or _is_library_names(v), "a list of library file names (libX.so.N)"),
}


def _is_library_names(value: Any) -> bool:
    """File names only: the loader loads each, and a path would load whatever it points at."""
    return _is_list_of(str)(value) and all(re.fullmatch(r"lib[\w.+-]+\.so[\d.]*", x) for x in value)


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
    if meta["output"]["shape"] != [spec.get("batch"), spec.get("num_classes")]:
        refuse(f"output shape {meta['output']['shape']} does not match the spec's "
               f"{[spec.get('batch'), spec.get('num_classes')]}")
    if meta.get("batch") is not None:
        _check_batch(meta["batch"], meta["input"]["shape"][0], refuse)
    if meta["target"]["kind"] == "cuda" and "gpu_arch" not in (meta["target"].get("requires") or {}):
        refuse("a CUDA build without 'target.requires.gpu_arch'")


def _check_batch(batch: Any, top: int, refuse: Any) -> None:
    """The `batch` record of a range build: entries that reach every batch of the range, the
    largest being the input shape's batch, each with its function name."""
    ints = _is_list_of(int)
    if not isinstance(batch, dict) or not all(isinstance(batch.get(k), int) and not isinstance(batch.get(k), bool)
                                              for k in ("min", "max")):
        refuse(f"field 'batch' must be an object with integer 'min' and 'max', got {batch!r}"[:300])
    low, high, entries = batch["min"], batch["max"], batch.get("entries")
    if not 0 < low <= high or high != top:
        refuse(f"field 'batch' ({low}-{high}) does not fit the input shape's batch {top}")
    if not ints(entries) or not entries or entries != sorted(set(entries)) or entries[0] != 1 or entries[-1] != high:
        refuse(f"field 'batch.entries' must be ascending batch sizes from 1 to {high}, got {entries!r}"[:300])
    expected = BatchRange(low, high, tuple(entries)).to_dict()["functions"]
    if batch.get("functions") != expected:
        refuse(f"field 'batch.functions' must be {expected}, got {batch.get('functions')!r}"[:300])
