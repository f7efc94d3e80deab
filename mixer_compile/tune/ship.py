"""Shipping tuning results: what `mixer-compile tune --ship-to DIR` writes.

Builds read shipped records from the installed `schedules/` tree (MetaSchedule's in
`schedules/<target>/`, the GPU library GEMMs' in `schedules/<family>/library_gemms.json`).
Shipping copies the best record of each kernel (not the whole search) from a tuning database,
and for a GPU target the user's library-GEMM records, into such a tree. In a checkout that
tree is `schedules/`: committed, the records go out in the next wheel, and every user's first
compile of those kernels applies them.
"""

from __future__ import annotations

from pathlib import Path

from mixer_compile.backend import cutlass, gemm_choice
from mixer_compile.backend.target import TargetInfo
from mixer_compile.errors import TuningError
from mixer_compile.tune.database import export_best, has_records


def gemm_family(target: TargetInfo) -> str | None:
    """The library-GEMM family whose records a build for `target` applies (None: a CPU, or a
    GPU without CUTLASS kernels)."""
    if target.kind != "cuda":
        return None
    arch = str(target.tvm_target().attrs["arch"])
    return cutlass.gpu_arch_flag(arch)[0] if cutlass.has_family(arch) else None


def ship(target: TargetInfo, db_dir: Path, root: Path) -> list[str]:
    """Merges the tuning results for `target` into the schedules tree `root`: per kernel the
    faster of the record there and the database's best; a library GEMM record replaces the
    one of the same problem. Returns one line per file written."""
    written = []
    if has_records(db_dir):
        count = export_best(db_dir, root / target.name)
        written.append(f"{count} kernels' best records -> {root / target.name}")
    family = gemm_family(target)
    records = gemm_choice.read_records(gemm_choice.user_records_path(family)) if family else []
    if records:
        path = gemm_choice.shipped_records_path(family, root)
        gemm_choice.write_records(path, records)
        written.append(f"{len(records)} library GEMM records -> {path}")
    if not written:
        raise TuningError(f"nothing to ship for {target.name}: '{db_dir}' holds no tuning records"
                          + (f" and no library GEMM was measured for {family}" if family else "")
                          + "; run `mixer-compile tune` first")
    return written
