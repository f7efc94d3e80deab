"""Library-speed GEMMs for NVIDIA GPUs: CUTLASS kernels generated and compiled at build time.

TVM 0.27 has no schedule that reaches Hopper's wgmma, and DLight's WMMA matmuls left the
Mixer far below an H100's tensor-core peak (benchmarks/results/gpu_*_mixer_b16.md). So a CUDA
build lowers its large GEMMs (patchify, channel fc1 and fc2, and token fc1 and fc2 as batched left products; `passes/library_gemms.py`
picks them) to calls of the `mixer_gemm_*` interface (`lower/library.py`), and this module
instantiates each called symbol from CUTLASS templates with its epilogue fused: bias (float32,
per output feature), then GELU (erf or tanh, as the spec says) or the residual add, rounded
once to the storage dtype.

sm_90/sm_90a: CUTLASS 3.x, TMA + wgmma, warp-specialized persistent kernels (cooperative,
ping-pong or stream-K, as the variant says), compiled for `sm_90a` (wgmma needs the
arch-specific target); sm_100/103: the same template with tcgen05 (1- or 2-SM MMA), compiled
for the `sm_100f` family. sm_80/86/89 (and sm_110, sm_120): CUTLASS 2.x, mma.sync m16n8k16 +
cp.async multistage; right products add bias and residual through the broadcast epilogue,
which broadcasts per column, so left products (bias per row) use an epilogue visitor tree
instead (column broadcast of the bias, GELU or an auxiliary load of R). Float32 kernels use
those sm_80 templates on every family, as 3xTF32 (`template`).
The objects export tvm-ffi's C ABI (`__tvm_ffi_<name>`), are linked into the artifact's
`model.so` (`export_library(addons=...)`) and are found there by `R.call_dps_packed`, so the
artifact stays self-contained (TVM runtime, CUDA runtime and driver). One sm_90a kernel takes
about a minute and several GB of memory to compile, so objects are cached by the hash of their
source, compiler and header packages under the user cache (`$MIXER_COMPILE_CACHE/kernels`).
Each kernel's configuration (tile, cluster, schedule; `Config`, `CANDIDATES`) is its symbol's
variant, chosen per call site by backend/gemm_choice.py; each also exports CUTLASS's
`can_implement`, which the build asks on the CPU (`load_on_host`).

`host_object` compiles a plain C++ implementation of the same interface for this CPU: the
host-CPU check of a GPU build (backend/cuda.py) runs the very Relax program, external calls
included, against the float64 reference.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixer_compile.errors import TargetError
from mixer_compile.lower.library import GemmKernel
from mixer_compile.util.atomic import why_unwritable
from mixer_compile.util.temps import claim_prefix

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

// The problem of a call (lower/library.py): D [L, M, N] = epilogue(product), W shared by all L.
//   xw:  X [..., K] (M = rows), W [N, K], bias [N]      wx: X [L, K, N], W [M, K], bias [M]
//   wtx: X [L, K, N], W [K, M], bias [M]; R (the residual, where the epilogue adds one) like D
struct Problem { int64_t m, n, k, l; };

Problem CheckArgs(const tvm::ffi::TensorView& x, const tvm::ffi::TensorView& w, const tvm::ffi::TensorView& bias,
                  const tvm::ffi::TensorView* r, const tvm::ffi::TensorView& d) {
  for (const auto* t : {&x, &w, &d}) {
    Check(t->dtype().code == DLCODE && t->dtype().bits == STORAGE_BITS, "X, W and D must have the kernel's dtype");
    Check(t->device().device_type == DEVICE, "tensors must be on the kernel's device");
  }
  Check(bias.dtype().code == kDLFloat && bias.dtype().bits == 32 && bias.ndim() == 1 &&
        bias.device().device_type == DEVICE, "bias must be float32, 1-d, on the kernel's device");
  Check(w.ndim() == 2, "W must be 2-d");
  Problem p;
  if (FORM_XW) {
    p = {0, w.size(0), w.size(1), 1};
    Check(x.size(x.ndim() - 1) == p.k, "X's last axis must be W's K");
    p.m = x.numel() / p.k;
  } else {
    Check(x.ndim() == 3, "X must be [L, K, N]");
    p = {FORM_WX ? w.size(0) : w.size(1), x.size(2), x.size(1), x.size(0)};
    Check((FORM_WX ? w.size(1) : w.size(0)) == p.k, "W's K must be X's K");
  }
  Check(d.numel() == p.l * p.m * p.n, "D must be [L, M, N]");
  Check(bias.size(0) == (FORM_XW ? p.n : p.m), "bias must have one value per output feature");
  if (r) Check(r->dtype().code == DLCODE && r->dtype().bits == STORAGE_BITS && r->numel() == d.numel() &&
               r->device().device_type == DEVICE, "R must be like D");
  return p;
}
}  // namespace
"""

