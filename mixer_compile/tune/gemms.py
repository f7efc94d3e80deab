"""GPU tuning of the library GEMMs: every candidate configuration of each call site, timed on the GPU.

MetaSchedule tunes the kernels TVM generates; the library GEMMs are CUTLASS templates (and
cuBLASLt where it serves the epilogue) whose knobs are the tile, the cluster and the schedule
(backend/cutlass.py CANDIDATES). For each distinct problem of a model (form, dtype,
epilogue, M, N, K, L) every candidate is compiled (cached like any build's kernels), linked
into one library, called on random data on the GPU and timed with TVM's time evaluator; the
fastest becomes a record in the user's GEMM records, which every later build of the family
applies (gemm_choice.records_for). A problem is written as soon as it is measured, and one
already measured on this GPU is skipped: an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mixer_compile.backend import cutlass, gemm_choice
from mixer_compile.backend.gemm_choice import Record
from mixer_compile.errors import TuningError
from mixer_compile.lower.library import GemmKernel, GemmShape

Say = Callable[[str], None]
REPEAT = 5  # timed runs per candidate (each averaging `number` calls sized to ~10 ms)


def candidates(kernel: GemmKernel, family: str) -> list[str]:
    """The variants measured for `kernel`: every CUTLASS candidate, and cuBLASLt where it
    implements the epilogue (right products; tanh GELU only)."""
    from mixer_compile.backend import cublaslt

    variants = [c.variant for c in cutlass.configs(family, kernel.dtype)]
    return variants + ([cublaslt.VARIANT] if cublaslt.supports(kernel) else [])


def _arrays(kernel: GemmKernel, shape: GemmShape, dev: Any) -> list[Any]:
    """Random X, W, bias[, R] and the output D of one call, on `dev`."""
    import ml_dtypes
    import tvm

    rng = np.random.default_rng(0)
    storage = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}[kernel.dtype]

    def tensor(dims: tuple[int, ...], dtype: Any = storage) -> Any:
        return tvm.runtime.tensor((rng.standard_normal(dims) * 0.1).astype(dtype), dev)

    m, n, k, l = shape.m, shape.n, shape.k, shape.l
    if kernel.form == "xw":
        x, w, d = (m, k), (n, k), (m, n)
    else:
        x, w, d = (l, k, n), ((m, k) if kernel.form == "wx" else (k, m)), (l, m, n)
    args = [tensor(x), tensor(w), tensor((n if kernel.form == "xw" else m,), np.float32)]
    if kernel.residual:
        args.append(tensor(d))
    return args + [tensor(d)]


def _time(lib: Any, symbol: str, args: list[Any], dev: Any) -> float:
    """Seconds per call: one warm-up, then REPEAT timings of enough calls for ~10 ms each."""
    probe = lib.time_evaluator(symbol, dev, number=1, repeat=1)(*args).mean
    number = max(1, min(1000, int(0.01 / max(probe, 1e-7))))
    return float(lib.time_evaluator(symbol, dev, number=number, repeat=REPEAT, min_repeat_ms=0)(*args).min)


def _times(lib: Any, kernel: GemmKernel, variants: list[str], args: list[Any], dev: Any, say: Say) -> dict[str, float]:
    """Seconds per call of each variant of `kernel`; one whose call fails (a configuration its
    library refuses for this problem at run time, say) is left out, and said."""
    times = {}
    for variant in variants:
        symbol = kernel.with_variant(variant).symbol
        try:
            times[variant] = _time(lib, symbol, args, dev)
        except Exception as exc:  # the call's own error, of whatever type TVM's FFI gives it
            say(f"    {symbol}: skipped, its call failed ({str(exc).strip().splitlines()[-1]})")
    return times


def tune_gemms(mod: Any, arch: str, say: Say, jobs: int = 0) -> list[Record]:
    """Measures every candidate of every library GEMM problem of `mod` on this machine's GPU
    and records the fastest of each in the user's GEMM records; returns the records of `mod`'s
    problems measured on this GPU, now or by an earlier run.
    `jobs` kernels compile at once (0: as many as cores and memory allow)."""
    from mixer_compile.machine import gpu_arch, local_gpu

    family = cutlass.gpu_arch_flag(arch)[0]
    dev = local_gpu()
    if dev is None or cutlass.gpu_arch_flag(gpu_arch(dev) or "sm_0")[0] != family:
        raise TuningError(f"tuning the GEMMs of a {family} build measures on a {family} GPU, and none is visible "
                          "here; build with the defaults, or tune on such a machine")
    device = str(dev.device_name)
    path = gemm_choice.user_records_path(family)
    done = {r.key() for r in gemm_choice.read_records(path) if r.device == device}
    problems = sorted({(k.with_variant(""), s) for k, s in gemm_choice.call_sites(mod)}, key=lambda p: p[0].symbol)
    todo = [(k, s) for k, s in problems if gemm_choice.key_of(k, s) not in done]
    say(f"library GEMMs: {len(problems)} problems, {len(problems) - len(todo)} already measured on {device}")
    chosen = sorted({k.with_variant(v) for k, _ in todo for v in candidates(k, family)}, key=lambda k: k.symbol)
    jobs = jobs or cutlass.compile_jobs()
    if chosen:
        say(f"  compiling {len(chosen)} candidate kernels ({jobs} at once; cached)")
    # all problems' candidates in one pool (a many-core machine compiles them side by side); one
    # that cannot be built here (a candidate that does not compile, cuBLASLt not installed) is said
    objects = gemm_choice.gpu_objects(chosen, arch, jobs, on_error=lambda kernel, exc: say(
        f"    {kernel.symbol}: skipped ({str(exc).splitlines()[0]})"))
    for i, (kernel, shape) in enumerate(todo, 1):
        built = {k.variant: obj for k, obj in objects.items() if k.with_variant("") == kernel}
        if not built:
            raise TuningError(f"no candidate of {kernel.symbol} compiled; see the lines above")
        with tempfile.TemporaryDirectory(prefix="mixer-gemm-tune-") as tmp:
            kernels = [kernel.with_variant(v) for v in built]
            lib = cutlass.load_on_host(list(built.values()), gemm_choice.link_options(kernels), Path(tmp))
            args = _arrays(kernel, shape, dev)
            times = _times(lib, kernel, list(built), args, dev, say)
        if not times:
            raise TuningError(f"no candidate of {kernel.symbol} ran on {device}; see the lines above")
        best = min(times, key=times.__getitem__)
        default = gemm_choice.default_config(kernel, shape, family).variant
        record = Record(kernel.form, kernel.dtype, kernel.epilogue, shape.m, shape.n, shape.k, shape.l, best,
                        round(times[best] * 1e6, 2), device)
        gemm_choice.write_records(path, [record])
        gain = times.get(default, times[best]) / times[best]
        say(f"  [{i}/{len(todo)}] {kernel.symbol} {shape.m}x{shape.n}x{shape.k}x{shape.l}: {best} "
            f"{record.us} us ({gain:.2f}x the default {default})")
    keys = {gemm_choice.key_of(k, s) for k, s in problems}
    return [r for r in gemm_choice.read_records(path) if r.device == device and r.key() in keys]


def tune_model_gemms(spec: Any, target: Any, form: str, dtype: str, batches: Any, say: Say) -> list[Record]:
    """tune_gemms on the library GEMMs of `spec` built for `target` (every entry batch of a
    range); nothing to do for a target without library GEMMs (CPUs)."""
    from mixer_compile.backend import backend_for
    from mixer_compile.compose import compose

    if not backend_for(target).pass_context(target, dtype).gemm_library:
        return []
    module = compose(spec, target, form, dtype, batches=batches).module
    if not gemm_choice.call_sites(module):
        return []
    return tune_gemms(module, str(target.tvm_target().attrs["arch"]), say)
