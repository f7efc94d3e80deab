"""Shipping tuning results: what `mixer-compile tune --ship-to DIR` writes.

Builds read shipped records from the installed `schedules/` tree (MetaSchedule's in
`schedules/<target>/`, the GPU library GEMMs' in `schedules/<family>/library_gemms.json`).
Shipping copies the best record of each of a model's kernels (not the whole search, nor the
other models' kernels the database holds) and, for a GPU target, the library-GEMM records of
its problems into such a tree. In a checkout that
tree is `schedules/`: committed, the records go out in the next wheel, and every user's first
compile of those kernels applies them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mixer_compile.backend import cuda, gemm_choice
from mixer_compile.backend.gemm_choice import Record
from mixer_compile.backend.target import TargetInfo
from mixer_compile.errors import TuningError
from mixer_compile.tune.database import export_best
from mixer_compile.util.atomic import why_unwritable


def check_writable(root: Path, target: TargetInfo) -> None:
    """Fails before the tuning, not after hours of it, when the schedules tree `root` could
    not be written, or the target is the host's own `llvm` (its records would go to
    `schedules/llvm`, which every host build would take in place of the named sets for its
    instruction sets); creates nothing that outlives the check."""
    if target.name == "llvm":
        raise TuningError("ship records for a named target (--target avx2, znver4, sm_90...): 'llvm' is this "
                          "machine's own CPU, and a schedules/llvm set would hide the others from every host build")
    problem = why_unwritable(root)
    if problem:
        raise TuningError(f"cannot ship records to '{Path(root).resolve()}': {problem}; give --ship-to a directory "
                          "this user can write")


def ship(target: TargetInfo, db_dir: Path, root: Path, mods: list[Any], gemm_records: list[Record]) -> list[str]:
    """Merges one tuning run's results for `target` into the schedules tree `root`: of the
    kernels `mods`, per kernel the faster of the record there and the database's best; the
    library GEMM records `gemm_records` replace those of the same problems. Returns one line
    per file written."""
    written = []
    if gemm_records:  # first: measured on a GPU, the scarcer of the two
        path = gemm_choice.shipped_records_path(cuda.gemm_family(target), root)
        gemm_choice.write_records(path, gemm_records)
        written.append(f"{len(gemm_records)} library GEMM records -> {path}")
    if mods:
        count = export_best(db_dir, root / target.name, mods)
        written.append(f"{count} kernels' best records ({len(mods)} of this model's) -> {root / target.name}")
    return written
