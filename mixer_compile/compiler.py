"""The compile driver: spec -> weights -> (the one composition) -> build -> validate -> artifact.

Each stage is one call into the module that owns it; this file only orders them and records
what happened, for the metadata and the progress lines. What differs between target kinds is
the backend's business (backend/__init__.py); what the model is, the composition's (compose.py).
"""

from __future__ import annotations

import datetime
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixer_compile import __version__
from mixer_compile.artifact.format import Metadata
from mixer_compile.backend import backend_for
from mixer_compile.backend.target import TargetInfo, build_requirements, get_target
from mixer_compile.check.validate import REFERENCE_IMAGES, TOLERANCES, Validation, validate
from mixer_compile.compose import compose
from mixer_compile.frontends import weights_for
from mixer_compile.machine import use_all_cores
from mixer_compile.model.spec import MixerSpec
from mixer_compile.passes.pipeline import PassReport
from mixer_compile.util.progress import Progress


@dataclass
class CompileOptions:
    spec: MixerSpec
    target: str = "llvm"
    weights: Path | None = None
    seed: int = 0
    form: str = "matmul"
    dtype: str = "float32"  # storage precision (passes/precision.py)
    embed_weights: bool = False
    out_dir: Path | None = None
    validation_seed: int = 1234
    tune: bool = False  # tune the kernels that lack records before building (CPU)
    trials: int = 64  # per large kernel, when tuning
    db: Path | None = None  # tuning database; default the user cache (tune/database.user_db_dir)
    choose_form: bool = False  # build every IR form, time each, keep the fastest (CPU)


@dataclass
class CompileResult:
    spec: MixerSpec
    validation: Validation
    passes: list[PassReport]
    timings: dict[str, float]
    metadata: Metadata
    artifact: Path | None = None


def compile_model(opts: CompileOptions, progress: Progress | None = None) -> CompileResult:
    import tvm

    from mixer_compile.artifact.write import check_writable, write_artifact

    use_all_cores()  # before validation or form choice runs a kernel (machine.py)
    progress = progress or Progress((6 if opts.out_dir is not None else 5) + int(opts.choose_form))
    spec = opts.spec
    if opts.out_dir is not None:
        check_writable(opts.out_dir)
    with progress.stage("target", opts.target):
        target = get_target(opts.target)
        backend = backend_for(target)
    with progress.stage("weights", str(opts.weights) if opts.weights else f"random init, seed {opts.seed}"):
        weights, spec, source = weights_for(spec, opts.weights, opts.seed)
        progress.say(f"      GELU flavour: {spec.resolved_gelu} "
                     + ("(set by the spec)" if opts.spec.gelu else f"(from the {source['origin']} weights)"))
    form, database, tuning = opts.form, None, {}
    if opts.choose_form and backend.TUNABLE:
        from mixer_compile.tune.choose_form import choose_form

        with progress.stage("choose", "build every IR form, time each on this CPU"):
            database, tuning = _tuning_records(opts, spec, target, progress)
            choice = choose_form(spec, weights, target, database, opts.dtype, progress.say)
            progress.say("      " + choice.summary())
            form = choice.form
            tuning["form_choice"] = {"chosen": form, "default": opts.form, "figures": choice.figures}
    with progress.stage("graph", f"{spec.fingerprint()}, form {form}, lowered to Relax"):
        model = compose(spec, target, form, opts.dtype, weights, embed=opts.embed_weights)
        for report in model.reports:
            progress.say("      " + report.summary())
    with progress.stage("build", f"{target.name}: {target.config}"):
        if backend.TUNABLE and not tuning:
            database, tuning = _tuning_records(opts, spec, target, progress)
        executable = backend.build(model.module, target, database, on_applied=lambda a: _applied(a, tuning, progress))

    def rebuild(at_most: int) -> tuple[Any, list[Any], int]:  # the same model at a batch <= at_most
        batch = min(at_most, spec.batch)
        small = compose(spec.replace(batch=batch), target, form, opts.dtype, weights, embed=opts.embed_weights)
        return small.module, [] if opts.embed_weights else list(small.params.values()), batch

    params = [] if opts.embed_weights else list(model.params.values())
    runner = backend.runner(executable, target, params, rebuild)
    check_spec = spec if runner.batch is None else spec.replace(batch=runner.batch)
    checked = min(check_spec.batch, REFERENCE_IMAGES)
    with progress.stage("validate", f"batch {check_spec.batch}, the first {checked} vs the float64 reference"):
        where = runner.where + (f", at batch {check_spec.batch}" if check_spec is not spec else "")
        result = validate(runner.run, check_spec, weights, seed=opts.validation_seed,
                          tolerance=TOLERANCES[opts.dtype], where=where)
        progress.say("      " + result.summary())
    graph = model.graph
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
        validation=result.to_dict(),
        tuning=tuning or None,
        **backend.describe(executable),
    )
    artifact = None
    if opts.out_dir is not None:
        with progress.stage("write", str(opts.out_dir)):
            metadata.timings_s = dict(progress.timings)
            artifact = write_artifact(opts.out_dir, executable, None if opts.embed_weights else model.params, metadata)
    return CompileResult(spec, result, model.reports, dict(progress.timings), metadata, artifact)


def _tuning_records(opts: CompileOptions, spec: MixerSpec, target: TargetInfo,
                    progress: Progress) -> tuple[Any, dict[str, Any]]:
    """The database a CPU build applies: the user's (tuned first with --tune, every form that
    will be built) merged with the shipped records for the target; None, with a warning saying
    how to tune, when there is none."""
    from mixer_compile.compose import model_tasks
    from mixer_compile.passes.pipeline import FORMS
    from mixer_compile.tune.database import TuningWarning, has_records, open_union, shipped_db_dirs, user_db_dir
    from mixer_compile.tune.search import tune
    from mixer_compile.tune.tasks import unique

    user_db, shipped = opts.db or user_db_dir(target), shipped_db_dirs(target)
    if opts.tune:
        forms = list(FORMS) if opts.choose_form else [opts.form]
        progress.say(f"      tuning: {opts.trials} trials per large kernel into {user_db} ({', '.join(forms)})")
        tasks = unique([t for form in forms for t in model_tasks(spec, target, form, opts.dtype, opts.trials)])
        summary = tune(tasks, target, user_db, say=progress.say, known=open_union(shipped))
        progress.say(f"      tuning: {summary.tuned_now} trials measured in {summary.seconds:.0f}s")
    dirs = [d for d in (user_db, *shipped) if has_records(d)]
    database = open_union(dirs)
    if database is None:
        warnings.warn(f"no tuning records for target '{target.name}': the code is untuned and very slow "
                      f"(Mixer-B/16 ~30 s per image); tune with `mixer-compile tune --spec {spec.name} "
                      f"--batch {spec.batch} --target {target.name}` or compile with --tune", TuningWarning)
    return database, {"databases": [str(d) for d in dirs], "tuned_now": opts.tune}


def _applied(applied: Any, tuning: dict[str, Any], progress: Progress) -> None:
    tuning.update(applied.to_dict())
    progress.say(f"      {applied.summary()}")
