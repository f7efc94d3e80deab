"""The library calls a lowering may emit, named once: the contract between lower/ and backend/.

A dense op that passes/library_gemms.py handed to a kernel library becomes

    R.call_dps_packed("mixer_gemm_<f16|bf16>_<bias|gelu_erf|gelu_tanh|residual>", A, W, bias[, R]) -> D
        A [..., K] activations (leading dims flattened into M), W [N, K] (K-major), bias [N]
        float32, R and D [..., N]; D = epilogue(A @ W^T + bias), accumulated in float32 and
        rounded once to the storage dtype

and a backend links an implementation of every such symbol the module calls into the library
(backend/cutlass.py: CUTLASS kernels for GPUs, plain C++ for the host-CPU check).
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "mixer_gemm_"
DTYPES = {"float16": "f16", "bfloat16": "bf16"}
EPILOGUES = ("bias", "gelu_erf", "gelu_tanh", "residual")


@dataclass(frozen=True)
class GemmKernel:
    dtype: str  # float16 | bfloat16
    epilogue: str  # one of EPILOGUES

    @property
    def symbol(self) -> str:
        return f"{PREFIX}{DTYPES[self.dtype]}_{self.epilogue}"

    @property
    def residual(self) -> bool:
        return self.epilogue == "residual"


def kernel_for(dtype: str, gelu: str | None, residual: bool) -> GemmKernel:
    """The kernel of a fused dense op (bias always; GELU or residual, not both: the Mixer has none)."""
    return GemmKernel(dtype, "residual" if residual else f"gelu_{gelu}" if gelu else "bias")


def from_symbol(symbol: str) -> GemmKernel:
    dtype_tag, _, epilogue = symbol.removeprefix(PREFIX).partition("_")
    dtype = {v: k for k, v in DTYPES.items()}[dtype_tag]
    return GemmKernel(dtype, epilogue)
