"""Relax module -> compiled TVM executable for one target, with tuning records applied.

The stock CPU pipeline of `tvm.compile` does no operator fusion; ours always runs the
target's full default pipeline (legalize, FuseOps, FuseTIR, ...), so a fused IR op really
becomes one kernel. Records are applied to exactly the fused module that was tuned
(`tune.prepare`), and counted, because MetaSchedule skips a kernel without a record silently.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import tvm
from tvm import relax

from mixer_compile.errors import TuningError
from mixer_compile.targets import TargetInfo
from mixer_compile.tune import is_kernel


@dataclass
class Applied:
    """How many kernels of the build received a tuning record. MetaSchedule falls back to
    plain loops, 100x slower, for a kernel it finds no record for, and says nothing: this
    count is how a build knows (and tells) whether it is tuned."""

    kernels: int
    tuned: list[str] = field(default_factory=list)
    untuned: list[str] = field(default_factory=list)

    def summary(self) -> str:
        missing = f" (untuned: {', '.join(self.untuned)})" if self.untuned else ""
        return f"tuned {len(self.tuned)}/{self.kernels} kernels{missing}"

    def to_dict(self) -> dict[str, Any]:
        return {"kernels": self.kernels, "tuned": self.tuned, "untuned": self.untuned}


def apply_database(fused: tvm.IRModule, target: TargetInfo, database: Any) -> tuple[tvm.IRModule, Applied]:
    """`fused` (tune.prepare's output) with every kernel that has a record replaced by its
    best scheduled version."""
    with target.tvm_target(), database:
        mod = relax.transform.MetaScheduleApplyDatabase()(fused)
    applied = Applied(0)
    for gv, func in mod.functions.items():
        if is_kernel(func):
            applied.kernels += 1
            scheduled = func.attrs is not None and bool(func.attrs.get("tirx.is_scheduled", False))
            (applied.tuned if scheduled else applied.untuned).append(gv.name_hint)
    if applied.kernels and not applied.tuned:
        warnings.warn(f"the tuning database applied to none of the {applied.kernels} kernels: "
                      "the build is untuned and will be very slow", UserWarning, stacklevel=2)
    return mod, applied


def compile_module(mod: tvm.IRModule, target: TargetInfo, database: Any = None,
                   on_applied: Callable[[Applied], None] | None = None) -> Any:
    """A `relax.VMExecutable` for `target`. On CPU the target's own pipeline runs in two
    halves around the records: legalize + fuse (`tune.prepare`), the `database`'s records
    applied (when given), then lowering; `on_applied` hears how many kernels got one."""
    tvm_target = target.tvm_target()
    if target.is_gpu:
        if database is not None:
            raise TuningError("tuning databases are supported for CPU (llvm) targets only")
        with tvm_target:
            return tvm.compile(mod, tvm_target, relax_pipeline=relax.get_default_pipeline(tvm_target))
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from mixer_compile.tune import prepare

    mod = prepare(mod, target)
    if database is not None:
        mod, applied = apply_database(mod, target, database)
    else:
        applied = Applied(0, untuned=[gv.name_hint for gv, f in mod.functions.items() if is_kernel(f)])
        applied.kernels = len(applied.untuned)
    if on_applied is not None:
        on_applied(applied)
    with tvm_target:
        rest = tvm.transform.Sequential(cpu.dataflow_lower_passes(tvm_target) + cpu.finalize_passes(tvm_target))
        return tvm.compile(mod, tvm_target, relax_pipeline=rest)