_TMA = r"""
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"
#include "cutlass/util/packed_stride.hpp"

using namespace cute;

namespace {
using Element = ELEMENT;
// A: xw X [M, K]; wx W [M, K]; wtx W [K, M].  B: xw W [N, K] (ColumnMajor B); left X[l] [K, N] (RowMajor B).
// W is one matrix for every l: its l stride is the compile-time 0, so its TMA descriptor has no l
// mode (a runtime 0 would give it an l mode of extent L and stride 0).
template <class S> using SharedOverL = cute::Stride<cute::tuple_element_t<0, S>, cute::tuple_element_t<1, S>, _0>;
using TagStrideA = cutlass::detail::TagToStrideA_t<LAYOUT_A>;
using TagStrideB = cutlass::detail::TagToStrideB_t<LAYOUT_B>;
using LayoutA = std::conditional_t<FORM_XW, TagStrideA, SharedOverL<TagStrideA>>;
using LayoutB = std::conditional_t<FORM_XW, SharedOverL<TagStrideB>, TagStrideB>;
using LayoutD = cutlass::layout::RowMajor;
constexpr int kAlign = 8;
using TileShape = Shape<_TILE_M, _TILE_N, _TILE_K>;
using ClusterShape = Shape<_CLUSTER_M, _CLUSTER_N, _1>;
using FusionOp = FUSION;

using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    ARCH_TAG, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, float, float, Element, LayoutD, kAlign, Element, LayoutD, kAlign,
    EPILOGUE_SCHEDULE, FusionOp>::CollectiveOp;
using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    ARCH_TAG, cutlass::arch::OpClassTensorOp, Element, LayoutA, kAlign, Element, LayoutB, kAlign, float,
    TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
    KERNEL_SCHEDULE>::CollectiveOp;
using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue,
                                                    TILE_SCHEDULER>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

typename Gemm::Arguments MakeArguments(const Problem& p, const void* x, const void* w, const void* bias,
                                       const void* source, void* d) {
  int m = int(p.m), n = int(p.n), k = int(p.k), l = int(p.l);
  const void* a = FORM_XW ? x : w;
  const void* b = FORM_XW ? w : x;
  auto sa = cutlass::make_cute_packed_stride(typename Kernel::StrideA{}, cute::make_shape(m, k, l));
  auto sb = cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, cute::make_shape(n, k, l));
  auto sd = cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, cute::make_shape(m, n, l));
  // without a residual, C is D: never read (beta 0), but its TMA descriptor is still made, and
  // cuTensorMapEncodeTiled refuses a null address (printing CUTLASS's error dump on every call)
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {m, n, k, l},
      {static_cast<const Element*>(a), sa, static_cast<const Element*>(b), sb},
      {{}, static_cast<const Element*>(source ? source : d), sd, static_cast<Element*>(d), sd}};
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = source ? 1.0f : 0.0f;
  args.epilogue.thread.bias_ptr = static_cast<const float*>(bias);
  return args;
}
"""

# sm_80 family: one kernel part per product (its includes, the `Gemm` type and `MakeArguments`),
# inside an anonymous namespace that _IMPLEMENTABLE closes.
_SM80_XW = r"""
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/epilogue/thread/linear_combination_bias_elementwise.h"
#include "cutlass/gemm/device/gemm_universal_with_broadcast.h"
#include "cutlass/functional.h"

namespace {
using Element = ELEMENT;
// Z = Activation(X @ W^T + beta * C + bias): C is the residual (beta 1) or absent (beta 0)
using EpilogueOp = cutlass::epilogue::thread::LinearCombinationBiasElementwise<
    Element, float, float, Element, Element, ALIGN, ACTIVATION<float>, cutlass::plus<float>, false, float>;
using Gemm = cutlass::gemm::device::GemmUniversalWithBroadcast<
    Element, cutlass::layout::RowMajor, Element, cutlass::layout::ColumnMajor, Element, cutlass::layout::RowMajor,
    float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, cutlass::gemm::GemmShape<_TILE_M, _TILE_N, _TILE_K>,
    cutlass::gemm::GemmShape<_WARP_M, _WARP_N, _TILE_K>, INSTRUCTION, EpilogueOp,
    cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<8>, _STAGES, ALIGN, ALIGN, MATH_OP>;

typename Gemm::Arguments MakeArguments(const Problem& p, const void* x, const void* w, const void* bias,
                                       const void* source, void* d) {
  return typename Gemm::Arguments(
      cutlass::gemm::GemmUniversalMode::kGemm, {int(p.m), int(p.n), int(p.k)}, 1,
      {1.0f, source ? 1.0f : 0.0f}, x, w, const_cast<void*>(source), d,
      const_cast<void*>(bias), nullptr, 0, 0, 0, 0, 0, 0, p.k, p.k, source ? p.n : 0, p.n, 0, 0);
}
"""

