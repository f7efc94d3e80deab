"""`export-onnx`: spec + weights -> IR -> passes -> ONNX, simplified, checked and validated.

The file is only written once ONNX Runtime, running it at two batch sizes (the dynamic
batch axis is part of what is checked), agrees with the float64 reference within the
fp32 bound; a file that fails is never left where the output was asked for.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from mixer_compile.check import ort
from mixer_compile.model import reference
from mixer_compile.util.atomic import why_unwritable, write_bytes
from mixer_compile.errors import MixerCompileError, ValidationError
from mixer_compile.lower.onnx import to_onnx
from mixer_compile.compose import optimized_graph
from mixer_compile.util.progress import Progress
from mixer_compile.model.spec import MixerSpec
from mixer_compile.check.validate import FP32_TOLERANCE, Validation, compare, random_images
from mixer_compile.frontends import weights_for


@dataclass
class ExportResult:
    spec: MixerSpec
    path: Path
    form: str
    node_counts: dict[str, int]
    validations: list[Validation] = field(default_factory=list)


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxsim's constant folding and clean-up, then the ONNX checker on the result."""
    import onnxsim

    simplified, ok = onnxsim.simplify(model)
    if not ok:
        raise MixerCompileError("onnxsim could not verify the simplified model against the original")
    try:
        onnx.checker.check_model(simplified, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise MixerCompileError(f"the exported model fails onnx.checker: {str(exc).splitlines()[0]}") from None
    return simplified


def validate_onnx(model: onnx.ModelProto, spec: MixerSpec, weights: dict[str, np.ndarray], batches: tuple[int, ...],
                  seed: int = 1234) -> list[Validation]:
    """ONNX Runtime against the reference at each batch size; raises past the fp32 bound."""
    sess = ort.session(model)
    results = []
    for b in batches:
        images = random_images(spec.replace(batch=b), seed)
        result = compare(ort.run(sess, images), reference.forward(spec, weights, images), FP32_TOLERANCE, seed)
        if not result.passed:
            raise ValidationError(f"the ONNX model disagrees with the reference at batch {b}: {result.summary()}; "
                                  "no file was written")
        results.append(result)
    return results


def export_onnx(spec: MixerSpec, out: Path, weights_path: Path | None = None, seed: int = 0,
                form: str = "conv", progress: Progress | None = None) -> ExportResult:
    out = Path(out)
    if out.suffix.lower() != ".onnx" and not out.is_dir():
        raise MixerCompileError(f"output '{out}' must be a .onnx file (e.g. '{out.with_suffix('.onnx').name}')")
    problem = "it is a directory" if out.is_dir() else why_unwritable(out.parent)
    if problem:  # before the export's work, not after it
        raise MixerCompileError(f"cannot write '{out}': {problem}; give -o a .onnx file path this user can write")
    progress = progress or Progress(5)
    with progress.stage("weights", str(weights_path) if weights_path else f"random init, seed {seed}"):
        weights, spec, _ = weights_for(spec, weights_path, seed)
    with progress.stage("graph", f"{spec.fingerprint()}, form {form}"):
        graph, reports = optimized_graph(spec, form)
        for report in reports:
            progress.say("      " + report.summary())
        model = to_onnx(graph, graph.materialize_params(weights))
    with progress.stage("simplify", "onnxsim + onnx.checker"):
        model = simplify(model)
        counts = dict(Counter(n.op_type for n in model.graph.node))
        progress.say("      nodes: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    batches = (spec.batch, spec.batch + 1)
    with progress.stage("validate", f"ONNX Runtime at batch {batches[0]} and {batches[1]} vs float64 reference"):
        validations = validate_onnx(model, spec, weights, batches)
        for v in validations:
            progress.say(f"      batch {v.batch}: {v.summary()}")
    with progress.stage("write", str(out)):
        write_bytes(out, model.SerializeToString())
    return ExportResult(spec, Path(out), form, counts, validations)
