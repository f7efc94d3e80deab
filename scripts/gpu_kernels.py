"""Compiles, into a kernel cache, the library GEMMs a GPU session will need: those of the builds
that `gpu_session.sh test bench` makes (the spec at each batch and dtype, default configurations)
and, with --candidates, every candidate that `gpu_session.sh tune` measures. nvcc needs about a
minute of CPU per sm_90a kernel; done here, beforehand, it costs no device time: the cache key
does not depend on where the packages are installed (backend/cutlass.py), so the GPU machine
finds these objects when its nvcc is the same version.

    python scripts/gpu_kernels.py --cache .gpu/cache [--spec mixer_b16] [--batches 1,64,256]
                                  [--dtypes float32,float16,bfloat16] [--candidates float16:256]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", required=True, help="the kernel cache to fill ($MIXER_COMPILE_CACHE on the GPU machine)")
    ap.add_argument("--spec", default="mixer_b16")
    ap.add_argument("--target", default="sm_90")
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--dtypes", default="float32,float16,bfloat16")
    ap.add_argument("--candidates", default="", help="DTYPE:BATCH whose GEMMs' tuning candidates to compile too")
    args = ap.parse_args(argv)
    os.environ["MIXER_COMPILE_CACHE"] = str(Path(args.cache).resolve())

    from mixer_compile.backend import cutlass, gemm_choice
    from mixer_compile.backend.target import get_target
    from mixer_compile.compose import compose
    from mixer_compile.model.spec import load_spec
    from mixer_compile.tune.gemms import candidates

    target = get_target(args.target)
    arch = str(target.tvm_target().attrs["arch"])
    family = cutlass.gpu_arch_flag(arch)[0]
    spec = load_spec(args.spec).with_gelu_for("random")
    wanted = set()
    for dtype in args.dtypes.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            module = compose(spec.replace(batch=batch), target, "matmul", dtype).module
            wanted |= {k for k, _ in gemm_choice.call_sites(gemm_choice.apply_choices(module, family)[0])}
    if args.candidates:
        dtype, batch = args.candidates.split(":")
        module = compose(spec.replace(batch=int(batch)), target, "matmul", dtype).module
        wanted |= {k.with_variant(v) for k, _ in gemm_choice.call_sites(module) for v in candidates(k, family)}
    jobs = cutlass.compile_jobs()
    print(f"{len(wanted)} kernels for {family}, {jobs} at once, into {args.cache}", flush=True)
    start = time.time()
    kernels = sorted(wanted, key=lambda k: k.symbol)
    for kernel, obj in gemm_choice.gpu_objects(kernels, arch, jobs).items():
        print(f"  {kernel.symbol}: {obj.name}", flush=True)
    print(f"done in {time.time() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
