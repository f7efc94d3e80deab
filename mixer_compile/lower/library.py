"""The library calls a lowering may emit, named once: the contract between lower/ and backend/.

A dense op that passes/library_gemms.py handed to a kernel library becomes

    R.call_dps_packed("mixer_gemm_<f16|bf16>_<bias|gelu_erf|gelu_tanh|residual>", A, W, bias[, R]) -> D
        A [..., K] activations (leading dims flattened into M), W [N, K] (K-major), bias [N]
        float32, R and D [..., N]; D = epilogue(A @ W^T + bias), accumulated in float32 and
        rounded once to the storage dtype

and a backend links an implementation of every such symbol the module calls into the library
(backend/cutlass.py: CUTLASS kernels for GPUs, plain C++ for the host-CPU check).

The lowering names what a call computes; the backend may then pick *how* per call site (a
CUTLASS tile configuration, or another library) and rename the call to `<symbol>__<variant>`:
the same contract, one exported symbol per implementation linked in.
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
    variant: str = ""  # how the backend implements it ("" = its default); part of the symbol

    @property
    def symbol(self) -> str:
        base = f"{PREFIX}{DTYPES[self.dtype]}_{self.epilogue}"
        return f"{base}__{self.variant}" if self.variant else base

    @property
    def residual(self) -> bool:
        return self.epilogue == "residual"


def kernel_for(dtype: str, gelu: str | None, residual: bool) -> GemmKernel:
    """The kernel of a fused dense op (bias always; GELU or residual, not both: the Mixer has none)."""
    return GemmKernel(dtype, "residual" if residual else f"gelu_{gelu}" if gelu else "bias")


def from_symbol(symbol: str) -> GemmKernel:
    name, _, variant = symbol.removeprefix(PREFIX).partition("__")
    dtype_tag, _, epilogue = name.partition("_")
    dtype = {v: k for k, v in DTYPES.items()}[dtype_tag]
    return GemmKernel(dtype, epilogue, variant)
