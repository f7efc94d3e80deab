"""The CPU backend (LLVM): Relax module -> compiled executable, tuning records applied.

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

from mixer_compile.backend import Runner
from mixer_compile.backend.gemm_space import vector_unit
from mixer_compile.backend.target import TargetInfo
from mixer_compile.passes.context import PassContext

TUNABLE = True


def pass_context(target: TargetInfo, dtype: str) -> PassContext:
    """Right-product kernels in panels of the CPU's SIMD width (passes/pack_kernels.py)."""
    return PassContext(dtype=dtype, panel=vector_unit(target.tvm_target()).lanes)


def prepare(mod: tvm.IRModule, target: TargetInfo) -> tvm.IRModule:
    """Legalized and fused: the form whose PrimFuncs are the tuning tasks and the kernels the
    build applies records to (the CPU pipeline's dispatch + legalize passes, after
    FastMathTransform: tanh/erf become polynomials LLVM can vectorise)."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    tvm_target = target.tvm_target()
    with tvm_target:
        passes = [relax.transform.FastMathTransform(), *cpu.library_dispatch_passes(tvm_target),
                  *cpu.legalize_passes(tvm_target)]
        return tvm.transform.Sequential(passes)(mod)


def is_kernel(func: Any) -> bool:
    """A PrimFunc that runs as code: pure reshapes become views in the build and never run."""
    return isinstance(func, tvm.tirx.PrimFunc) and not relax.analysis.has_reshape_pattern(func)


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
    """`fused` (prepare's output) with every kernel that has a record replaced by its
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


def build(mod: tvm.IRModule, target: TargetInfo, database: Any = None,
          on_applied: Callable[[Applied], None] | None = None) -> Any:
    """A `relax.VMExecutable` for `target`. The target's own pipeline runs in two halves
    around the records: legalize + fuse (`prepare`), the `database`'s records applied (when
    given), then lowering; `on_applied` hears how many kernels got one."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    tvm_target = target.tvm_target()
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


def runner(executable: Any, target: TargetInfo, params: list[Any],
           rebuild: Callable[[int], tuple[tvm.IRModule, list[Any], int]]) -> Runner:
    """Runs the build itself, on this CPU (`rebuild` is for backends that cannot run here)."""
    return Runner(vm_function(executable, tvm.cpu(), params), "this CPU")


def vm_function(library: Any, dev: Any, params: list[Any]) -> Callable[[Any], Any]:
    """`main` of a compiled module on `dev` with its weights bound: NumPy images in and out."""
    vm = relax.VirtualMachine(library, dev)
    args = [tvm.runtime.tensor(v, dev) for v in params]
    return lambda x: vm["main"](tvm.runtime.tensor(x, dev), *args).numpy()


def describe(executable: Any) -> dict[str, Any]:
    """Nothing beyond the target: LLVM code for the target's CPU, in the library."""
    return {}
