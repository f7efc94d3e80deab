"""Software prefetch of a GEMM's next weight panel, added to the CPU kernels at lowering.

At batch 1 each weight serves few rows (49 on the /32 presets) and a call streams every weight
from DRAM once: a kernel timed warm, its weights left in cache by the call before, hides what a
model pays (benchmarks/README.md, "The next panel prefetched"). The micro-kernel re-reads its B
panel once per row tile, so only the first row tile of each column tile waits on DRAM while
the others run from cache. Here the row tiles of one column tile fetch the next column tile's
panels meanwhile, so that more of the stream overlaps the FMAs (what it gains, measured:
benchmarks/README.md).
gemm_space.apply marks the loop over row tiles (`ROW_TILES`: the distance in elements from
one column tile's panels to the next, and how many row tiles prefetch, `gemm_space.prefetch_rows`:
as many as it takes to cover the next panels, as far as L2 holds them beside the current ones)
where B is a weight read in panels in place; `prefetch_next_panel` then rewrites the lowered
kernel:

- the marked loop in two: its first row tiles prefetch in their k loop, after the FMAs, the
  vector a distance and a row tile's share (row tile x K x lanes) past the first one the FMAs
  read, one vector of B per k step; the other row tiles run as before (a prefetch of a line
  already in cache still takes a load slot: on B/16's 28 row tiles, every row tile
  prefetching cost more than it saved);
- the accumulators of that k loop on the stack. TVM places an allocation of 1 KB or more (an
  AVX-512 tile's 20 vectors are 1.25 KB) in a workspace from its allocator; LLVM cannot tell
  that memory from the weights, takes the prefetch (which it models as touching its argument's
  memory) as a possible write to it, and then keeps the accumulators in memory across every k
  step: a tile ran 2x slower. On the stack they stay in registers.

The rewrite runs after TVM's own TIR pipeline (`PIPELINE`, registered with TVM by name),
before the host finalisation that lowers allocations: the model build and every kernel built
alone (tuning's candidates, the benchmarks) go through it.
"""

from __future__ import annotations

import math
from typing import Any

import tvm
import tvm_ffi
from tvm import tirx
from tvm.tirx import stmt as S

# loop annotation: [elements from one column tile's panels to the next, row tiles that prefetch them]
ROW_TILES = "mixer_compile.prefetch_next_panel"
STACK_BYTES = 4096  # accumulators up to this stay on the stack (a micro-tile holds at most 32 vectors)
PIPELINE = "mixer_compile.cpu"
_LOCALITY = 2  # prefetcht1: into L2, where the next panel waits; L1 is the current panel's
_DISABLE_LOWER_BUILTIN = "disable_lower_builtin"  # tirx::transform::kDisableLowerTVMBuiltin


def _all(node: Any, kind: Any) -> list[Any]:
    found: list[Any] = []
    tvm_ffi.structural_walk(node, [(kind, found.append)])
    return found


def _panel_load(k_loop: Any, allocated: set[str]) -> Any | None:
    """The first vector load of B in a micro-kernel's k loop: the innermost loop that stores
    only to buffers the kernel allocates (its accumulators; an epilogue stores to the output)
    and reads a ramp of a buffer it does not (a weight panel passed in, not a stage)."""
    stores = _all(k_loop.body, S.BufferStore)
    if _all(k_loop.body, S.For) or not stores or any(s.buffer.name not in allocated for s in stores):
        return None
    loads = [x for x in _all(k_loop.body, tvm.ir.TensorLoad)
             if len(x.indices) == 1 and isinstance(x.indices[0], tvm.ir.prim.expr.Ramp)
             and x.source.name not in allocated]
    return loads[0] if loads else None


