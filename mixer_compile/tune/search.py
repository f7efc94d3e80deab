"""The MetaSchedule driver: the tasks of a model (tasks.py), tuned one by one into a database.

Each kernel is tuned on its own: one task at a time gives per-task progress, a budget per task and resumption by counting
the records a task already has. Records are keyed by workload (the kernel's TIR), so kernels
shared between presets or batch sizes are tuned once. MetaSchedule appends each measured
batch of candidates (`BATCH` trials) to the JSON database before it picks the next, so a
killed run loses at most the batch in flight and a re-run continues where it stopped; Ctrl-C
stops once the batch in flight is recorded (`util/interrupt.py`).

Tuning refines the defaults: before searching, the schedule a build would give each kernel
without records (backend/cpu.py `default_schedule`: gemm_space's register model, the
cpu_schedules rules) is measured once with the same runner and committed as the kernel's
first record, so the database's best is never slower than the default, and each kernel's
line (and `TuneSummary.table`) says what the search gained over it.

A GPU target is tuned the same way, measured by MetaSchedule's local runner on this machine's
GPU (or an RPC runner's): its default is DLight's schedule, its candidates MetaSchedule's
tensor-core space (tasks.py), each built with the PassContext the model build applies their
records under (`_build`).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tvm.s_tir import meta_schedule as ms

from mixer_compile.backend import backend_for, gemm_space
from mixer_compile.backend.intrinsics import tensor_intrinsics
from mixer_compile.backend.target import TargetInfo
from mixer_compile.errors import ArtifactError, TuningError
from mixer_compile.machine import physical_cores, use_all_cores
from mixer_compile.tune.database import open_database, scan
from mixer_compile.tune.tasks import Task, best_latency, count_records, record_secs
from mixer_compile.util.atomic import why_unwritable
from mixer_compile.util.interrupt import StopOnInterrupt, ignore_sigint
from mixer_compile.util.locking import exclusive
from mixer_compile.util.temps import claim_prefix

BATCH = 16
# MetaSchedule applies mutated traces without catching schedule errors (evolutionary_search.cc):
# a candidate of the CUDA tensor-core space can abort a task's whole search ("not a stage
# pipeline" in compute-at); a new seed usually gets past it, and the records so far are kept
SEARCH_ATTEMPTS = 3
INLINE_BUILD_FLOPS = 10e6  # kernels below this are compiled in this process (see _InlineBuilder)
Say = Callable[[str], None]


def _progress_callback(task: Task, index: int, total: int, clock: dict[str, Any], say: Say) -> Any:
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class _Progress(PyMeasureCallback):
        def apply(self, task_scheduler: Any, task_id: int, candidates: list, builds: list, runs: list) -> None:
            if clock["interrupt"].requested and task.done + len(runs) < task.trials:
                task_scheduler.terminate_task(task_id)  # at its budget the scheduler ends it: twice aborts
            if not runs:
                return
            for b, r in zip(builds, runs):
                task.done += 1
                clock["measured"] += 1
                if r.run_secs and not r.error_msg:
                    secs = sum(float(s) for s in r.run_secs) / len(r.run_secs)
                    clock["best"] = min(clock.get("best", float("inf")), secs)
            per_trial = (time.perf_counter() - clock["start"]) / max(1, clock["measured"])
            eta = per_trial * clock["remaining"]()
            best = clock.get("best")
            speed = f"{best * 1e3:.3f} ms ({task.flops / best / 1e9:.1f} GFLOP/s)" if best else "no valid run yet"
            failed = sum(1 for b, r in zip(builds, runs) if b.error_msg or r.error_msg)
            if failed:
                first = next(str(b.error_msg or r.error_msg) for b, r in zip(builds, runs) if b.error_msg or r.error_msg)
                say(f"      task {index}/{total} {task.name}: {failed} of {len(runs)} candidates failed "
                    f"({first.strip().splitlines()[-1][:150]})")
            say(f"      task {index}/{total} {task.name}: {task.done}/{task.trials} trials, best {speed}, "
                f"~{_minutes(eta)} left")

    return _Progress()


def _gain(t: Task, record: Any) -> str:
    """What the search gained over the default schedule ("" when either was not measured). A
    GEMM's best record that makes the default's own decision (micro-tile, loop order) is the
    default re-measured, and its ratio to the first measurement is the machine's noise: it is
    said as such, not as a gain."""
    best = record_secs(record)
    if best is None or not t.default_secs:
        return ""
    if t.default_decision is not None and gemm_space.decision_of(record.trace) == t.default_decision:
        return ", the default schedule (no candidate beat it)"
    return f", {t.default_secs / best:.2f}x over the default"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


@dataclass
class TuneSummary:
    tasks: list[Task]
    tuned_now: int  # trials measured by this run
    db_dir: Path
    seconds: float
    interrupted: bool = False

    def table(self, db: Any, target: TargetInfo) -> list[str]:
        lines = []
        width = max(len(t.name) for t in self.tasks)
        for t in self.tasks:
            record = db.query_tuning_record(t.mod, target.tvm_target(), "main")
            best = record_secs(record)
            speed = f"{best * 1e3:9.3f} ms {t.flops / best / 1e9:7.1f} GFLOP/s" if best else "   no valid record"
            gain = _gain(t, record)
            lines.append(f"      {t.name:<{width}} x{t.calls:<3} {t.flops / 1e6:9.1f} MFLOP {t.done:>5} trials "
                         f"{speed}{gain}")
        return lines


def tune(tasks: list[Task], target: TargetInfo, db_dir: Path, say: Say = print,
         seed: int | None = None, known: Any = None, runner: Any = None) -> TuneSummary:
    """Tunes every task (`compose.model_tasks`) until it has its budget of records in the
    database at `db_dir`; kernels already there, or in the read-only database `known` (the
    shipped records), are skipped. `runner`: where candidates are measured (default a
    LocalRunner here; fleet.rpc_runner for remote devices)."""
    _check_measurable(target, runner)
    problem = why_unwritable(db_dir)
    if problem:
        raise TuningError(f"cannot write the tuning database '{db_dir}': {problem}; give --db a directory this "
                          "user can write (or set MIXER_COMPILE_CACHE)")
    use_all_cores()  # measured as deployed: on every core (the runner processes inherit it)
    start = time.perf_counter()
    tvm_target = target.tvm_target()
    if tvm_target.kind.name == "llvm" and "num-cores" not in target.config:
        raise TuningError(f"target '{target.name}' has no num-cores; MetaSchedule needs it on CPU")
    with exclusive(db_dir, say):  # one writer per database: a second tuner waits for the first
        db = open_database(Path(db_dir), writable=True)
        count_records(db, tasks)
        _recall_defaults([t for t in tasks if t.done], target, db)
        shipped = [t for t in tasks if known is not None and best_latency(known, t.mod, target) is not None]
        unusable = [t for t in tasks if t not in shipped and best_latency(db, t.mod, target) is None]
        for t in unusable:  # a spent budget without one valid record (every build timed out...) is retried
            if t.done >= t.trials:
                t.trials += t.done
        # kernels without a usable record first: one of them left untuned makes the model ~100x slower
        todo = sorted((t for t in tasks if t.done < t.trials and t not in shipped), key=lambda t: t not in unusable)
        say(f"      {len(tasks)} kernels, {len(tasks) - len(todo)} already tuned in {db_dir}"
            + (f" or the shipped records ({len(shipped)})" if shipped else "") + "; "
            f"{sum(t.trials - t.done for t in todo)} trials to run")
        # the worker pools start (and check themselves) before Ctrl-C is ours: a Ctrl-C reaching a
        # worker still importing TVM kills it, which here is a plain KeyboardInterrupt in this process
        pools = _worker_pools(tvm_target, runner) if todo else None
        with StopOnInterrupt(say) as interrupt:
            measured = _measure_defaults([t for t in todo if t.done == 0], target, db, say, pools) if todo else 0
            todo = [t for t in todo if t.done < t.trials]
            if todo and not interrupt.requested:
                measured += _tune_tasks(todo, tasks, tvm_target, db, say, seed, interrupt, pools)
        if measured and not scan(Path(db_dir)).clean:  # TVM's writer says nothing of a full disk
            raise TuningError(f"the tuning database '{db_dir}' was not written whole (a full disk?): free some "
                              "space and run the same command again; its good records are kept")
    return TuneSummary(tasks, measured, Path(db_dir), time.perf_counter() - start, interrupt.requested)


def _check_measurable(target: TargetInfo, runner: Any) -> None:
    """Refuses, before any work, to tune for a GPU with no GPU to measure on, or for a CPU whose
    instruction sets this one lacks: MetaSchedule's local runner would fail every candidate,
    one timeout after the other, and end with nothing measured."""
    if runner is not None:
        return
    if target.kind != "cuda":
        from mixer_compile.backend.target import build_requirements
        from mixer_compile.machine import check_cpu

        try:
            check_cpu(build_requirements(target.tvm_target())["cpu"], f"the {target.name} code")
        except ArtifactError as exc:
            reason = str(exc).split(";")[0].removeprefix(f"the {target.name} code was built for ")
            raise TuningError(f"tuning for {target.name} measures on this CPU, which cannot run its code ({reason}): "
                              "tune on such a machine, or measure on one with --rpc-tracker") from None
        return
    from mixer_compile.machine import check_gpu, gpu_arch, local_gpu

    arch, local = str(target.tvm_target().attrs["arch"]), gpu_arch(local_gpu())
    if local is None:
        raise TuningError(f"tuning for {target.name} measures on a GPU; none is visible here (build with the "
                          "defaults, or tune on a GPU machine)")
    try:
        check_gpu(arch, local, f"tuning for {target.name}")
    except ArtifactError:
        raise TuningError(f"tuning for {target.name} measures on a {arch} GPU; this one is {local} (tune with "
                          f"--target {local}, or on a {arch} machine)") from None


def _measure_defaults(tasks: list[Task], target: TargetInfo, db: Any, say: Say, pools: tuple[Any, Any, Any]) -> int:
    """Each task's default schedule (what a build without records runs), built here and
    measured by the tuning runner in one batch, committed as the task's first record (it
    counts as a trial). Sets `Task.default_secs`; returns how many were recorded (a failed one
    is not: the search keeps its whole budget for that kernel)."""
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.builder import BuilderInput
    from tvm.s_tir.meta_schedule.database import TuningRecord
    from tvm.s_tir.meta_schedule.runner import RunnerInput

    _, inline, runner = pools
    tvm_target = target.tvm_target()
    default_schedule = backend_for(target).default_schedule
    scheduled = [(t, default_schedule(t.mod, target)) for t in tasks]
    scheduled = [(t, sch) for t, sch in scheduled if sch is not None]
    if not scheduled:
        return 0
    say(f"      measuring the default schedules of {len(scheduled)} kernels (what tuning starts from)")
    recorded = 0
    builds = inline.build([BuilderInput(sch.mod, tvm_target) for _, sch in scheduled])
    device = "cpu" if tvm_target.kind.name == "llvm" else tvm_target.kind.name
    inputs = [RunnerInput(b.artifact_path, device, ArgInfo.from_prim_func(t.mod["main"]))
              for (t, _), b in zip(scheduled, builds) if b.error_msg is None]
    futures = iter(runner.run(inputs)) if inputs else iter(())
    for (t, sch), b in zip(scheduled, builds):
        secs, error = None, b.error_msg
        if error is None:
            result = next(futures).result()
            error = result.error_msg
            if error is None and result.run_secs:
                secs = [float(x) for x in result.run_secs]
        if secs:  # a failed default is not recorded: the search still has its whole budget
            db.commit_tuning_record(TuningRecord(sch.trace, db.commit_workload(t.mod), secs, tvm_target,
                                                 ArgInfo.from_prim_func(t.mod["main"])))
            t.done += 1
            recorded += 1
            _remember_default(t, sch, sum(secs) / len(secs))
            say(f"      {t.name}: default schedule {t.default_secs * 1e3:.3f} ms "
                f"({t.flops / t.default_secs / 1e9:.1f} GFLOP/s)")
        else:
            say(f"      {t.name}: default schedule failed ({str(error).strip().splitlines()[-1][:150]})")
    return recorded


def _recall_defaults(tasks: list[Task], target: TargetInfo, db: Any) -> None:
    """Sets `Task.default_secs` (and `default_decision`) of kernels a previous run started from
    the record `_measure_defaults` committed, found by its trace, so that a resumed run still
    says what the search gained over the default."""
    default_schedule = backend_for(target).default_schedule
    for t in tasks:
        sch = default_schedule(t.mod, target)
        if sch is None:
            continue
        trace = str(sch.trace.as_json(remove_postproc=True))
        records = db.get_top_k(db.commit_workload(t.mod), t.done)
        secs = record_secs(next((r for r in records if str(r.trace.as_json(remove_postproc=True)) == trace), None))
        if secs:
            _remember_default(t, sch, secs)


def _remember_default(t: Task, sch: Any, secs: float) -> None:
    """What `_gain` compares the search's best with: the default's time and, for a GEMM of
    gemm_space, its decision (a best record making it is the default re-measured)."""
    t.default_secs = secs
    t.default_decision = gemm_space.decision_of(sch.trace) if t.micro_kernel else None


def _inline_builder() -> Any:
    """Compiles candidates in this process, one after the other. MetaSchedule's LocalBuilder
    starts a fresh pool of worker processes for every batch (each importing TVM), which on a
    busy 2-core machine costs more than compiling a small kernel's candidates; the large
    kernels keep the parallel workers (and their timeout)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import default_export

    @derived_object
    class _InlineBuilder(PyBuilder):
        def build(self, build_inputs: list) -> list:
            results = []
            for b in build_inputs:
                try:
                    results.append(BuilderResult(default_export(_build(b.mod, b.target)), None))
                except Exception as exc:  # a candidate that does not compile is a failed trial, not an error
                    results.append(BuilderResult(None, f"inline build: {exc}"))
            return results

    return _InlineBuilder()


