"""cuBLASLt: a second implementation of the library-GEMM contract (lower/library.py), by variant.

CUTLASS kernels (backend/cutlass.py) are instantiated per configuration and need a measured
choice per problem; cuBLASLt picks its own kernel by heuristic and is fast on every GPU it
supports, so some call sites may run faster with it. It is not the default because it costs:
its GELU epilogue is the tanh approximation only (timm's erf GELU cannot use it), and the
library is a ~500 MB run-time dependency that CUTLASS's self-contained objects avoid. So a
build calls it only where a measurement on a GPU chose it, by renaming the call to
`<symbol>__cublaslt` (backend/gemm_choice.py); this module compiles the wrapper exporting that
symbol, and an artifact that links one declares `libcublasLt.so.13` in its metadata
(`runtime_libraries`), which the loader loads before model.so or refuses in one line
(machine.load_runtime_libraries).

The wrapper (`source`) is C++ against tvm-ffi's C ABI, like the CUTLASS kernels: the same
arguments, checks and stream. It serves the right product (form xw) only: the bias of a left
product runs along D's rows, which cuBLASLt's bias epilogue, broadcast along columns, cannot
express in a row-major D. Headers and library come from the `nvidia-cublas` wheel (the
`cublas` extra); objects are cached like CUTLASS's (cutlass.compile_cached). The host-CPU check
of such a build needs nothing from here: cutlass.host_source implements every mixer_gemm_*
symbol, variants included.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from mixer_compile.backend.cutlass import argument_checks, compile_cached
from mixer_compile.errors import TargetError
from mixer_compile.lower.library import GemmKernel
from mixer_compile.machine import CUBLASLT, package_file

VARIANT = "cublaslt"
RUNTIME_LIBRARY = CUBLASLT.soname  # libcublasLt.so.13: the wheel has no unversioned .so to link by -l
HEADER = "cublasLt.h"

# D = epilogue(X @ W^T + beta * C + bias): the residual is C with beta = 1 (cublasLt.h: the
# epilogue's bias is added to alpha * A @ B + beta * C, then the activation applied).
_EPILOGUES = {"bias": "CUBLASLT_EPILOGUE_BIAS", "gelu_tanh": "CUBLASLT_EPILOGUE_GELU_BIAS",
              "residual": "CUBLASLT_EPILOGUE_BIAS"}
# storage dtype: element and cuBLASLt's type. Every one computes in float32
# (CUBLAS_COMPUTE_32F: a float32 GEMM is plain SGEMM, no TF32, as PyTorch's default)
_TYPES = {"float16": ("__half", "CUDA_R_16F"), "bfloat16": ("__nv_bfloat16", "CUDA_R_16BF"),
          "float32": ("float", "CUDA_R_32F")}

_SOURCE = r"""
// SYMBOL: the xw form of mixer_gemm_* (lower/library.py) by cuBLASLt (backend/cublaslt.py):
//   D [..., N] = epilogue(X [..., K] @ W [N, K]^T + bias [N] (+ R [..., N])), accumulated in float32,
//   by EPILOGUE.
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <type_traits>
ARGUMENT_CHECKS
namespace {
using Element = ELEMENT;
constexpr cudaDataType_t kType = CUDA_TYPE;
constexpr cublasLtEpilogue_t kEpilogue = EPILOGUE;
// The most workspace an algorithm may ask for (NVIDIA's advice for Hopper); a call allocates only
// what its algorithm needs, stream-ordered, as the CUTLASS kernels do.
constexpr size_t kMaxWorkspace = size_t(32) << 20;

void CheckCuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) TVM_FFI_THROW(RuntimeError) << "SYMBOL: " << what << ": " << cudaGetErrorString(status);
}
void CheckLt(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS)
    TVM_FFI_THROW(RuntimeError) << "SYMBOL: " << what << ": " << cublasLtGetStatusName(status);
}

