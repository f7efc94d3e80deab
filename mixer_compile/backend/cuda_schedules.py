"""The CUDA build pipeline: TVM's default one in two halves around the tuning records, with
bf16 matmuls on tensor cores too.

`prepare` legalizes and fuses: its PrimFuncs are the tuning tasks (tune/tasks.py) and the
kernels `apply_records` gives their records to; `cuda_pipeline` then schedules every kernel
left with DLight's rules and lowers. Kernels with a record are built with `BUILD_CONFIG`, the
PassContext they were measured under (tune/search.py).

DLight's default Matmul rule (TVM 0.27) tensorizes fp16 matmuls with WMMA 16x16x16 and
leaves bf16 ones on CUDA cores (FFMA), an order of magnitude below the tensor cores, because
its intrinsic table holds fp16 and int8 only. The WMMA intrinsic generators themselves are dtype-generic
and CUDA's `nvcuda::wmma` takes `__nv_bfloat16` fragments on sm_80 and later, so we register
the bf16 loads and the bf16 x bf16 -> fp32 multiply-accumulate under their own names and run
the stock rule on bf16 matmuls with those names swapped in (`BF16Matmul`): same tiling, same
thresholds (every dimension above 64), same fallback to the CUDA-core schedule. The SASS of a
bf16 build then shows `HMMA.16816.F32.BF16` (tests/test_cuda_build.py checks it).

The WMMA generators come from TVM's tensor intrinsics, imported through `intrinsics.py`
(their plain import takes tens of seconds).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import tvm
from tvm import relax
from tvm.relax.backend.cuda import pipeline as cuda
from tvm.s_tir import TensorIntrin, dlight as dl
from tvm.s_tir.dlight.analysis import get_root_block
from tvm.s_tir.dlight.base.transform import _apply_rules, _is_scheduled
from tvm.s_tir.dlight.gpu import matmul as dlight_matmul

from mixer_compile.backend.cpu import Applied, is_kernel
from mixer_compile.backend.intrinsics import memoized_getmodule, tensor_intrinsics
from mixer_compile.backend.target import TargetInfo

# StorageRewrite lets an fp32 accumulator's staging buffer share an fp16 operand's shared
# memory, and the WMMA store's tvm_access_ptr then fails its element-type check: without this
# nearly every fp32-accumulate tensor-core candidate of MetaSchedule fails to build (DESIGN.md 6)
BUILD_CONFIG = {"tirx.disable_storage_rewrite": True}

intrinsics = tensor_intrinsics().cuda

_BF16 = {"_f16_a": "_bf16_a", "_f16_b": "_bf16_b", "f16f16": "bf16bf16"}
_STOCK_GROUP = intrinsics.get_wmma_intrin_group
_STOCK_DTYPES = dlight_matmul.get_in_out_dtypes


def _register_bf16_wmma() -> None:
    """The bf16 counterparts of the fp16 WMMA intrinsics that MatmulTensorization uses."""
    for scope in ("shared", "shared.dyn"):
        suffix = scope.replace(".", "_")
        TensorIntrin.register(f"wmma_load_16x16x16_bf16_a_{suffix}",
                              *intrinsics.get_wmma_load_intrin(16, 16, 16, "bfloat16", scope, False, False),
                              override=True)
        TensorIntrin.register(f"wmma_load_16x16x16_bf16_b_trans_{suffix}",
                              *intrinsics.get_wmma_load_intrin(16, 16, 16, "bfloat16", scope, True, True),
                              override=True)
    TensorIntrin.register("wmma_sync_16x16x16_bf16bf16f32_trans",
                          *intrinsics.get_wmma_sync_intrin(16, 16, 16, "bfloat16", "float32", True), override=True)


with memoized_getmodule():
    _register_bf16_wmma()


def _bf16_group(load_scope: str, store_scope: str, in_dtype: str, out_dtype: str, trans_b: bool) -> dict[str, str]:
    group = _STOCK_GROUP(load_scope, store_scope, "float16", out_dtype, trans_b)
    for f16, bf16 in _BF16.items():
        group = {k: v.replace(f16, bf16) for k, v in group.items()}
    return group


def _as_fp16_for_dispatch(block: Any) -> tuple[str, str]:
    in_dtype, out_dtype = _STOCK_DTYPES(block)
    return ("float16" if in_dtype == "bfloat16" else in_dtype), out_dtype



@contextlib.contextmanager
def _bf16_as_fp16() -> Iterator[None]:
    """Inside: DLight's Matmul dispatch sees bf16 inputs as fp16, and its tensorization picks
    the bf16 intrinsics. Rules run on one thread: the build's child process (cuda.py) or the tuner's."""
    intrinsics.get_wmma_intrin_group, dlight_matmul.get_in_out_dtypes = _bf16_group, _as_fp16_for_dispatch
    try:
        yield
    finally:
        intrinsics.get_wmma_intrin_group, dlight_matmul.get_in_out_dtypes = _STOCK_GROUP, _STOCK_DTYPES


class BF16Matmul(dl.gpu.Matmul):
    """DLight's Matmul rule for matmuls that read bf16; None for anything else."""

    def apply(self, func: Any, target: Any, tunable: bool) -> Any:
        if not isinstance(func, tvm.tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = tvm.s_tir.Schedule(func)
        blocks = dlight_matmul.get_reduction_blocks(sch, sch.get_child_blocks(get_root_block(sch)))
        if not blocks or _STOCK_DTYPES(sch.get(blocks[0]))[0] != "bfloat16":
            return None
        with _bf16_as_fp16():
            return super().apply(func, target, tunable)


def _default_rules() -> list[Any]:
    return [BF16Matmul(), dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
            dl.gpu.Fallback()]


def prepare(mod: tvm.IRModule, target: TargetInfo) -> tvm.IRModule:
    """Legalized and fused, nothing scheduled: TVM's CUDA dispatch and legalize passes without
    their last step, DLight (`cuda_pipeline` runs it after the records)."""
    tvm_target = target.tvm_target()
    with tvm_target:
        passes = cuda.library_dispatch_passes(tvm_target) + cuda.legalize_passes(tvm_target)[:-1]
        return tvm.transform.Sequential(passes)(mod)


def apply_records(fused: tvm.IRModule, target: TargetInfo, database: Any) -> tuple[tvm.IRModule, Applied]:
    """`fused` (prepare's output) with each kernel's record from `database` (None: none)
    applied and marked scheduled, so DLight leaves it alone; the other kernels are the
    defaults DLight schedules in the build."""
    kernels = [gv.name_hint for gv, func in fused.functions.items() if is_kernel(func)]
    mod = fused
    if database is not None:
        with target.tvm_target(), database:
            mod = relax.transform.MetaScheduleApplyDatabase()(fused)
    tuned = [name for name in kernels if _is_scheduled(mod[name])]
    return mod, Applied(len(kernels), tuned=tuned, defaults=[name for name in kernels if name not in tuned])


def default_schedule(mod: tvm.IRModule, target: TargetInfo) -> Any:
    """The schedule a build gives the kernel `mod["main"]` without a record (the first DLight
    rule that takes it; None when none does): what CUDA tuning measures first (tune/search.py)."""
    tvm_target = target.tvm_target()
    with tvm_target:
        found = _apply_rules(mod["main"], tvm_target, _default_rules(), tunable=False)
    return found[0] if found else None


def cuda_pipeline(target: Any) -> tvm.transform.Pass:
    """The rest of TVM's default CUDA pipeline after `prepare`: DLight's default rules, with
    BF16Matmul ahead, on every kernel no record scheduled, then lowering and finalizing."""
    return tvm.transform.Sequential([dl.ApplyDefaultSchedule(*_default_rules())]
                                    + cuda.dataflow_lower_passes(target) + cuda.finalize_passes(target))