# The left products: the broadcast epilogue above adds its vector per column, a left product's
# bias runs per row, so their epilogue is a visitor tree (EVT), evaluated in float32 on the
# accumulators and stored once. Batched: grid z walks L, W's batch stride is 0 (one W for all).
# K (196 tokens) is never a contiguous axis (wtx stores W M-major): its residue is a predicated
# first k-tile of the multistage mainloop, and can_implement checks only the contiguous axes.
_SM80_LEFT = r"""
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/functional.h"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/default_gemm_universal_with_visitor.h"
#include "cutlass/epilogue/threadblock/fusion/visitors.hpp"  // after the gemm headers: it names gemm::GemmCoord

namespace {
using namespace cute;
using namespace cutlass::epilogue::threadblock;
using Element = ELEMENT;
using TileShape = cutlass::gemm::GemmShape<_TILE_M, _TILE_N, _TILE_K>;
using WarpShape = cutlass::gemm::GemmShape<_WARP_M, _WARP_N, _TILE_K>;
using ThreadMap = OutputTileThreadLayout<TileShape, WarpShape, Element, ALIGN, 1>;
constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
using StrideLMN = Stride<int64_t, _1, int64_t>;  // R and D [L, M, N]: (row N, column 1, batch M * N)
// acc + bias[row]: one float32 per output feature, the same for every column and every l
using WithBias = Sm80EVT<VisitorCompute<cutlass::plus, float, float, kRound>, VisitorAccFetch,
                         VisitorColBroadcast<ThreadMap, float, Stride<_1, _0, _0>>>;
using Output = OUTPUT;  // then GELU or + R, converted once to Element
using Store = Sm80EVT<VisitorAuxStore<ThreadMap, Element, kRound, StrideLMN>, Output>;
using Kernel = typename cutlass::gemm::kernel::DefaultGemmWithVisitor<
    Element, LAYOUT_A, cutlass::ComplexTransform::kNone, ALIGN, Element, cutlass::layout::RowMajor,
    cutlass::ComplexTransform::kNone, ALIGN, Element, cutlass::layout::RowMajor, ALIGN, float, float,
    cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, TileShape, WarpShape, INSTRUCTION,
    Store, cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<8>, _STAGES, MATH_OP, 1>::GemmKernel;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

// A = W ([M, K] for wx, stored [K, M] for wtx), B = X[l] [K, N]
typename Gemm::Arguments MakeArguments(const Problem& p, const void* x, const void* w, const void* bias,
                                       const void* source, void* d) {
  StrideLMN rows{p.n, _1{}, p.m * p.n};
  typename Store::Arguments epilogue{
      {{{}, {static_cast<const float*>(bias), 0.0f, {}}, {}}, OUTPUT_ARGS}, {static_cast<Element*>(d), rows}};
  return typename Gemm::Arguments(
      cutlass::gemm::GemmUniversalMode::kBatched, {int(p.m), int(p.n), int(p.k)}, int(p.l), epilogue, w, x,
      nullptr, nullptr, 0, p.k * p.n, 0, 0, FORM_WX ? p.k : p.m, p.n, 0, 0);
}
"""

# Every family's kernel continues with its launch, after its `Gemm` type and `MakeArguments` (the CUTLASS 2.x and 3.x
# device adapters share this interface): the argument checks, CUTLASS's own, then the run on
# TVM's stream, its workspace (if any) stream-ordered.
_RUN = r"""
void Run(tvm::ffi::TensorView x, tvm::ffi::TensorView w, tvm::ffi::TensorView bias, RESIDUAL_PARAM
         tvm::ffi::TensorView d) {
  Problem p = CheckArgs(x, w, bias, RESIDUAL_REF, d);
  auto args = MakeArguments(p, x.data_ptr(), w.data_ptr(), bias.data_ptr(), RESIDUAL_PTR, d.data_ptr());
  Gemm gemm;
  Check(gemm.can_implement(args) == cutlass::Status::kSuccess,
        "CUTLASS cannot run this shape (the contiguous axes must be multiples of 8)");
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, x.device().device_id));
  struct Workspace {  // freed, stream-ordered, however Run ends
    void* at = nullptr;
    cudaStream_t stream;
    ~Workspace() { if (at) cudaFreeAsync(at, stream); }
  } workspace{nullptr, stream};
  if (size_t size = Gemm::get_workspace_size(args)) {
    cudaError_t error = cudaMallocAsync(&workspace.at, size, stream);
    if (error != cudaSuccess) TVM_FFI_THROW(RuntimeError) << "SYMBOL: cannot allocate its workspace: " << cudaGetErrorString(error);
  }
  Check(gemm.initialize(args, workspace.at, stream) == cutlass::Status::kSuccess, "initialize");
  Check(gemm.run(stream) == cutlass::Status::kSuccess, "run");
}
"""


# ... and end with this: whether the kernel can run a problem (CUTLASS's own checks:
# alignment of the contiguous axes, shapes), asked on the CPU at build time by
# backend/gemm_choice.py `check_implementable`, and the exports.
_IMPLEMENTABLE = r"""
bool Implementable(int64_t m, int64_t n, int64_t k, int64_t l) {
  auto args = MakeArguments(Problem{m, n, k, l}, nullptr, nullptr, nullptr, nullptr, nullptr);
  return Gemm::can_implement(args) == cutlass::Status::kSuccess;
}
}  // namespace

TVM_FFI_DLL_EXPORT_TYPED_FUNC(SYMBOL, Run);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(SYMBOL_implementable, Implementable);
"""


