"""Where tuning records live, and opening them safely.

A tuning database is a directory with MetaSchedule's two JSON-lines files (workloads, and
records that point at a workload by its line number). Records come from three places:
`--db DIR` given by the user, the user's cache (`$MIXER_COMPILE_CACHE/tuning/<target>`,
default `~/.cache/mixer-compile/tuning/<target>`) and the shipped `schedules/<target>/`.

TVM's loader aborts on the first bad line, and a tuning process killed mid-write leaves a
truncated last line onto which the next run would append. So every file is scanned line by
line before TVM sees it: a bad line is skipped with a warning naming the file and the line.
Reading goes through a cleaned copy; a database opened for writing is repaired in place only
after the original is kept aside under a `.corrupt-<time>` name, and the warning says where.
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from mixer_compile.errors import TargetError, TuningError
from mixer_compile.backend.target import TargetInfo
from mixer_compile.util.temps import claim_prefix

WORKLOADS, RECORDS = "database_workload.json", "database_tuning_record.json"
# the top-level schedules/, installed as the package data mixer_compile.schedules (pyproject.toml)
SCHEDULES_DIR = Path(files("mixer_compile.schedules"))
CACHE_ENV = "MIXER_COMPILE_CACHE"
_ISA_PREFIXES = ("avx", "fma", "sse", "f16c", "bmi", "popcnt", "amx", "vnni")


class TuningWarning(UserWarning):
    """A tuning database problem that does not stop the compile (bad line, nothing applied)."""


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mixer-compile"


def user_db_dir(target: TargetInfo) -> Path:
    """The user's own tuning records for `target` (written by `mixer-compile tune`)."""
    return cache_root() / "tuning" / target.name


def has_records(db_dir: Path) -> bool:
    path = Path(db_dir) / RECORDS
    try:
        return path.is_file() and path.stat().st_size > 0
    except PermissionError:  # another user's cache, say: a build only reads it, and goes on without
        warnings.warn(f"cannot read the tuning records in '{db_dir}' (permission denied): not used; set "
                      f"{CACHE_ENV} to a directory of yours", TuningWarning, stacklevel=2)
        return False


def _isa(config: dict[str, Any]) -> set[str]:
    import tvm

    features = tvm.target.codegen.llvm_get_cpu_features(tvm.target.Target(config))
    return {str(f) for f in features if str(f).startswith(_ISA_PREFIXES)}


def shipped_db_dirs(target: TargetInfo) -> list[Path]:
    """Shipped records usable for `target`: `schedules/<name>/` when it exists; otherwise (the
    host target) every shipped set tuned for a CPU of the same SIMD unit whose instruction sets
    the target CPU also has, the richest first. Schedules are target-independent TIR
    transformations, so records tuned for a compatible CPU apply and compile for this one; but
    a schedule shaped for another vector width is no schedule for this one (AVX2-tuned LayerNorm
    and mean records ran slower than the defaults on an AVX-512 CPU), and a GEMM's decisions
    are keyed by the width anyway. Zen 4's set (its instruction sets include AMD's SSE4a) serves
    Zen 4 and 5, not Intel's AVX-512 CPUs, where the defaults ran faster than its records
    (benchmarks/results/cpu_matrix_emeraldrapids_avx512_model.md)."""
    own = SCHEDULES_DIR / target.name
    if has_records(own):
        return [own]
    if target.kind != "llvm" or not SCHEDULES_DIR.is_dir():
        return []
    from mixer_compile.backend.gemm_space import vector_unit
    from mixer_compile.backend.target import get_target

    mine, unit = _isa(target.config), vector_unit(target.tvm_target())
    found = []
    for d in sorted(p for p in SCHEDULES_DIR.iterdir() if has_records(p)):
        try:
            tuned_for = get_target(d.name)
        except TargetError:
            continue
        theirs = _isa(tuned_for.config)
        if theirs <= mine and vector_unit(tuned_for.tvm_target()) == unit:
            found.append((len(theirs), d))
    return [d for _, d in sorted(found, key=lambda x: -x[0])]