def _build(mod: Any, target: Any, _params: Any = None) -> Any:
    """MetaSchedule's `default_build` (both builders' build function) without its `import
    tvm.s_tir.tensor_intrin` (slow, see backend/intrinsics.py; a scheduled candidate needs none
    of them, and a builder worker is a process of its own). Candidates build as the model
    build applying their records does: CUDA ones under cuda_schedules.BUILD_CONFIG, CPU ones
    by cpu_schedules.build_kernel."""
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    if target.kind.name != "cuda":
        from mixer_compile.backend.cpu_schedules import build_kernel

        return build_kernel(mod, target)
    from mixer_compile.backend.cuda_schedules import BUILD_CONFIG

    with tvm.transform.PassContext(config=BUILD_CONFIG):
        return tvm.tirx.build(mod, target=target)


def _search(trials: int) -> Any:
    """MetaSchedule's evolutionary search, its population scaled to the budget: the default
    512 costs ~10 s of CPU per round in sampling and cost-model scoring, which a budget of a
    few trials per kernel cannot use (it is what makes a tiny tuning run take minutes)."""
    return ms.search_strategy.EvolutionarySearch(population_size=min(512, max(32, 16 * trials)),
                                                 init_min_unmeasured=min(50, max(8, 4 * trials)))


def _worker_pools(tvm_target: Any, runner: Any) -> tuple[Any, Any, Any]:
    """The builders here (a process pool, and inline for small kernels) and the runner (the
    caller's, or one here), workers ignoring Ctrl-C."""
    # generous timeouts: on a loaded 2-core machine a worker's start-up alone can take 30 s;
    # a candidate whose build takes longer than 90 s is a pathological unrolling anyway.
    # Candidates are timed warm (MetaSchedule's default): flushing the caches before each run
    # (enable_cpu_cache_flush, to mimic weights arriving from DRAM) picked records that made
    # Mixer-B/16 batch 1 slower in the model, in an A/B run: a flushed run's time is mostly the
    # weights' stream, the same for every candidate, so the noise picked the record.
    pool = ms.builder.LocalBuilder(max_workers=int(tvm_target.attrs.get("num-cores") or physical_cores()),
                                   timeout_sec=90, f_build=_build, initializer=ignore_sigint)
    inline = _inline_builder()
    return pool, inline, runner or ms.runner.LocalRunner(timeout_sec=120, initializer=ignore_sigint)