// The bias is float32 by the contract. cublasLt.h (13.1) says of CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE
// that "bias vector elements are the same type as the elements of output matrix (Dtype)", the
// exceptions being IMMA and fp8 kernels: a CUDA_R_32F bias with a 16-bit D is not documented. So a
// plan asks the heuristic for a float32 bias first (the contract exactly: added in float32, rounded
// once) and, when no algorithm takes one, for a bias of D's type, which each call then rounds into
// the head of its workspace allocation (the bias rounded once more).
__global__ void BiasToElement(const float* bias, Element* out, int64_t n) {
  int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = Element(bias[i]);
}

// cuBLASLt is column-major: row-major D [M, N] is column-major D^T [N, M] = W' X', where W [N, K]
// row-major is column-major [K, N], transposed (TRANSA), and X [M, K] row-major is column-major
// [K, M]. The epilogue's bias runs along D^T's rows: N, the output features, as the contract says.
struct Plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t w = nullptr, x = nullptr, d = nullptr;  // d serves C too
  cublasLtMatmulAlgo_t algo{};
  size_t workspace = 0;
  bool bias_fp32 = true;

  Plan() = default;
  Plan(const Plan&) = delete;
  ~Plan() {
    if (op) cublasLtMatmulDescDestroy(op);
    for (auto layout : {w, x, d})
      if (layout) cublasLtMatrixLayoutDestroy(layout);
  }
};

// An algorithm depends on the alignment of every pointer (256 bytes is assumed unless told; TVM
// promises 64), so it is chosen per problem and alignments: W, X, C, D, bias.
using Alignments = std::tuple<uint32_t, uint32_t, uint32_t, uint32_t, uint32_t>;
using Key = std::tuple<int, int64_t, int64_t, int64_t, Alignments>;  // device, M, N, K, alignments

uint32_t Alignment(const void* pointer) {
  auto address = reinterpret_cast<uintptr_t>(pointer);
  uint32_t align = 256;
  while (align > 1 && address % align) align /= 2;
  return align;
}

template <typename T>
void SetDesc(cublasLtMatmulDesc_t op, cublasLtMatmulDescAttributes_t attribute, const T& value, const char* what) {
  CheckLt(cublasLtMatmulDescSetAttribute(op, attribute, &value, sizeof(value)), what);
}

