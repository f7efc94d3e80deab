"""The CPU backend (LLVM): Relax module -> compiled executable, every kernel scheduled.

The stock CPU pipeline of `tvm.compile` does no operator fusion; ours always runs the
target's full default pipeline (legalize, FuseOps, FuseTIR, ...), so a fused IR op really
becomes one kernel. Then every kernel gets a schedule (`schedule_kernels`): GEMMs always
gemm_space's micro-kernel, its tile and loop order from the best record of a GEMM of the same
shape (any epilogue, any batch) or from a model of the machine, its parallel split from the
target's cores; other kernels their exact record, else a default rule (cpu_schedules.py).
Nothing runs as plain loops without a loud warning, and `Applied` counts where each schedule
came from.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import tvm
from tvm import relax

from mixer_compile.backend.runner import Runner
from mixer_compile.backend.gemm_space import vector_unit
from mixer_compile.backend.target import TargetInfo
from mixer_compile.errors import TargetError
from mixer_compile.machine import host_arch, normalize_arch, physical_cores
from mixer_compile.passes.context import PassContext

TUNABLE = True
CHOOSES_FORM = True  # --choose-form can time this kind's builds here, on this CPU


def pass_context(target: TargetInfo, dtype: str) -> PassContext:
    """Right-product kernels in panels of the CPU's SIMD width (passes/pack_kernels.py), over
    the whole batch's rows (passes/batch_as_rows.py); activations in float32 whatever the
    storage dtype: the arithmetic is float32 here (passes/precision.py)."""
    return PassContext(dtype=dtype, panel=vector_unit(target.tvm_target()).lanes, activation_dtype="float32",
                       gemm_convs=True, batch_rows=True)


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
    """How every kernel of the build got its schedule: from a tuning record (`tuned`: a
    GEMM's micro-tile and loop order from the record of a GEMM of the same shape, or a
    non-GEMM kernel's exact record), from the default rules without measuring (`defaults`,
    cpu_schedules.py), or none (`untuned`: plain loops, ~100x slower; the build warns)."""

    kernels: int
    tuned: list[str] = field(default_factory=list)
    untuned: list[str] = field(default_factory=list)
    defaults: list[str] = field(default_factory=list)
    gemms: dict[str, Any] = field(default_factory=dict)  # kernel -> the gemm_space.Candidate it runs

    def summary(self) -> str:
        line = (f"{self.kernels} kernels: {len(self.tuned)} from records, {len(self.defaults)} default "
                f"schedules, {len(self.untuned)} unscheduled")
        return line + (f" ({', '.join(self.untuned)})" if self.untuned else "")

    def to_dict(self) -> dict[str, Any]:
        return {"kernels": self.kernels, "tuned": self.tuned, "untuned": self.untuned, "defaults": self.defaults}


SLOWDOWN = "~100x"  # plain loops against a scheduled kernel (DESIGN.md section 2)


def machine(target: TargetInfo) -> Any:
    """The SIMD unit and the cores the default schedules and parallel splits are shaped for:
    the build target's (for `llvm`, the host's `num-cores`), never the tuning machine's."""
    from mixer_compile.backend.cpu_schedules import Machine

    tvm_target = target.tvm_target()
    cores = tvm_target.attrs.get("num-cores")
    return Machine(vector_unit(tvm_target), int(cores) if cores else physical_cores())


def _leaf_databases(database: Any) -> list[Any]:
    from tvm.s_tir.meta_schedule.database import UnionDatabase

    if database is None:
        return []
    if isinstance(database, UnionDatabase):
        return [leaf for d in database.databases for leaf in _leaf_databases(d)]
    return [database]


class Decided(NamedTuple):
    """A micro-kernel decision a record holds, with what it was measured on."""

    secs: float
    batch: int
    decision: Any  # gemm_space.Decision
    workload: int  # structural hash of the record's kernel


def gemm_decisions(database: Any) -> dict[tuple[Any, ...], list[Decided]]:
    """Every micro-kernel decision (gemm_space.Decision) the records hold, by the GEMM's
    per-call shape (gemm_space.signature), fastest first. Read from the records' traces, so a
    record of fc1 with tanh GELU serves fc1 with erf GELU, and a batch-1 record a batch-8
    kernel, when that kernel has no record of its own."""
    import tvm_ffi
    from tvm.s_tir import Schedule

    from mixer_compile.backend import gemm_space

    out: dict[tuple[Any, ...], list[Decided]] = {}
    shapes: dict[int, Any] = {}
    for db in _leaf_databases(database):
        try:
            records = db.get_all_tuning_records()
        except Exception:  # a database kind that cannot list its records
            continue
        for rec in records:
            secs = [float(x) for x in rec.run_secs or []]
            if not secs or max(secs) >= 1e9:
                continue
            key = tvm_ffi.structural_hash(rec.workload.mod)
            if key not in shapes:
                sch = Schedule(rec.workload.mod)
                gemm = gemm_space.find_gemm(sch)
                shapes[key] = None if gemm is None else (sch, gemm)
            if shapes[key] is None:
                continue
            decision = gemm_space.decision_of(rec.trace)
            if decision is None:  # a record of MetaSchedule's generic space
                continue
            sch, gemm = shapes[key]
            sig = gemm_space.signature(sch, gemm, _panel_lanes(rec))
            out.setdefault(sig, []).append(Decided(sum(secs) / len(secs), gemm.batch, decision, key))
    for v in out.values():
        v.sort(key=lambda d: d.secs)
    return out