@dataclass(frozen=True)
class Config:
    """A CUTLASS kernel configuration, spelt in the variant of a symbol (lower/library.py).

    sm_90a: `t<M>x<N>x<K>_c<m>x<n>_<coop|pp|sk>`: CTA tile, thread-block cluster, and the
    warp-specialized schedule (cooperative: two consumer warp groups share a 128-row tile;
    ping-pong: each owns a tile, so 64-row tiles suit small M; stream-K: cooperative, with the
    K loop of the output tiles divided among the SMs, for problems of fewer tiles than SMs).
    sm_100: `t<M>x<N>x<K>_c<m>x<n>_<auto|sk>`: MMA tile (M 256: a pair of SMs, cluster 2x1) and
    cluster, CUTLASS's builder choosing the 1- or 2-SM tcgen05 schedule; stream-K as on sm_90a.
    sm_80: `t<M>x<N>x<K>_w<M>x<N>_s<S>`: CTA tile, warp tile and pipeline stages.
    """

    tile: tuple[int, int, int]
    cluster: tuple[int, int] = (1, 1)
    schedule: str = "coop"  # sm_90a: coop | pp | sk; sm_100: auto | sk
    warp: tuple[int, int] = (0, 0)  # sm_80
    stages: int = 0  # sm_80

    @property
    def variant(self) -> str:
        t = "x".join(map(str, self.tile))
        if self.stages:
            return f"t{t}_w{self.warp[0]}x{self.warp[1]}_s{self.stages}"
        return f"t{t}_c{self.cluster[0]}x{self.cluster[1]}_{self.schedule}"

    @staticmethod
    def parse(variant: str) -> "Config":
        parts = variant.split("_")

        def dims(part: str) -> tuple[int, ...]:
            return tuple(int(v) for v in part[1:].split("x"))

        try:
            tile = dims(parts[0])
            if parts[1].startswith("w"):
                return Config(tile, warp=dims(parts[1]), stages=int(parts[2][1:]))  # type: ignore[arg-type]
            return Config(tile, dims(parts[1]), parts[2])  # type: ignore[arg-type]
        except (IndexError, ValueError):
            raise TargetError(f"'{variant}' is not a CUTLASS configuration (t128x256x64_c2x1_coop, "
                              "t128x128x32_w64x64_s4)") from None


# The design space of each family, largest tile first: what backend/gemm_choice.py picks a
# default from and what tune/gemms.py measures.
CANDIDATES = {
    "sm_90a": (Config((128, 256, 64), (2, 1), "coop"), Config((128, 256, 64), (1, 1), "coop"),
               Config((128, 128, 64), (1, 1), "coop"), Config((64, 256, 64), (1, 1), "pp"),
               Config((64, 128, 64), (1, 1), "pp"), Config((128, 128, 64), (1, 1), "sk")),
    "sm_80": (Config((128, 128, 32), warp=(64, 64), stages=4), Config((64, 128, 32), warp=(32, 64), stages=4),
              Config((64, 64, 32), warp=(32, 32), stages=6)),
    "sm_100": (Config((256, 128, 64), (2, 1), "auto"), Config((128, 256, 64), (1, 1), "auto"),
               Config((128, 128, 64), (1, 1), "auto"), Config((128, 64, 64), (1, 1), "auto"),
               Config((128, 128, 64), (1, 1), "sk")),
    # float32 on every family: the sm_80 templates with 3xTF32 (CUTLASS's generator's tiles)
    "tf32x3": (Config((128, 128, 16), warp=(32, 64), stages=4), Config((128, 64, 16), warp=(64, 32), stages=4),
               Config((64, 64, 16), warp=(32, 32), stages=3)),
}


TMA_FAMILIES = ("sm_90a", "sm_100")  # the families with CUTLASS 3.x kernels (the `_TMA` template)


def template(family: str, dtype: str) -> str:
    """The templates a kernel of `dtype` instantiates on a GPU `family`: wgmma has no float32
    input with float32 accuracy (its tf32 keeps 10 mantissa bits), so float32 GEMMs run as
    3xTF32 on mma.sync (`OpMultiplyAddFastF32`: a = big + small, three tf32 products, float32
    accuracy at tensor-core speed) on Hopper and Blackwell as on Ampere. Families without
    CUTLASS 3.x kernels here take the sm_80 templates (`gpu_arch_flag`)."""
    if dtype == "float32":
        return "tf32x3"
    return family if family in TMA_FAMILIES else "sm_80"


def configs(family: str, dtype: str) -> tuple[Config, ...]:
    """The design space of a `dtype` kernel on `family`, largest tile first."""
    return CANDIDATES[template(family, dtype)]


