"""Every micro-tile of a model's GEMMs timed alone on this CPU, the register model's default marked.

The default tile (`gemm_space.default_candidate`) is a model of the core; tuning measures the
candidates of `gemm_space.candidates`. When the defaults lose on a CPU (to a tuning record, to
a peer), this says which tile would have won each GEMM and by how much: the data a change to
the model needs. Each GEMM kernel of the model (as the build fuses it) is scheduled with every
candidate and with the default, built alone as tuning builds a candidate, and timed in turn
on random inputs, `--repeat` rounds, medians; GFLOP/s of the GEMM alone (epilogue not counted).

    python benchmarks/bench_tiles.py --spec mixer_b16 --batch 1 --out benchmarks/results
    python benchmarks/bench_tiles.py --spec mixer_l16 --tiles 14x2   # and a tile the space leaves out
    python benchmarks/bench_tiles.py --spec mixer_h14 --kernels matmul2 --k-blocks 0 512 1024 2560
    TVM_NUM_THREADS=1 python benchmarks/bench_tiles.py --spec mixer_s32 --cold
The third: the default tile alone, with K in blocks of each size given that divides K (0: no
blocks), against the default's own (`gemm_space.k_block`). The last: on one thread, each call
after the weights are flushed from the caches, as a batch-1 model whose weights outgrow the
caches meets them (file name `..._cold_1thread`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_cpu import matrix_spec, threads_suffix, tvm_heading, write_report  # noqa: E402
from bench_kernels import interleaved_medians, kernel_timer, model_options, new_report, random_args  # noqa: E402
from mixer_compile.backend.target import get_target  # noqa: E402


def _label(c: Any) -> str:
    return f"{c.mr}x{c.nv}{'' if c.c_outer else ' (A outer)'}{f' k{c.kc}' if c.kc else ''}"


def tile_times(spec_name: str, batch: int, gelu: str, target_name: str, repeat: int,
               extra: list[tuple[int, int]], kernels: str = "", k_blocks: list[int] | None = None,
               cold: bool = False) -> list[dict[str, Any]]:
    """Per GEMM kernel (those whose name contains `kernels`): its shape, the default tile, and
    GFLOP/s of every candidate (and of the `extra` mr x nv tiles that fit it), fastest first; or,
    given `k_blocks`, of the default tile with K in each of those blocks. `cold`: each call with
    the weights flushed from the caches first (bench_kernels.kernel_timer)."""
    from tvm.s_tir import Schedule

    from mixer_compile.backend import cpu, gemm_space
    from mixer_compile.compose import compose

    target = get_target(target_name)
    m = cpu.machine(target)
    fused = cpu.prepare(compose(matrix_spec(spec_name, batch, gelu), target).module, target)
    rows = []
    for gv, func in fused.functions.items():
        if not cpu.is_kernel(func) or kernels not in gv.name_hint:
            continue
        sch = Schedule(func)
        gemm = gemm_space.find_gemm(sch)
        space = gemm_space.candidates(gemm, m.vec, m.cores) if gemm is not None else []
        if not space:
            continue
        default = gemm_space.default_candidate(gemm, m.vec, m.cores)
        asked = [gemm_space.with_decision(gemm, gemm_space.Decision(mr, nv, True), m.vec, m.cores) for mr, nv in extra]
        if k_blocks is not None:
            space, asked = [dataclasses.replace(default, kc=kc) for kc in k_blocks if kc == 0 or gemm.k % kc == 0], []
        timers = {}
        for c in dict.fromkeys([default, *space, *filter(None, asked)]):
            scheduled = sch.copy()
            gemm_space.apply(scheduled, gemm, c, m.lanes)
            timers[_label(c)] = kernel_timer(scheduled.mod["main"], target, cold)
        medians = interleaved_medians(timers, random_args(func), repeat)
        gflop = 2 * gemm.batch * gemm.m * gemm.n * gemm.k / 1e9
        ranked = sorted(medians, key=medians.get)
        rows.append({"kernel": gv.name_hint, "batch": gemm.batch, "m": gemm.m, "n": gemm.n, "k": gemm.k,
                     "default": _label(default),
                     "tiles": [{"tile": t, "ms": medians[t], "gflops": gflop / medians[t] * 1e3} for t in ranked]})
    return rows


def markdown(report: dict[str, Any]) -> str:
    if report.get("k_blocks") is not None:
        what = (f"The default tile (*) with K in blocks of {', '.join(map(str, report['k_blocks']))} (0: none) "
                f"where they divide K, and its own (`gemm_space.k_block`)")
    else:
        what = (f"Every candidate of `gemm_space.candidates`, the default (*) and the tiles asked for "
                f"({', '.join(report['tiles']) or 'none'})")
    kernels = f", kernels matching `{report['kernels']}`" if report.get("kernels") else ""
    kernels += ", each call with the weights flushed from the caches first (cold)" if report.get("cold") else ""
    out = tvm_heading(report, f"GEMM tiles of {report['spec']} at batch {report['batch']} ({report['gelu']} GELU)",
                      f"{what}{kernels}, each kernel built alone and timed in turn, "
                      f"{report['repeat']} rounds, medians; GFLOP/s of the GEMM alone.") + [
           "| kernel | M x N x K (batch) | default | best | default / best | tiles by GFLOP/s |", "|---|---|---|---|---|---|"]
    for r in report["gemms"]:
        tiles = r["tiles"]
        default = next(t for t in tiles if t["tile"] == r["default"])
        ranked = "  ".join(f"{t['tile']}{'*' if t['tile'] == r['default'] else ''} {t['gflops']:.0f}" for t in tiles)
        out.append(f"| {r['kernel'][:32]} | {r['m']} x {r['n']} x {r['k']} ({r['batch']}) | {r['default']} "
                   f"{default['gflops']:.0f} | {tiles[0]['tile']} {tiles[0]['gflops']:.0f} | "
                   f"{default['ms'] / tiles[0]['ms']:.2f}x | {ranked} |")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = model_options(__doc__.splitlines()[0], batch=1, repeat=7)
    ap.add_argument("--tiles", nargs="*", default=[], metavar="MRxNV",
                    help="more tiles to time where they fit (e.g. 14x2: a default of an earlier model)")
    ap.add_argument("--kernels", default="", help="only the kernels whose name contains this (e.g. matmul2)")
    ap.add_argument("--k-blocks", nargs="*", type=int, metavar="KC",
                    help="time the default tile with K in these blocks instead of the candidates (0: no blocks)")
    ap.add_argument("--cold", action="store_true",
                    help="each call with the weights flushed from the caches first, as a batch-1 model runs them")
    args = ap.parse_args()
    report = {**new_report(args), "tiles": args.tiles, "kernels": args.kernels, "k_blocks": args.k_blocks,
              "cold": args.cold}
    extra = [tuple(int(v) for v in t.lower().split("x")) for t in args.tiles]
    report["gemms"] = tile_times(args.spec, args.batch, args.gelu, args.target, args.repeat, extra,
                                 args.kernels, args.k_blocks, args.cold)
    report["load_after"] = [round(v, 2) for v in os.getloadavg()]
    study = "kblocks" if args.k_blocks is not None else "tiles"
    stem = f"{study}_{report['machine']['llvm_cpu']}_{Path(args.spec).stem}_b{args.batch}_{args.gelu}"
    stem += ("_cold" if args.cold else "") + threads_suffix(report["machine"])
    write_report(Path(args.out), stem, report, markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
