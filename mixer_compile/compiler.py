"""The compile driver: spec -> weights -> (the one composition) -> build -> validate -> artifact.

The CLI (`mixer-compile`) and the Python API (`mixer_compile.compile`, api.py) both call
`compile_model`. Before any work it refuses a batch whose activations, weights and validation
images would not fit the memory of the machine that runs them (check/memory.py), and an output
directory the artifact could not be written to (`check_before_work`). A batch range
(`CompileOptions.batches`) builds one library with an entry function per entry batch
(artifact/format.py's BatchRange) and validates the range's smallest batch, its largest and
an odd one between, each run as the runtime runs it (split over the entries).

Each stage is one call into the module that owns it; this file only orders them and records
what happened, for the metadata and the progress lines. What differs between target kinds is
the backend's business (backend/__init__.py); what the model is, the composition's (compose.py).
"""

from __future__ import annotations

import datetime
import platform
import shlex
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mixer_compile.version import __version__
from mixer_compile.artifact.format import BatchRange, Metadata
from mixer_compile.backend import backend_for
from mixer_compile.backend.runner import Runner
from mixer_compile.backend.target import TargetInfo, build_requirements, get_target
from mixer_compile.check.memory import check_fits
from mixer_compile.check.validate import REFERENCE_IMAGES, TOLERANCES, Validation, validate
from mixer_compile.compose import compose
from mixer_compile.errors import MixerCompileError, TuningError
from mixer_compile.frontends import InMemoryWeights, weights_for
from mixer_compile.machine import use_all_cores
from mixer_compile.model.spec import MixerSpec
from mixer_compile.passes.pipeline import PassReport
from mixer_compile.util.progress import Progress


@dataclass
class CompileOptions:
    spec: MixerSpec
    target: str = "llvm"
    weights: Path | InMemoryWeights | None = None  # a checkpoint file, or weights read off a live module
    seed: int = 0
    form: str = "matmul"
    dtype: str = "float32"  # storage precision (passes/precision.py)
    embed_weights: bool = False
    out_dir: Path | None = None
    validation_seed: int = 1234
    tune: bool = False  # tune the kernels that lack records before building (a GPU target: on this GPU)
    trials: int = 64  # per large kernel, when tuning
    db: Path | None = None  # tuning database; default the user cache (tune/database.user_db_dir)
    choose_form: bool = False  # build every IR form, time each, keep the fastest (CPU)
    batches: tuple[int, int] | None = None  # a batch range (min, max) served by one artifact; None: spec.batch

    def batch_range(self) -> BatchRange:
        """The batches to serve: `batches` (the spec's batch is then ignored) or the spec's one."""
        low, high = self.batches or (self.spec.batch, self.spec.batch)
        if not 0 < low <= high:
            raise MixerCompileError(f"batch range {low}-{high} is empty; give min-max with 0 < min <= max")
        return BatchRange.of(low, high)


@dataclass
class CompileResult:
    spec: MixerSpec
    validation: Validation
    passes: list[PassReport]
    timings: dict[str, float]
    metadata: Metadata
    artifact: Path | None = None


def check_before_work(opts: CompileOptions) -> BatchRange:
    """Refuses, in one line, a compile that is bound to fail for a reason known before any work:
    a batch the memory cannot hold (check/memory.py), an artifact that could not be written to
    `out_dir`, a temporary directory without room (artifact/write.py's check_writable). Callers
    with work of their own before `compile_model` (import-onnx draws images and writes the
    checkpoint beside the artifact) call it first, so that nothing is allocated or written for
    a compile that would be refused. Returns the batch range it checked."""
    batches = opts.batch_range()
    check_fits(opts.spec.replace(batch=batches.max), batches, opts.target, opts.dtype)
    if opts.out_dir is not None:
        from mixer_compile.artifact.write import check_writable

        check_writable(opts.out_dir)
    return batches