def _with_prefetch(row_tiles: Any, allocated: set[str], accumulators: set[str]) -> Any:
    """The marked loop over row tiles in two, the first part prefetching (module docstring);
    the accumulators its k loop stores to are added to `accumulators`."""
    plain = {k: v for k, v in row_tiles.annotations.items() if k != ROW_TILES}
    loop = S.For(row_tiles.loop_var, row_tiles.min, row_tiles.extent, row_tiles.kind, row_tiles.body,
                 row_tiles.thread_binding, plain)
    k_loops = [(f, load) for f in _all(row_tiles.body, S.For) if (load := _panel_load(f, allocated)) is not None]
    starts = isinstance(row_tiles.min, tirx.IntImm) and int(row_tiles.min) == 0  # not a tile LoopPartition peeled off
    if len(k_loops) != 1 or not starts or not isinstance(row_tiles.extent, tirx.IntImm):
        return loop
    (k_loop, load), = k_loops
    accumulators.update(s.buffer.name for s in _all(k_loop.body, S.BufferStore))
    ramp = load.indices[0]
    step = int(k_loop.extent) * ramp.lanes  # one row tile's share: a vector of B per k step
    distance, rows = (int(v) for v in row_tiles.annotations[ROW_TILES])
    first = min(rows, int(row_tiles.extent))
    row = tirx.Var(row_tiles.loop_var.name + "_ahead", row_tiles.loop_var.ty)
    address = tirx.address_of(tirx.BufferLoad(load.source, [ramp.base + distance + row * step]))
    prefetch = S.Evaluate(tirx.call_llvm_intrin("void", "llvm.prefetch.p0", address, tirx.IntImm("int32", 0),
                                                tirx.IntImm("int32", _LOCALITY), tirx.IntImm("int32", 1)))

    def add(f: Any) -> Any:
        if not f.same_as(k_loop):
            return f
        body = list(f.body.seq) if isinstance(f.body, S.SeqStmt) else [f.body]
        return S.For(f.loop_var, f.min, f.extent, f.kind, S.SeqStmt([*body, prefetch]), f.thread_binding, f.annotations)

    ahead = tvm_ffi.structural_map(row_tiles.body, [(S.For, add)])
    ahead = tvm_ffi.structural_map(ahead, [(tvm.ir.expr.Var, lambda v: row if v.same_as(row_tiles.loop_var) else v)])
    parts = [S.For(row, row_tiles.min, first, row_tiles.kind, ahead, row_tiles.thread_binding, plain)]
    if first < int(row_tiles.extent):
        parts.append(S.For(row_tiles.loop_var, first, int(row_tiles.extent) - first, row_tiles.kind,
                           row_tiles.body, row_tiles.thread_binding, plain))
    return S.SeqStmt(parts) if len(parts) > 1 else parts[0]


def _on_stack(alloc: Any, accumulators: set[str]) -> Any:
    """An accumulator allocation kept on the stack (module docstring)."""
    buffer = alloc.buffer
    if buffer.name not in accumulators or not all(isinstance(d, tirx.IntImm) for d in buffer.shape):
        return alloc
    if tvm.runtime.DataType(str(buffer.dtype)).itemsize * math.prod(int(d) for d in buffer.shape) > STACK_BYTES:
        return alloc
    return S.AllocBuffer(buffer, {**dict(alloc.annotations), _DISABLE_LOWER_BUILTIN: tirx.IntImm("int32", 1)})


def prefetch_next_panel(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """`func` with the prefetches its marked loops ask for (module docstring)."""
    if func.body is None or not any(ROW_TILES in f.annotations for f in _all(func.body, S.For)):
        return func
    allocated = {a.buffer.name for a in _all(func.body, S.AllocBuffer)}
    accumulators: set[str] = set()

    def mark(loop: Any) -> Any:
        return _with_prefetch(loop, allocated, accumulators) if ROW_TILES in loop.annotations else loop

    body = tvm_ffi.structural_map(func.body, [(S.For, mark)], order="pre")
    body = tvm_ffi.structural_map(body, [(S.AllocBuffer, lambda a: _on_stack(a, accumulators))])
    return func.with_body(body)


def _pipeline() -> tuple[Any, Any, Any]:
    lower, host, device = tvm.tirx.get_tir_pipeline("s_tir")
    rewrite = tvm.tirx.transform.prim_func_pass(lambda f, _m, _c: prefetch_next_panel(f), opt_level=0,
                                                name="mixer_compile.PrefetchNextPanel")
    # the row tiles' two loops define the same variables (the lowered body's lets) twice: ConvertSSA renames
    return tvm.transform.Sequential([lower, rewrite, tvm.tirx.transform.ConvertSSA()]), host, device


tvm.tirx.compilation_pipeline.register_tir_pipeline(PIPELINE, _pipeline)
