"""Library-speed GEMMs for NVIDIA GPUs: CUTLASS kernels generated and compiled at build time.

TVM 0.27 has no schedule that reaches Hopper's wgmma, and DLight's WMMA matmuls ran the
Mixer at ~10% of an H100's tensor-core peak. So a CUDA build lowers its large right-product
GEMMs (patchify, channel fc1, channel fc2; `passes/library_gemms.py` picks them) to calls of
the `mixer_gemm_*` interface (`lower/library.py`), and this module instantiates each called
symbol from CUTLASS templates with its epilogue fused: bias (float32, per output column), then
GELU (erf or tanh, as the spec says) or the residual add, rounded once to the storage dtype.

sm_90/sm_90a: CUTLASS 3.x, TMA + wgmma, warp-specialized cooperative persistent kernels,
compiled for `sm_90a` (wgmma needs the arch-specific target). sm_80/86/89: CUTLASS 2.x,
mma.sync m16n8k16 + cp.async multistage, bias and residual through the broadcast epilogue.
The objects export tvm-ffi's C ABI (`__tvm_ffi_<name>`), are linked into the artifact's
`model.so` (`export_library(addons=...)`) and are found there by `R.call_dps_packed`, so the
artifact stays self-contained (TVM runtime, CUDA runtime and driver). One sm_90a kernel takes
about a minute and several GB of memory to compile, so objects are cached by the hash of their
source and compiler under the user cache (`$MIXER_COMPILE_CACHE/kernels`).

`host_object` compiles a plain C++ implementation of the same interface for this CPU: the
host-CPU check of a GPU build (backend/cuda.py) runs the very Relax program, external calls
included, against the float64 reference.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mixer_compile.errors import TargetError
from mixer_compile.lower.library import PREFIX, GemmKernel, from_symbol

# ---------------------------------------------------------------------------- GPU sources

_COMMON = r"""
#include <cuda_runtime.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>
"""

_CHECKS = r"""
namespace {
void Check(bool ok, const char* what) {
  if (!ok) TVM_FFI_THROW(RuntimeError) << "SYMBOL: " << what;
}

// A [..., K] and D [..., N] (leading dims = M), W [N, K], bias [N] float32, all on the GPU.
void CheckArgs(const tvm::ffi::TensorView& a, const tvm::ffi::TensorView& w, const tvm::ffi::TensorView& bias,
               const tvm::ffi::TensorView& d, int code, int64_t* m, int64_t* n, int64_t* k) {
  for (const auto* t : {&a, &w, &d}) {
    Check(t->dtype().code == code && t->dtype().bits == 16, "A, W and D must have the kernel's 16-bit dtype");
    Check(t->device().device_type == kDLCUDA, "tensors must be on the GPU");
  }
  Check(bias.dtype().code == kDLFloat && bias.dtype().bits == 32 && bias.ndim() == 1, "bias must be float32 [N]");
  Check(w.ndim() == 2, "W must be [N, K]");
  *n = w.size(0);
  *k = w.size(1);
  Check(a.size(a.ndim() - 1) == *k && d.size(d.ndim() - 1) == *n && bias.size(0) == *n, "shape mismatch");
  *m = a.numel() / *k;
  Check(d.numel() == *m * *n, "D must be [M, N]");
}
}  // namespace
"""

_SM90 = r"""
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"

using namespace cute;

namespace {
using Element = ELEMENT;
using Layout = cutlass::layout::RowMajor;            // A [M, K], C/D [M, N]
using LayoutW = cutlass::layout::ColumnMajor;        // W [N, K]: K-major
constexpr int kAlign = 8;
using TileShape = Shape<_128, _256, _64>;
using ClusterShape = Shape<_2, _1, _1>;
using FusionOp = FUSION;

using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, float, float, Element, Layout, kAlign, Element, Layout, kAlign,
    cutlass::epilogue::TmaWarpSpecializedCooperative, FusionOp>::CollectiveOp;
using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, Layout, kAlign, Element, LayoutW, kAlign, float,
    TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
    cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue,
                                                    cutlass::gemm::PersistentScheduler>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

void Run(tvm::ffi::TensorView a, tvm::ffi::TensorView w, tvm::ffi::TensorView bias, RESIDUAL_PARAM
         tvm::ffi::TensorView d) {
  int64_t m, n, k;
  CheckArgs(a, w, bias, d, DLCODE, &m, &n, &k);
  const void* source = RESIDUAL_PTR;
  auto sa = cute::make_stride(int64_t(k), cute::Int<1>{}, int64_t(m) * k);
  auto sw = cute::make_stride(int64_t(k), cute::Int<1>{}, int64_t(n) * k);
  auto sd = cute::make_stride(int64_t(n), cute::Int<1>{}, int64_t(m) * n);
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {int(m), int(n), int(k), 1},
      {static_cast<const Element*>(a.data_ptr()), sa, static_cast<const Element*>(w.data_ptr()), sw},
      {{}, static_cast<const Element*>(source), sd, static_cast<Element*>(d.data_ptr()), sd}};
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = source ? 1.0f : 0.0f;
  args.epilogue.thread.bias_ptr = static_cast<const float*>(bias.data_ptr());
  Gemm gemm;
  Check(gemm.can_implement(args) == cutlass::Status::kSuccess, "CUTLASS cannot run this shape (K and N % 8)");
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, a.device().device_id));
  size_t workspace_size = Gemm::get_workspace_size(args);
  void* workspace = nullptr;
  if (workspace_size) Check(cudaMallocAsync(&workspace, workspace_size, stream) == cudaSuccess, "workspace");
  Check(gemm.initialize(args, workspace, stream) == cutlass::Status::kSuccess, "initialize");
  Check(gemm.run(stream) == cutlass::Status::kSuccess, "run");
  if (workspace) cudaFreeAsync(workspace, stream);
}
}  // namespace

