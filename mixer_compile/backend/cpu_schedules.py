"""Default CPU schedules: every kernel gets a parallel, vectorised loop nest without measuring.

What DLight is for GPUs, for the Mixer's kernels on x86 (and any LLVM CPU with a SIMD unit
gemm_space knows): a list of rules tried in order on a kernel's schedule, each
`(sch, machine) -> bool`; the first that returns True has scheduled it (a rule that raises or
returns False leaves the kernel untouched: each runs on a copy). The rules:

- `gemm`: a GEMM gemm_space matches gets its micro-kernel (`gemm_space.default_candidate`:
  register tile from the SIMD unit, B panel reused across M, parallel split from the cores);
- `rows`: row reductions that feed one row-wise output (LayerNorm: the sum, the sum of squares,
  the normalisation): one parallel loop over rows, and each row's reductions computed inside
  it, in vector accumulators (rfactor), so the row stays in cache from the first pass to the
  output; a reduction that is not along the contiguous axis it reads leaves the kernel to
  `reduction`;
- `reduction`: LayerNorm, the token mean, a GEMM gemm_space cannot tile (no tile fits the
  registers, or a primitive refused its epilogue): elementwise blocks are
  inlined; a reduction along the contiguous axis (LayerNorm's sums) is split by the SIMD width
  and rfactor'ed into vector accumulators; a reduction whose output's last axis is contiguous
  in its input (the mean over tokens, a GEMV) is vectorised along that axis, the reduction
  outside it; every nest is parallel over its leading spatial loops;
- `injective`: transposes, copies, the patchify gather: everything inlined into the output,
  whose loops are fused, parallel in chunks of SPATIAL_VECTORS SIMD vectors, vectorised inside;
- `parallel_only`: the last resort: each block's outer spatial loops run in parallel.

`cpu.build` applies these where no tuning record applies and counts them (`Applied.defaults`).
Every scheduled kernel, whatever scheduled it, then gets `likely_guards` and builds under
`BUILD_CONFIG` (tuning's candidates too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import tvm
from tvm.s_tir import Schedule
from tvm.tirx import IterVar
from tvm.tirx.analysis import undefined_vars

from mixer_compile.backend import gemm_space
from mixer_compile.backend.cpu_prefetch import PIPELINE


@dataclass(frozen=True)
class Machine:
    """What the default schedules are shaped for: the SIMD unit and the cores that run the code."""

    vec: gemm_space.Vector
    cores: int

    @property
    def lanes(self) -> int:
        return self.vec.lanes


Rule = Callable[[Schedule, Machine], bool]


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def _blocks(sch: Schedule) -> list[Any]:
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def _realize(sch: Schedule, block: Any) -> Any:
    """The block's SBlockRealize: its iterators with the loop expressions bound to them."""
    return tvm.get_global_func("s_tir.schedule.GetSBlockRealize")(sch, block)


def _kinds(sch: Schedule, block: Any) -> list[tuple[Any, Any, str]]:
    """(loop, iterator var, 'S' or 'R') for every loop of an unscheduled block, matched by the
    block's bindings (a loop binds exactly one iterator); raises when they do not match."""
    realize = _realize(sch, block)
    loops = sch.get_loops(block)
    loop_vars = [sch.get(lp).loop_var for lp in loops]
    out = []
    for iv, value in zip(realize.block.iter_vars, realize.iter_values):
        index = next((n for n, v in enumerate(loop_vars) if value.same_as(v)), None)
        if index is None:
            raise ValueError("a binding that is not a single loop")
        kind = "S" if iv.iter_type == IterVar.DataPar else "R" if iv.iter_type == IterVar.CommReduce else "O"
        out.append((index, iv.var, kind))
    if len(out) != len(loops) or sorted(i for i, _, _ in out) != list(range(len(loops))):
        raise ValueError("loops and iterators do not match one to one")
    out.sort(key=lambda x: x[0])
    return [(loops[i], var, kind) for i, var, kind in out]


