"""Hand-written design spaces for the Mixer's GEMM kernels on x86 CPUs.

MetaSchedule's generic multi-level tiling plateaus far below ONNX Runtime's MLAS kernels on
the Mixer's GEMMs. The gap is the register micro-kernel: a `mr x nr` block of C held in
vector registers across the whole K loop, one broadcast of A and `nr / lanes` vector loads
of B per k, `mr * nr / lanes` FMAs. That loop nest, written once here, compiles (LLVM) to
exactly that inner loop, which the tuning space of MetaSchedule's generic rules does not
reach (benchmarks/bench_tiles.py times every tile of a model's GEMMs).

Every candidate is a fixed loop nest (no random decisions): micro-kernel shape and loop
order (the `Decision`, which belongs to the machine's registers and caches) and the parallel
split (`parallel_split`, which belongs to the machine that runs the code: its cores). MetaSchedule
measures the candidates like any others and keeps the records; a build reads the decision back
from a record's trace (`decision_of`) and re-applies it with `apply` to any GEMM of the same
per-call shape (`signature`: any epilogue, any batch), the parallel split (and K's blocks,
`k_block`) recomputed for the build target. Without a record, `default_candidate` picks the
tile by a model of the core (backend/cpu.py). An N that is no multiple of the SIMD width (a
spec's odd D_C, the 1000-class head on AVX-512) gets the same micro-kernel, its last column
tile predicated and peeled off at lowering (`tile_vectors`). Kernels that are not a GEMM
(LayerNorm, mean) keep MetaSchedule's generic space when tuned, and cpu_schedules.py's rules by
default.

Shape of the match: one block with spatial iterators (..., i, j) and one reduction k, reading
A[..., i, k] (not indexed by j) and B[..., k, j] or its panels B[j // P, k, j % P] (j
innermost, contiguous), optionally
followed by elementwise blocks (bias, GELU, residual): those are inlined into the last one,
which is computed per micro-tile, while C's tile is still in registers. An operand may come
through a stage that only widens a half-precision weight to float32 (lower/relax.py
`_widened`): a B panel is then converted once into cache under its panel loop and read by
every row tile, a (small) A weight once per call, instead of converting at every use. A B
read in place (token mixing's activations, (K, N) row-major) is likewise copied into a panel
under its panel loop, as a BLAS packs B. A weight read in its panels in place gets its loop
over row tiles marked for the lowering's prefetch of the next column tile's panels
(`prefetch_rows`, backend/cpu_prefetch.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tvm.s_tir import Schedule
from tvm.tirx import FloorMod, IntImm, IterVar
from tvm.tirx.analysis import undefined_vars

from mixer_compile.backend.cpu_prefetch import ROW_TILES

MAX_CANDIDATES = 16
MAX_NV = 6  # vectors per row of a micro-tile: loads of B per k


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
    mchunks: int = 1  # parallel split of M, when batch x chunks alone cannot keep the cores busy
    kc: int = 0  # rows of B's panel per pass over the row tiles (`k_block`); 0: all K at once


@dataclass(frozen=True)
class Decision:
    """What a schedule of this space decides about the machine's registers and caches (the
    micro-tile and the loop order), as opposed to its parallel split, which belongs to the
    machine that runs the code (`parallel_split`). A record's decisions transfer to any GEMM
    of the same per-call shape (`signature`), whatever its epilogue and batch."""

    mr: int
    nv: int
    c_outer: bool


@dataclass(frozen=True)
class Gemm:
    block: str
    batch: int  # product of the leading spatial extents
    m: int
    n: int
    k: int


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def tile_vectors(gemm: Gemm, lanes: int) -> list[int]:
    """The vectors per row of C a micro-tile may hold (up to MAX_NV). A width that does not
    divide N leaves a predicated last column tile, peeled off at lowering like the last row
    tile (cpu_schedules.likely_guards), the full tiles vectorised: any width when N is no
    multiple of the SIMD width (a spec's D_C of 750, a head of 37 classes: the tail is there
    anyway), else one whose column tiles N fills to COLUMNS_USED. Divisors alone were too few
    for some N: 200 (25 vectors) left 1 or 5, and a 4 x 2 with a tail beats both."""
    widths = range(1, MAX_NV + 1)
    if gemm.n % lanes:
        return list(widths)
    return [nv for nv in widths if filled(gemm.n, nv * lanes) >= COLUMNS_USED]


def candidates(gemm: Gemm, vec: Vector, cores: int) -> list[Candidate]:
    """The tuning space: micro-kernels that keep C's tile in registers (between half of them
    and all but the few B and A needs), with the vectors `tile_vectors` allows and rows that
    fill at least ROWS_USED of their tiles (the last row tile, predicated where mr does not
    divide M, is peeled off at lowering: cpu_schedules.likely_guards), fewest loads per useful
    FMA first, under each loop order; the parallel split from `parallel_split` (a build
    recomputes it anyway)."""
    kernels = [(mr, nv) for mr in range(1, min(16, gemm.m) + 1) if filled(gemm.m, mr) >= ROWS_USED
               for nv in tile_vectors(gemm, vec.lanes) if vec.registers // 2 <= mr * nv <= vec.registers - nv - 1]
    # fewest loads per FMA first ((mr + nv) / (mr * nv), over the share of real rows and columns), then the bigger tile
    kernels.sort(key=lambda k: ((k[0] + k[1]) / (k[0] * k[1]) / filled(gemm.m, k[0]) / filled(gemm.n, k[1] * vec.lanes),
                                -k[0] * k[1]))
    out = []
    for mr, nv in kernels[:MAX_CANDIDATES // 2]:
        out += [_candidate(gemm, Decision(mr, nv, c_outer), vec.lanes, cores) for c_outer in (False, True)]
    return out[:MAX_CANDIDATES]


def _candidate(gemm: Gemm, d: Decision, lanes: int, cores: int) -> Candidate:
    """Decision `d` on this GEMM, with what belongs to the machine that runs it: the parallel
    split and K's block."""
    chunks, mchunks = parallel_split(gemm, d.mr, d.nv, lanes, cores)
    return Candidate(d.mr, d.nv, chunks, d.c_outer, mchunks, k_block(gemm, d.nv, lanes) if d.c_outer else 0)