# per storage dtype: the element type, its 16-byte access in elements, and the sm_80 templates'
# mma.sync instruction and math operator (3xTF32 for float32: m16n8k8 tf32, float32 accuracy)
_ELEMENTS = {
    "float16": ("cutlass::half_t", 8, "cutlass::gemm::GemmShape<16, 8, 16>", "cutlass::arch::OpMultiplyAdd"),
    "bfloat16": ("cutlass::bfloat16_t", 8, "cutlass::gemm::GemmShape<16, 8, 16>", "cutlass::arch::OpMultiplyAdd"),
    "float32": ("float", 4, "cutlass::gemm::GemmShape<16, 8, 8>", "cutlass::arch::OpMultiplyAddFastF32"),
}
_LAYOUTS = {"xw": ("RowMajor", "ColumnMajor"), "wx": ("RowMajor", "RowMajor"), "wtx": ("ColumnMajor", "RowMajor")}
# the elementwise op after acc + bias (a residual is added by the epilogue's binary op instead)
_ACTIVATIONS = {"gelu_erf": "cutlass::epilogue::thread::GELU", "gelu_tanh": "cutlass::epilogue::thread::GELU_taylor",
                "bias": "cutlass::epilogue::thread::Identity", "residual": "cutlass::epilogue::thread::Identity"}


def _sm90_fusion(kernel: GemmKernel, element: str) -> str:
    ops = "cutlass::epilogue::fusion"
    per = "Row" if kernel.left else "Col"  # the bias runs along the output features: D's rows in a left product
    if kernel.epilogue.startswith("gelu"):
        act = _ACTIVATIONS[kernel.epilogue]
        return f"{ops}::LinCombPer{per}BiasEltAct<{act}, {element}, float, float, {element}, float>"
    return f"{ops}::LinCombPer{per}Bias<{element}, float, float, {element}, float>"


def _schedules(config: Config, kind: str) -> tuple[str, str, str]:
    """The mainloop, epilogue and tile scheduler of a CUTLASS 3.x configuration (`kind` sm_90a
    or sm_100: there the builder picks tcgen05's 1- or 2-SM schedule from tile and cluster)."""
    scheduler = "cutlass::gemm::StreamKScheduler" if config.schedule == "sk" else "cutlass::gemm::PersistentScheduler"
    if kind == "sm_100":
        return "cutlass::gemm::collective::KernelScheduleAuto", "cutlass::epilogue::collective::EpilogueScheduleAuto", \
            scheduler
    if config.schedule == "pp":
        return ("cutlass::gemm::KernelTmaWarpSpecializedPingpong", "cutlass::epilogue::TmaWarpSpecialized",
                "cutlass::gemm::PersistentScheduler")
    return ("cutlass::gemm::KernelTmaWarpSpecializedCooperative", "cutlass::epilogue::TmaWarpSpecializedCooperative",
            scheduler)


def _with_form(text: str, kernel: GemmKernel, device: str) -> str:
    """The argument checks of `kernel`'s form on `device` (kDLCUDA, or kDLCPU for the host)."""
    text = text.replace("SYMBOL", kernel.symbol).replace("DEVICE", device)
    text = text.replace("FORM_XW", str(kernel.form == "xw").lower()).replace("FORM_WX", str(kernel.form == "wx").lower())
    text = text.replace("DLCODE", "kDLBfloat" if kernel.dtype == "bfloat16" else "kDLFloat")
    text = text.replace("STORAGE_BITS", "32" if kernel.dtype == "float32" else "16")
    text = text.replace("RESIDUAL_PARAM", "tvm::ffi::TensorView r," if kernel.residual else "")
    text = text.replace("RESIDUAL_REF", "&r" if kernel.residual else "nullptr")
    return text.replace("RESIDUAL_PTR", "r.data_ptr()" if kernel.residual else "nullptr")


def argument_checks(kernel: GemmKernel, device: str = "kDLCUDA") -> str:
    """`Check`, `Problem` and `CheckArgs(x, w, bias, r, d)` for `kernel` on `device` (kDLCUDA, or
    kDLCPU for the host): every implementation of the contract checks its arguments alike
    (backend/cublaslt.py too)."""
    return _with_form(_CHECKS, kernel, device)


def _sm80_output(kernel: GemmKernel) -> tuple[str, str]:
    """The visitor-tree node over acc + bias in an sm_80 left product, and its arguments: + R
    (an auxiliary load of R [L, M, N]) or the activation, either converting to the storage dtype,
    so the result is rounded once."""
    if kernel.residual:
        return ("Sm80EVT<VisitorCompute<cutlass::plus, Element, float, kRound>, WithBias, "
                "VisitorAuxLoad<ThreadMap, Element, StrideLMN>>",
                "{const_cast<Element*>(static_cast<const Element*>(source)), Element(0), rows}, {}")
    return f"Sm80EVT<VisitorCompute<{_ACTIVATIONS[kernel.epilogue]}, Element, float, kRound>, WithBias>", "{}"


