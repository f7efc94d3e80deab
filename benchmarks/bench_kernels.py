"""Every kernel of a model timed alone on this CPU: its default schedule against the shipped record's.

A model's time is the sum of its kernels'. When the defaults and the shipped records (or two
revisions of the default rules) differ by a percent or two on the whole model, this says which
kernel differs, by how much, and with which GEMM tile. Each kernel is scheduled as the model
build schedules it (`cpu.schedule_kernels`: the default rules only, then the shipped records
only), built alone as tuning builds a candidate, and timed on random inputs with TVM's time
evaluator; the two builds of a kernel are timed in turn, `--repeat` rounds, medians.

    python benchmarks/bench_kernels.py --spec mixer_b16 --batch 8 --gelu erf --out benchmarks/results
    python benchmarks/bench_kernels.py --spec mixer_s16 --batch 8 --without batch_as_rows

With `--without PASS` the second build is not the shipped records' but the defaults' of the
model built without that pass (bench_cpu.py's ablation, kernel by kernel; `prefetch_next_panel`:
the same kernels lowered without their prefetches): kernels paired in order, each timed on
inputs of its own shapes; a pass that changes the kernels' number is refused.

With `--cold` alone the second column is the defaults again, each call timed after the caches are
flushed of every argument but the first (TVM's `cache_flush_cpu_non_first_arg`: a GEMM's
weights come from DRAM, its activations from cache). That is what a model pays at batch 1 when
its weights exceed the caches, and what a kernel timed warm, its weights left in cache by the
call before, hides.

    python benchmarks/bench_kernels.py --spec mixer_s32 --batch 1 --cold

With both, `--without PASS --cold`, both builds are timed cold: what a pass is worth at batch 1
(`prefetch_next_panel`, the prefetch of the next weight panels, is for exactly that).

    python benchmarks/bench_kernels.py --spec mixer_s32 --batch 1 --without prefetch_next_panel --cold
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_cpu import ABLATIONS, machine, matrix_spec, threads_suffix, tvm_heading, without_pass, write_report  # noqa: E402
from mixer_compile.backend.target import get_target  # noqa: E402


def kernel_timer(func: Any, target: Any, cold: bool = False) -> Callable[..., Any]:
    """`func` (one scheduled kernel) built alone as the model build lowers it, and its timer;
    `cold`: 20 calls, each after the caches are flushed of all arguments but the first (the flush
    runs once per repeat, so each repeat is one call)."""
    import tvm

    from mixer_compile.backend.cpu_schedules import build_kernel

    lib = build_kernel(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target.tvm_target())
    if cold:
        return lib.time_evaluator("main", tvm.cpu(), number=1, repeat=20, f_preproc="cache_flush_cpu_non_first_arg")
    return lib.time_evaluator("main", tvm.cpu(), number=1, repeat=1, min_repeat_ms=50)


def random_args(func: Any) -> list[Any]:
    """Random inputs (and outputs) for a kernel, seed 0."""
    import tvm
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    rng = np.random.default_rng(0)
    return [tvm.runtime.tensor(rng.standard_normal([int(d) for d in a.shape]).astype(a.dtype), tvm.cpu())
            for a in ArgInfo.from_prim_func(func)]


def interleaved_medians(timers: dict[str, Callable[..., Any]], args: list[Any] | dict[str, list[Any]],
                        repeat: int) -> dict[str, float]:
    """Median ms per call of each build, timed in turn `repeat` rounds: load drifts hit all alike.
    `args`: the inputs of all, or each build's own (by label)."""
    samples: dict[str, list[float]] = {label: [] for label in timers}
    for _ in range(repeat):
        for label, timer in timers.items():
            samples[label].append(timer(*(args[label] if isinstance(args, dict) else args)).mean * 1e3)
    return {label: statistics.median(v) for label, v in samples.items()}


def kernel_times(spec_name: str, batch: int, gelu: str, target_name: str, repeat: int,
                 form: str = "matmul", without: str | None = None, cold: bool = False) -> list[dict[str, Any]]:
    """Per kernel: calls per forward, ms per call by the defaults and by the other build (the
    shipped records, the defaults without pass `without`, or the defaults timed `cold`), and the
    GEMM tile each chose."""
    from mixer_compile.backend import cpu
    from mixer_compile.compose import compose, model_tasks
    from mixer_compile.tune.database import open_union, shipped_db_dirs

    spec, target = matrix_spec(spec_name, batch, gelu), get_target(target_name)
    fused = cpu.prepare(compose(spec, target, form).module, target)
    calls = {t.name: t.calls for t in model_tasks(spec, target, form)}
    other = second_build(without, cold)
    if without is None:  # the same kernels: under the shipped records, or the defaults again (cold)
        modules = {"defaults": fused, other: fused}
        databases = {} if cold else {other: open_union(shipped_db_dirs(target))}
    else:
        with without_pass(without):
            ablated = cpu.prepare(compose(spec, target, form).module, target)
        modules, databases = {"defaults": fused, other: ablated}, {}
    scheduled = {label: cpu.schedule_kernels(f, target, databases.get(label)) for label, f in modules.items()}
    kernels = {label: [gv.name_hint for gv, func in f.functions.items() if cpu.is_kernel(func)]
               for label, f in modules.items()}
    if len(kernels["defaults"]) != len(kernels[other]):
        raise SystemExit(f"without {without} the model has {len(kernels[other])} kernels, not "
                         f"{len(kernels['defaults'])}: no pairs to time")
    rows = []
    for names in zip(*kernels.values()):
        name = dict(zip(modules, names))
        timers = {}
        for label, (mod, _) in scheduled.items():  # the lowering's own steps (the prefetch) ablated at the build
            with without_pass(without) if label == "without" else contextlib.nullcontext():
                timers[label] = kernel_timer(mod[name[label]], target, cold=cold and (label == "cold" or without is not None))
        # one set of inputs where both builds are of the same kernel, else each its own shapes
        args = random_args(fused[name["defaults"]]) if without is None else \
            {label: random_args(f[name[label]]) for label, f in modules.items()}
        medians = interleaved_medians(timers, args, repeat)
        row = {"kernel": name["defaults"], "calls": calls.get(name["defaults"], 1)}
        for label, (_, applied) in scheduled.items():
            row[f"{label}_ms"] = medians[label]
            tile = applied.gemms.get(name[label])
            row[f"{label}_tile"] = f"{tile.mr}x{tile.nv}" if tile else None
            row[f"{label}_from"] = "record" if name[label] in applied.tuned else "default"
        rows.append(row)
    return rows


