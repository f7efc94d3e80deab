"""`import-onnx`: compile a Mixer given as an ONNX file through the normal driver.

ONNX -> recognised spec + canonical checkpoint (written beside the artifact, so the
metadata names a real file and every other command can use it) -> compile_model (passes,
lowering, build, validation against the float64 reference, artifact) -> the compiled module
run against ONNX Runtime on the very file it came from. The recognition itself is checked
first (reference on the recognised weights vs ONNX Runtime), so a misread graph is reported
as such, before any build time is spent. Before that, right after the import, compile's own
refusals run (compiler.check_before_work): a batch whose images would not fit in memory is
refused before they are drawn, an output compile would refuse before the checkpoint and spec
are written beside it, so that a refused import leaves nothing behind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from mixer_compile.check import ort
from mixer_compile.check.validate import FP32_TOLERANCE, REFERENCE_IMAGES, Validation, compare, random_images
from mixer_compile.compiler import CompileOptions, CompileResult, check_before_work, compile_model
from mixer_compile.errors import ArtifactError, MixerCompileError, ValidationError
from mixer_compile.frontends.onnx_import import ImportedMixer, import_onnx
from mixer_compile.frontends.write import write_weights
from mixer_compile.model import reference
from mixer_compile.util.atomic import write_bytes
from mixer_compile.util.progress import Progress


@dataclass
class OnnxCompileResult:
    imported: ImportedMixer
    checkpoint: Path
    spec_file: Path
    recognition: Validation
    compiled: CompileResult
    against_onnx: Validation | None  # None: the build is for another machine (compile's validation says how)


def _against_onnx(sess, run, imported: ImportedMixer, what: str, seed: int) -> Validation:
    """`run` on a batch of seeded random images against ONNX Runtime on the file; `run` may
    answer for the first images only (the float64 reference: REFERENCE_IMAGES)."""
    images = random_images(imported.spec, seed)
    out = run(images)
    ref = ort.run(sess, images)[: len(out)]
    result = compare(out, ref.astype("float64"), FP32_TOLERANCE, seed, batch=len(images))
    if not result.passed:
        raise ValidationError(f"{what} disagrees with ONNX Runtime on the file: {result.summary()}")
    return result


def _same_weights(path: Path, weights: dict[str, np.ndarray]) -> bool:
    with np.load(path, allow_pickle=False) as held:
        return set(held.files) == set(weights) and all(np.array_equal(held[k], weights[k]) for k in weights)


def _quietly(check: Callable[[], bool]) -> bool:
    """`check()`, False where it cannot even read the file (not ours, then)."""
    try:
        return check()
    except Exception:
        return False


def compile_onnx(path: Path, out_dir: Path, target: str = "llvm", form: str = "matmul", batch: int | None = None,
                 seed: int = 1234) -> OnnxCompileResult:
    """Compiles the Mixer in the ONNX file `path` to the artifact `out_dir`, its recognised
    checkpoint and spec written beside it as `out_dir`.npz and .json."""
    out_dir = Path(out_dir).resolve()
    checkpoint, spec_file = (out_dir.with_name(out_dir.name + suffix) for suffix in (".npz", ".json"))
    progress = Progress(3)
    with progress.stage("import", str(path)):
        imported = import_onnx(path, batch)
        spec = imported.spec
        opts = CompileOptions(spec=spec, target=target, weights=checkpoint, form=form, out_dir=out_dir)
        check_before_work(opts)  # compile's refusals (target, memory, output, TMPDIR) before images or files
        spec_text = json.dumps(spec.to_dict(), indent=2) + "\n"
        for beside, ours in ((checkpoint, lambda: _same_weights(checkpoint, imported.weights)),
                             (spec_file, lambda: json.loads(spec_file.read_text()) == json.loads(spec_text))):
            # what check_before_work does not see: a file of the user's where these go (an earlier
            # import of this model wrote the same content, and is replaced)
            if beside.is_dir() or (beside.exists() and not _quietly(ours)):
                raise MixerCompileError(f"cannot write '{beside}': " + ("it is a directory" if beside.is_dir() else
                                        "a file that this import did not write is there") + "; move it or choose "
                                        f"another -o (the checkpoint and spec are written beside the artifact as "
                                        f"{out_dir.name}.npz and .json)")
        if batch is not None and batch != spec.batch:
            progress.say(f"      the file's batch is fixed at {spec.batch}: building for batch {spec.batch}, "
                         f"not {batch} (export it with a dynamic batch axis to choose)")
        progress.say(f"      recognised {spec.num_blocks} blocks, patch {spec.patch_size}, C {spec.hidden_dim}, "
                     f"D_S {spec.tokens_mlp_dim}, D_C {spec.channels_mlp_dim}, {spec.num_classes} classes, "
                     f"{spec.image_size[0]}x{spec.image_size[1]}, {spec.resolved_gelu} GELU")
        sess = ort.session(path)
        def recognised(images: np.ndarray) -> np.ndarray:  # the float64 reference, on the first images only
            return reference.forward(spec, imported.weights, images[:REFERENCE_IMAGES])

        recognition = _against_onnx(sess, recognised, imported,
                                    "the recognised model (reference on the recognised weights)", seed)
        progress.say(f"      recognition vs ONNX Runtime: {recognition.summary()}")
    with progress.stage("save", "recognised checkpoint and spec beside the artifact"):
        write_weights(imported.weights, checkpoint)
        write_bytes(spec_file, spec_text.encode())
        progress.say(f"      {checkpoint}, {spec_file}")
    compiled = compile_model(opts)
    with progress.stage("validate", "compiled module vs ONNX Runtime on the file"):
        from mixer_compile import runtime

        try:  # a build for another machine (--target cuda here, say) was validated as compile does it
            runtime.check_machine(compiled.metadata, f"the {target} build")
        except ArtifactError as exc:
            progress.say(f"      not run here: {exc}")
            return OnnxCompileResult(imported, checkpoint, spec_file, recognition, compiled, None)
        model = runtime.load(compiled.artifact)
        against = _against_onnx(sess, lambda x: model(x), imported, "the compiled module", seed)
        progress.say(f"      {against.summary()}")
    return OnnxCompileResult(imported, checkpoint, spec_file, recognition, compiled, against)