def gpu_source(kernel: GemmKernel, family: str) -> str:
    """The CUDA source of one kernel, any form, for a GPU `family` (`gpu_arch_flag`), from the
    templates `template` names, configured by its variant (without one: the largest tile of
    its design space)."""
    kind = template(family, kernel.dtype)
    config = Config.parse(kernel.variant) if kernel.variant else CANDIDATES[kind][0]
    element, align, instruction, math_op = _ELEMENTS[kernel.dtype]
    layout_a, layout_b = _LAYOUTS[kernel.form]
    if kind in TMA_FAMILIES:
        text = _COMMON + _CHECKS + _TMA.replace("ARCH_TAG", "cutlass::arch::Sm90" if kind == "sm_90a"
                                                 else "cutlass::arch::Sm100")
        mainloop, epilogue, scheduler = _schedules(config, kind)
        text = (text.replace("_CLUSTER_M", f"_{config.cluster[0]}").replace("_CLUSTER_N", f"_{config.cluster[1]}")
                .replace("KERNEL_SCHEDULE", mainloop).replace("EPILOGUE_SCHEDULE", epilogue)
                .replace("TILE_SCHEDULER", scheduler)
                .replace("LAYOUT_B", f"cutlass::layout::{layout_b}").replace("FUSION", _sm90_fusion(kernel, element)))
    elif kernel.left:
        output, output_args = _sm80_output(kernel)
        text = _COMMON + _CHECKS + _SM80_LEFT.replace("OUTPUT_ARGS", output_args).replace("OUTPUT", output)
    else:
        text = _COMMON + _CHECKS + _SM80_XW.replace("ACTIVATION", _ACTIVATIONS[kernel.epilogue])
    for name, value in zip(("_TILE_M", "_TILE_N", "_TILE_K"), config.tile):
        text = text.replace(name, f"_{value}" if kind in TMA_FAMILIES else str(value))
    text = (text.replace("_WARP_M", str(config.warp[0])).replace("_WARP_N", str(config.warp[1]))
            .replace("_STAGES", str(config.stages)).replace("LAYOUT_A", f"cutlass::layout::{layout_a}")
            .replace("ALIGN", str(align)).replace("INSTRUCTION", instruction).replace("MATH_OP", math_op))
    return _with_form((text + _RUN + _IMPLEMENTABLE).replace("ELEMENT", element), kernel, "kDLCUDA")


def has_family(arch: str) -> bool:
    """Whether a GPU of `arch` gets CUTLASS GEMMs (sm_80 and newer: Ampere, Ada, Hopper, Blackwell)."""
    try:
        gpu_arch_flag(arch)
    except TargetError:
        return False
    return True


def gpu_arch_flag(arch: str) -> tuple[str, str]:
    """The kernel family and nvcc -gencode for a target's arch. Hopper gets the sm_90a kernels
    (wgmma exists on sm_90a only); datacenter Blackwell (sm_100, sm_103) the sm_100 ones
    (tcgen05), compiled family-specific (`sm_100f`: one object for B200 and B300); Ampere, Ada,
    Thor (sm_110) and workstation Blackwell (sm_120) the sm_80 templates, compiled for their own
    arch (mma.sync runs on all of them). A family names where GEMM records apply (one GPU
    generation), `template` what it instantiates."""
    major_minor = int(arch.removeprefix("sm_").rstrip("af"))
    if 100 <= major_minor < 110:
        return "sm_100", "arch=compute_100f,code=sm_100f"
    if major_minor >= 110:
        return f"sm_{major_minor // 10 * 10}", f"arch=compute_{major_minor},code=sm_{major_minor}"
    if major_minor >= 90:
        return "sm_90a", "arch=compute_90a,code=sm_90a"
    if major_minor >= 80:
        return "sm_80", f"arch=compute_80,code=sm_{major_minor}"
    raise TargetError(f"GPU {arch} has no tensor-core GEMM family here (sm_80 or newer)")


# ---------------------------------------------------------------------------- CPU stand-in

