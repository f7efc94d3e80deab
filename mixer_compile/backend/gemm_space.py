"""Hand-written design spaces for the Mixer's GEMM kernels on x86 CPUs.

MetaSchedule's generic multi-level tiling plateaus at 90-170 GFLOP/s on the Mixer's GEMMs
here; ONNX Runtime's MLAS kernels reach ~460. The gap is the register micro-kernel: a
`mr x nr` block of C held in vector registers across the whole K loop, one broadcast of A
and `nr / lanes` vector loads of B per k, `mr * nr / lanes` FMAs. That loop nest, written
once here, compiles (LLVM) to exactly that inner loop and reaches ~500 GFLOP/s on one
196x768x3072 fc1 + GELU on this 2-core machine.

Every candidate is a fixed loop nest (no random decisions): micro-kernel shape, loop order
and the parallel split of N. MetaSchedule measures them like any other candidates and keeps
the records; a record is a trace of stock schedule primitives, so applying it needs nothing
from this module. Kernels that are not a GEMM with a vectorisable N (LayerNorm, mean, the
1000-class head) keep MetaSchedule's generic space.

Shape of the match: one block with spatial iterators (..., i, j) and one reduction k, reading
A[..., i, k] (not indexed by j) and B[..., k, j] or its panels B[j // P, k, j % P] (j
innermost, contiguous), optionally
followed by elementwise blocks (bias, GELU, residual): those are inlined into the last one,
which is computed per micro-tile, while C's tile is still in registers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tvm.s_tir import Schedule
from tvm.tirx import FloorMod, IterVar
from tvm.tirx.analysis import undefined_vars

MAX_CANDIDATES = 16


@dataclass(frozen=True)
class Vector:
    """What the micro-kernel may use: SIMD lanes (float32) and vector registers."""

    lanes: int
    registers: int


def vector_unit(tvm_target: Any) -> Vector:
    """The SIMD unit the micro-kernels are shaped for, from the target's CPU features: AVX-512
    (32 zmm registers of 16 floats), AVX2 (16 ymm of 8), SSE2 (16 xmm of 4) or NEON (32 q
    registers of 4). Any other CPU is refused: a guessed width would silently shape every
    panel and micro-tile for another machine."""
    from tvm.target.codegen import target_has_features

    from mixer_compile.errors import TargetError

    units = (("avx512f", Vector(16, 32)), ("avx2", Vector(8, 16)), ("sse2", Vector(4, 16)), ("neon", Vector(4, 32)))
    for feature, unit in units:
        try:
            if target_has_features(feature, tvm_target):
                return unit
        except Exception:  # LLVM does not know the feature name for this architecture
            continue
    raise TargetError(f"no SIMD unit known for the CPU of target {tvm_target} (mixer-compile shapes CPU "
                      "kernels for AVX-512, AVX2, SSE2 or NEON); give the target a CPU with one of them "
                      "(its 'mcpu' or 'mattr')")


@dataclass(frozen=True)
class Candidate:
    mr: int  # rows of C per micro-tile (broadcasts of A per k)
    nv: int  # vectors of C per row of the micro-tile (loads of B per k)
    chunks: int  # parallel split of N (times the batch extent: the parallel loop)
    c_outer: bool  # order: N blocks outside M blocks (B panel reused across A) or inside


@dataclass(frozen=True)
class Gemm:
    block: str
    batch: int  # product of the leading spatial extents
    m: int
    n: int


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(gemm: Gemm, vec: Vector, cores: int) -> list[Candidate]:
    """Micro-kernels that keep C's tile in registers (between half of them and all but the
    few B and A needs), with tiles that divide M and N exactly (a predicated tail would turn
    the loop scalar), best-balanced first, under each loop order and parallel split."""
    vectors = gemm.n // vec.lanes
    kernels = [(mr, nv) for mr in _divisors(gemm.m) if mr <= 16 for nv in _divisors(vectors) if nv <= 6
               if vec.registers // 2 <= mr * nv <= vec.registers - nv - 1]
    # fewest loads per FMA first ((mr + nv) / (mr * nv)), then the bigger tile
    kernels.sort(key=lambda k: ((k[0] + k[1]) / (k[0] * k[1]), -k[0] * k[1]))
    out = []
    for mr, nv in kernels[:4]:
        splits = [c for c in _divisors(vectors // nv) if gemm.batch * c >= cores][:2]
        out += [Candidate(mr, nv, chunks, c_outer) for chunks in splits for c_outer in (False, True)]
    return out[:MAX_CANDIDATES]


def find_gemm(sch: Schedule) -> Gemm | None:
    """The kernel's GEMM block, if it has the shape this space handles (module docstring)."""
    root = sch.get_sblock("root")
    blocks = sch.get_child_blocks(root)
    gemms = []
    for rv in blocks:
        block = sch.get(rv)
        kinds = [iv.iter_type for iv in block.iter_vars]
        if kinds.count(IterVar.CommReduce) == 1 and kinds[-1] == IterVar.CommReduce and len(kinds) >= 3 \
                and all(k == IterVar.DataPar for k in kinds[:-1]) and len(block.reads) == 2:
            gemms.append((rv, block))
    if len(gemms) != 1 or len(sch.get_output_blocks(root)) != 1:
        return None
    rv, block = gemms[0]
    *_, i, j, k = [iv.var for iv in block.iter_vars]
    a, b = block.reads
    a_vars = _vars(a)
    a_ok = _has(a_vars, i) and _has(a_vars, k) and not _has(a_vars, j)
    if not a_ok or not _contiguous_along(b, j):
        return None
    extents = [int(iv.dom.extent) for iv in block.iter_vars]
    return Gemm(block.name_hint, math.prod(extents[:-3]), extents[-3], extents[-2])


