"""The compile pipeline end to end: spec -> weights -> IR -> passes -> Relax -> build ->
validate -> artifact. Each stage is one call into the module that owns it; this file only
orders them and records what happened, for the metadata and the progress lines.
"""

from __future__ import annotations

import datetime
import platform
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mixer_compile import __version__
from mixer_compile.cuda_build import runnable_here
from mixer_compile.gemm_space import panel_width
from mixer_compile.passes.pipeline import PassReport, optimized_graph
from mixer_compile.progress import Progress
from mixer_compile.spec import MixerSpec
from mixer_compile.targets import get_target
from mixer_compile.threads import use_all_cores
from mixer_compile.validate import REFERENCE_IMAGES, TOLERANCES, Validation, validate
from mixer_compile.weights import weights_for

HOST_CHECK_BATCH = 2  # batch of the CPU stand-in check of a GPU build that cannot run here


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
    db: Path | None = None  # tuning database; default the user cache (tuning_db.user_db_dir)
    choose_form: bool = False  # build every IR form, time each, keep the fastest (CPU)


@dataclass
class CompileResult:
    spec: MixerSpec
    validation: Validation
    passes: list[PassReport]
    timings: dict[str, float]
    metadata: dict[str, Any]
    artifact: Path | None = None


def compile_model(opts: CompileOptions, progress: Progress | None = None) -> CompileResult:
    import tvm

    from mixer_compile.artifact import check_writable, write_artifact
    from mixer_compile.build import compile_module
    from mixer_compile.compat import build_requirements
    from mixer_compile.lower.relax import to_relax

    use_all_cores()  # before validation or form choice runs a kernel (threads.py)
    progress = progress or Progress((7 if opts.out_dir is not None else 6) + int(opts.choose_form))
    spec = opts.spec
    if opts.out_dir is not None:
        check_writable(opts.out_dir)
    with progress.stage("target", opts.target):
        target = get_target(opts.target)
    with progress.stage("weights", str(opts.weights) if opts.weights else f"random init, seed {opts.seed}"):
        weights, spec, source = weights_for(spec, opts.weights, opts.seed)
        progress.say(f"      GELU flavour: {spec.resolved_gelu} "
                     + ("(set by the spec)" if opts.spec.gelu else f"(from the {source['origin']} weights)"))
    form, database, tuning = opts.form, None, {}
    if opts.choose_form and not target.is_gpu:
        from mixer_compile.choose_form import choose_form

        with progress.stage("choose", "build every IR form, time each on this CPU"):
            database, tuning = _tuning_records(opts, spec, target, progress)
            choice = choose_form(spec, weights, target, database, opts.dtype, progress.say)
            progress.say("      " + choice.summary())
            form = choice.form
            tuning["form_choice"] = {"chosen": form, "default": opts.form, "figures": choice.figures}
    with progress.stage("graph", f"{spec.fingerprint()}, form {form}"):
        graph, reports = optimized_graph(spec, form, opts.dtype, panel_width(target))
        for report in reports:
            progress.say("      " + report.summary())
        params = graph.materialize_params(weights)
    with progress.stage("lower", "IR -> Relax"):
        mod = to_relax(graph, embed=params if opts.embed_weights else None)
    with progress.stage("build", f"{target.name}: {target.config}"):
        if target.is_gpu:
            from mixer_compile.cuda_build import build_cuda_library

            work = tempfile.TemporaryDirectory(prefix="mixer-compile-cuda-")  # removed when collected
            executable = build_cuda_library(mod, target, Path(work.name))
        else:
            if not tuning:
                database, tuning = _tuning_records(opts, spec, target, progress)
            executable = compile_module(mod, target, database, on_applied=lambda a: _applied(a, tuning, progress))
    check_spec, check_mod, check_params = spec, mod, params
    if target.is_gpu and spec.batch > HOST_CHECK_BATCH and runnable_here(executable) is not None:
        # the host CPU stands in for the GPU: the same lowering at a small batch (untuned CPU code
        # at the GPU's batch, 256 say, would take hours)
        check_spec = spec.replace(batch=HOST_CHECK_BATCH)
        check_graph, _ = optimized_graph(check_spec, form, opts.dtype)
        check_params = check_graph.materialize_params(weights)
        check_mod = to_relax(check_graph, embed=check_params if opts.embed_weights else None)
    checked = min(check_spec.batch, REFERENCE_IMAGES)
    with progress.stage("validate", f"batch {check_spec.batch}, the first {checked} vs the float64 reference"):
        run, where = _runner(executable, check_mod, target, [] if opts.embed_weights else list(check_params.values()))
        if check_spec is not spec:
            where += f", at batch {check_spec.batch}"
        result = validate(run, check_spec, weights, seed=opts.validation_seed, tolerance=TOLERANCES[opts.dtype],
                          where=where)
        progress.say("      " + result.summary())
    metadata = {
        "mixer_compile_version": __version__,
        "tvm_version": tvm.__version__,
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "built_on": {"machine": platform.machine(), "python": platform.python_version()},
        "spec": spec.to_dict(),
        "target": {"name": target.name, "kind": target.kind, "config": target.config,
                   "requires": build_requirements(target.tvm_target())},
        "form": form,
        "precision": graph.meta.get("precision", {"dtype": "float32", "accumulate": "float32"}),
        "passes": [r.to_dict() for r in reports],
        "weights": {**source, "embedded": opts.embed_weights},
        "params": list(graph.params),
        "input": {"name": graph.input.name, "shape": list(graph.input.shape), "dtype": graph.input.dtype,
                  "layout": "NCHW"},
        "output": {"shape": [spec.batch, spec.num_classes], "dtype": "float32"},
        "validation": result.to_dict(),
    }
    if tuning:
        metadata["tuning"] = tuning
    if target.is_gpu:
        metadata["gpu_code"] = executable.describe()
    artifact = None
    if opts.out_dir is not None:
        with progress.stage("write", str(opts.out_dir)):
            metadata["timings_s"] = dict(progress.timings)
            artifact = write_artifact(opts.out_dir, executable, None if opts.embed_weights else params, metadata)
    return CompileResult(spec, result, reports, dict(progress.timings), metadata, artifact)