_HOST = r"""
// CPU implementation of the mixer_gemm_* interface (backend/cutlass.py): the host-CPU check
// of a GPU build runs the same Relax program with these in place of the GPU kernels.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/function.h>

namespace {
enum Storage { kF16, kBF16, kF32 };
float Load(const void* p, int64_t i, Storage s) {
  if (s == kF32) return static_cast<const float*>(p)[i];
  uint16_t h = static_cast<const uint16_t*>(p)[i];
  if (s == kBF16) { uint32_t u = uint32_t(h) << 16; float f; std::memcpy(&f, &u, 4); return f; }
  _Float16 v; std::memcpy(&v, &h, 2); return float(v);
}
void Store(void* p, int64_t i, float x, Storage s) {
  if (s == kF32) { static_cast<float*>(p)[i] = x; return; }
  uint16_t* q = static_cast<uint16_t*>(p);
  if (s == kBF16) {  // round to nearest even
    uint32_t u; std::memcpy(&u, &x, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    q[i] = uint16_t(u >> 16);
    return;
  }
  _Float16 v = _Float16(x); std::memcpy(&q[i], &v, 2);
}
// D[l, i, j] = act(sum_p A(i, p) B(l, p, j) + bias) (+ R): A and B as lower/library.py's forms say
void Gemm(int64_t m, int64_t n, int64_t k, int64_t l, const char* form, const tvm::ffi::TensorView& x,
          const tvm::ffi::TensorView& w, const tvm::ffi::TensorView& bias, const void* r,
          const tvm::ffi::TensorView& d, int act) {
  Storage storage = x.dtype().bits == 32 ? kF32 : x.dtype().code == kDLBfloat ? kBF16 : kF16;
  bool xw = form[0] == 'x', wtx = form[1] == 't';
  const void* X = x.data_ptr();
  const void* W = w.data_ptr();
  auto bias_ = static_cast<const float*>(bias.data_ptr());
  void* D = d.data_ptr();
  std::vector<float> a(static_cast<size_t>(m * k)), b(static_cast<size_t>(k * n)), acc(static_cast<size_t>(n));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t p = 0; p < k; ++p)
      a[size_t(i * k + p)] = Load(xw ? X : W, xw ? i * k + p : wtx ? p * m + i : i * k + p, storage);
  for (int64_t batch = 0; batch < l; ++batch) {
    for (int64_t p = 0; p < k; ++p)
      for (int64_t j = 0; j < n; ++j)
        b[size_t(p * n + j)] = xw ? Load(W, j * k + p, storage) : Load(X, (batch * k + p) * n + j, storage);
    for (int64_t i = 0; i < m; ++i) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t p = 0; p < k; ++p) {
        const float ap = a[size_t(i * k + p)];
        const float* bp = &b[size_t(p * n)];
        for (int64_t j = 0; j < n; ++j) acc[size_t(j)] += ap * bp[j];
      }
      for (int64_t j = 0; j < n; ++j) {
        const int64_t at = (batch * m + i) * n + j;
        float y = acc[size_t(j)] + bias_[xw ? j : i];
        if (act == 1) y = 0.5f * y * (1.f + std::erf(y * 0.70710678f));
        if (act == 2) y = 0.5f * y * (1.f + std::tanh(0.7978845608f * (y + 0.044715f * y * y * y)));
        if (r) y += Load(r, at, storage);
        Store(D, at, y, storage);
      }
    }
  }
}
}  // namespace
"""

_HOST_ENTRY = r"""
namespace host_SYMBOL {
void Run(tvm::ffi::TensorView x, tvm::ffi::TensorView w, tvm::ffi::TensorView bias, RESIDUAL_PARAM
         tvm::ffi::TensorView d) {
  Problem p = CheckArgs(x, w, bias, RESIDUAL_REF, d);
  Gemm(p.m, p.n, p.k, p.l, "FORM", x, w, bias, RESIDUAL_PTR, d, ACT);
}
}  // namespace host_SYMBOL
TVM_FFI_DLL_EXPORT_TYPED_FUNC(SYMBOL, host_SYMBOL::Run);
"""


def _host_entry(kernel: GemmKernel) -> str:
    act = {"gelu_erf": 1, "gelu_tanh": 2}.get(kernel.epilogue, 0)
    checks = _CHECKS.replace("namespace {", "namespace host_SYMBOL {", 1)
    return _with_form(checks + _HOST_ENTRY.replace("FORM", kernel.form).replace("ACT", str(act)), kernel, "kDLCPU")


def host_source(kernels: list[GemmKernel]) -> str:
    """The C++ stand-in of `kernels` for this CPU: every symbol, variants included, computes the
    same contract (the variant only says how a GPU would)."""
    return _HOST + "".join(_host_entry(k) for k in sorted(set(kernels), key=lambda k: k.symbol))


# ---------------------------------------------------------------------------- compiling

def _include_dirs() -> list[str]:
    import tvm_ffi.libinfo

    return list(tvm_ffi.libinfo.include_paths())


def cutlass_includes() -> list[str]:
    """CUTLASS's headers and its utility headers (packed strides) from the nvidia-cutlass wheel."""
    try:
        import cutlass_library
    except ImportError:
        raise TargetError("CUDA builds need CUTLASS's headers: pip install nvidia-cutlass==4.2.0.0") from None
    source = Path(cutlass_library.__file__).parent / "source"
    paths = [source / "include", source / "tools" / "util" / "include"]
    if not (paths[0] / "cutlass" / "cutlass.h").is_file() or not (paths[1] / "cutlass" / "util").is_dir():
        raise TargetError(f"the nvidia-cutlass package has no headers under {source}; reinstall nvidia-cutlass==4.2.0.0")
    return [str(p) for p in paths]


def _cache_dir() -> Path:
    from mixer_compile.tune.database import cache_root

    return cache_root() / "kernels"


@functools.lru_cache(maxsize=None)
def _portable(arg: str) -> str:
    """A compiler argument as the cache key sees it: an include directory inside an installed
    package is named relative to its site directory, with the versions of the distributions
    that install that package, so a cache filled on one machine serves another with the same
    packages (the device script carries one) and an upgrade of the headers misses it."""
    from importlib.metadata import packages_distributions, version

    if not arg.startswith("-I"):
        return arg
    path = Path(arg[2:]).resolve()
    for root in sorted((Path(p).resolve() for p in sys.path if p), key=lambda r: -len(r.parts)):
        if root in path.parents:
            relative = path.relative_to(root)
            dists = sorted(set(packages_distributions().get(relative.parts[0], [])))
            return f"-I{relative} ({', '.join(f'{d} {version(d)}' for d in dists)})"
    return arg