def _panel_lanes(rec: Any) -> int:
    """The SIMD width a gemm_space record was made for: the last factor of its Split of j."""
    from mixer_compile.backend.gemm_space import _plain

    for inst in _plain(rec.trace.as_json())[0]:
        if inst[0] == "Split" and len(inst[1]) == 5 and isinstance(inst[1][-1], int):
            return int(inst[1][-1])
    return 0


def _mark(func: Any, original: Any) -> Any:
    """A scheduled PrimFunc as the build takes it: MetaSchedule's `tirx.is_scheduled`, and the
    original's attributes (a workload carries `global_symbol` "main", a fused kernel none)."""
    func = func.with_attr("tirx.is_scheduled", True)
    if original.attrs is None or "global_symbol" not in original.attrs:
        func = func.without_attr("global_symbol")
    return func


def schedule_kernels(fused: tvm.IRModule, target: TargetInfo, database: Any = None) -> tuple[tvm.IRModule, Applied]:
    """`fused` (prepare's output) with every kernel scheduled:

    - a GEMM of gemm_space's tuning space: always gemm_space.apply, with the micro-tile and
      loop order of its own fastest record, else of the fastest record of a GEMM of the same
      per-call shape (any epilogue, any batch; the same batch preferred), else the register model's
      (`default_candidate`); the parallel split always from this target's cores;
    - any other kernel: its exact record (MetaSchedule's workload key), else the default rules
      (cpu_schedules.py).

    A kernel no rule schedules stays plain loops, and the build warns naming it."""
    import tvm_ffi
    from tvm.s_tir import Schedule
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    from mixer_compile.backend import cpu_schedules, gemm_space

    m = machine(target)
    tvm_target = target.tvm_target()
    decisions = gemm_decisions(database) if database is not None else {}
    applied = Applied(0)
    mod = fused
    for gv, func in fused.functions.items():
        if not is_kernel(func):
            continue
        applied.kernels += 1
        name = gv.name_hint
        scheduled, from_record = None, False
        sch = Schedule(func)
        gemm = gemm_space.find_gemm(sch)
        tiled = gemm is not None and bool(gemm_space.candidates(gemm, m.vec, m.cores))
        if tiled:
            sig = gemm_space.signature(sch, gemm, m.lanes)
            own = tvm_ffi.structural_hash(_normalize_mod(func)) if sig in decisions else None
            candidate = None
            # the kernel's own record first (the best tile can differ with the epilogue:
            # benchmarks/README.md, "A record of another epilogue"), then one of the same batch, fastest first
            ranked = sorted(decisions.get(sig, []), key=lambda d: (d.workload != own, d.batch != gemm.batch, d.secs))
            for d in ranked:
                candidate = gemm_space.with_decision(gemm, d.decision, m.vec, m.cores)
                if candidate is not None:
                    from_record = True
                    break
            candidate = candidate or gemm_space.default_candidate(gemm, m.vec, m.cores)
            try:
                gemm_space.apply(sch, gemm, candidate, m.lanes)
                scheduled = sch
                applied.gemms[name] = candidate
            except Exception:  # a primitive refused it (an epilogue that is not elementwise): the rules
                from_record = False
        elif database is not None:
            workload = _normalize_mod(func)
            with tvm_target:
                found = database.query_schedule(workload, tvm_target, "main")
            if found is not None:
                scheduled, from_record = found, True
        if scheduled is None:
            result = cpu_schedules.default_schedule(Schedule(func), m)
            scheduled = result[0] if result is not None else None
        if scheduled is None:
            applied.untuned.append(name)
            continue
        (applied.tuned if from_record else applied.defaults).append(name)
        mod = _replace(mod, gv, _mark(cpu_schedules.likely_guards(scheduled).mod["main"], func))
    if applied.untuned:
        warnings.warn(f"{len(applied.untuned)} of {applied.kernels} kernels got no schedule and run as plain "
                      f"loops, {SLOWDOWN} slower than scheduled: {', '.join(applied.untuned)} (no record and no "
                      "default rule (backend/cpu_schedules.py) applies to them)", UserWarning, stacklevel=3)
    return mod, applied


