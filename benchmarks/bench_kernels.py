"""Every kernel of a model timed alone on this CPU: its default schedule against the shipped record's.

A model's time is the sum of its kernels'. When the defaults and the shipped records (or two
revisions of the default rules) differ by a percent or two on the whole model, this says which
kernel differs, by how much, and with which GEMM tile. Each kernel is scheduled as the model
build schedules it (`cpu.schedule_kernels`: the default rules only, then the shipped records
only), built alone as tuning builds a candidate, and timed on random inputs with TVM's time
evaluator; the two builds of a kernel are timed in turn, `--repeat` rounds, medians.

    python benchmarks/bench_kernels.py --spec mixer_b16 --batch 8 --gelu erf --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_cpu import machine, matrix_spec, tvm_heading, write_report  # noqa: E402
from mixer_compile.backend.target import get_target  # noqa: E402


def kernel_timer(func: Any, target: Any) -> Callable[..., Any]:
    """`func` (one scheduled kernel) built alone as the model build lowers it, and its timer."""
    import tvm

    from mixer_compile.backend.cpu_schedules import build_kernel

    lib = build_kernel(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target.tvm_target())
    return lib.time_evaluator("main", tvm.cpu(), number=1, repeat=1, min_repeat_ms=50)


def random_args(func: Any) -> list[Any]:
    """Random inputs (and outputs) for a kernel, seed 0."""
    import tvm
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    rng = np.random.default_rng(0)
    return [tvm.runtime.tensor(rng.standard_normal([int(d) for d in a.shape]).astype(a.dtype), tvm.cpu())
            for a in ArgInfo.from_prim_func(func)]


def interleaved_medians(timers: dict[str, Callable[..., Any]], args: list[Any], repeat: int) -> dict[str, float]:
    """Median ms per call of each build, timed in turn `repeat` rounds: load drifts hit all alike."""
    samples: dict[str, list[float]] = {label: [] for label in timers}
    for _ in range(repeat):
        for label, timer in timers.items():
            samples[label].append(timer(*args).mean * 1e3)
    return {label: statistics.median(v) for label, v in samples.items()}


def kernel_times(spec_name: str, batch: int, gelu: str, target_name: str, repeat: int,
                 form: str = "matmul") -> list[dict[str, Any]]:
    """Per kernel: calls per forward, ms per call by the defaults and by the shipped records, and
    the GEMM tile each chose."""
    from mixer_compile.backend import cpu
    from mixer_compile.compose import compose, model_tasks
    from mixer_compile.tune.database import open_union, shipped_db_dirs

    spec, target = matrix_spec(spec_name, batch, gelu), get_target(target_name)
    fused = cpu.prepare(compose(spec, target, form).module, target)
    calls = {t.name: t.calls for t in model_tasks(spec, target, form)}
    builds = {label: cpu.schedule_kernels(fused, target, db)
              for label, db in (("defaults", None), ("shipped", open_union(shipped_db_dirs(target))))}
    rows = []
    for gv, func in fused.functions.items():
        if not cpu.is_kernel(func):
            continue
        args = random_args(func)
        timers = {label: kernel_timer(mod[gv.name_hint], target) for label, (mod, _) in builds.items()}
        medians = interleaved_medians(timers, args, repeat)
        row = {"kernel": gv.name_hint, "calls": calls.get(gv.name_hint, 1)}
        for label, (_, applied) in builds.items():
            row[f"{label}_ms"] = medians[label]
            tile = applied.gemms.get(gv.name_hint)
            row[f"{label}_tile"] = f"{tile.mr}x{tile.nv}" if tile else None
            row[f"{label}_from"] = "record" if gv.name_hint in applied.tuned else "default"
        rows.append(row)
    return rows


def markdown(report: dict[str, Any]) -> str:
    rows = report["kernels"]
    total = {k: sum(r[f"{k}_ms"] * r["calls"] for r in rows) for k in ("defaults", "shipped")}
    out = tvm_heading(report, f"Kernels of {report['spec']} at batch {report['batch']} ({report['gelu']} GELU)",
                      "Each kernel built alone from the model build's schedule, defaults and shipped timed in "
                      f"turn, {report['repeat']} rounds, medians.") + [
           "| kernel | calls | defaults ms | tile | shipped ms | from | tile | shipped / defaults | x calls, ms |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['kernel'][:60]} | {r['calls']} | {r['defaults_ms']:.3f} | {r['defaults_tile'] or '-'} | "
                   f"{r['shipped_ms']:.3f} | {r['shipped_from']} | {r['shipped_tile'] or '-'} | "
                   f"{r['shipped_ms'] / r['defaults_ms']:.2f}x | "
                   f"{(r['shipped_ms'] - r['defaults_ms']) * r['calls']:+.2f} |")
    out += ["", f"Sum over a forward (kernels alone, calls counted): defaults {total['defaults']:.1f} ms, "
            f"shipped {total['shipped']:.1f} ms ({total['shipped'] / total['defaults']:.3f}x)."]
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
    args = ap.parse_args()
    report = new_report(args)
    report["kernels"] = kernel_times(args.spec, args.batch, args.gelu, args.target, args.repeat, args.form)
    report["load_after"] = [round(v, 2) for v in os.getloadavg()]
    stem = f"kernels_{report['machine']['llvm_cpu']}_{Path(args.spec).stem}_b{args.batch}_{args.gelu}"
    stem += f"_{args.form}" if args.form != "matmul" else ""
    write_report(Path(args.out), stem, report, markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
