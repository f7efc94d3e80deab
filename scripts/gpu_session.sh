#!/usr/bin/env bash
# What a session with a GPU machine (the device tool) runs, by stage:
#   stage    (device call 1, carry [".gpu/a"])  the first half of TVM lands; prints the machine and its nvcc
#   install  (device call 2, carry [".gpu/b"])  joins the halves, installs TVM, tvm-ffi, CUTLASS and xgboost into /tmp/site
#   targets  the issue's two targets first: benchmarks/bench_gpu.py at batch 256 and 1, fp16 only, with
#            no records (the defaults a first compile gets): ours against PyTorch eager, torch.compile
#            and (batch 1) torch.compile's CUDA graphs, plus the tensor-core peak
#   test     the GPU tests (tests/test_cuda_build.py, test_library_gemms.py, test_gemm_choice.py and
#            test_cuda_tune.py with --runslow: the CUTLASS sm_90a kernels too), every build validated
#            on the GPU
#   bench    benchmarks/bench_gpu.py over BATCHES (default 256,64,1) and DTYPES (default fp16, bf16,
#            fp32; builds the targets stage made are reused), every build validated on the GPU
#   tune     mixer-compile tune for the GPU at batch 256, fp16: the library GEMMs' CUTLASS (and cuBLASLt)
#            candidates measured per problem, then MetaSchedule on TVM's kernels (TRIALS, default 8);
#            the records land in $OUT as they are measured ($OUT/library_gemms, $OUT/tuning) and, at
#            the end, as a schedules tree in $OUT/schedules (copy it into schedules/ and commit);
#            later stages' builds apply them
#   cpuscale benchmarks/bench_cpu.py on the machine's CPU at 2, 4, 8 and 16 threads (CPU scaling)
# The machine forgets everything 30 s after a call, so run the calls back to back; stages combine,
# in priority order, since a call is cut at 10 minutes and returns only what is in $OUT by then:
# `bash scripts/gpu_session.sh install targets test bench tune`. Every stage writes its results
# into $OUT as it goes (device tool; ./gpu-results here): copy them to benchmarks/results/ and
# commit. See README, "NVIDIA GPUs".
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-results}; mkdir -p "$OUT"
SITE=/tmp/site
export PYTHONPATH=$PWD:$SITE PYTHONUNBUFFERED=1
for d in /usr/local/cuda/lib64 /usr/local/cuda/lib $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, "cu13", "lib") for p in nvidia.__path__))' 2>/dev/null); do
  [ -d "$d" ] && export LD_LIBRARY_PATH=$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
done
SPEC=${SPEC:-mixer_b16}
# the CUTLASS kernels compiled beforehand (gpu_pack.sh with KERNELS=1), found by their cache key
# (the tests' kernels too: tests/conftest.py kernel_cache); kernels compiled here are kept beside them
# (xz through Python's lzma: the image need not have the xz tool)
untar_xz() { python3 -c 'import sys, tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode="r|xz").extractall(sys.argv[1], filter="fully_trusted")' "$1"; }
if [ -f .gpu/a/cache.tar.xz ]; then
  mkdir -p /tmp/mixer && untar_xz /tmp/mixer < .gpu/a/cache.tar.xz
  export MIXER_COMPILE_CACHE=/tmp/mixer/cache MIXER_TEST_KERNEL_CACHE=/tmp/mixer/cache
fi

for stage in "$@"; do
  echo "=== $stage $(date -u +%H:%M:%S)"
  case $stage in
    stage)
      ls -la .gpu/a || { echo "no .gpu/a: run scripts/gpu_pack.sh here and carry .gpu/a"; exit 2; }
      nvidia-smi -L; python3 --version; python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())'
      which nvcc cuobjdump
      # the kernel cache is keyed by this release (backend/cutlass.py _tool_version)
      nvcc --version | grep release ;;
    install)
      [ -f .gpu/a/tvm.tar.xz.part-00 ] || { echo "the first half (.gpu/a) is gone: the machine went cold; run the 'stage' call again, then this one at once"; exit 2; }
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        .gpu/b/apache_tvm_ffi-*.whl .gpu/a/nvidia_cutlass-*.whl .gpu/a/xgboost_cpu-*.whl || exit 2
      cat .gpu/a/tvm.tar.xz.part-00 .gpu/b/tvm.tar.xz.part-01 | untar_xz "$SITE" || exit 2
      # this scratch copy runs from source: give it the wheel's layout of the package data
      ln -sfn ../targets mixer_compile/targets && ln -sfn ../schedules mixer_compile/schedules
      python3 -c 'import tvm; d = tvm.cuda(0); print("tvm", tvm.__version__, "GPU", d.exist and d.device_name, d.exist and d.compute_version)' || exit 2 ;;
    test)
      python3 -m pytest -q -rs --runslow tests/test_cuda_build.py tests/test_library_gemms.py tests/test_gemm_choice.py \
        tests/test_cuda_tune.py tests/test_cublaslt.py 2>&1 | tee "$OUT/test_gpu.log" ;;
    tune)
      export MIXER_COMPILE_CACHE=${MIXER_COMPILE_CACHE:-/tmp/mixer-cache}
      # the records are written into $OUT as they are measured: a call cut short still returns them
      for d in library_gemms tuning; do
        mkdir -p "$OUT/$d" "$MIXER_COMPILE_CACHE"
        if [ -d "$MIXER_COMPILE_CACHE/$d" ] && [ ! -L "$MIXER_COMPILE_CACHE/$d" ]; then
          cp -r "$MIXER_COMPILE_CACHE/$d/." "$OUT/$d/" && rm -rf "${MIXER_COMPILE_CACHE:?}/$d"
        fi
        ln -sfn "$OUT/$d" "$MIXER_COMPILE_CACHE/$d"
      done
      python3 -m mixer_compile.cli tune --spec "$SPEC" --target cuda --dtype float16 --batch "${TUNE_BATCH:-256}" \
        --trials "${TRIALS:-8}" --ship-to "$OUT/schedules" 2>&1 | tee "$OUT/tune.log" ;;
    targets)
      python3 benchmarks/bench_gpu.py --spec "$SPEC" --batches 256,1 --dtypes float16 --tag targets \
        --artifacts /tmp/bench --out "$OUT" 2>&1 | tee "$OUT/bench_targets.log" ;;
    bench)
      python3 benchmarks/bench_gpu.py --spec "$SPEC" --batches "${BATCHES:-256,64,1}" \
        --dtypes "${DTYPES:-float16,bfloat16,float32}" --artifacts /tmp/bench --out "$OUT" 2>&1 | tee "$OUT/bench.log" ;;
    cpuscale)
      for t in ${THREADS:-2 4 8 16}; do
        python3 benchmarks/bench_cpu.py --specs mixer_b16 --batches 1 8 --threads "$t" --out "$OUT/cpu_threads_$t" \
          2>&1 | tee "$OUT/cpu_threads_$t.log"
      done ;;
    *) echo "unknown stage '$stage' (stage, install, targets, test, bench, tune, cpuscale)"; exit 2 ;;
  esac
done