def compile_model(opts: CompileOptions, progress: Progress | None = None) -> CompileResult:
    batches = check_before_work(opts)
    spec = opts.spec.replace(batch=batches.max)

    import tvm

    from mixer_compile.artifact.write import write_artifact
    use_all_cores()  # before validation or form choice runs a kernel (machine.py)
    progress = progress or Progress((6 if opts.out_dir is not None else 5) + int(opts.choose_form))
    with progress.stage("target", opts.target):
        target = get_target(opts.target)
        backend = backend_for(target)
        if target.name != opts.target and target.description:  # an alias, or `cuda` resolved to the GPU here
            progress.say(f"      {target.name}: {target.description}")
    with progress.stage("weights", _weights_line(opts)):
        weights, spec, source = weights_for(spec, opts.weights, opts.seed)
        progress.say(f"      GELU flavour: {spec.resolved_gelu} "
                     + ("(set by the spec)" if opts.spec.gelu else f"(from the {source['origin']} weights)"))
    form, database, tuning = opts.form, None, {}
    if opts.choose_form and not backend.CHOOSES_FORM:
        with progress.stage("choose", f"not for {target.name}: keeping form {opts.form}"):
            progress.say(f"      --choose-form times each form's build on this CPU; {target.kind} builds "
                         "take the form their backend is made for")
    elif opts.choose_form:
        from mixer_compile.tune.choose_form import choose_form

        with progress.stage("choose", "build every IR form, time each on this CPU"):
            database, tuning = _tuning_records(opts, spec, target, progress, batches)
            choice = choose_form(spec.replace(batch=batches.min), weights, target, database, opts.dtype, progress.say)
            progress.say("      " + choice.summary())
            form = choice.form
            tuning["form_choice"] = {"chosen": form, "default": opts.form, "figures": choice.figures}
    entries = f", batch entries {'+'.join(map(str, batches.entries))}" if batches.is_range else ""
    with progress.stage("graph", f"{spec.fingerprint()}, form {form}, lowered to Relax{entries}"):
        model = compose(spec, target, form, opts.dtype, weights, embed=opts.embed_weights, batches=batches)
        for report in model.reports:
            progress.say("      " + report.summary())
    with progress.stage("build", f"{target.name}: {target.config}"):
        if backend.TUNABLE and not tuning:
            database, tuning = _tuning_records(opts, spec, target, progress, batches)
        executable = backend.build(model.module, target, database,
                                   on_applied=lambda a: _applied(a, tuning, progress, opts.db))

    def rebuild(at_most: int) -> tuple[Any, list[Any], int]:  # the same model at a batch <= at_most
        batch = min(at_most, spec.batch)
        small = compose(spec.replace(batch=batch), target, form, opts.dtype, weights, embed=opts.embed_weights)
        return small.module, [] if opts.embed_weights else list(small.params.values()), batch

    params = [] if opts.embed_weights else list(model.params.values())
    runner = backend.runner(executable, target, params, rebuild)
    if runner.batch is not None:  # a stand-in (a build this machine cannot run, checked on this CPU)
        checks = [(runner.batch, runner.function())]
    elif batches.is_range:
        run = _range_runner(runner, batches)
        checks = [(b, run) for b in validation_batches(batches)]
    else:
        checks = [(spec.batch, runner.function())]
    shown = ", ".join(str(b) for b, _ in checks)
    with progress.stage("validate", f"batch{'es' if len(checks) > 1 else ''} {shown}, the first "
                        f"{min(checks[-1][0], REFERENCE_IMAGES)}{' of each' if len(checks) > 1 else ''} "
                        "vs the float64 reference"):
        where = runner.where + (f", at batch {runner.batch}" if runner.batch not in (None, spec.batch) else "")
        results = []
        for batch, run in checks:
            results.append(validate(run, spec.replace(batch=batch), weights, seed=opts.validation_seed,
                                    tolerance=TOLERANCES[opts.dtype], where=where))
            progress.say("      " + (f"batch {batch}: " if len(checks) > 1 else "") + results[-1].summary())
        result = max(results, key=lambda r: r.max_rel_error)
    graph = model.graph
    validation = result.to_dict()
    if len(results) > 1:
        validation["batches"] = [{"batch": r.batch, "checked": r.checked, "max_rel_error": r.max_rel_error,
                                  "passed": r.passed} for r in results]
    metadata = Metadata(
        mixer_compile_version=__version__,
        tvm_version=tvm.__version__,
        built_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        built_on={"machine": platform.machine(), "python": platform.python_version()},
        spec=spec.to_dict(),
        target={"name": target.name, "kind": target.kind, "config": target.config,
                "requires": build_requirements(target.tvm_target())},
        form=form,
        precision=graph.meta.get("precision", {"dtype": "float32", "accumulate": "float32"}),
        passes=[r.to_dict() for r in model.reports],
        weights={**source, "embedded": opts.embed_weights},
        params=list(graph.params),
        input={"name": graph.input.name, "shape": list(graph.input.shape), "dtype": graph.input.dtype,
               "layout": "NCHW"},
        output={"shape": [spec.batch, spec.num_classes], "dtype": "float32"},
        validation=validation,
        tuning=tuning or None,
        batch=batches.to_dict() if batches.is_range else None,
        **backend.describe(executable),
    )
    artifact = None
    if opts.out_dir is not None:
        with progress.stage("write", str(opts.out_dir)):
            metadata.timings_s = dict(progress.timings)
            artifact = write_artifact(opts.out_dir, executable, None if opts.embed_weights else model.params, metadata)
    return CompileResult(spec, result, model.reports, dict(progress.timings), metadata, artifact)


def _weights_line(opts: CompileOptions) -> str:
    if isinstance(opts.weights, InMemoryWeights):
        return opts.weights.description
    return str(opts.weights) if opts.weights else f"random init, seed {opts.seed}"


