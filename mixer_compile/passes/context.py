"""What a pass may depend on besides the graph: the facts of the target and the precision.

Passes are target-independent rewrites except where a fact of the machine changes the best
layout (a CPU's SIMD width sets the weight panels) or the user asked for a precision. Those
facts come in here, decided once by the backend (`backend.pass_context`), so a pass never
inspects a target itself and `mixer-compile show --target T` runs exactly what the build runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from mixer_compile.errors import MixerCompileError

DTYPES = ("float32", "float16", "bfloat16")
ACCUMULATE = "float32"


@dataclass(frozen=True)
class PassContext:
    dtype: str = "float32"  # storage precision (precision.py); sums stay ACCUMULATE
    panel: int = 0  # column panel of right-product kernels (pack_kernels.py); 0: keep (K, N)
    gemm_library: str = ""  # "cutlass": large GEMMs call library kernels (library_gemms.py)
    # where activations are stored: `dtype` ("") where the hardware computes on half precision
    # (GPU tensor cores), "float32" where every operand is converted to float32 anyway (CPUs)
    activation_dtype: str = ""
    # the conv form's convolutions built as the GEMMs they are (convs_as_gemms.py): the target's
    # kernels are GEMMs; False where the convolutions are the point (the ONNX export)
    gemm_convs: bool = False
    # a right product's batch of images run as one GEMM over all their rows (batch_as_rows.py):
    # where a kernel takes the batch as an outer loop of its own (the CPU micro-kernels)
    batch_rows: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise MixerCompileError(f"unknown dtype '{self.dtype}'; choose one of {', '.join(DTYPES)}")