@dataclass
class ScanResult:
    workloads: list[str]  # good workload lines
    records: list[str]  # good record lines, re-indexed onto `workloads`
    problems: list[str]  # one message per skipped line

    @property
    def clean(self) -> bool:
        return not self.problems


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        return []
    try:
        return path.read_text(errors="replace").split("\n")
    except OSError as exc:
        raise TuningError(f"cannot read tuning database file '{path}': {exc.strerror}") from None


def scan(db_dir: Path) -> ScanResult:
    """Every line of both files checked by parsing it the way TVM will (JSON, then the
    workload's IRModule or the record's trace); records of a skipped workload go with it."""
    from tvm.s_tir.meta_schedule.database import TuningRecord, Workload

    wl_path, rec_path = Path(db_dir) / WORKLOADS, Path(db_dir) / RECORDS
    problems: list[str] = []
    workloads: list[str] = []
    parsed: dict[int, tuple[int, Any]] = {}  # old index -> (new index, Workload)
    old = 0
    for lineno, line in enumerate(_lines(wl_path), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            workload = Workload.from_json(obj)
        except Exception as exc:  # TVM raises several error types for a malformed module
            problems.append(f"{wl_path}:{lineno}: bad workload line skipped ({_short(exc)})")
        else:
            parsed[old] = (len(workloads), workload)
            workloads.append(line)
        old += 1
    records: list[str] = []
    for lineno, line in enumerate(_lines(rec_path), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not (isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], int)):
                raise ValueError("not a [workload index, record] pair")
            if obj[0] not in parsed:
                raise ValueError(f"refers to workload {obj[0]}, which is missing or bad")
            new_index, workload = parsed[obj[0]]
            TuningRecord.from_json(obj[1], workload)
        except Exception as exc:  # JSON, shape or TVM trace errors alike mean a bad line
            problems.append(f"{rec_path}:{lineno}: bad tuning record skipped ({_short(exc)})")
        else:
            records.append(line if new_index == obj[0] else json.dumps([new_index, obj[1]]))
    return ScanResult(workloads, records, problems)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[-1] if text else type(exc).__name__)[:120]


def _write_clean(result: ScanResult, dest: Path) -> None:
    """Both files written aside first, then renamed: a full disk leaves the originals as they were."""
    parts = ((WORKLOADS, result.workloads), (RECORDS, result.records))
    for name, lines in parts:
        (dest / f".{name}.tmp").write_text("".join(line + "\n" for line in lines))
    for name, _ in parts:
        os.replace(dest / f".{name}.tmp", dest / name)


def open_database(db_dir: Path, writable: bool = False) -> Any:
    """A JSONDatabase over `db_dir`, its bad lines skipped with a TuningWarning each."""
    from tvm.s_tir.meta_schedule.database import JSONDatabase

    db_dir = Path(db_dir)
    if writable:
        try:
            db_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TuningError(f"cannot create tuning database directory '{db_dir}': {exc.strerror}") from None
    result = scan(db_dir)
    for problem in result.problems:
        warnings.warn(problem, TuningWarning, stacklevel=2)
    if result.clean:
        if writable:
            _end_with_newline(db_dir)
        path = db_dir
    elif writable:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
        try:
            for name in (WORKLOADS, RECORDS):
                if (db_dir / name).is_file():
                    shutil.copy2(db_dir / name, db_dir / f"{name}.corrupt-{stamp}")
            _write_clean(result, db_dir)
        except OSError as exc:
            for name in (WORKLOADS, RECORDS):
                (db_dir / f"{name}.corrupt-{stamp}").unlink(missing_ok=True)
                (db_dir / f".{name}.tmp").unlink(missing_ok=True)
            raise TuningError(f"cannot repair the tuning database '{db_dir}': {exc.strerror or exc}; free some "
                              "space, or give --db another directory") from None
        warnings.warn(f"{db_dir}: {len(result.problems)} bad line(s) removed; the original files are kept "
                      f"as *.corrupt-{stamp}", TuningWarning, stacklevel=2)
        path = db_dir
    else:
        path = Path(tempfile.mkdtemp(prefix="mixer-compile-db-"))
        atexit.register(shutil.rmtree, path, True)
        _write_clean(result, path)
    if not writable and not has_records(path):
        from tvm.s_tir.meta_schedule.database import MemoryDatabase

        return MemoryDatabase()
    return JSONDatabase(str(path / WORKLOADS), str(path / RECORDS), allow_missing=writable)