def default_schedule(mod: tvm.IRModule, target: TargetInfo) -> Any:
    """The schedule a build gives the kernel `mod["main"]` when no record applies (a Schedule,
    or None when no rule applies): what tuning starts from (tune/search.py). The default
    rules' first, `gemm`, is the register model's micro-kernel `schedule_kernels` applies."""
    from tvm.s_tir import Schedule

    from mixer_compile.backend import cpu_schedules

    result = cpu_schedules.default_schedule(Schedule(mod), machine(target))
    return result[0] if result is not None else None


def _replace(mod: tvm.IRModule, gv: Any, func: Any) -> tvm.IRModule:
    mod = mod.shallow_copy() if hasattr(mod, "shallow_copy") else tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    mod[gv] = func
    return mod


def build(mod: tvm.IRModule, target: TargetInfo, database: Any = None,
          on_applied: Callable[[Applied], None] | None = None) -> Any:
    """A `relax.VMExecutable` for `target`. The target's own pipeline runs in two halves
    around the schedules: legalize + fuse (`prepare`), every kernel scheduled (the
    `database`'s records where they apply, default schedules elsewhere: `schedule_kernels`),
    then lowering; `on_applied` hears how each kernel got its schedule."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from mixer_compile.backend.cpu_prefetch import PIPELINE
    from mixer_compile.backend.cpu_schedules import BUILD_CONFIG

    tvm_target = target.tvm_target()
    cross = cross_linker(target)  # before the work: no toolchain for a foreign architecture, no build
    mod = prepare(mod, target)
    mod, applied = schedule_kernels(mod, target, database)
    if on_applied is not None:
        on_applied(applied)
    with tvm_target, tvm.transform.PassContext(config=BUILD_CONFIG):
        rest = tvm.transform.Sequential(cpu.dataflow_lower_passes(tvm_target) + cpu.finalize_passes(tvm_target))
        executable = tvm.compile(mod, tvm_target, relax_pipeline=rest, tir_pipeline=PIPELINE)
    return executable if cross is None else CrossLinked(executable, cross)


def cross_linker(target: TargetInfo) -> str | None:
    """The C compiler that links a build for another architecture (LLVM compiles for any, but
    TVM links with this machine's g++, which fails on foreign objects with an empty "Compilation
    error"): $CXX or $CC when set, else the `<triple>-g++` or `-gcc` of a cross toolchain on
    PATH. None for this machine's architecture (TVM's own choice links it)."""
    triple = str(target.tvm_target().attrs.get("mtriple") or "")
    arch, here = normalize_arch(triple.split("-")[0]) if triple else None, host_arch()
    if arch is None or arch == here:
        return None
    given = os.environ.get("CXX") or os.environ.get("CC")
    if given:
        return given
    short = triple.replace("-unknown-", "-")  # LLVM's aarch64-unknown-linux-gnu is Debian's aarch64-linux-gnu
    for name in dict.fromkeys(f"{t}-{cc}" for t in (triple, short) for cc in ("g++", "gcc")):
        if shutil.which(name):
            return name
    raise TargetError(f"the {target.name} build is for {arch} and this machine is {here}; "
                      f"linking it needs a C compiler for {short}: install one (Debian/Ubuntu: apt install "
                      f"g++-{short}) or set CXX to it")


class CrossLinked:
    """A build for another architecture, linked by its cross compiler; duck-types the one
    method the artifact writer uses (`export_library`), as backend/cuda.py's CudaLibrary does."""

    def __init__(self, executable: Any, compiler: str) -> None:
        self.executable, self.compiler = executable, compiler

    def export_library(self, file_name: str) -> None:
        from tvm.support.cc import cross_compiler

        self.executable.export_library(file_name, fcompile=cross_compiler(self.compiler))


def runner(executable: Any, target: TargetInfo, params: list[Any],
           rebuild: Callable[[int], tuple[tvm.IRModule, list[Any], int]]) -> Runner:
    """Runs the build itself on this CPU when this CPU has every instruction set the target's
    code uses. A build for another CPU (`--target znver4` on an AVX2 machine) would die of an
    illegal instruction: the same Relax module (`rebuild`, at the build's batch: same lowering,
    same weight panels) is then built for this CPU and checked here, and the record says so."""
    from mixer_compile.backend.target import build_requirements, get_target
    from mixer_compile.errors import ArtifactError
    from mixer_compile.machine import check_cpu

    try:
        check_cpu(build_requirements(target.tvm_target())["cpu"], f"the {target.name} build")
    except ArtifactError as exc:
        mod, host_params, batch = rebuild(sys.maxsize)
        host = get_target("llvm")
        return Runner(build(mod, host), tvm.cpu(), host_params,
                      f"this CPU ({host.config.get('mcpu')}): the same lowering built for it; "
                      f"{target.name} run pending ({str(exc).split(';')[0]})", batch)
    return Runner(executable, tvm.cpu(), params, "this CPU")


def describe(executable: Any) -> dict[str, Any]:
    """Nothing beyond the target: LLVM code for the target's CPU, in the library."""
    return {}
