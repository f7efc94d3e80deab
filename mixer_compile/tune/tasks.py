"""The tasks of a model: its kernels as MetaSchedule workloads, with their budgets.

Extracted from the module the build compiles (`backend.cpu.prepare`), so a task's workload
hashes to the key a record is stored and applied under. `compose.model_tasks` is the one
place a model's tasks are made from a spec; tuning, reports and benchmarks all call it.

Budget: `trials` per kernel for the kernels that carry at least `BIG_SHARE` of the model's
FLOPs; the rest (LayerNorm, mean, head, patchify) get a quarter of it: their search spaces
are small and a few trials find the parallel, vectorised loop nest. GEMM kernels search
backend/gemm_space.py's micro-kernel candidates instead of the generic space; only their
micro-tile and loop order matter to a build (the parallel split is the build machine's).
On a GPU every kernel searches MetaSchedule's tensor-core space: WMMA tiles for the half-
precision GEMMs (fp32 accumulators), the generic CUDA rules for the rest.
Tuning starts from each kernel's default schedule (tune/search.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import tvm
import tvm_ffi
from tvm.s_tir import meta_schedule as ms

from mixer_compile.backend.cpu import is_kernel
from mixer_compile.backend.target import TargetInfo
from mixer_compile.errors import TuningError

BIG_SHARE = 0.05


@dataclass
class Task:
    name: str
    mod: tvm.IRModule  # the kernel's workload, the database key
    calls: int  # how many times the model calls it
    flops: float  # per call
    trials: int = 0  # the budget
    done: int = 0  # records in the database
    space: Any = "post-order-apply"  # MetaSchedule's generic space, or gemm_space's candidates
    micro_kernel: bool = False  # the space is gemm_space's candidates (a CPU GEMM)
    default_secs: float | None = None  # the default schedule's measured time, when tuning measured it
    default_decision: Any = None  # its gemm_space.Decision, for a GEMM of that space (then measured)

    @property
    def total_flops(self) -> float:
        return self.flops * self.calls


def extract_tasks(fused: tvm.IRModule, target: TargetInfo, trials: int) -> list[Task]:
    """The kernels of `fused` with their budgets, largest share of the FLOPs first."""
    from tvm.s_tir.analysis import estimate_tir_flops

    if trials < 1:
        raise TuningError(f"--trials must be at least 1, got {trials}")
    tasks = []
    tvm_target = target.tvm_target()
    for t in ms.relax_integration.extract_tasks(fused, tvm_target):
        mod = t.dispatched[0]
        if not is_kernel(mod["main"]):
            continue
        tasks.append(Task(t.task_name, mod, int(t.weight), float(estimate_tir_flops(mod))))
    if not tasks:
        raise TuningError("the module has no kernels to tune")
    total = sum(t.total_flops for t in tasks) or 1.0
    for t in tasks:
        t.trials = trials if t.total_flops / total >= BIG_SHARE else max(1, trials // 4)
        if tvm_target.kind.name == "cuda":
            t.space = tensor_core_space()
        else:
            _use_gemm_space(t, tvm_target)
    return sorted(tasks, key=lambda t: -t.total_flops)


def _use_gemm_space(task: Task, tvm_target: Any) -> None:
    """GEMM kernels search gemm_space's micro-kernel candidates; each is a fixed loop nest, so
    a budget beyond their number has nothing more to find."""
    from tvm.s_tir import Schedule

    from mixer_compile.backend.gemm_space import design_spaces, vector_unit

    vec, cores = vector_unit(tvm_target), int(tvm_target.attrs["num-cores"])
    count = len(design_spaces(Schedule(task.mod), vec, cores))
    if count:
        task.space = ms.space_generator.ScheduleFn(lambda sch: design_spaces(sch, vec, cores),
                                                   sch_rules=[], postprocs=[], mutator_probs={})
        task.trials = min(task.trials, count)
        task.micro_kernel = True


def tensor_core_space() -> Any:
    """MetaSchedule's CUDA space with its tensor-core rules ahead (one per task: a tuning
    context takes its space generator over)."""
    import mixer_compile.backend.cuda_schedules  # noqa: F401 (registers the WMMA intrinsics the rules name, quickly)

    return ms.space_generator.PostOrderApply(sch_rules="cuda-tensorcore", postprocs="cuda-tensorcore",
                                             mutator_probs="cuda-tensorcore")


def unique(tasks: list[Task]) -> list[Task]:
    """One task per workload (two forms of a model share their LayerNorms, say), its calls summed."""
    seen: dict[int, Task] = {}
    for t in tasks:
        key = tvm_ffi.structural_hash(t.mod)
        if key in seen:
            seen[key].calls += t.calls
        else:
            seen[key] = t
    return list(seen.values())


def count_records(db: Any, tasks: list[Task]) -> None:
    """Sets `done` from the records already in `db` (failed measurements count: a candidate
    that does not build is a spent trial too)."""
    counts: dict[int, int] = {}
    for rec in db.get_all_tuning_records():
        key = tvm_ffi.structural_hash(rec.workload.mod)
        counts[key] = counts.get(key, 0) + 1
    for t in tasks:
        t.done = counts.get(tvm_ffi.structural_hash(t.mod), 0)


def best_latency(db: Any, mod: tvm.IRModule, target: TargetInfo) -> float | None:
    """Seconds of the best valid record of workload `mod`, None when it has none (a query:
    nothing is written, so it is safe on the shipped, read-only records)."""
    return record_secs(db.query_tuning_record(mod, target.tvm_target(), "main"))


def record_secs(record: Any) -> float | None:
    """A tuning record's mean measured seconds; None for no record or one without a valid run."""
    if record is None or not record.run_secs:
        return None
    return sum(float(s) for s in record.run_secs) / len(record.run_secs)