def _end_with_newline(db_dir: Path) -> None:
    """A record appended after a line without its newline would glue the two together."""
    for name in (WORKLOADS, RECORDS):
        path = db_dir / name
        if path.is_file() and path.stat().st_size:
            with open(path, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")


def open_union(db_dirs: list[Path]) -> Any:
    """One read-only database over several directories; a query returns the best record of
    any of them, so the user's own records win wherever they are faster than shipped ones."""
    from tvm.s_tir.meta_schedule.database import UnionDatabase

    dbs = [open_database(d) for d in db_dirs if has_records(d)]
    if not dbs:
        return None
    return dbs[0] if len(dbs) == 1 else UnionDatabase(*dbs)


def export_best(src_dir: Path, dest_dir: Path, mods: list[Any] | None = None) -> int:
    """Merges the best record of every workload of `src_dir` (of the workloads `mods` only,
    when given: one model's kernels of a database that holds others too) into `dest_dir`, what
    is shipped in schedules/: one record per kernel, not the whole search. Returns how many
    kernels `dest_dir` has a record for.

    Each winner is written with its own workload. Two models' kernels can be structurally
    equal under different block names (the token mean is `lv414_red` after a tanh GELU,
    `lv318_red` after an erf one), and a trace names its blocks: attached to the other model's
    copy of the workload, as a database's merge of equal workloads does, it no longer replays.
    The winners are written in the order of their structural hashes: shipping the same records
    again writes the same bytes, and a commit's diff shows only the records that changed."""
    import tvm_ffi
    from tvm.s_tir.meta_schedule.database import JSONDatabase, TuningRecord

    from mixer_compile.tune.tasks import record_secs

    dest_dir = Path(dest_dir)
    def by_kernel(directory: Path) -> list[tuple[int, Any]]:  # (structural hash, record)
        return [(tvm_ffi.structural_hash(r.workload.mod), r) for r in open_database(directory).get_all_tuning_records()]

    wanted = None if mods is None else {tvm_ffi.structural_hash(m) for m in mods}
    picked = [(key, r) for key, r in by_kernel(src_dir) if wanted is None or key in wanted]
    if not picked:
        raise TuningError(f"'{src_dir}' holds no tuning records{' of these kernels' if mods is not None else ''} "
                          "to export; run `mixer-compile tune` first")
    shipped = by_kernel(dest_dir) if has_records(dest_dir) else []
    best: dict[int, tuple[float, Any]] = {}  # structural hash -> (seconds, the fastest valid record)
    for key, r in [*shipped, *picked]:
        secs = record_secs(r)
        if secs is None or secs >= 1e9:  # no run, or a failed one
            continue
        if key not in best or secs < best[key][0]:
            best[key] = (secs, r)
    dest_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=claim_prefix(dest_dir, ".export-"), dir=dest_dir))
    try:
        db = JSONDatabase(str(tmp / WORKLOADS), str(tmp / RECORDS), allow_missing=True)
        for _, r in (best[key] for key in sorted(best)):
            db.commit_tuning_record(TuningRecord(r.trace, db.commit_workload(r.workload.mod), r.run_secs, r.target,
                                                 r.args_info))
        written = scan(tmp)  # TVM's writer says nothing of a full disk: read back before replacing
        if not written.clean or len(written.records) != len(best):
            raise TuningError(f"cannot ship records to '{dest_dir}': {len(written.records)} of {len(best)} records "
                              "read back whole (a full disk?); the records there are unchanged")
        for name in (WORKLOADS, RECORDS):
            os.replace(tmp / name, dest_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return len(best)
