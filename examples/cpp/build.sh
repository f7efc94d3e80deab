#!/bin/sh
# Builds mixer_infer against the TVM runtime shipped in the apache-tvm wheel.
#   examples/cpp/build.sh [OUTPUT]      (PYTHON=/path/to/python to pick the environment)
# The headers and libraries are found through the Python packages (without importing them):
# tvm/include + tvm/lib/libtvm_runtime.so, and tvm_ffi/include + tvm_ffi/lib/libtvm_ffi.so.
# The binary records their directories as its rpath, so it runs without LD_LIBRARY_PATH.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/mixer_infer}
py=${PYTHON:-python3}
where() { "$py" -c "import importlib.util as u; print(u.find_spec('$1').submodule_search_locations[0])"; }
tvm=$(where tvm)
ffi=$(where tvm_ffi)
# --no-as-needed: nothing here calls libtvm_runtime directly, but its static initialisers
# register the .so loader, the Relax VM and runtime.LoadParamsFromFile.
exec "${CXX:-g++}" -std=c++17 -O2 -Wall "$here/mixer_infer.cc" -o "$out" \
    -I"$tvm/include" -I"$ffi/include" \
    -L"$tvm/lib" -L"$ffi/lib" -Wl,--no-as-needed -ltvm_runtime -ltvm_ffi \
    -Wl,-rpath,"$tvm/lib" -Wl,-rpath,"$ffi/lib"
