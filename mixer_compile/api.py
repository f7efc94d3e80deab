"""The Python API: `mixer_compile.compile(model, target="llvm", batch=..., dtype=...)`.

    import timm, mixer_compile
    model = timm.create_model("mixer_b16_224", pretrained=True)
    compiled = mixer_compile.compile(model, batch="1-16")   # any batch from 1 to 16
    logits = compiled(images)                               # numpy or torch, NCHW float32
    compiled.save("mixer_b16")                               # mixer_compile.runtime.load("mixer_b16")

`model` is a preset name ("mixer_s16"), a spec file (.toml/.json), a checkpoint (.npz from the
official JAX code, .pth/.safetensors from timm; its configuration read off the weights'
shapes unless `spec=` names one), a MixerSpec, or a live timm `MlpMixer` module (configuration
and weights read off it: frontends/torch_module.py). It is compiled by the one driver the
command line uses (compiler.compile_model), validated, written as an artifact (to `out_dir`,
or a temporary directory that lives as long as the returned object) and loaded with
`runtime.load`: the result is a `runtime.CompiledMixer`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from mixer_compile.errors import MixerCompileError, SpecError, TargetError
from mixer_compile.model.spec import MixerSpec, load_spec, parse_batch
from mixer_compile.runtime import CompiledMixer


def compile(model: Any, target: str = "llvm", batch: int | str | tuple[int, int] = 1, dtype: Any = "float32", *,
            spec: str | MixerSpec | None = None, weights: str | Path | None = None,
            image_size: int | tuple[int, int] | None = None, gelu: str | None = None, form: str = "matmul",
            seed: int = 0, embed_weights: bool = False, tune: bool = False, trials: int = 64,
            out_dir: str | Path | None = None, verbose: bool = False) -> CompiledMixer:
    """Compiles `model` (see the module docstring) for `target` and returns it loaded.

    `batch`: one batch size (8), or a range served by one artifact ("1-16" or (1, 16)).
    `dtype`: storage precision (float32, float16, bfloat16: a name, or NumPy's or torch's
    dtype). `weights`: a checkpoint for a preset or spec (default: the seeded random init).
    `image_size`: the image size where it cannot be read off the model (a non-square grid).
    `verbose`: the stage lines on stderr.
    The compile result (validation, timings, metadata) is the returned object's
    `compile_result`.
    """
    from mixer_compile.compiler import CompileOptions, compile_model
    from mixer_compile.frontends import FORMATS, InMemoryWeights
    from mixer_compile.util.progress import Progress

    low, high = parse_batch(batch)
    if not isinstance(target, (str, Path)):
        raise TargetError(f"target must be a name (llvm, avx2, cuda, sm_90...) or a target JSON file, got {target!r}")
    dtype = dtype if isinstance(dtype, str) else _dtype_name(dtype)
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size) if image_size else None
    loaded: Path | InMemoryWeights | None = Path(weights) if weights is not None else None
    checkpoint = isinstance(model, (str, Path)) and Path(model).suffix.lower() in FORMATS
    if spec is not None and not checkpoint:
        raise MixerCompileError("spec= names the configuration of a checkpoint; give it with a checkpoint path")
    if isinstance(model, MixerSpec):
        the_spec = model.replace(image_size=size) if size else model
    elif checkpoint:
        if weights is not None:
            raise MixerCompileError("weights= is for presets and spec files; a checkpoint is its own weights")
        the_spec, loaded = _checkpoint(Path(model), spec, size)
    elif isinstance(model, (str, Path)):
        the_spec = load_spec(model, image_size=size)
    elif _is_torch_module(model):
        from mixer_compile.frontends.torch_module import read_module

        if weights is not None:
            raise MixerCompileError("weights= is for presets and spec files; a module brings its own")
        the_spec, loaded = read_module(model, size)
    else:
        raise SpecError(f"model of type {type(model).__name__} is neither a preset name, a spec file, a "
                        "checkpoint, a MixerSpec nor a torch module")
    if gelu is not None:
        the_spec = the_spec.replace(gelu=gelu)
    work = None
    if out_dir is None:
        work = tempfile.TemporaryDirectory(prefix="mixer-compile-")
        out_dir = Path(work.name) / "artifact"
    opts = CompileOptions(spec=the_spec.replace(batch=high), target=target, weights=loaded, seed=seed, form=form,
                          dtype=dtype, embed_weights=embed_weights, out_dir=Path(out_dir), tune=tune, trials=trials,
                          batches=(low, high))
    steps = 6 + int(opts.choose_form)
    result = compile_model(opts, Progress(steps, quiet=not verbose))
    compiled = CompiledMixer(result.artifact)
    compiled.compile_result = result
    compiled._workdir = work  # removed with the object (the loaded library stays mapped)
    return compiled


def _dtype_name(dtype: Any) -> str:
    """np.float16, torch.bfloat16 and the like as the names the compiler takes."""
    import numpy as np

    try:
        return np.dtype(dtype).name
    except TypeError:  # torch's dtypes, which NumPy does not know
        return str(dtype).removeprefix("torch.")


def _is_torch_module(model: Any) -> bool:
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(model, torch.nn.Module)


def _checkpoint(path: Path, spec: str | MixerSpec | None, size: tuple[int, int] | None) -> tuple[MixerSpec, Path]:
    """A checkpoint's spec: the one named, else read off its shapes."""
    from mixer_compile.frontends.torch_module import checkpoint_spec

    if isinstance(spec, MixerSpec):
        return spec, path
    if spec is not None:
        return load_spec(spec, image_size=size), path
    return checkpoint_spec(path, size), path