ROWS_USED = 7 / 8  # the least share of real rows in a tuning candidate's row tiles
COLUMNS_USED = 7 / 8  # the least share of real columns in a micro-tile's column tiles (tile_vectors)


def filled(n: int, group: int) -> float:
    """The share of ceil(n / group) groups of `group` slots that `n` items fill: M's real rows
    in its row tiles (the last tile's may not all be), a parallel loop's tasks in its rounds
    over the cores."""
    return n / (-(-n // group) * group)


BALANCE = 7 / 8  # the least share of the cores' time a parallel loop may keep busy


def parallel_split(gemm: Gemm, mr: int, nv: int, lanes: int, cores: int) -> tuple[int, int]:
    """(chunks of N, chunks of M) for the parallel loop, whose extent is E = batch x chunks x
    mchunks, from the machine that runs the code (never from a record). The rule: E tasks of
    equal work on `cores` threads keep them busy for E / (ceil(E / cores) x cores) of the time;
    the split is the smallest with that share at least 7/8 (E divisible by the cores, or
    E >= 8 x cores), N split before M (each core then streams only its share of the weights).
    A kernel with fewer tiles than that gets its most balanced split. With a column tail
    (`column_tail`) the parallel loop is N's column tiles, one task each: LoopPartition then
    peels the last one off (with several column tiles per task their k loops kept the guard
    and odd_dc750's GEMMs ran slower: tiles_emeraldrapids_odd_dc750_b1_tanh*.md)."""
    col_blocks, row_blocks = -(-gemm.n // (nv * lanes)), -(-gemm.m // mr)
    if column_tail(gemm, nv, lanes):
        return col_blocks, 1
    splits = [(c, r) for r in _divisors(row_blocks) for c in _divisors(col_blocks)]
    for c, r in splits:
        if filled(gemm.batch * c * r, cores) >= BALANCE:
            return c, r
    return max(splits, key=lambda cr: (filled(gemm.batch * cr[0] * cr[1], cores), gemm.batch * cr[0] * cr[1]))


def column_tail(gemm: Gemm, nv: int, lanes: int) -> bool:
    """Whether a tile of nv vectors leaves a predicated last column tile (N no multiple of its width)."""
    return gemm.n % (nv * lanes) != 0


# the model of a core behind default_candidate: two FMA pipes of 4 cycles' latency and two vector
# loads per cycle (Zen, Intel since Haswell; the same on the AVX-512 parts this targets); B's
# vectors stream from L2 at about one per two cycles (its panel, re-read by every row tile,
# outgrows L1), where A's few rows stay in L1; A's broadcasts issue at one per cycle
FMA_PER_CYCLE, FMA_LATENCY, LOADS_PER_CYCLE, B_VECTORS_PER_CYCLE, BROADCASTS_PER_CYCLE = 2, 4, 2, 0.5, 1


def _cycles(mr: int, nv: int) -> tuple[float, list[float]]:
    """Per k of a mr x nv micro-tile: the FMA pipes' cycles, and each other unit's (loads,
    A's broadcasts, B's vectors from L2); the FMA latency's chains bound them all (FMA_LATENCY)."""
    return mr * nv / FMA_PER_CYCLE, [(mr + nv) / LOADS_PER_CYCLE, mr / BROADCASTS_PER_CYCLE, nv / B_VECTORS_PER_CYCLE]


def tile_efficiency(mr: int, nv: int) -> float:
    """Share of the FMA peak a mr x nv micro-tile can reach in the model: per k it issues
    mr x nv FMAs, mr broadcasts of A and nv loads of B, and its mr x nv accumulators must cover
    the FMA latency x throughput or the chains stall. B's loads also bound it from L2: a tile of
    fewer than 4 rows waits on B (a 2 x 5 tile ran well below a 4 x 2 one on Mixer-H/14's GEMMs,
    benchmarks/results/cpu_matrix_znver3_large.md). A's broadcasts issue at one per cycle, which
    only a tile of one vector per row outruns: 14 x 1 and 8 x 1 tiles, which the model without
    that bound rated near peak, measured well below a 4 x 2 on GEMMs whose N (100, 200) left no
    wider tile among N's divisors (benchmarks/results/cpu_matrix_znver3_odd_specs*.md)."""
    return _cycles(mr, nv)[0] / _tile_cycles(mr, nv)


def tail_share(gemm: Gemm, mr: int, nv: int, lanes: int, cores: int) -> float:
    """Share of the cores' FMA peak a tile of nv vectors keeps on a GEMM whose N it leaves a
    column tail: the full column tiles run as parallel tasks (`parallel_split`), and the last
    one, which LoopPartition peels off the parallel loop, runs after them on one core, with
    only the vectors that hold real columns. So 9 x 3 beats 6 x 4 on N = 100 (two full tiles on
    two cores, then one vector; against one full tile on one core, then three vectors) and 14 x 2
    (three full tiles on two cores): benchmarks/results/tiles_emeraldrapids_odd_c100_b3_tanh.md."""
    full, rest = divmod(gemm.n, nv * lanes)
    cycles = -(-full // cores) * _tile_cycles(mr, nv) + _tile_cycles(mr, -(-rest // lanes))
    return mr * gemm.n / lanes / (FMA_PER_CYCLE * cores) / cycles


def _tile_cycles(mr: int, nv: int) -> float:
    """Cycles per k of a mr x nv micro-tile in the model: its busiest unit, or the FMA latency."""
    fma, units = _cycles(mr, nv)
    return max(fma, *units, FMA_LATENCY)


def tile_pressure(mr: int, nv: int) -> float:
    """The busiest unit besides the FMA pipes, as a share of their cycles: among tiles the model
    rates alike, one whose loads, broadcasts or B stream run at their limit has no slack for
    what the model does not see (a miss, a busy L2). On AVX-512 the 14 x 2 tile issues one
    broadcast a cycle, at the limit, and ran behind a 7 x 3 on Mixer-B/16's GEMMs
    (benchmarks/results/tiles_emeraldrapids_*.md); AVX2's tiles of full efficiency all have a
    unit at its limit, so they tie here as before."""
    fma, units = _cycles(mr, nv)
    return max(units) / fma


# L1 data caches of the x86 cores this targets: 64 sets of 64-byte lines (32 KB 8-way on Zen 2-4,
# 48 KB 12-way on Zen 5 and Intel since Ice Lake); the fewest ways bound
L1_SETS, L1_WAYS, LINE = 64, 8, 64


def rows_in_one_set(mr: int, k: int) -> int:
    """How many of a tile's mr rows of A (K floats apart) map to one L1 set. With K a multiple
    of 1024 every row starts at a multiple of 4 KiB: all mr rows share a set, and more rows than
    the set has ways evict each other's lines before their 16 uses are done. Mixer's channel fc2
    (K = D_C: 2048, 3072, 4096) ran 14 x 2 tiles behind 4 x 4, 5 x 4 and 7 x 3 ones on an Emerald
    Rapids (12 ways; benchmarks/results/tiles_emeraldrapids_*.md), and Zen 4's tuning (8 ways)
    chose 7 x 3 and 4 x 4 for them."""
    stride = k * 4  # bytes from one row of A to the next
    if stride % LINE:  # rows not line-aligned: spread over the sets
        return 1
    period = L1_SETS // math.gcd(L1_SETS, stride // LINE)  # distinct sets the rows cycle through
    return -(-mr // period)


# L2 of the x86 cores this targets: 1 MB on Zen 4 and 5, 1.25-2 MB on Intel's since Ice Lake; the least bounds
L2_BYTES = 1 << 20


def k_block(gemm: Gemm, nv: int, lanes: int) -> int:
    """Rows of B's panel each pass over the row tiles reads (0: all K in one pass). The panel,
    K x nv vectors, is what every row tile re-reads from L2 while A's rows stream past it; a
    panel over 3/4 of L2 leaves too little room for that stream, and each row tile then reads B
    from L3 again. Over that, K goes in blocks of a quarter of L2's worth of B's rows (a divisor
    of K: no predicated block; none when K's largest such divisor is under half of that, as for
    a prime K), C's tile stored and reloaded between them, the epilogue after the last. Only
    with B's panel outside the row tiles (`c_outer`), the order the blocks belong to. H/14's and
    L/16's channel fc2 (K = 5120 and 4096: 1.3 and 1 MB panels of 6 x 4 tiles) run in blocks of
    1024. The bound is the smallest L2 this targets: where L2 still holds a panel (2 MB on
    Intel's), the blocks neither gain nor lose (benchmarks/results/kblocks_emeraldrapids_*.md)."""
    row = nv * lanes * 4  # bytes of one row of the panel
    if gemm.k * row <= L2_BYTES * 3 // 4:
        return 0
    rows = L2_BYTES // 4 // row
    kc = max(d for d in _divisors(gemm.k) if d <= rows)
    return kc if 2 * kc >= rows else 0


def prefetch_rows(gemm: Gemm, nv: int, lanes: int) -> int:
    """How many row tiles prefetch the next column tile's panels (backend/cpu_prefetch.py), one
    vector of B per k step each: enough to cover them (nv), as far as 3/4 of L2 holds them
    beside the current panels, which every row tile re-reads; on the smallest L2 this targets
    (L2_BYTES), as `k_block`. B/16's channel fc2 (K = 3072, 590 KB of panels in a 7 x 3 tile)
    prefetches a third of the next panels, its channel fc1 (K = 768) all of them."""
    row = gemm.k * lanes * 4  # bytes of B one row tile's prefetches cover (float32 panels)
    return max(0, min(nv, (L2_BYTES * 3 // 4 - nv * row) // row))


# rates the register model gives within this share of each other are alike to it: what tells such
# tiles apart is what it does not see (a 1% row tail against the broadcast unit at its limit)
MODEL_TOLERANCE = 0.03


def default_candidate(gemm: Gemm, vec: Vector, cores: int) -> Candidate | None:
    """The candidate chosen without measuring. The register model rates each micro-tile:
    without a column tail, `tile_efficiency` times the share of its rows that are real (where
    mr does not divide M the last row tile is predicated) times the share of the cores its
    parallel split keeps busy (13 row tiles split no way over 16 cores); with one, the real
    rows' share times `tail_share`. Among the tiles rated within MODEL_TOLERANCE of the best,
    the choice goes to one without a column tail (its tail runs alone on one core after the
    rest), then to the one with the most slack on its busiest other unit (`tile_pressure`), then
    to the bigger tile, then to one that divides M. Never more rows of A in one L1 set than it
    has ways (`rows_in_one_set`); B panel reused across M (`c_outer`); the parallel split from
    the cores. The tile's vectors are those `tile_vectors` allows; None when no tile fits the
    registers.

    Why the tolerance: a row tail costs little (the last row tile is peeled off,
    cpu_schedules.likely_guards), and the model's exact best lost to tiles it rated 1-3% lower:
    on AVX-512, 9 x 3 and 8 x 3 to 7 x 3 on B/16's GEMMs, and 6 x 4 to 14 x 2 and 4 x 4 on
    S/16's and L/16's, with 196 rows each (benchmarks/results/tiles_emeraldrapids_*_guarded.md)."""
    fits = [(mr, nv) for mr in range(1, min(16, gemm.m) + 1) for nv in tile_vectors(gemm, vec.lanes)
            if mr * nv <= vec.registers - nv - 1 and rows_in_one_set(mr, gemm.k) <= L1_WAYS]
    if not fits:
        return None

    def rate(k: tuple[int, int]) -> float:
        mr, nv = k
        if column_tail(gemm, nv, vec.lanes):
            return filled(gemm.m, mr) * tail_share(gemm, mr, nv, vec.lanes, cores)
        chunks, mchunks = parallel_split(gemm, mr, nv, vec.lanes, cores)
        return tile_efficiency(mr, nv) * filled(gemm.m, mr) * filled(gemm.batch * chunks * mchunks, cores)

    def slack(k: tuple[int, int]) -> tuple[bool, float, int, bool, int]:
        mr, nv = k
        return not column_tail(gemm, nv, vec.lanes), -round(tile_pressure(mr, nv), 3), mr * nv, gemm.m % mr == 0, mr

    rates = {k: rate(k) for k in fits}
    best = max(rates.values())
    mr, nv = max((k for k, r in rates.items() if r >= best * (1 - MODEL_TOLERANCE)), key=slack)
    return _candidate(gemm, Decision(mr, nv, True), vec.lanes, cores)


def with_decision(gemm: Gemm, d: Decision, vec: Vector, cores: int) -> Candidate | None:
    """The candidate that makes decision `d` on this GEMM for this machine's cores (None when
    `tile_vectors` does not allow its vectors or its tile does not fit this machine's registers)."""
    if d.mr > gemm.m or d.nv not in tile_vectors(gemm, vec.lanes) or d.mr * d.nv > vec.registers - d.nv - 1:
        return None
    return _candidate(gemm, d, vec.lanes, cores)


def signature(sch: Schedule, gemm: Gemm, lanes: int) -> tuple[Any, ...]:
    """The per-call shape a decision is keyed by: M, N, K, the SIMD width and how B is laid
    out (panels or plain); not the batch, not the epilogue."""
    block = sch.get(sch.get_sblock(gemm.block))
    k = int(block.iter_vars[-1].dom.extent)
    b = block.reads[1]
    return (gemm.m, gemm.n, k, lanes, len(b.region), _in_panels(block))


def _in_panels(block: Any) -> bool:
    """Whether the GEMM block reads B in panels B[j // P, k, j % P] (passes/pack_kernels.py)."""
    return isinstance(block.reads[1].region[-1].min, FloorMod)


def decision_of(trace: Any) -> Decision | None:
    """The decisions recorded in the trace of a schedule `apply` made: the Split of i holds
    [..., mr], the Split of j [chunks, None, nv, lanes], the Reorder the loop order. None for a
    trace of another space (MetaSchedule's generic one)."""
    insts = _plain(trace.as_json())[0]
    loops = next((i[3] for i in insts if i[0] == "GetLoops"), None)
    if loops is None or len(loops) < 3:
        return None
    i, j = loops[-3], loops[-2]
    split_i = next((x for x in insts if x[0] == "Split" and x[1][0] == i), None)
    split_j = next((x for x in insts if x[0] == "Split" and x[1][0] == j), None)
    reorder = next((x for x in insts if x[0] == "Reorder"), None)
    if split_i is None or split_j is None or reorder is None or len(split_j[1]) != 5:
        return None
    mr, nv = split_i[1][-1], split_j[1][3]
    if not isinstance(mr, int) or not isinstance(nv, int):
        return None
    io, jm = split_i[3][-2], split_j[3][1]
    order = reorder[1]
    if io not in order or jm not in order:
        return None
    return Decision(mr, nv, order.index(jm) < order.index(io))


def _plain(x: Any) -> Any:
    """A trace's JSON as Python lists, strings and ints (TVM hands out its own String and
    integer objects)."""
    if isinstance(x, str):
        return str(x)
    if isinstance(x, (list, tuple)) or type(x).__name__ == "Array":
        return [_plain(v) for v in x]
    if isinstance(x, IntImm):
        return int(x.value)
    if hasattr(x, "__index__") and not isinstance(x, bool):
        return int(x)
    return x


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
    return Gemm(block.name_hint, math.prod(extents[:-3]), extents[-3], extents[-2], extents[-1])


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
    widen = _widening(sch, block)
    # a stage under the panel loop pays off over the row tiles that re-read it (a predicated last
    # row tile, mr not dividing M, is peeled off at lowering: cpu_schedules.likely_guards)
    staged = c.c_outer and gemm.m > c.mr
    for rv in sch.get_child_blocks(root):
        name = sch.get(rv).name_hint
        if name not in (gemm.block, sch.get(output).name_hint, *widen):
            sch.compute_inline(rv)
    *batch, i, j, k = sch.get_loops(block)
    if c.mchunks > 1:
        mo, io, ii = sch.split(i, [c.mchunks, None, c.mr])
    else:
        (io, ii), mo = sch.split(i, [None, c.mr]), None
    jo, jm, jv, jl = sch.split(j, [c.chunks, None, c.nv, lanes])
    ko, k = sch.split(k, [None, c.kc]) if c.kc else (None, k)  # kc only with c_outer (`_candidate`)
    inner = [k, ii, jv, jl]
    if column_tail(gemm, c.nv, lanes):  # N's chunks alone in parallel, the batch inside: LoopPartition
        outer, serial = [jo], batch  # peels the tail tile off a plain loop only (not off a fused one's j % chunks)
    else:
        outer, serial = [*batch, jo] + ([mo] if mo is not None else []), []
    blocks = (jm, ko, io) if ko is not None else (jm, io) if c.c_outer else (io, jm)
    sch.reorder(*outer, *serial, *blocks, *inner)
    sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    sch.unroll(ii)
    sch.unroll(jv)
    sch.vectorize(jl)
    if sch.get(output).name_hint != gemm.block:
        sch.reverse_compute_at(output, jm if ko is not None or not c.c_outer else io)
        last = sch.get_loops(output)[-1]
        sch.vectorize(sch.split(last, [None, lanes])[1])
    for name, operand in widen.items():
        if operand == 0:  # the broadcast operand: the whole (small) weight, once per call
            loops = sch.get_loops(sch.get_sblock(name))
            sch.parallel(sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0])
    # B's panel staged under its panel loop, converted or copied once and read by every row tile:
    # a half weight's widening stage, or a copy of a B read in place (token mixing's activations,
    # whose tile's K rows lie a row of N apart: as many pages and, for N a power of two, one
    # cache set), as a BLAS packs B
    widened = next((name for name, operand in widen.items() if operand == 1), None)
    if staged and (widened or not _in_panels(sch.get(block))):
        stage = sch.get_sblock(widened) if widened else sch.cache_read(block, 1, "global")
        sch.compute_at(stage, jm)
        sch.vectorize(sch.get_loops(stage)[-1])
    elif widened:  # converted at each use
        sch.compute_inline(sch.get_sblock(widened))
    elif staged and ko is None and _in_panels(sch.get(block)) and (rows := prefetch_rows(gemm, c.nv, lanes)):
        # a weight's panels, read in place: the distance to the next panels, the row tiles that prefetch them
        sch.annotate(io, ROW_TILES, [c.nv * lanes * gemm.k, rows])
    sch.decompose_reduction(block, ko if ko is not None else k)


def _widening(sch: Schedule, block: Any) -> dict[str, int]:
    """The stages that only convert an operand of the GEMM to its compute dtype (a half weight
    on a CPU, lower/relax.py `_widened`), by name, with the operand each feeds (0: A, 1: B)."""
    reads = [r.source for r in sch.get(block).reads]
    out = {}
    for rv in sch.get_producers(block):
        stage = sch.get(rv)
        if len(stage.writes) != 1 or len(stage.reads) != 1 \
                or any(iv.iter_type != IterVar.DataPar for iv in stage.iter_vars):
            continue
        written, read = stage.writes[0].source, stage.reads[0].source
        operand = next((i for i, b in enumerate(reads) if b.same_as(written)), None)
        same_shape = [int(d) for d in written.shape] == [int(d) for d in read.shape]
        if operand is not None and written.dtype != read.dtype and same_shape:
            out[stage.name_hint] = operand
    return out


def design_spaces(sch: Schedule, vec: Vector, cores: int) -> list[Schedule]:
    """One schedule per candidate, or [] when the kernel is not a GEMM this space handles."""
    gemm = find_gemm(sch)
    if gemm is None:
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