TVM_FFI_DLL_EXPORT_TYPED_FUNC(SYMBOL, Run);
"""

_SM80 = r"""
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/epilogue/thread/linear_combination_bias_elementwise.h"
#include "cutlass/gemm/device/gemm_universal_with_broadcast.h"
#include "cutlass/functional.h"

namespace {
using Element = ELEMENT;
// Z = Activation(A @ W^T + beta * C + bias): C is the residual (beta 1) or absent (beta 0)
using EpilogueOp = cutlass::epilogue::thread::LinearCombinationBiasElementwise<
    Element, float, float, Element, Element, 8, ACTIVATION<float>, cutlass::plus<float>, false, float>;
using Gemm = cutlass::gemm::device::GemmUniversalWithBroadcast<
    Element, cutlass::layout::RowMajor, Element, cutlass::layout::ColumnMajor, Element, cutlass::layout::RowMajor,
    float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, cutlass::gemm::GemmShape<128, 128, 32>,
    cutlass::gemm::GemmShape<64, 64, 32>, cutlass::gemm::GemmShape<16, 8, 16>, EpilogueOp,
    cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<8>, 4, 8, 8>;  // 64 KB of shared memory: sm_86/89 too

void Run(tvm::ffi::TensorView a, tvm::ffi::TensorView w, tvm::ffi::TensorView bias, RESIDUAL_PARAM
         tvm::ffi::TensorView d) {
  int64_t m, n, k;
  CheckArgs(a, w, bias, d, DLCODE, &m, &n, &k);
  const void* source = RESIDUAL_PTR;
  typename Gemm::Arguments args(
      cutlass::gemm::GemmUniversalMode::kGemm, {int(m), int(n), int(k)}, 1,
      {1.0f, source ? 1.0f : 0.0f}, a.data_ptr(), w.data_ptr(), const_cast<void*>(source), d.data_ptr(),
      const_cast<void*>(bias.data_ptr()), nullptr, 0, 0, 0, 0, 0, 0, k, k, source ? n : 0, n, 0, 0);
  Gemm gemm;
  Check(gemm.can_implement(args) == cutlass::Status::kSuccess, "CUTLASS cannot run this shape (K and N % 8)");
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, a.device().device_id));
  Check(gemm.initialize(args, nullptr, stream) == cutlass::Status::kSuccess, "initialize");
  Check(gemm(stream) == cutlass::Status::kSuccess, "run");
}
}  // namespace

