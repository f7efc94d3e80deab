"""The IR forms of one model built for this CPU and timed side by side (what --choose-form does).

The matmul form (tokens-major GEMMs) is the fast form on CPUs; the conv form (token mixing as a
tied full-receptive-field depthwise conv, channel mixing as 1x1 convs: passes/pipeline.py) is
the paper's view and the one for conv-only runtimes (`export-onnx --form conv`). Built for a
CPU its convolutions run as GEMMs (passes/convs_as_gemms.py; before that pass, as TVM's generic
conv kernels). This measures what is left between the forms, per spec and batch, with the
shipped records applied to both.

    python benchmarks/bench_forms.py --specs mixer_s32 mixer_s16 --batches 1 8 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_cpu import machine, matrix_spec, tvm_heading, write_report  # noqa: E402


def form_times(spec_name: str, batch: int, gelu: str, target_name: str) -> dict[str, Any]:
    from mixer_compile.backend.target import get_target
    from mixer_compile.model.params import random_weights
    from mixer_compile.tune.choose_form import choose_form
    from mixer_compile.tune.database import open_union, shipped_db_dirs

    spec, target = matrix_spec(spec_name, batch, gelu), get_target(target_name)
    choice = choose_form(spec, random_weights(spec, 0), target, open_union(shipped_db_dirs(target)),
                         say=lambda line: print(f"  {spec_name} batch {batch}: {line.strip()}", flush=True))
    return {"spec": spec_name, "batch": batch, "gelu": gelu, "fastest": choice.form, "forms": choice.figures}


def markdown(report: dict[str, Any]) -> str:
    out = tvm_heading(report, "IR forms built for this CPU", "Each form built as `--choose-form` builds it "
                      "(shipped records applied) and timed by TVM's time evaluator, median of 5 calls after a "
                      "warm-up.") + [
           "| spec | batch | GELU | matmul ms | conv ms | conv / matmul | kernels from records (matmul, conv) |",
           "|---|---|---|---|---|---|---|"]
    for case in report["cases"]:
        f = case["forms"]
        ms = {name: f[name]["ms"] for name in ("matmul", "conv")}
        ratio = f"{ms['conv'] / ms['matmul']:.1f}x" if None not in ms.values() else "-"
        shown = {name: f"{v:.2f}" if v is not None else f"not timed ({f[name].get('note', '')})"
                 for name, v in ms.items()}
        out.append(f"| {case['spec']} | {case['batch']} | {case['gelu']} | {shown['matmul']} | {shown['conv']} | "
                   f"{ratio} | {f['matmul']['tuned']}, {f['conv']['tuned']} |")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", nargs="+", default=["mixer_s32", "mixer_s16"], help="presets, preset@PIXELS or files")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--gelu", choices=("erf", "tanh"), default="erf")
    ap.add_argument("--target", default="llvm")
    ap.add_argument("--tag", default="", help="suffix of the result files' names")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    from mixer_compile.machine import use_all_cores

    threads = use_all_cores()
    report: dict[str, Any] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                              "machine": machine(threads), "target": args.target,
                              "load_before": [round(v, 2) for v in os.getloadavg()]}
    report["cases"] = [form_times(s, b, args.gelu, args.target) for s in args.specs for b in args.batches]
    report["load_after"] = [round(v, 2) for v in os.getloadavg()]
    stem = f"forms_{report['machine']['llvm_cpu']}" + (f"_{args.tag}" if args.tag else "")
    write_report(Path(args.out), stem, report, markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