def _inline_elementwise(sch: Schedule, keep: set[str]) -> None:
    """Inlines every spatial block that is not an output (nor in `keep`) into its consumers."""
    outputs = {sch.get(b).name_hint for b in sch.get_output_blocks(sch.get_sblock("root"))}
    for block in reversed(_blocks(sch)):
        name = sch.get(block).name_hint
        if name in outputs or name in keep:
            continue
        if all(iv.iter_type == IterVar.DataPar for iv in sch.get(block).iter_vars):
            try:
                sch.compute_inline(block)
            except Exception:  # not inlineable (e.g. read by a reduction's init): keep it
                continue


# vectors per innermost chunk of a spatial nest: a gather (the patchify's reshape-transpose, a
# channel in every third float) computes each lane's address with divisions, which LLVM shares
# across a chunk; with one vector per chunk the tuner's records beat the default
# (benchmarks/README.md, "What makes the CPU code fast")
SPATIAL_VECTORS = 8


def _spatial(sch: Schedule, block: Any, m: Machine) -> None:
    """All loops fused, split by the largest divisor of the last extent up to SPATIAL_VECTORS
    SIMD vectors; the outer part parallel, the inner vectorised."""
    loops = sch.get_loops(block)
    if not loops:
        return
    last = int(sch.get(loops[-1]).extent)
    v = _largest_divisor(last, SPATIAL_VECTORS * m.lanes)
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    outer, inner = sch.split(fused, [None, v])
    sch.parallel(outer)
    if v > 1:
        sch.vectorize(inner)


def _innermost_vars(sch: Schedule, block: Any) -> list[Any]:
    """The variables of the last index of every buffer the block reads."""
    out = []
    for region in sch.get(block).reads:
        if region.region:
            out += list(undefined_vars(region.region[-1].min))
    return out


def _reduction(sch: Schedule, block: Any, m: Machine) -> None:
    kinds = _kinds(sch, block)
    spatial = [(lp, v) for lp, v, k in kinds if k == "S"]
    reduce = [(lp, v) for lp, v, k in kinds if k == "R"]
    if [k for _, _, k in kinds] != ["S"] * len(spatial) + ["R"] * len(reduce) or not reduce:
        raise ValueError("not spatial loops then reduction loops")
    inner = _innermost_vars(sch, block)
    last_s = spatial[-1] if spatial else None
    last_r = reduce[-1]
    if last_s is not None and any(v.same_as(last_s[1]) for v in inner):
        # column: vectorise along the contiguous output axis, the reduction outside it
        extent = int(sch.get(last_s[0]).extent)
        v = _largest_divisor(extent, m.lanes)
        so, sv = sch.split(last_s[0], [None, v])
        lead = [lp for lp, _ in spatial[:-1]] + [so]
        sch.reorder(*lead, *[lp for lp, _ in reduce], sv)
        sch.parallel(sch.fuse(*lead) if len(lead) > 1 else lead[0])
        if v > 1:
            sch.vectorize(sv)
        sch.decompose_reduction(block, reduce[0][0])
        return
    extent = int(sch.get(last_r[0]).extent)
    v = _largest_divisor(extent, m.lanes)
    if any(x.same_as(last_r[1]) for x in inner) and v > 1:
        # row: vector accumulators across the contiguous reduction axis (rfactor), then their sum
        _, ri = sch.split(last_r[0], [None, v])
        rf = sch.rfactor(ri, factor_axis=len(spatial))
        rf_loops = sch.get_loops(rf)
        if spatial:
            sch.parallel(sch.fuse(*rf_loops[:len(spatial)]) if len(spatial) > 1 else rf_loops[0])
        sch.vectorize(sch.get_loops(rf)[-1])
        sch.decompose_reduction(rf, sch.get_loops(rf)[1 if spatial else 0])
        loops = sch.get_loops(block)
        if spatial:
            sch.parallel(sch.fuse(*loops[:len(spatial)]) if len(spatial) > 1 else loops[0])
        return
    if spatial:  # neither axis contiguous: rows in parallel
        lead = [lp for lp, _ in spatial]
        sch.parallel(sch.fuse(*lead) if len(lead) > 1 else lead[0])