TVM_FFI_DLL_EXPORT_TYPED_FUNC(SYMBOL, Run);
"""


def _sm90_fusion(kernel: GemmKernel, element: str) -> str:
    ops = "cutlass::epilogue::fusion"
    if kernel.epilogue.startswith("gelu"):
        act = "GELU" if kernel.epilogue == "gelu_erf" else "GELU_taylor"
        return f"{ops}::LinCombPerColBiasEltAct<cutlass::epilogue::thread::{act}, {element}, float, float, {element}, float>"
    return f"{ops}::LinCombPerColBias<{element}, float, float, {element}, float>"


def gpu_source(kernel: GemmKernel, arch: str) -> str:
    """The CUDA source of one kernel for `arch` (sm_90a or sm_80)."""
    element = "cutlass::half_t" if kernel.dtype == "float16" else "cutlass::bfloat16_t"
    body = _SM90 if arch == "sm_90a" else _SM80
    activation = {"gelu_erf": "cutlass::epilogue::thread::GELU", "gelu_tanh": "cutlass::epilogue::thread::GELU_taylor"}
    text = (_COMMON + _CHECKS + body).replace("ELEMENT", element).replace("SYMBOL", kernel.symbol)
    text = text.replace("FUSION", _sm90_fusion(kernel, element))
    text = text.replace("ACTIVATION", activation.get(kernel.epilogue, "cutlass::epilogue::thread::Identity"))
    text = text.replace("DLCODE", "kDLFloat" if kernel.dtype == "float16" else "kDLBfloat")
    text = text.replace("RESIDUAL_PARAM", "tvm::ffi::TensorView r," if kernel.residual else "")
    return text.replace("RESIDUAL_PTR", "r.data_ptr()" if kernel.residual else "nullptr")


def has_family(arch: str) -> bool:
    """Whether a GPU of `arch` gets CUTLASS GEMMs (sm_80 to sm_90: Ampere, Ada, Hopper)."""
    try:
        gpu_arch_flag(arch)
    except TargetError:
        return False
    return True


def gpu_arch_flag(arch: str) -> tuple[str, str]:
    """The kernel family and nvcc -gencode for a target's arch: Hopper gets the sm_90a kernels
    (wgmma exists on sm_90a only), Ampere and Ada the sm_80 ones."""
    major_minor = int(arch.removeprefix("sm_").rstrip("a"))
    if major_minor >= 100:
        raise TargetError(f"no CUTLASS GEMM family for {arch} yet (sm_80 and sm_90 are supported)")
    if major_minor >= 90:
        return "sm_90a", "arch=compute_90a,code=sm_90a"
    if major_minor >= 80:
        return "sm_80", f"arch=compute_80,code=sm_{major_minor}"
    raise TargetError(f"GPU {arch} has no tensor-core GEMM family here (sm_80 or newer)")


# ---------------------------------------------------------------------------- CPU stand-in

_HOST = r"""
// CPU implementation of the mixer_gemm_* interface (backend/cutlass.py): the host-CPU check
// of a GPU build runs the same Relax program with these in place of the CUTLASS kernels.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/function.h>