def second_build(without: str | None, cold: bool = False) -> str:
    """The label of a report's second build (its rows' keys): the shipped records', the
    defaults' without a pass, or the defaults' timed with cold caches."""
    return "without" if without else "cold" if cold else "shipped"


def markdown(report: dict[str, Any]) -> str:
    rows, other = report["kernels"], second_build(report.get("without"), report.get("cold", False))
    title = {"cold": "cold caches", "without": f"without `{report.get('without')}`"}.get(other, "shipped")
    if other == "without" and report.get("cold"):
        title += " (both cold)"
    total = {k: sum(r[f"{k}_ms"] * r["calls"] for r in rows) for k in ("defaults", other)}
    out = tvm_heading(report, f"Kernels of {report['spec']} at batch {report['batch']} ({report['gelu']} GELU)",
                      f"Each kernel built alone from the model build's schedule, defaults and {title} timed in "
                      f"turn, {report['repeat']} rounds, medians.") + [
           f"| kernel | calls | defaults ms | tile | {title} ms | from | tile | {title} / defaults | x calls, ms |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['kernel'][:60]} | {r['calls']} | {r['defaults_ms']:.3f} | {r['defaults_tile'] or '-'} | "
                   f"{r[other + '_ms']:.3f} | {r[other + '_from']} | {r[other + '_tile'] or '-'} | "
                   f"{r[other + '_ms'] / r['defaults_ms']:.2f}x | "
                   f"{(r[other + '_ms'] - r['defaults_ms']) * r['calls']:+.2f} |")
    out += ["", f"Sum over a forward (kernels alone, calls counted): defaults {total['defaults']:.1f} ms, "
            f"{title} {total[other]:.1f} ms ({total[other] / total['defaults']:.3f}x)."]
    return "\n".join(out) + "\n"


def model_options(description: str, batch: int, repeat: int) -> argparse.ArgumentParser:
    """The options of a benchmark of one model's kernels on this CPU (this one, bench_tiles)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--spec", default="mixer_b16", help="preset, or preset@PIXELS")
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--gelu", choices=("erf", "tanh"), default="erf")
    ap.add_argument("--target", default="llvm")
    ap.add_argument("--repeat", type=int, default=repeat)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    return ap


def new_report(args: argparse.Namespace) -> dict[str, Any]:
    """A report's header: when, on what machine (all its cores in use), which model and target."""
    from mixer_compile.machine import use_all_cores

    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(use_all_cores()), "target": args.target, "spec": args.spec, "batch": args.batch,
            "gelu": args.gelu, "repeat": args.repeat, "load_before": [round(v, 2) for v in os.getloadavg()]}


def main() -> int:
    ap = model_options(__doc__.splitlines()[0], batch=8, repeat=15)
    ap.add_argument("--form", choices=("matmul", "conv"), default="matmul")
    ap.add_argument("--without", choices=ABLATIONS, metavar="PASS",
                    help="against the defaults built without PASS instead of the shipped records")
    ap.add_argument("--cold", action="store_true",
                    help="alone: against the defaults timed with the weights flushed from the caches before each "
                         "call; with --without: both builds timed so")
    args = ap.parse_args()
    report = new_report(args)
    report["without"], report["cold"] = args.without, args.cold
    report["kernels"] = kernel_times(args.spec, args.batch, args.gelu, args.target, args.repeat, args.form,
                                     args.without, args.cold)
    report["load_after"] = [round(v, 2) for v in os.getloadavg()]
    stem = f"kernels_{report['machine']['llvm_cpu']}_{Path(args.spec).stem}_b{args.batch}_{args.gelu}"
    stem += f"_{args.form}" if args.form != "matmul" else ""
    stem += (f"_without_{args.without}" if args.without else "") + ("_cold" if args.cold else "")
    stem += threads_suffix(report["machine"])
    write_report(Path(args.out), stem, report, markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
