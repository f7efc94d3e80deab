"""The compile driver: spec -> weights -> (the one composition) -> build -> validate -> artifact.

The CLI (`mixer-compile`) and the Python API (`mixer_compile.compile`, api.py) both call
`compile_model`. Before any work it refuses a batch whose activations, weights and validation
images would not fit the memory of the machine that runs them (`check_fits`). A batch range
(`CompileOptions.batches`) builds one library with an entry function per entry batch
(artifact/format.py's BatchRange) and validates the range's smallest batch, its largest and
an odd one between, each run as the runtime runs it (split over the entries).

Each stage is one call into the module that owns it; this file only orders them and records
what happened, for the metadata and the progress lines. What differs between target kinds is
the backend's business (backend/__init__.py); what the model is, the composition's (compose.py).
"""

from __future__ import annotations

import datetime
import os
import platform
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
from mixer_compile.check.validate import REFERENCE_IMAGES, TOLERANCES, Validation, validate
from mixer_compile.compose import compose
from mixer_compile.errors import MixerCompileError
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
    tune: bool = False  # tune the kernels that lack records before building (CPU)
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


def compile_model(opts: CompileOptions, progress: Progress | None = None) -> CompileResult:
    batches = opts.batch_range()
    spec = opts.spec.replace(batch=batches.max)
    check_fits(spec, batches, opts.target, opts.dtype)  # before any work (even importing TVM): refuse what cannot fit

    import tvm

    from mixer_compile.artifact.write import check_writable, write_artifact
    use_all_cores()  # before validation or form choice runs a kernel (machine.py)
    progress = progress or Progress((6 if opts.out_dir is not None else 5) + int(opts.choose_form))
    if opts.out_dir is not None:
        check_writable(opts.out_dir)
    with progress.stage("target", opts.target):
        target = get_target(opts.target)
        backend = backend_for(target)
    with progress.stage("weights", _weights_line(opts)):
        weights, spec, source = weights_for(spec, opts.weights, opts.seed)
        progress.say(f"      GELU flavour: {spec.resolved_gelu} "
                     + ("(set by the spec)" if opts.spec.gelu else f"(from the {source['origin']} weights)"))
    form, database, tuning = opts.form, None, {}
    if opts.choose_form and backend.TUNABLE:
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
        executable = backend.build(model.module, target, database, on_applied=lambda a: _applied(a, tuning, progress))

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


GIB = float(1 << 30)
MEMORY_SHARE = 0.9  # of the physical memory a build may plan to use; the rest is the OS's and TVM's own


def footprint(spec: MixerSpec, batch: int, dtype: str = "float32") -> dict[str, float]:
    """Bytes a model at `batch` needs, by kind: `weights` (stored at `dtype` where the model runs),
    `activations` (per image: its input, the largest live set of a block: the channel-mixing
    hidden S x D_C, or the token-mixing C x D_S, beside three S x C tensors; accumulation is
    float32, so counted at 4 bytes whatever the storage dtype) and `validation` (the host's
    float32 random images and the copy handed to the module)."""
    h, w = spec.image_size
    image = 4 * spec.in_channels * h * w
    live = 4 * (max(spec.tokens * spec.channels_mlp_dim, spec.hidden_dim * spec.tokens_mlp_dim)
                + 3 * spec.tokens * spec.hidden_dim)
    element = 4 if dtype == "float32" else 2
    return {"weights": float(spec.param_count() * element), "activations": float(batch * (image + live)),
            "validation": float(2 * batch * image)}


def host_memory() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(spec: MixerSpec, batches: BatchRange, target_name: str, dtype: str = "float32") -> None:
    """Refuses, before any work and in one line, a batch whose activations, weights or validation
    would not fit the memory that must hold them: the host's RAM for a CPU build (and for the
    validation images and the compiler's three float32 copies of the weights, always); the
    GPU's memory for a CUDA build when a GPU is visible here."""
    from mixer_compile.machine import local_gpu

    kind, arch = _target_kind(target_name)
    gpu = local_gpu() if kind == "cuda" else None
    on_host = kind != "cuda" or gpu is not None  # a CUDA build without a GPU is checked at batch 2 on the host
    need = footprint(spec, batches.max, dtype)
    host = {"weights": 3 * footprint(spec, 1)["weights"],
            "activations": need["activations"] if kind != "cuda" else 0.0,
            "validation": need["validation"] if on_host else 0.0}
    _refuse_unless_fits(spec, batches, host, host_memory(), "of memory (RAM)", "this machine has",
                        lambda b: footprint(spec, b, dtype), kind != "cuda", on_host)
    device = {"weights": need["weights"], "activations": need["activations"]}
    if gpu is not None:
        _refuse_unless_fits(spec, batches, device, int(gpu.total_global_memory), "of GPU memory",
                            f"the {gpu.device_name} has", lambda b: footprint(spec, b, dtype), True, False)
    elif kind == "cuda" and arch in LARGEST_GPU:  # no GPU here: what the largest GPU of the target's kind holds
        name, have = LARGEST_GPU[arch]
        _refuse_unless_fits(spec, batches, device, have, "of GPU memory",
                            f"the largest {arch} GPU ({name}) has", lambda b: footprint(spec, b, dtype), True, False)


# The most memory a GPU of an architecture has: with no GPU visible at build time, a batch
# beyond it cannot run on any GPU the build is for.
LARGEST_GPU = {"sm_80": ("A100 80GB", 80 * 10**9), "sm_86": ("RTX A6000", 48 * 2**30),
               "sm_89": ("L40S", 48 * 2**30), "sm_90": ("H200", 141 * 10**9), "sm_90a": ("H200", 141 * 10**9)}


def _target_kind(name: str) -> tuple[str, str | None]:
    """A target's kind (and GPU architecture) from its file, without resolving it (resolving the
    host CPU or a local GPU imports TVM: seconds a refusal need not wait)."""
    from mixer_compile.backend.target import known_targets

    for stem, data in known_targets().items():
        if name == stem or name in data.get("aliases", []):
            target = data["target"]
            arch = target.get("arch")
            arch = data.get("default") if arch == "local" else arch
            if "kind" in target:
                return str(target["kind"]), arch
            break
    target = get_target(name)  # a tag, or a target file given by path
    return target.kind, target.config.get("arch")


def _refuse_unless_fits(spec: MixerSpec, batches: BatchRange, need: dict[str, float], have: int | None,
                        what: str, where: str, at: Callable[[int], dict[str, float]],
                        activations: bool, validation: bool) -> None:
    total = sum(need.values())
    if have is None or total <= MEMORY_SHARE * have:
        return
    per_image = (at(1)["activations"] if activations else 0.0) + (at(1)["validation"] if validation else 0.0)
    fixed = total - batches.max * per_image
    largest = int((MEMORY_SHARE * have - fixed) // per_image) if per_image else 0
    parts = ", ".join(f"{k} {v / GIB:,.1f} GiB" for k, v in need.items() if v)
    fits = (f"the largest batch that fits is about {largest}" if largest >= 1
            else "no batch fits: the weights alone do not")
    raise MixerCompileError(f"batch {batches.describe()} of {spec.name} needs about {total / GIB:,.1f} GiB {what} "
                            f"({parts}) and {where} {have / GIB:,.1f} GiB; {fits}")


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
        tasks = unique([t for form in forms for t in model_tasks(spec, target, form, opts.dtype, opts.trials, batches)])
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
