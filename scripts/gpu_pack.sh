#!/usr/bin/env bash
# Packs what a GPU machine of the device tool lacks: TVM 0.27, tvm-ffi, CUTLASS's headers and
# xgboost (MetaSchedule's cost model) for its Python 3.12 (its image has torch, nvcc and the
# driver, no registry). One device call carries at most 64 MiB with the working tree, and TVM's
# wheel alone is 100 MB, so its files go as one xz tarball (~64 MB) split in two: .gpu/a (first
# half, CUTLASS, xgboost, the kernel cache) with the first call, .gpu/b (second half, tvm-ffi)
# with the second; see README, "NVIDIA GPUs". With KERNELS=1 it also compiles here, into
# .gpu/cache, the CUTLASS kernels the session's builds, GEMM tuning and GPU tests need
# (scripts/gpu_kernels.py: ~50 sm_90a kernels, then the tests' own; about an hour on 2 cores),
# packed as .gpu/a/cache.tar.xz, so the GPU machine spends no device time on nvcc.
# Ends by checking each call's size against the limit.
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT=$((64 << 20))
if [ "${KERNELS:-0}" = 1 ]; then  # the kernels need CUTLASS's and cuBLASLt's headers: fail now, not after 30 min of nvcc
  python3 -c 'import importlib.metadata as m; [m.version(p) for p in ("nvidia-cutlass", "nvidia-cublas")]' 2>/dev/null \
    || { echo "error: KERNELS=1 needs nvidia-cutlass and nvidia-cublas in this python3: pip install -e '.[test,cublas]'"; exit 1; }
fi
rm -rf .gpu/a .gpu/b .gpu/dl .gpu/tvm && mkdir -p .gpu/a .gpu/b .gpu/dl .gpu/tvm .gpu/cache
xgboost=$(python3 -c 'import importlib.metadata as m; print(m.version("xgboost-cpu"))')
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/dl \
  apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 nvidia-cutlass==4.2.0.0 "xgboost-cpu==$xgboost"
# a wheel is a zip: its files as a tarball under xz -9 take ~37% less (libtvm_compiler.so most)
python3 -m zipfile -e .gpu/dl/apache_tvm-0.27.0.post1-*.whl .gpu/tvm
tar -C .gpu/tvm -cf - . | xz -9 -T0 > .gpu/dl/tvm.tar.xz
half=$(( ($(stat -c %s .gpu/dl/tvm.tar.xz) + 1) / 2 ))
split -b "$half" -d .gpu/dl/tvm.tar.xz .gpu/dl/tvm.tar.xz.part-
mv .gpu/dl/tvm.tar.xz.part-00 .gpu/dl/nvidia_cutlass-*.whl .gpu/dl/xgboost_cpu-*.whl .gpu/a/
mv .gpu/dl/tvm.tar.xz.part-01 .gpu/dl/apache_tvm_ffi-*.whl .gpu/b/
rm -rf .gpu/dl .gpu/tvm
if [ "${KERNELS:-0}" = 1 ]; then
  python3 scripts/gpu_kernels.py --cache .gpu/cache --spec "${SPEC:-mixer_b16}" --candidates float16:256
  # the kernels the GPU tests compile (gpu_session.sh `test`), by running them here
  MIXER_COMPILE_CACHE=$PWD/.gpu/cache MIXER_TEST_KERNEL_CACHE=$PWD/.gpu/cache python3 -m pytest -q --runslow \
    tests/test_library_gemms.py tests/test_cublaslt.py tests/test_cuda_build.py
fi
tar -C .gpu -cJf .gpu/a/cache.tar.xz cache
# what each call carries: the working tree that travels (tracked files, untracked ones git does
# not ignore) and its half
tree=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r stat -c %s | awk '{s += $1} END {print s + 0}')
status=0
for half in a b; do
  size=$(( tree + $(du -sb ".gpu/$half" | cut -f1) ))
  echo "call carrying .gpu/$half: $(( size >> 20 )) MiB of the $(( LIMIT >> 20 )) MiB a call may carry"
  [ "$size" -le "$LIMIT" ] || { echo "error: .gpu/$half is too large to travel"; status=1; }
done
exit $status
