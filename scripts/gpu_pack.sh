#!/usr/bin/env bash
# Packs what a GPU machine of the device tool lacks: TVM 0.27 and tvm-ffi for its Python 3.12
# (its image has torch, nvcc and the driver, no TVM and no registry). The TVM wheel is 100 MB and
# one device call carries at most 64 MiB, so it is split in two halves: .gpu/a goes with the
# first call, .gpu/b (second half + tvm-ffi + CUTLASS's headers) with the second; see README,
# "NVIDIA GPUs". With KERNELS=1 it also compiles here, into .gpu/a/cache, the CUTLASS kernels the
# session's builds, GEMM tuning and GPU tests need (scripts/gpu_kernels.py: ~50 sm_90a kernels, then
# the tests' own; about an hour on 2 cores, ~10 MB), so the GPU machine spends no device time on nvcc.
set -euo pipefail
cd "$(dirname "$0")/.."
kept=""
if [ -d .gpu/a/cache ]; then kept=$(mktemp -d); mv .gpu/a/cache "$kept/"; fi  # compiled kernels survive a re-pack
rm -rf .gpu && mkdir -p .gpu/a .gpu/b .gpu/dl
if [ -n "$kept" ]; then mv "$kept/cache" .gpu/a/; rmdir "$kept"; fi
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/dl \
  apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 nvidia-cutlass==4.2.0.0
tvm=$(ls .gpu/dl/apache_tvm-0.27.0.post1-*.whl)
half=$(( ($(stat -c %s "$tvm") + 1) / 2 ))
split -b "$half" -d "$tvm" ".gpu/tvm-part-"
mv .gpu/tvm-part-00 .gpu/a/ && mv .gpu/tvm-part-01 .gpu/b/
basename "$tvm" > .gpu/b/tvm-wheel-name
mv .gpu/dl/apache_tvm_ffi-*.whl .gpu/dl/nvidia_cutlass-*.whl .gpu/b/
rm -rf .gpu/dl
if [ "${KERNELS:-0}" = 1 ]; then
  python3 scripts/gpu_kernels.py --cache .gpu/a/cache --spec "${SPEC:-mixer_b16}" --candidates float16:256
  # the kernels the GPU tests compile (gpu_session.sh `test`), by running them here
  MIXER_TEST_KERNEL_CACHE=$PWD/.gpu/a/cache python3 -m pytest -q --runslow tests/test_library_gemms.py \
    tests/test_cublaslt.py
fi
du -sh .gpu/a .gpu/b