def _search_task(t: Task, index: int, total: int, tvm_target: Any, db: Any, say: Say, clock: dict[str, Any],
                 work_dir: str, pools: tuple[Any, Any, Any], rand_state: int) -> None:
    """One MetaSchedule search over the trials `t` has left; what it measures is in `db` as it goes."""
    pool, inline, runner = pools
    context = ms.TuneContext(mod=t.mod, target=tvm_target, space_generator=t.space, search_strategy=_search(t.trials),
                             task_name=t.name, rand_state=rand_state, num_threads="physical")
    callbacks = [*ms.measure_callback.MeasureCallback.create("default"), _progress_callback(t, index, total, clock, say)]
    remaining = t.trials - t.done
    ms.tune_tasks(tasks=[context], task_weights=[1.0], work_dir=work_dir, max_trials_global=remaining,
                  num_trials_per_iter=min(BATCH, remaining), runner=runner,
                  builder=inline if t.flops < INLINE_BUILD_FLOPS else pool,
                  database=db, measure_callbacks=callbacks, cost_model="xgb", task_scheduler="round-robin")


def _tune_tasks(todo: list[Task], tasks: list[Task], tvm_target: Any, db: Any, say: Say, seed: int | None,
                interrupt: StopOnInterrupt, pools: tuple[Any, Any, Any]) -> int:
    clock: dict[str, Any] = {"start": time.perf_counter(), "measured": 0, "interrupt": interrupt,
                             "remaining": lambda: sum(max(0, t.trials - t.done) for t in todo)}
    tensor_intrinsics()  # each TuneContext imports them: once here, in seconds, not a minute
    tmp = Path(tempfile.gettempdir())  # MetaSchedule's logs; a killed run's go with the next run
    with tempfile.TemporaryDirectory(prefix=claim_prefix(tmp, "mixer-compile-tune-"), dir=tmp) as work_dir:
        for t in todo:
            index = tasks.index(t) + 1
            clock.pop("best", None)
            say(f"      task {index}/{len(tasks)} {t.name}: x{t.calls}, {t.flops / 1e6:.1f} MFLOP per call, "
                f"{t.done}/{t.trials} trials done")
            for attempt in range(SEARCH_ATTEMPTS):
                if t.done >= t.trials:
                    break
                try:
                    _search_task(t, index, len(tasks), tvm_target, db, say, clock, work_dir, pools,
                                 -1 if seed is None else seed + index + 1000 * attempt)
                    break
                except Exception as exc:  # noqa: BLE001 (TVM raises its own error types from C++)
                    last = str(exc).strip().splitlines()
                    say(f"      task {index}/{len(tasks)} {t.name}: the search stopped on a MetaSchedule error "
                        f"({(last[0] if last else type(exc).__name__)[:120]}); "
                        + ("retrying with another seed" if attempt + 1 < SEARCH_ATTEMPTS
                           else "the kernel keeps its best record so far"))
            else:
                t.trials = t.done
            record = db.query_tuning_record(t.mod, tvm_target, "main")
            gain = _gain(t, record)
            if gain:
                say(f"      task {index}/{len(tasks)} {t.name}: best {record_secs(record) * 1e3:.3f} ms{gain} "
                    f"(the default measured {t.default_secs * 1e3:.3f} ms)")
            if interrupt.requested:
                break
            if t.done < t.trials:  # the search space ran out of new candidates
                say(f"      task {index}/{len(tasks)} {t.name}: search space exhausted at {t.done} trials")
                t.trials = t.done
    return clock["measured"]