def gemm(sch: Schedule, m: Machine) -> bool:
    """gemm_space's micro-kernel, chosen by its register model."""
    found = gemm_space.find_gemm(sch)
    if found is None:
        return False
    candidate = gemm_space.default_candidate(found, m.vec, m.cores)
    if candidate is None:
        return False
    gemm_space.apply(sch, found, candidate, m.lanes)
    return True


def _along_rows(sch: Schedule, block: Any, k: Any) -> bool:
    """Whether `block` reads along `k`, and every buffer it reads along `k` has `k` in its last
    (contiguous) index only."""
    along = False
    for region in sch.get(block).reads:
        *outer, last = [undefined_vars(r.min) for r in region.region] or [[]]
        if any(v.same_as(k) for vs in outer for v in vs):
            return False
        along = along or any(v.same_as(k) for v in last)
    return along


def _reduces(sch: Schedule, block: Any) -> bool:
    return any(iv.iter_type == IterVar.CommReduce for iv in sch.get(block).iter_vars)


def rows(sch: Schedule, m: Machine) -> bool:
    """Row reductions computed at the output's row loop (module docstring)."""
    if not any(_reduces(sch, b) for b in _blocks(sch)):
        return False
    _inline_elementwise(sch, set())
    *producers, out = _blocks(sch)
    if not producers or any(iv.iter_type != IterVar.DataPar for iv in sch.get(out).iter_vars):
        return False
    for block in producers:  # each reduces one axis, the contiguous one of everything it reads along it
        kinds = _kinds(sch, block)
        if [k for *_, k in kinds].count("R") != 1 or kinds[-1][2] != "R" or not _along_rows(sch, block, kinds[-1][1]):
            return False
    loops = sch.get_loops(out)
    if len(loops) < 2:
        return False
    v = _largest_divisor(int(sch.get(loops[-1]).extent), m.lanes)
    row = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
    sch.vectorize(sch.split(loops[-1], [None, v])[1])
    sch.parallel(row)
    staged = []
    for block in producers:  # rfactor while each block has its own loop nest, then into the row
        _, lanes = sch.split(sch.get_loops(block)[-1], [None, v])
        staged += [sch.rfactor(lanes, factor_axis=len(sch.get(block).iter_vars) - 1), block]
    for block in reversed(staged):
        sch.compute_at(block, row)
    for rf in staged[0::2]:  # its loops under the row follow its iterators: the lanes', then k's
        realize = _realize(sch, rf)
        k = next(value for iv, value in zip(realize.block.iter_vars, realize.iter_values)
                 if iv.iter_type == IterVar.CommReduce)
        loops = sch.get_loops(rf)
        k_loop = next(lp for lp in loops if sch.get(lp).loop_var.same_as(k))
        lane_loop = next(lp for lp in reversed(loops) if not sch.get(lp).loop_var.same_as(k))
        sch.reorder(k_loop, lane_loop)
        sch.vectorize(lane_loop)
        sch.decompose_reduction(rf, k_loop)
    return True


def reduction(sch: Schedule, m: Machine) -> bool:
    blocks = _blocks(sch)
    if not any(_reduces(sch, b) for b in blocks):
        return False
    _inline_elementwise(sch, set())
    for block in _blocks(sch):
        if _reduces(sch, block):
            _reduction(sch, block, m)
        else:
            _spatial(sch, block, m)
    return True


def injective(sch: Schedule, m: Machine) -> bool:
    blocks = _blocks(sch)
    if any(iv.iter_type != IterVar.DataPar for b in blocks for iv in sch.get(b).iter_vars):
        return False
    _inline_elementwise(sch, set())
    for block in _blocks(sch):
        _spatial(sch, block, m)
    return True