def _tuning_records(opts: CompileOptions, spec: MixerSpec, target: Any,
                    progress: Progress) -> tuple[Any, dict[str, Any]]:
    """The database a CPU build applies: the user's (tuned first with --tune) merged with the
    shipped records for the target; None, with a warning saying how to tune, when there is none."""
    from mixer_compile.tune import model_module, tune
    from mixer_compile.tuning_db import TuningWarning, has_records, open_union, shipped_db_dirs, user_db_dir

    user_db, shipped = opts.db or user_db_dir(target), shipped_db_dirs(target)
    if opts.tune:
        progress.say(f"      tuning: {opts.trials} trials per large kernel into {user_db}")
        summary = tune(model_module(spec, target, opts.form, opts.dtype), target, opts.trials, user_db, say=progress.say,
                       known=open_union(shipped))
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


def _runner(executable: Any, mod: Any, target: Any, params: list[Any]) -> tuple[Callable[[Any], Any], str]:
    """How validation runs the build, and where. A CUDA build runs on this machine's GPU when
    it has a compatible one; otherwise the same Relax module (same lowering, same precision)
    is compiled for this CPU and run there, and the record says the GPU run is pending."""
    import tvm

    from mixer_compile.build import compile_module

    if not target.is_gpu:
        dev, lib, where = tvm.cpu(), executable, "this CPU"
    elif (why := runnable_here(executable)) is None:
        dev, lib = tvm.cuda(), tvm.runtime.load_module(str(executable.path))
        where = f"GPU {dev.device_name}"
    else:
        dev, lib = tvm.cpu(), compile_module(mod, get_target("llvm"))
        where = f"host CPU: the same lowering and precision built for llvm; GPU run pending ({why})"
    vm = tvm.relax.VirtualMachine(lib, dev)
    args = [tvm.runtime.tensor(v, dev) for v in params]
    return (lambda x: vm["main"](tvm.runtime.tensor(x, dev), *args).numpy()), where