def validation_batches(batches: BatchRange) -> list[int]:
    """The batches a range build is validated at: its smallest, an odd one between (the largest,
    which splits over the most entries) and its largest."""
    odd = next((b for b in range(batches.max - 1, batches.min, -1) if b % 2), None)
    return sorted({batches.min, batches.max} | ({odd} if odd is not None else set()))


def _range_runner(runner: Runner, batches: BatchRange) -> Callable[[np.ndarray], np.ndarray]:
    """A range build run as the runtime runs it: the batch split over the entry functions
    (BatchRange.split), the logits concatenated."""
    entries = {b: runner.function(batches.function(b)) for b in batches.entries}

    def run(images: np.ndarray) -> np.ndarray:
        out, at = [], 0
        for b in batches.split(len(images)):
            out.append(entries[b](images[at:at + b]))
            at += b
        return np.concatenate(out)

    return run


def _tuning_records(opts: CompileOptions, spec: MixerSpec, target: TargetInfo,
                    progress: Progress, batches: BatchRange | None = None) -> tuple[Any, dict[str, Any]]:
    """The database a build applies: the user's (tuned first with --tune, every form that
    will be built) merged with the shipped records for the target; None, with a warning saying
    how to tune, when there is none."""
    from mixer_compile.compose import model_tasks
    from mixer_compile.passes.pipeline import FORMS
    from mixer_compile.tune.database import has_records, open_union, shipped_db_dirs, user_db_dir
    from mixer_compile.tune.gemms import tune_model_gemms
    from mixer_compile.tune.search import tune
    from mixer_compile.tune.tasks import unique

    user_db, shipped = opts.db or user_db_dir(target), shipped_db_dirs(target)
    if opts.db is not None and not opts.tune and not Path(opts.db).is_dir():
        raise TuningError(f"tuning database '{opts.db}' is not a directory; give the one `mixer-compile tune --db` "
                          "wrote, or add --tune to tune into it")
    if opts.tune:
        forms = list(FORMS) if opts.choose_form and backend_for(target).CHOOSES_FORM else [opts.form]
        progress.say(f"      tuning: {opts.trials} trials per large kernel into {user_db} ({', '.join(forms)})")
        for form in forms:  # the library GEMMs of a GPU build (tune/gemms.py), then MetaSchedule's kernels
            tune_model_gemms(spec, target, form, opts.dtype, batches, progress.say)
        tasks = unique([t for form in forms for t in model_tasks(spec, target, form, opts.dtype, opts.trials, batches)])
        summary = tune(tasks, target, user_db, say=progress.say, known=open_union(shipped))
        progress.say(f"      tuning: {summary.tuned_now} trials measured in {summary.seconds:.0f}s")
        if summary.interrupted:  # stopped by Ctrl-C: no build from a cut-short tuning (its records are kept)
            raise KeyboardInterrupt
    dirs = [d for d in (user_db, *shipped) if has_records(d)]
    database = open_union(dirs)
    if database is None:  # not a problem since every kernel has a default schedule (backend/cpu_schedules.py)
        progress.say(f"      no tuning records for target '{target.name}': every kernel gets its default schedule; "
                     f"{_tune_hint(opts, spec, batches)} refines them")
    return database, {"databases": [str(Path(d).resolve()) for d in dirs], "tuned_now": opts.tune}


def _tune_hint(opts: CompileOptions, spec: MixerSpec, batches: BatchRange | None) -> str:
    """How to tune this build's kernels: the `tune` command that makes the same kernels when the
    spec is a preset's (the GELU flavour included: it may have come from the weights), else
    --tune, since `tune` cannot name a spec read off a checkpoint or given in memory."""
    from mixer_compile.model.spec import PRESETS

    preset = PRESETS.get(spec.name)
    if preset is None or preset.replace(batch=spec.batch, gelu=spec.gelu) != spec:
        return "adding --tune to this build"
    batch = f"{batches.min}-{batches.max}" if batches is not None and batches.is_range else str(spec.batch)
    extra = f" --dtype {opts.dtype}" if opts.dtype != CompileOptions.dtype else ""
    extra += f" --form {opts.form}" if opts.form != CompileOptions.form else ""
    return (f"`mixer-compile tune --spec {spec.name} --batch {batch} --gelu {spec.resolved_gelu} --target "
            f"{shlex.quote(opts.target)}{extra}` (or --tune)")


def _applied(applied: Any, tuning: dict[str, Any], progress: Progress, db: Path | None) -> None:
    """Records how the kernels got their schedules; warns when a database the user named served
    none of them (another model's, or another target's: likely a mistake). The default cache
    and the shipped records serving none is the normal case of a new model, said, not warned."""
    tuning.update(applied.to_dict())
    progress.say(f"      {applied.summary()}")
    if db is not None and applied.kernels and not applied.tuned:
        warnings.warn(f"the tuning database '{db}' applied to none of the {applied.kernels} kernels: every kernel "
                      "runs its default schedule (tune to refine them)", UserWarning, stacklevel=2)