std::unique_ptr<Plan> MakePlan(cublasLtHandle_t handle, const Problem& p, const Alignments& align, const void* bias) {
  auto plan = std::make_unique<Plan>();
  CheckLt(cublasLtMatmulDescCreate(&plan->op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
  SetDesc(plan->op, CUBLASLT_MATMUL_DESC_TRANSA, CUBLAS_OP_T, "transpose W");
  SetDesc(plan->op, CUBLASLT_MATMUL_DESC_EPILOGUE, kEpilogue, "epilogue");
  CheckLt(cublasLtMatrixLayoutCreate(&plan->w, kType, p.k, p.n, p.k), "layout of W");
  CheckLt(cublasLtMatrixLayoutCreate(&plan->x, kType, p.k, p.m, p.k), "layout of X");
  CheckLt(cublasLtMatrixLayoutCreate(&plan->d, kType, p.n, p.m, p.n), "layout of D");

  cublasLtMatmulPreference_t pref = nullptr;
  CheckLt(cublasLtMatmulPreferenceCreate(&pref), "cublasLtMatmulPreferenceCreate");
  std::unique_ptr<std::remove_pointer_t<cublasLtMatmulPreference_t>, decltype(&cublasLtMatmulPreferenceDestroy)> owned(
      pref, cublasLtMatmulPreferenceDestroy);
  auto set_pref = [&](cublasLtMatmulPreferenceAttributes_t attribute, auto value) {
    CheckLt(cublasLtMatmulPreferenceSetAttribute(pref, attribute, &value, sizeof(value)), "preference");
  };
  set_pref(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, kMaxWorkspace);
  set_pref(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, std::get<0>(align));
  set_pref(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, std::get<1>(align));
  set_pref(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, std::get<2>(align));
  set_pref(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, std::get<3>(align));

  for (cudaDataType_t bias_type : {CUDA_R_32F, kType}) {
    // the heuristic reads the bias pointer's alignment only; a rounded bias will sit at the head of
    // a fresh (256-byte aligned) allocation
    const void* at = bias_type == CUDA_R_32F ? bias : reinterpret_cast<const void*>(uintptr_t(256));
    SetDesc(plan->op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, bias_type, "BIAS_DATA_TYPE");
    SetDesc(plan->op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, at, "BIAS_POINTER");
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(handle, plan->op, plan->w, plan->x, plan->d, plan->d,
                                                           pref, 1, &result, &found);
    if (status == CUBLAS_STATUS_SUCCESS && found > 0) {
      plan->algo = result.algo;
      plan->workspace = result.workspaceSize;
      plan->bias_fp32 = bias_type == CUDA_R_32F;
      return plan;
    }
  }
  Check(false, "cuBLASLt has no algorithm for this problem and epilogue");
  return nullptr;
}

// The first call of a problem may come while TVM captures the forward pass into a CUDA graph, in
// global capture mode, which forbids this thread calls such as cudaMalloc: creating the handle and
// planning are no stream work, so they run in relaxed mode (as PyTorch's allocator does).
struct RelaxedCapture {
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  RelaxedCapture() { cudaThreadExchangeStreamCaptureMode(&mode); }
  ~RelaxedCapture() { cudaThreadExchangeStreamCaptureMode(&mode); }
};

struct State {
  std::mutex mu;  // handles, plans, and the bias pointer a call sets on its plan
  std::map<int, cublasLtHandle_t> handles;
  std::map<Key, std::unique_ptr<Plan>> plans;
};

State& Global() {
  static State* state = new State();  // never destroyed: at exit the CUDA runtime may be gone first
  return *state;
}

void Gemm(const tvm::ffi::TensorView& x, const tvm::ffi::TensorView& w, const tvm::ffi::TensorView& bias,
          const tvm::ffi::TensorView* r, const tvm::ffi::TensorView& d) {
  const Problem p = CheckArgs(x, w, bias, r, d);
  const int device = x.device().device_id;
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device));
  const void* c = r ? r->data_ptr() : d.data_ptr();  // beta = 0 without a residual: C is not read
  const Alignments align{Alignment(w.data_ptr()), Alignment(x.data_ptr()), Alignment(c), Alignment(d.data_ptr()),
                         Alignment(bias.data_ptr())};
  State& state = Global();
  std::lock_guard<std::mutex> lock(state.mu);
  cublasLtHandle_t handle;
  Plan* plan;
  {
    RelaxedCapture relaxed;
    cublasLtHandle_t& slot = state.handles[device];
    if (!slot) CheckLt(cublasLtCreate(&slot), "cublasLtCreate");
    handle = slot;
    std::unique_ptr<Plan>& planned = state.plans[Key{device, p.m, p.n, p.k, align}];
    if (!planned) planned = MakePlan(handle, p, align, bias.data_ptr());
    plan = planned.get();
  }
  const size_t bias_bytes = plan->bias_fp32 ? 0 : (p.n * sizeof(Element) + 255) / 256 * 256;
  char* buffer = nullptr;
  if (bias_bytes + plan->workspace)
    CheckCuda(cudaMallocAsync(reinterpret_cast<void**>(&buffer), bias_bytes + plan->workspace, stream), "workspace");
  const void* bias_at = bias.data_ptr();
  if (!plan->bias_fp32) {
    BiasToElement<<<unsigned((p.n + 255) / 256), 256, 0, stream>>>(static_cast<const float*>(bias.data_ptr()),
                                                                   reinterpret_cast<Element*>(buffer), p.n);
    CheckCuda(cudaGetLastError(), "bias conversion");
    bias_at = buffer;
  }
  SetDesc(plan->op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias_at, "BIAS_POINTER");
  const float alpha = 1.0f, beta = r ? 1.0f : 0.0f;
  cublasStatus_t status = cublasLtMatmul(handle, plan->op, &alpha, w.data_ptr(), plan->w, x.data_ptr(), plan->x,
                                         &beta, c, plan->d, d.data_ptr(), plan->d, &plan->algo,
                                         plan->workspace ? buffer + bias_bytes : nullptr, plan->workspace, stream);
  if (buffer) cudaFreeAsync(buffer, stream);
  CheckLt(status, "cublasLtMatmul");
}

