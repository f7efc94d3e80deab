"""The library calls a lowering may emit, named once: the contract between lower/ and backend/.

A dense op that passes/library_gemms.py handed to a kernel library becomes

    R.call_dps_packed("mixer_gemm_<form>_<f16|bf16|f32>_<bias|gelu_erf|gelu_tanh|residual>", X, W, bias[, R]) -> D

accumulated in float32, epilogue (bias, then GELU or the residual) in float32, rounded once to
the storage dtype. The form says which product, and how W is stored:

    xw   right product (patchify, channel mixing): X [..., K] (leading dims flattened into M),
         W [N, K] (K-major), bias [N], R and D [..., N];  D = X @ W^T + bias
    wx   left product (token mixing, tokens-major): X [L, K, N], W [M, K] (K-major), bias [M],
         R and D [L, M, N];  D[l] = W @ X[l] + bias[:, None], one W for every l
    wtx  the same left product with W stored [K, M] (M-major): for a K that is not a multiple of
         8 (196 tokens), whose rows a TMA load could not address; M-major keeps K off every
         contiguous axis

and a backend links an implementation of every such symbol the module calls into the library
(backend/cutlass.py: CUTLASS kernels for GPUs, plain C++ for the host-CPU check).

The lowering names what a call computes; the backend then picks *how* per call site (a CUTLASS
tile configuration, or another library: backend/gemm_choice.py) and renames the call to
`<symbol>__<variant>`: the same contract, one exported symbol per implementation linked in.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

PREFIX = "mixer_gemm_"
FORMS = ("xw", "wx", "wtx")
DTYPES = {"float16": "f16", "bfloat16": "bf16", "float32": "f32"}
EPILOGUES = ("bias", "gelu_erf", "gelu_tanh", "residual")


@dataclass(frozen=True)
class GemmKernel:
    dtype: str  # float16 | bfloat16 | float32
    epilogue: str  # one of EPILOGUES
    form: str = "xw"  # one of FORMS
    variant: str = ""  # how the backend implements it ("" = not chosen yet); part of the symbol

    @property
    def symbol(self) -> str:
        base = f"{PREFIX}{self.form}_{DTYPES[self.dtype]}_{self.epilogue}"
        return f"{base}__{self.variant}" if self.variant else base

    @property
    def residual(self) -> bool:
        return self.epilogue == "residual"

    @property
    def left(self) -> bool:
        return self.form != "xw"

    def with_variant(self, variant: str) -> "GemmKernel":
        return replace(self, variant=variant)


@dataclass(frozen=True)
class GemmShape:
    """The problem of one call site: D [L, M, N] from K-long dot products."""

    m: int
    n: int
    k: int
    l: int = 1


def form_of(axis: int, ndim: int, kernel_layout: str) -> str:
    """The form of a dense op contracting `axis` of an `ndim`-d input with a kernel stored as
    `kernel_layout` ("NK" or "KN"): right products read W [N, K]; left ones either layout."""
    if axis == ndim - 1:
        return "xw"
    return "wx" if kernel_layout == "NK" else "wtx"


def kernel_for(dtype: str, gelu: str | None, residual: bool, form: str = "xw") -> GemmKernel:
    """The kernel of a fused dense op (bias always; GELU or residual, not both: the Mixer has none)."""
    return GemmKernel(dtype, "residual" if residual else f"gelu_{gelu}" if gelu else "bias", form)


def shape_of(kernel: GemmKernel, x_shape: tuple[int, ...], w_shape: tuple[int, ...]) -> GemmShape:
    """The problem a call computes, from its X and W shapes."""
    if kernel.form == "xw":
        n, k = w_shape
        m = 1
        for d in x_shape[:-1]:
            m *= d
        return GemmShape(m, n, k)
    m, k = w_shape if kernel.form == "wx" else w_shape[::-1]
    return GemmShape(m, x_shape[-1], k, x_shape[0])


def from_symbol(symbol: str) -> GemmKernel:
    name, _, variant = symbol.removeprefix(PREFIX).partition("__")
    form, dtype_tag, epilogue = name.split("_", 2)
    dtype = {v: k for k, v in DTYPES.items()}[dtype_tag]
    return GemmKernel(dtype, epilogue, form, variant)