namespace {
float Load(const uint16_t* p, int64_t i, bool bf16) {
  uint16_t h = p[i];
  if (bf16) { uint32_t u = uint32_t(h) << 16; float f; std::memcpy(&f, &u, 4); return f; }
  _Float16 v; std::memcpy(&v, &h, 2); return float(v);
}
void Store(uint16_t* p, int64_t i, float x, bool bf16) {
  if (bf16) {  // round to nearest even
    uint32_t u; std::memcpy(&u, &x, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    p[i] = uint16_t(u >> 16);
    return;
  }
  _Float16 v = _Float16(x); std::memcpy(&p[i], &v, 2);
}
void Gemm(tvm::ffi::TensorView a, tvm::ffi::TensorView w, tvm::ffi::TensorView bias, const uint16_t* r,
          tvm::ffi::TensorView d, int act) {
  bool bf16 = a.dtype().code == kDLBfloat;
  int64_t n = w.size(0), k = w.size(1), m = a.numel() / k;
  if (d.numel() != m * n || bias.numel() != n) TVM_FFI_THROW(RuntimeError) << "mixer_gemm (host): shape mismatch";
  auto A = static_cast<const uint16_t*>(a.data_ptr());
  auto W = static_cast<const uint16_t*>(w.data_ptr());
  auto B = static_cast<const float*>(bias.data_ptr());
  auto D = static_cast<uint16_t*>(d.data_ptr());
  std::vector<float> wt(static_cast<size_t>(n * k)), row(static_cast<size_t>(k));
  for (int64_t i = 0; i < n * k; ++i) wt[size_t(i)] = Load(W, i, bf16);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t p = 0; p < k; ++p) row[size_t(p)] = Load(A, i * k + p, bf16);
    for (int64_t j = 0; j < n; ++j) {
      const float* wj = &wt[size_t(j * k)];
      float acc = 0.f;
      for (int64_t p = 0; p < k; ++p) acc += row[size_t(p)] * wj[p];
      float y = acc + B[j];
      if (act == 1) y = 0.5f * y * (1.f + std::erf(y * 0.70710678f));
      if (act == 2) y = 0.5f * y * (1.f + std::tanh(0.7978845608f * (y + 0.044715f * y * y * y)));
      if (r) y += Load(r, i * n + j, bf16);
      Store(D, i * n + j, y, bf16);
    }
  }
}
}  // namespace
"""


def _host_entry(kernel: GemmKernel) -> str:
    act = {"gelu_erf": 1, "gelu_tanh": 2}.get(kernel.epilogue, 0)
    name = f"Host_{kernel.symbol}"
    if kernel.residual:
        body = (f"void {name}(tvm::ffi::TensorView a, tvm::ffi::TensorView w, tvm::ffi::TensorView bias, "
                f"tvm::ffi::TensorView r, tvm::ffi::TensorView d) {{ "
                f"Gemm(a, w, bias, static_cast<const uint16_t*>(r.data_ptr()), d, {act}); }}")
    else:
        body = (f"void {name}(tvm::ffi::TensorView a, tvm::ffi::TensorView w, tvm::ffi::TensorView bias, "
                f"tvm::ffi::TensorView d) {{ Gemm(a, w, bias, nullptr, d, {act}); }}")
    return f"namespace {{ {body} }}\nTVM_FFI_DLL_EXPORT_TYPED_FUNC({kernel.symbol}, {name});\n"


def host_source(kernels: list[GemmKernel]) -> str:
    return _HOST + "".join(_host_entry(k) for k in sorted(set(kernels), key=lambda k: k.symbol))


# ---------------------------------------------------------------------------- compiling

def _include_dirs() -> list[str]:
    import tvm_ffi.libinfo

    return list(tvm_ffi.libinfo.include_paths())


def cutlass_include() -> str:
    try:
        import cutlass_library
    except ImportError:
        raise TargetError("CUDA builds need CUTLASS's headers: pip install nvidia-cutlass==4.2.0.0") from None
    path = Path(cutlass_library.__file__).parent / "source" / "include"
    if not (path / "cutlass" / "cutlass.h").is_file():
        raise TargetError(f"the nvidia-cutlass package has no headers at {path}; reinstall nvidia-cutlass==4.2.0.0")
    return str(path)


def _cache_dir() -> Path:
    from mixer_compile.tune.database import cache_root

    return cache_root() / "kernels"


def _compile(source: str, command: list[str], suffix: str, what: str) -> Path:
    """`command` (with SRC and OBJ placeholders) run once per distinct source and compiler;
    the object is cached, written atomically, so concurrent builds share it."""
    tool_version = subprocess.run([command[0], "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([source, tool_version, *command]).encode()).hexdigest()[:24]
    obj = _cache_dir() / f"{key}{suffix}"
    if obj.is_file():
        return obj
    print(f"      compiling {what} (cached in {obj.parent} afterwards)", file=sys.stderr, flush=True)
    obj.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mixer-kernel-", dir=obj.parent) as tmp:
        src, out = Path(tmp) / f"k{Path(command[0]).name}.cc", Path(tmp) / f"k{suffix}"
        if "nvcc" in Path(command[0]).name:
            src = src.with_suffix(".cu")
        src.write_text(source)
        argv = [str(src) if a == "SRC" else str(out) if a == "OBJ" else a for a in command]
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-12:])
            raise TargetError(f"compiling {what} failed:\n{tail}")
        os.replace(out, obj)
    return obj


def gpu_object(kernel: GemmKernel, arch: str) -> Path:
    """The compiled object of `kernel` for a GPU of `arch` (cached)."""
    family, gencode = gpu_arch_flag(arch)
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise TargetError("'nvcc' is not on PATH; install the CUDA toolkit (it compiles the GPU kernels)")
    command = [nvcc, "-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "-Xcompiler=-fPIC",
               "-gencode", gencode, f"-I{cutlass_include()}", *(f"-I{d}" for d in _include_dirs()),
               "-c", "SRC", "-o", "OBJ"]
    return _compile(gpu_source(kernel, family), command, ".o",
                    f"the CUTLASS kernel {kernel.symbol} for {family} (about a minute)")


def host_object(kernels: list[GemmKernel]) -> Path:
    """This CPU's implementation of `kernels` (cached)."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        raise TargetError("no C++ compiler (g++) on PATH; install one to check GPU builds on this CPU")
    command = [cxx, "-std=c++17", "-O2", "-fPIC", *(f"-I{d}" for d in _include_dirs()), "-c", "SRC", "-o", "OBJ"]
    return _compile(host_source(kernels), command, ".o", "the host implementation of the GEMM kernels")


def link_options() -> list[str]:
    """Linker options for a library holding GPU kernel objects: the CUDA runtime they call
    (wrapped so that `--as-needed`, which export_library's options precede, keeps it)."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
             str(Path(shutil.which("nvcc") or "/").resolve().parent.parent)]
    dirs = [d / sub for d in map(Path, filter(None, homes)) for sub in ("lib64", "lib")
            if (d / sub / "libcudart.so").exists()]
    if not dirs:
        raise TargetError("the CUDA runtime library (libcudart.so) was not found; set CUDA_HOME to the CUDA toolkit")
    return ["-Wl,--no-as-needed", f"-L{dirs[0]}", "-lcudart", "-Wl,--as-needed"]


def symbols(mod: object) -> list[GemmKernel]:
    """The GEMM kernels a Relax module calls (`R.call_dps_packed` of a mixer_gemm_* symbol)."""
    from tvm import relax

    found: set[str] = set()

    def visit(expr: object) -> None:
        if isinstance(expr, relax.ExternFunc) and str(expr.global_symbol).startswith(PREFIX):
            found.add(str(expr.global_symbol))

    for func in mod.functions.values():  # type: ignore[attr-defined]
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return [from_symbol(s) for s in sorted(found)]