def parallel_only(sch: Schedule, m: Machine) -> bool:
    done = False
    for block in _blocks(sch):
        kinds = _kinds(sch, block)
        lead = []
        for lp, _, kind in kinds:
            if kind != "S":
                break
            lead.append(lp)
        if lead:
            sch.parallel(sch.fuse(*lead) if len(lead) > 1 else lead[0])
            done = True
    return done


RULES: list[Rule] = [gemm, rows, reduction, injective, parallel_only]

# how every CPU kernel is lowered (the model build and tuning's candidates alike): LoopPartition
# peels off the iterations of a constant loop in which a `likely` guard (likely_guards) fails
BUILD_CONFIG = {"s_tir.LoopPartition": {"partition_const_loop": True}}


def likely_guards(sch: Schedule) -> Schedule:
    """`sch` with every block predicate marked `likely`. A split that does not divide its loop
    guards the block inside the innermost loops: a GEMM whose micro-tile's rows do not divide
    M (5 x 2 on the 49 tokens of the /32 presets) tested the last tile's rows at every k, and
    LLVM kept that branch in every tile's k loop, the guarded row's accumulators spilled to the
    stack (benchmarks/README.md, "Row tiles that do not divide M"). Marked likely,
    LoopPartition (`BUILD_CONFIG`) peels the last tile off: the full tiles run without a
    branch. The predicates are only rewritten, so the schedule's trace no longer replays to
    this module: call it on what gets built."""
    from tvm.s_tir.stmt import SBlockRealize
    from tvm.tirx import For, SeqStmt

    def guarded(stmt: Any) -> bool:
        return isinstance(stmt, SBlockRealize) and not isinstance(stmt.predicate, tvm.tirx.IntImm) \
            and not (isinstance(stmt.predicate, tvm.ir.expr.Call) and stmt.predicate.op.name == "prim.likely")

    for block in _blocks(sch):
        loops = sch.get_loops(block)
        if not loops:
            continue
        loop = sch.get(loops[-1])
        stmts = list(loop.body) if isinstance(loop.body, SeqStmt) else [loop.body]
        if not any(guarded(s) for s in stmts):
            continue
        stmts = [SBlockRealize(s.iter_values, _likely_terms(s.predicate), s.block) if guarded(s) else s for s in stmts]
        reuse = {s.block: s.block for s in stmts if isinstance(s, SBlockRealize)}
        body = SeqStmt(stmts) if len(stmts) > 1 else stmts[0]
        sch.state.replace(sch.get_sref(loops[-1]), For(loop.loop_var, loop.min, loop.extent, loop.kind, body,
                                                       loop.thread_binding, loop.annotations), reuse)
    return sch


def _likely_terms(predicate: Any) -> Any:
    """`predicate` with each term of its conjunction marked likely on its own."""
    from tvm.tirx import And, likely

    if isinstance(predicate, And):
        return And(_likely_terms(predicate.a), _likely_terms(predicate.b))
    return likely(predicate)


def build_kernel(mod: tvm.IRModule, target: Any) -> Any:
    """One scheduled kernel built as the model build lowers it (`likely_guards`, `BUILD_CONFIG`,
    the prefetches of cpu_prefetch.py):
    tuning's candidates and the benchmarks' kernels timed alone. Built without them, a tile with
    a predicated last row or column tile kept its guard in every k loop and timed far slower
    than in the model, so tuning ranked it wrongly
    (benchmarks/results/tiles_emeraldrapids_odd_c100_b3_tanh_before.md)."""
    mod = likely_guards(Schedule(mod)).mod
    with tvm.transform.PassContext(config=BUILD_CONFIG):
        return tvm.tirx.build(mod, target=target, pipeline=PIPELINE)


def default_schedule(sch: Schedule, m: Machine) -> tuple[Schedule, str] | None:
    """The first rule that schedules a copy of `sch`: (the schedule, the rule's name), or None."""
    for rule in RULES:
        copy = sch.copy()
        try:
            if rule(copy, m):
                return copy, getattr(rule, "__name__", "rule")
        except Exception:  # a primitive refused this kernel: the next rule
            continue
    return None