@functools.lru_cache(maxsize=None)
def _tool_version(compiler: str) -> str:
    """The compiler's version as the cache key sees it: nvcc's release (`13.0`), not its build
    (`V13.0.88`), so that another machine's nvcc of the same release (a GPU machine's image, say)
    finds the objects compiled here; any other compiler's whole `--version`."""
    text = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    release = re.search(r"Cuda compilation tools, release (\d+\.\d+)", text)
    return f"nvcc release {release.group(1)}" if release else text


def compile_cached(source: str, command: list[str], suffix: str, what: str) -> Path:
    """`command` (with SRC and OBJ placeholders) run once per distinct source, compiler version
    and header packages; the object is cached, written atomically, so concurrent builds share it."""
    key_parts = [source, _tool_version(command[0]), Path(command[0]).name, *map(_portable, command[1:])]
    key = hashlib.sha256("\0".join(key_parts).encode()).hexdigest()[:24]
    obj = _cache_dir() / f"{key}{suffix}"
    if obj.is_file():
        return obj
    problem = why_unwritable(obj.parent)
    if problem:
        raise TargetError(f"cannot write the kernel cache '{obj.parent}': {problem}; set MIXER_COMPILE_CACHE "
                          "to a writable directory")
    obj.parent.mkdir(parents=True, exist_ok=True)
    print(f"      compiling {what} (cached in {obj.parent} afterwards)", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix=claim_prefix(obj.parent, "mixer-kernel-"), dir=obj.parent) as tmp:
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
               "-gencode", gencode, *(f"-I{d}" for d in cutlass_includes() + _include_dirs()),
               "-c", "SRC", "-o", "OBJ"]
    return compile_cached(gpu_source(kernel, family), command, ".o",
                    f"the CUTLASS kernel {kernel.symbol} for {family} (up to a minute)")


NVCC_MEMORY = 4 << 30  # peak memory of one sm_90a CUTLASS kernel's nvcc


def compile_jobs() -> int:
    """How many kernels to compile at once: one per core, as memory allows (nvcc is
    single-threaded and takes GBs per CUTLASS 3.x kernel)."""
    from mixer_compile.machine import physical_cores

    try:
        meminfo = Path("/proc/meminfo").read_text()
        available = int(meminfo.split("MemAvailable:")[1].split()[0]) * 1024
    except (OSError, IndexError, ValueError):
        available = 2 * NVCC_MEMORY
    return max(1, min(physical_cores(), available // NVCC_MEMORY))


def host_compiler() -> str:
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        raise TargetError("no C++ compiler (g++) on PATH; install one (it compiles and links the GEMM kernels)")
    return cxx


def host_object(kernels: list[GemmKernel]) -> Path:
    """This CPU's implementation of `kernels` (cached)."""
    command = [host_compiler(), "-std=c++17", "-O2", "-fPIC", *(f"-I{d}" for d in _include_dirs()), "-c", "SRC", "-o", "OBJ"]
    return compile_cached(host_source(kernels), command, ".o", "the host implementation of the GEMM kernels")


def cuda_runtime_dir() -> Path:
    """The CUDA toolkit's library directory (the CUDA runtime the kernel objects call)."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
             str(Path(shutil.which("nvcc") or "/").resolve().parent.parent)]
    dirs = [d / sub for d in map(Path, filter(None, homes)) for sub in ("lib64", "lib")
            if (d / sub / "libcudart.so").exists()]
    if not dirs:
        raise TargetError("the CUDA runtime library (libcudart.so) was not found; set CUDA_HOME to the CUDA toolkit")
    return dirs[0]


def link_options() -> list[str]:
    """Linker options for a library holding GPU kernel objects: the CUDA runtime they call
    (wrapped so that `--as-needed`, which export_library's options precede, keeps it)."""
    return ["-Wl,--no-as-needed", f"-L{cuda_runtime_dir()}", "-lcudart", "-Wl,--as-needed"]


def load_on_host(objects: list[Path], options: list[str], directory: Path) -> Any:
    """GPU kernel objects linked into one library in `directory` and loaded into this process,
    GPU or not: their host-side functions (CUTLASS's `can_implement`) run on the CPU, and the
    CUDA runtime is only loaded, never initialised, until a kernel is launched."""
    import ctypes

    import tvm

    out = directory / "kernels_on_host.so"
    proc = subprocess.run([host_compiler(), "-shared", "-o", str(out), *map(str, dict.fromkeys(objects)), *options],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise TargetError(f"linking the GEMM kernels failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    runtime = sorted(cuda_runtime_dir().glob("libcudart.so.*"))
    for lib in runtime[-1:]:  # the versioned soname model.so records; not on the loader's path everywhere
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    return tvm.runtime.load_module(str(out))