void Run(tvm::ffi::TensorView x, tvm::ffi::TensorView w, tvm::ffi::TensorView bias, RESIDUAL_PARAM
         tvm::ffi::TensorView d) {
  Gemm(x, w, bias, RESIDUAL_ARG, d);
}
}  // namespace

TVM_FFI_DLL_EXPORT_TYPED_FUNC(SYMBOL, Run);
"""


def supports(kernel: GemmKernel) -> bool:
    """Whether cuBLASLt can compute `kernel`: right products with a bias, tanh GELU or residual
    epilogue (its GELU epilogue is the tanh approximation: an erf GELU stays with CUTLASS)."""
    return kernel.form == "xw" and kernel.dtype in _TYPES and kernel.epilogue in _EPILOGUES


def source(kernel: GemmKernel) -> str:
    """The C++/CUDA source of the wrapper exporting `kernel.symbol` (see the module docstring)."""
    if not supports(kernel):
        raise TargetError(f"{kernel.symbol}: cuBLASLt has no such GEMM (right products with a bias, tanh GELU or "
                          "residual epilogue only)")
    element, cuda_type = _TYPES[kernel.dtype]
    fields = {"SYMBOL": kernel.symbol, "ELEMENT": element, "CUDA_TYPE": cuda_type,
              "EPILOGUE": _EPILOGUES[kernel.epilogue], "RESIDUAL_PARAM": "tvm::ffi::TensorView r," if kernel.residual
              else "", "RESIDUAL_ARG": "&r" if kernel.residual else "nullptr"}
    text = _SOURCE.replace("ARGUMENT_CHECKS", argument_checks(kernel))  # the CUTLASS kernels' checks
    return re.sub(r"\b(" + "|".join(fields) + r")\b", lambda m: fields[m.group(0)], text)


def _package_dir(name: str) -> Path:
    """The directory of `name` (the header or the library) in the installed nvidia-cublas package."""
    path = package_file(CUBLASLT.distribution, name)
    if path is None:
        raise TargetError(f"GEMMs by cuBLASLt need the {CUBLASLT.distribution} package: {CUBLASLT.pip}")
    return path.parent


def _gencode(arch: str) -> str:
    """nvcc's -gencode for the wrapper's one small kernel (the bias rounding), for exactly the
    target's architecture, like the rest of the build's GPU code."""
    match = re.fullmatch(r"sm_(\d+a?)", arch)
    if match is None:
        raise TargetError(f"'{arch}' is not a CUDA architecture (sm_80, sm_90a, ...)")
    return f"arch=compute_{match.group(1)},code=sm_{match.group(1)}"


def gpu_object(kernel: GemmKernel, arch: str) -> Path:
    """The compiled wrapper of `kernel` for a GPU of `arch` (cached)."""
    import tvm_ffi.libinfo

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise TargetError("'nvcc' is not on PATH; install the CUDA toolkit (it compiles the GPU kernels)")
    command = [nvcc, "-std=c++17", "-O3", "-DNDEBUG", "-Xcompiler=-fPIC", "-gencode", _gencode(arch),
               f"-I{_package_dir(HEADER)}", *(f"-I{d}" for d in tvm_ffi.libinfo.include_paths()),
               "-c", "SRC", "-o", "OBJ"]
    return compile_cached(source(kernel), command, ".o", f"the cuBLASLt wrapper {kernel.symbol} for {arch}")


def link_options() -> list[str]:
    """Linker options for a library holding cuBLASLt wrappers (besides cutlass.link_options'
    CUDA runtime): libcublasLt by soname, wrapped so that `--as-needed` keeps it. No rpath: the
    build machine's site-packages means nothing where the artifact runs; the loader finds it."""
    return ["-Wl,--no-as-needed", f"-L{_package_dir(RUNTIME_LIBRARY)}", f"-l:{RUNTIME_LIBRARY}", "-Wl,--as-needed"]


def runtime_libraries(kernels: list[GemmKernel]) -> list[str]:
    """What a library linking `kernels` needs at run time beyond TVM's and CUDA's runtimes, for
    the artifact's metadata (`runtime_libraries`)."""
    return [RUNTIME_LIBRARY] if any(k.variant == VARIANT for k in kernels) else []