def _contiguous_along(region: Any, j: Any) -> bool:
    """B is read contiguously along j: B[..., k, j], or B[j // P, k, j % P] in the panels
    of passes/pack_kernels.py (P, the SIMD width, so a vector never straddles two panels)."""
    index = region.region[-1].min
    return index.same_as(j) or (isinstance(index, FloorMod) and index.a.same_as(j))


def _vars(region: Any) -> list[Any]:
    return [v for r in region.region for v in undefined_vars(r.min)]


def _has(variables: list[Any], var: Any) -> bool:
    return any(v.same_as(var) for v in variables)


def apply(sch: Schedule, gemm: Gemm, c: Candidate, lanes: int) -> None:
    """The candidate's loop nest on `sch` (module docstring)."""
    block = sch.get_sblock(gemm.block)
    root = sch.get_sblock("root")
    output = sch.get_output_blocks(root)[0]
    for rv in sch.get_child_blocks(root):
        name = sch.get(rv).name_hint
        if name not in (gemm.block, sch.get(output).name_hint):
            sch.compute_inline(rv)
    *batch, i, j, k = sch.get_loops(block)
    io, ii = sch.split(i, [None, c.mr])
    jo, jm, jv, jl = sch.split(j, [c.chunks, None, c.nv, lanes])
    inner = [k, ii, jv, jl]
    sch.reorder(*batch, jo, *((jm, io) if c.c_outer else (io, jm)), *inner)
    sch.parallel(sch.fuse(*batch, jo))
    sch.unroll(ii)
    sch.unroll(jv)
    sch.vectorize(jl)
    if sch.get(output).name_hint != gemm.block:
        sch.reverse_compute_at(output, io if c.c_outer else jm)
        last = sch.get_loops(output)[-1]
        sch.vectorize(sch.split(last, [None, lanes])[1])
    sch.decompose_reduction(block, k)


def design_spaces(sch: Schedule, vec: Vector, cores: int) -> list[Schedule]:
    """One schedule per candidate, or [] when the kernel is not a GEMM this space handles."""
    gemm = find_gemm(sch)
    if gemm is None or gemm.n % vec.lanes:
        return []
    spaces = []
    for c in candidates(gemm, vec, cores):
        copy = sch.copy()
        try:
            apply(copy, gemm, c, vec.lanes)
        except Exception:  # a primitive refused this kernel (e.g. an epilogue that is not elementwise)
            return []
        spaces.append(copy)
    return spaces
