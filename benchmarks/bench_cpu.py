"""Our compiled Mixer against PyTorch eager, torch.compile and ONNX Runtime on this CPU, in one run.

For each spec and batch (default mixer_s16 and mixer_b16, batches 1 and 8): our module built
for `--target` (default llvm, the host CPU) with the tuning records a compile finds by itself
(the user cache merged with the shipped `schedules/`; default schedules for kernels without
one), validated by the compile; the same
random weights (seed 0) in a PyTorch Mixer (`tests/torch_model.py`, timm's names) run eager, through
torch.compile, and exported with torch.onnx to ONNX Runtime. All run with `--threads` threads
(default: the physical cores) on the same input.

Timing: after warm-up, `--repeat` rounds; each round times one call of every implementation
in turn (interleaved, so machine load drifts hit all alike; each after a pause and an untimed
call of its own, see `interleaved`) and one 2048^3 matmul by torch.mm and by ONNX Runtime: the
faster is the sgemm ceiling. Reported: median, spread (min-max and IQR), GFLOP/s, ratio to the fastest
peer and to the ceiling, the load average before and after. Plus, from the tuning records,
a per-kernel breakdown (best measured time x calls against the share of FLOPs) and, when
`--trials-db` points at a full tuning database, the model latency the records predict after
k trials per kernel.

    python benchmarks/bench_cpu.py --out benchmarks/results
    python benchmarks/bench_cpu.py --specs tiny.json --batches 2 --repeat 3   # smoke run

Matrix mode (`--matrix`, issue #13): every preset (S/32 ... L/16) at batches 1, 3 and 8, erf
and tanh GELU, plus a non-preset spec (B/16 at 160 px), each built twice by `cpu.build`: with
defaults only (no user cache, no shipped records: every kernel scheduled by the default rules
and gemm_space's register model) and with the shipped records only; against ONNX Runtime on
the PyTorch Mixer with timm's module names (`torch.onnx.export`, same weights and GELU) and
torch.compile. Nothing is left out because it is slow; `--specs/--batches/--gelus/--peers`
pick a subset that fits the machine's time; `--dtypes float16 bfloat16` adds our defaults in those
storage dtypes, `--without PASS...` our defaults built without those passes of the pipeline
(passes/pipeline.py) or without the CPU lowering's prefetches (`prefetch_next_panel`,
backend/cpu_prefetch.py): an ablation, what each is worth, side by side in the same run. Every
output is checked against ONNX Runtime's.

    python benchmarks/bench_cpu.py --matrix --specs mixer_s16 mixer_b16 --batches 1 8 --gelus erf \
        --peers onnxruntime --repeat 5
    python benchmarks/bench_cpu.py --matrix --specs mixer_s32 --batches 8 --without batch_as_rows
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mixer_compile.compiler import CompileOptions, compile_model  # noqa: E402
from mixer_compile.util.progress import Progress  # noqa: E402
from mixer_compile.model.spec import MixerSpec, load_spec  # noqa: E402
from mixer_compile.backend.target import TargetInfo, get_target  # noqa: E402
from mixer_compile.model.params import random_weights  # noqa: E402
from mixer_compile.passes.pipeline import PASSES  # noqa: E402

SGEMM_N = 2048
PAUSE_S = 0.3  # before each timed call: the previous implementation's spinning threads park (interleaved)
PEERS = ("pytorch_eager", "torch_compile", "onnxruntime")


def machine(threads: int) -> dict[str, Any]:
    import onnxruntime
    import torch
    import tvm

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu": model, "llvm_cpu": str(tvm.target.codegen.llvm_get_system_cpu()),
            "logical_cpus": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "tvm": tvm.__version__,
            "os": platform.platform()}


def ours(spec: MixerSpec, target: str, work: Path) -> tuple[Callable[[np.ndarray], Any] | None, dict[str, Any]]:
    """Our module for `spec`, or None (with the reason) when some kernel got no schedule at all."""
    from mixer_compile import runtime

    result = compile_model(CompileOptions(spec=spec, target=target, out_dir=work / spec.fingerprint()),
                           Progress(7, quiet=True))
    tuning = result.metadata.tuning or {}
    info = {"validation": result.validation.summary(), "tuning": tuning,
            "compile_s": sum(result.timings.values())}
    if tuning.get("untuned"):
        return None, info
    model = runtime.load(result.artifact)
    return model, info


def onnxruntime_session(model: Any, x: np.ndarray, path: Path,
                        providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> Callable[[], Any]:
    """`model` as `torch.onnx.export` writes it (what a user of timm would deploy), run by ONNX
    Runtime (on as many threads as torch uses; `providers`: bench_gpu.py asks for CUDA)."""
    import onnxruntime as ort
    import torch

    with torch.inference_mode():
        torch.onnx.export(model, (torch.from_numpy(x),), str(path), dynamo=False, input_names=["image"],
                          opset_version=17)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=list(providers))
    return lambda: session.run(None, {"image": x})[0]


def in_inference_mode(fn: Callable[[Any], Any], xt: Any) -> Callable[[], Any]:
    import torch

    def call() -> Any:
        with torch.inference_mode():
            return fn(xt)

    return call


def torch_compiled(model: Any) -> Any:
    """`torch.compile(model)` from an empty dynamo cache: every Mixer built in one run shares one
    `forward`, and past dynamo's recompile limit (8) the next model would silently run eager."""
    import torch

    torch._dynamo.reset()
    return torch.compile(model)


def peers(spec: MixerSpec, weights: dict[str, np.ndarray], x: np.ndarray, work: Path) -> dict[str, Callable]:
    import torch

    from tests.torch_model import torch_mixer  # the repository's PyTorch Mixer with timm's names

    model = torch_mixer(spec, weights)
    xt = torch.from_numpy(x)
    return {"pytorch_eager": in_inference_mode(model, xt), "torch_compile": in_inference_mode(torch_compiled(model), xt),
            "onnxruntime": onnxruntime_session(model, x, work / f"{spec.fingerprint()}.onnx")}


def sgemms(threads: int) -> dict[str, Callable[[], Any]]:
    """One SGEMM_N^3 float32 matmul by torch.mm and by ONNX Runtime's MatMul (MLAS): the
    ceiling is the faster of the two, since neither library is the fastest everywhere (here
    torch.mm reaches 150-230 GFLOP/s, MLAS 410-470)."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    a, b = torch.randn(SGEMM_N, SGEMM_N), torch.randn(SGEMM_N, SGEMM_N)
    tensor = [SGEMM_N, SGEMM_N]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "sgemm",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, tensor) for n in "ab"],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, tensor)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                   .SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {"a": a.numpy(), "b": b.numpy()}
    return {"sgemm_torch": lambda: torch.mm(a, b), "sgemm_onnxruntime": lambda: session.run(None, feeds)}


def interleaved(fns: dict[str, Callable[[], Any]], repeat: int, warmup: int) -> dict[str, list[float]]:
    """Each timed call comes after a pause and one untimed call of the same implementation:
    ONNX Runtime, OpenMP (torch) and TVM all keep their worker threads spinning for a while
    after a call, and on 2 cores those spinning threads slowed whichever implementation came
    next by up to 2x. A served model is called after itself, which is what this measures."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            time.sleep(PAUSE_S)
            fn()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def stats(samples: list[float], flops: float) -> dict[str, float]:
    q = np.percentile(samples, [25, 75])
    median = statistics.median(samples)
    return {"median_ms": median * 1e3, "min_ms": min(samples) * 1e3, "max_ms": max(samples) * 1e3,
            "iqr_ms": float(q[1] - q[0]) * 1e3, "gflops": flops / median / 1e9, "runs": len(samples)}


def kernel_breakdown(spec: MixerSpec, target: TargetInfo) -> list[dict[str, Any]]:
    """Best measured time of every tuned kernel x its calls, against its share of the FLOPs."""
    from mixer_compile.compose import model_tasks
    from mixer_compile.tune.database import has_records, open_union, shipped_db_dirs, user_db_dir
    from mixer_compile.tune.tasks import best_latency

    db = open_union([d for d in (user_db_dir(target), *shipped_db_dirs(target)) if has_records(d)])
    tasks = model_tasks(spec, target)
    total_flops = sum(t.total_flops for t in tasks)
    rows = []
    for t in tasks:
        best = best_latency(db, t.mod, target) if db is not None else None
        rows.append({"kernel": t.name, "calls": t.calls, "mflop_per_call": t.flops / 1e6,
                     "flop_share": t.total_flops / total_flops if total_flops else 0.0,
                     "ms_per_call": best * 1e3 if best else None,
                     "ms_total": best * 1e3 * t.calls if best else None,
                     "gflops": t.flops / best / 1e9 if best and t.flops else None})
    known = sum(r["ms_total"] or 0.0 for r in rows)
    for r in rows:
        r["time_share"] = (r["ms_total"] or 0.0) / known if known else None
    return rows


def trials_curve(spec: MixerSpec, target: TargetInfo, db_dirs: list[Path], points: list[int]) -> list[dict[str, Any]]:
    """Model latency predicted by the records after the first k trials of every kernel, summed
    over kernels x calls. Read from the record files, which are appended in measurement order
    (TVM's loader returns them sorted by speed)."""
    import tvm_ffi
    from tvm.s_tir.meta_schedule.database import Workload

    from mixer_compile.compose import model_tasks
    from mixer_compile.tune.database import scan

    tasks = model_tasks(spec, target)
    runs: dict[int, list[float]] = {}
    for d in db_dirs:
        lines = scan(d)
        keys = [tvm_ffi.structural_hash(Workload.from_json(json.loads(w)).mod) for w in lines.workloads]
        for line in lines.records:
            index, record = json.loads(line)
            secs = [float(x) for x in record[1] or []]
            ok = secs and max(secs) < 1e9
            runs.setdefault(keys[index], []).append(sum(secs) / len(secs) if ok else float("inf"))
    curve = []
    for k in points:
        total, complete = 0.0, True
        for t in tasks:
            best = min(runs.get(tvm_ffi.structural_hash(t.mod), [])[:k], default=float("inf"))
            complete &= best != float("inf")
            total += best * t.calls
        curve.append({"trials_per_kernel": k, "model_ms": total * 1e3 if complete else None})
    return curve


def write_report(out: Path, stem: str, report: dict[str, Any], text: str) -> None:
    """A run's results as `stem`.json (everything measured) and `stem`.md (its tables) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(text)


def built_for(report: dict[str, Any]) -> str:
    """The LLVM CPU our module was built for: the machine's own unless `--target` named another ISA."""
    return report["target"].get("mcpu", report["machine"]["llvm_cpu"])


def threads_phrase(machine: dict[str, Any]) -> str:
    """'1 thread', '2 threads': a results file says how many threads ran it."""
    return f"{machine['threads']} thread{'s' if machine['threads'] != 1 else ''}"


def threads_suffix(machine: dict[str, Any]) -> str:
    """'_1thread' for a result file's name when a run used fewer threads than the machine's
    cores (TVM_NUM_THREADS), so it does not overwrite the all-cores run's file; else ''."""
    from mixer_compile.machine import physical_cores

    return "" if machine["threads"] == physical_cores() else "_" + threads_phrase(machine).replace(" ", "")


def tvm_heading(report: dict[str, Any], title: str, method: str) -> list[str]:
    """The first lines of a results file of our kernels alone: the machine, the target, how
    they were timed, the load."""
    m = report["machine"]
    return [f"# {title}: {m['cpu']} ({m['llvm_cpu']}), {threads_phrase(m)}; target `{report['target']}`", "",
            f"{report['date']}; TVM {m['tvm']}. {method} Load average before {report['load_before']}, after "
            f"{report['load_after']}.", ""]


def heading(report: dict[str, Any], title: str) -> list[str]:
    """The first lines of a results file: the machine, the software, the load."""
    m = report["machine"]
    return [f"# {title}: {m['cpu']} ({m['llvm_cpu']}), {threads_phrase(m)}; ours built for `{built_for(report)}`",
            "", f"{report['date']}; torch {m['torch']}, onnxruntime {m['onnxruntime']}, TVM {m['tvm']}. Load "
            f"average before {report['load_before']}, after {report['load_after']} (a shared machine: figures move "
            f"between runs). {report['repeat']} interleaved rounds, "]


def markdown(report: dict[str, Any]) -> str:
    out = heading(report, "CPU benchmark")
    out[-1] += (f"median and spread per implementation. sgemm ceiling: the faster of torch.mm and ONNX Runtime's "
                f"MatMul, {SGEMM_N}^3, in the same run.")
    out.append("")
    for case in report["cases"]:
        out += [f"## {case['spec']} batch {case['batch']} ({case['gflop']:.2f} GFLOP per call)", "",
                f"ours: {case['ours']['validation']}; {_tuned(case['ours'])}; "
                f"sgemm ceiling {case['sgemm']['gflops']:.0f} GFLOP/s ({case['sgemm']['by']}; "
                + ", ".join(f"{k} {v:.0f}" for k, v in case['sgemm']['all_gflops'].items()) + ")", "",
                "| implementation | median ms | min-max ms | IQR ms | GFLOP/s | vs fastest peer | of sgemm |",
                "|---|---|---|---|---|---|---|"]
        for name, s in case["results"].items():
            out.append(f"| {name} | {s['median_ms']:.2f} | {s['min_ms']:.2f}-{s['max_ms']:.2f} | {s['iqr_ms']:.2f} "
                       f"| {s['gflops']:.1f} | {s['vs_fastest_peer']:.2f}x | {s['of_sgemm']:.0%} |")
        if case.get("kernels"):
            out += ["", "Per kernel (best tuned time x calls, from the records):", "",
                    "| kernel | calls | MFLOP/call | FLOP share | ms total | time share | GFLOP/s |", "|---|---|---|---|---|---|---|"]
            for r in case["kernels"]:
                ms = f"{r['ms_total']:.2f}" if r["ms_total"] is not None else "no record"
                gf = f"{r['gflops']:.1f}" if r["gflops"] else "-"
                ts = f"{r['time_share']:.0%}" if r["time_share"] is not None else "-"
                out.append(f"| {r['kernel']} | {r['calls']} | {r['mflop_per_call']:.1f} | {r['flop_share']:.1%} "
                           f"| {ms} | {ts} | {gf} |")
        if case.get("curve"):
            out += ["", "Model latency predicted from the records after k trials per kernel:", "",
                    "| k | " + " | ".join(str(p["trials_per_kernel"]) for p in case["curve"]) + " |",
                    "|---" * (len(case["curve"]) + 1) + "|",
                    "| ms | " + " | ".join(f"{p['model_ms']:.1f}" if p["model_ms"] else "-" for p in case["curve"]) + " |"]
        out.append("")
    return "\n".join(out)


def _tuned(info: dict[str, Any]) -> str:
    t = info.get("tuning") or {}
    return (f"{t.get('kernels', '?')} kernels: {len(t.get('tuned', []))} from records, "
            f"{len(t.get('defaults', []))} default schedules") + (
        "" if not t.get("untuned") else f" (not timed: unscheduled {', '.join(t['untuned'])})")


CURVE_POINTS = [1, 2, 4, 8, 16, 24, 32]


def refresh_curves(path: Path, db_dirs: list[Path], target: TargetInfo) -> int:
    report = json.loads(path.read_text())
    for case in report["cases"]:
        case["curve"] = trials_curve(load_spec(case["spec"], batch=case["batch"]), target, db_dirs, CURVE_POINTS)
    path.write_text(json.dumps(report, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown(report))
    return 0


MATRIX_SPECS = ["mixer_s32", "mixer_s16", "mixer_b32", "mixer_b16", "mixer_l32", "mixer_l16", "mixer_b16@160"]
MATRIX_BATCHES = [1, 3, 8]
MATRIX_GELUS = ["erf", "tanh"]


def matrix_spec(name: str, batch: int, gelu: str) -> MixerSpec:
    """A preset, or `preset@PIXELS` for the preset at another (square) image size."""
    base, _, pixels = name.partition("@")
    spec = load_spec(base, batch=batch)
    if pixels:
        spec = spec.replace(image_size=(int(pixels), int(pixels)), name=f"{spec.name}@{pixels}")
    return spec.replace(gelu=gelu)


# what `--without` may leave out: the graph passes, and the CPU lowering's prefetches (backend/cpu_prefetch.py)
ABLATIONS = [*PASSES, "prefetch_next_panel"]


def without_pass(name: str) -> Any:
    """A context in which the build leaves pass `name` out (it returns its input unchanged)."""
    from mixer_compile.backend import cpu_prefetch

    if name in PASSES:
        return mock.patch.dict(PASSES, {name: lambda graph, ctx: (graph, [])})
    return mock.patch.object(cpu_prefetch, "prefetch_next_panel", lambda func: func)


def matrix_case(name: str, batch: int, gelu: str, target: TargetInfo, peer_names: list[str], repeat: int,
                warmup: int, work: Path, dtypes: tuple[str, ...] = (), without: tuple[str, ...] = ()) -> dict[str, Any]:
    import torch
    import tvm

    from mixer_compile.backend import cpu
    from mixer_compile.backend.runner import Runner
    from mixer_compile.compose import compose
    from mixer_compile.tune.database import open_union, shipped_db_dirs
    from tests.torch_model import torch_mixer

    spec = matrix_spec(name, batch, gelu)
    weights = random_weights(spec, 0)
    x = np.random.default_rng(1).standard_normal((batch, 3, *spec.image_size)).astype(np.float32)
    case: dict[str, Any] = {"spec": name, "batch": batch, "gelu": gelu, "image": list(spec.image_size),
                            "gflop": spec.flops_per_image() * batch / 1e9, "builds": {}}
    fns: dict[str, Callable[[], Any]] = {}
    model = compose(spec, target, weights=weights)
    params = list(model.params.values())
    for label, database in (("ours_defaults", None), ("ours_shipped", open_union(shipped_db_dirs(target)))):
        applied: list[Any] = []
        start = time.perf_counter()
        executable = cpu.build(model.module, target, database, on_applied=applied.append)
        seconds = time.perf_counter() - start
        run = Runner(executable, tvm.cpu(), params, "this CPU").function()
        fns[label] = lambda run=run: run(x)
        case["builds"][label] = {"build_s": seconds, "applied": applied[0].to_dict(),
                                 "summary": applied[0].summary()}
        print(f"  {label}: built in {seconds:.1f} s; {applied[0].summary()}", file=sys.stderr, flush=True)

    def defaults(composed: Any) -> Callable[[], Any]:  # a variant of ours, default schedules only
        executable = cpu.build(composed.module, target)
        run = Runner(executable, tvm.cpu(), list(composed.params.values()), "this CPU").function()
        return lambda: run(x)

    for dtype in dtypes:  # half-precision storage, defaults only: the same model as a user's --dtype build
        fns[f"ours_{dtype}"] = defaults(compose(spec, target, dtype=dtype, weights=weights))
    for pass_name in without:  # the defaults without a pass (an ablation)
        with without_pass(pass_name):
            fns[f"ours_without_{pass_name}"] = defaults(compose(spec, target, weights=weights))
    tm = torch_mixer(spec, weights)
    xt = torch.from_numpy(x)
    fns["onnxruntime"] = onnxruntime_session(tm, x, work / f"{spec.fingerprint()}.onnx")
    if "torch_compile" in peer_names:
        fns["torch_compile"] = in_inference_mode(torch_compiled(tm), xt)
        start = time.perf_counter()
        fns["torch_compile"]()
        case["torch_compile_s"] = time.perf_counter() - start
    reference = np.asarray(fns["onnxruntime"](), np.float64)
    case["rel_error_vs_ort"] = {k: float(np.abs(np.asarray(fns[k]() if k != "torch_compile" else
                                                          fns[k]().numpy(), np.float64) - reference).max()
                                         / np.abs(reference).max())
                                for k in fns if k != "onnxruntime"}
    if without:
        case["without"] = list(without)
    print(f"  timing {', '.join(fns)}", file=sys.stderr, flush=True)
    times = interleaved(fns, repeat, warmup)
    flops = spec.flops_per_image() * batch
    case["results"] = {k: stats(v, flops) for k, v in times.items()}
    ort_ms = case["results"]["onnxruntime"]["median_ms"]
    for r in case["results"].values():
        r["vs_onnxruntime"] = r["median_ms"] / ort_ms
    print("  " + ", ".join(f"{k} {v['median_ms']:.1f} ms" for k, v in case["results"].items()), file=sys.stderr)
    return case


def matrix_markdown(report: dict[str, Any]) -> str:
    out = heading(report, "CPU matrix")
    out[-1] += ("medians. `defaults`: no user cache and no shipped records (every kernel by the default rules); "
                "`shipped`: the shipped records only (`schedules/`); ONNX Runtime runs the PyTorch Mixer with timm's "
                "names exported by torch.onnx (same weights and GELU). Build: `cpu.build` wall time (legalize, "
                "schedule, LLVM). Ratios are to ONNX Runtime; max rel. error is against ONNX Runtime's logits.")
    dtypes = sorted({k.removeprefix("ours_") for c in report["cases"] for k in c["results"]} & {"float16", "bfloat16"})
    if dtypes:
        out[-1] += (f" {' and '.join(dtypes)}: our defaults with that storage dtype (sums in float32), against "
                    "ONNX Runtime in float32; max rel. error is of the float32 builds.")
    ablations = list(dict.fromkeys(p for c in report["cases"] for p in c.get("without", [])))
    if ablations:
        out[-1] += (f" Without {', '.join(f'`{p}`' for p in ablations)}: our defaults built with that pass left out, "
                    "and the defaults' time over that build's (below 1: the pass pays).")
    out += ["", "| spec | batch | GELU | defaults ms | shipped ms | ONNX Runtime ms | torch.compile ms | defaults / ORT "
            "| shipped / ORT | defaults / shipped | shipped records | build s (defaults) | max rel. error |"
            + "".join(f" {d} ms (/ ORT) |" for d in dtypes) + "".join(f" without {p} ms (defaults / it) |" for p in ablations),
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * (len(dtypes) + len(ablations))]
    for c in report["cases"]:
        r = c["results"]

        def ms(k: str) -> str:
            return f"{r[k]['median_ms']:.1f}" if k in r else "-"

        shipped = c["builds"]["ours_shipped"]["applied"]
        tc = ms("torch_compile") + (f" (compile {c['torch_compile_s']:.0f} s)" if "torch_compile_s" in c else "")
        out.append(f"| {c['spec']} | {c['batch']} | {c['gelu']} | {ms('ours_defaults')} | {ms('ours_shipped')} "
                   f"| {ms('onnxruntime')} | {tc} | {r['ours_defaults']['vs_onnxruntime']:.2f}x "
                   f"| {r['ours_shipped']['vs_onnxruntime']:.2f}x "
                   f"| {r['ours_defaults']['median_ms'] / r['ours_shipped']['median_ms']:.2f}x "
                   f"| {len(shipped['tuned'])}/{shipped['kernels']} "
                   f"| {c['builds']['ours_defaults']['build_s']:.1f} "
                   f"| {max(v for k, v in c['rel_error_vs_ort'].items() if k.removeprefix('ours_') not in dtypes):.1e} |"
                   + "".join(f" {ms('ours_' + d)} ({r['ours_' + d]['vs_onnxruntime']:.2f}x) |" if 'ours_' + d in r
                             else " - |" for d in dtypes)
                   + "".join(f" {ms('ours_without_' + p)} "
                             f"({r['ours_defaults']['median_ms'] / r['ours_without_' + p]['median_ms']:.2f}x) |"
                             if 'ours_without_' + p in r else " - |" for p in ablations))
    if report.get("first_compile"):
        f = report["first_compile"]
        out += ["", f"First compile of {f['spec']} batch {f['batch']} without records (`mixer-compile compile`, "
                f"a fresh process, empty cache, no shipped records): {f['seconds']:.1f} s wall."]
    return "\n".join(out) + "\n"


def first_compile(spec_name: str, batch: int, target: str) -> dict[str, Any]:
    """Wall time of a whole `compile_model` (weights, graph, build, validation) in a fresh process
    with an empty cache and no shipped records."""
    import subprocess

    code = ("import sys, time, tempfile, os; from pathlib import Path; t0 = time.perf_counter(); "
            "import mixer_compile.tune.database as d; d.SCHEDULES_DIR = Path(tempfile.mkdtemp()); "
            "os.environ['MIXER_COMPILE_CACHE'] = tempfile.mkdtemp(); "
            "from mixer_compile.compiler import CompileOptions, compile_model; "
            "from mixer_compile.model.spec import load_spec; from mixer_compile.util.progress import Progress; "
            f"r = compile_model(CompileOptions(spec=load_spec('{spec_name}', batch={batch}), target='{target}'), "
            "Progress(5, quiet=True)); "
            "print(time.perf_counter() - t0, r.validation.passed, r.metadata.tuning.get('defaults') is not None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    seconds, passed, _ = out.stdout.split()[-3:]
    return {"spec": spec_name, "batch": batch, "seconds": float(seconds), "validated": passed == "True"}


def matrix_main(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    os.environ["TVM_NUM_THREADS"] = str(threads)
    target = get_target(args.target)
    report: dict[str, Any] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                              "machine": machine(threads), "target": target.config, "repeat": args.repeat,
                              "load_before": [round(v, 2) for v in os.getloadavg()], "cases": []}
    specs = args.specs if args.specs_given else MATRIX_SPECS
    batches = args.batches if args.batches_given else MATRIX_BATCHES
    out = Path(args.out)
    stem = f"cpu_matrix_{report['machine']['llvm_cpu']}" + (f"_{args.tag}" if args.tag else "")
    threads = threads_suffix(report["machine"])
    if not stem.endswith(threads):  # a --tag may say it already (older results)
        stem += threads
    if args.first_compile:
        print("first compile of mixer_b16 batch 1 without records", file=sys.stderr, flush=True)
        report["first_compile"] = first_compile("mixer_b16", 1, args.target)
    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as tmp:
        for name in specs:
            for batch in batches:
                for gelu in args.gelus:
                    print(f"{name} batch {batch} {gelu}", file=sys.stderr, flush=True)
                    report["cases"].append(matrix_case(name, batch, gelu, target, args.peers, args.repeat,
                                                       args.warmup, Path(tmp), tuple(args.dtypes),
                                                       tuple(args.without)))
                    report["load_after"] = [round(v, 2) for v in os.getloadavg()]
                    write_report(out, stem, report, matrix_markdown(report))  # kept as it grows
    print(matrix_markdown(report))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--matrix", action="store_true", help="the defaults/shipped/peers matrix (module docstring)")
    ap.add_argument("--gelus", nargs="+", default=MATRIX_GELUS, choices=MATRIX_GELUS)
    ap.add_argument("--peers", nargs="+", default=["onnxruntime", "torch_compile"],
                    choices=["onnxruntime", "torch_compile"], help="matrix mode: the peers timed")
    ap.add_argument("--dtypes", nargs="*", default=[], choices=["float16", "bfloat16"],
                    help="matrix mode: also our defaults with these storage dtypes")
    ap.add_argument("--without", nargs="*", default=[], metavar="PASS", choices=ABLATIONS,
                    help="matrix mode: also our defaults built without each PASS (passes/pipeline.py, or "
                         "prefetch_next_panel: backend/cpu_prefetch.py)")
    ap.add_argument("--tag", default="", help="matrix mode: suffix of the result files' names (one per subset run)")
    ap.add_argument("--first-compile", action="store_true",
                    help="matrix mode: also time a whole first compile of Mixer-B/16 without records")
    ap.add_argument("--specs", nargs="+", default=["mixer_s16", "mixer_b16"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--target", default="llvm")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--trials-db", nargs="+", help="full tuning databases for the latency-vs-trials curve")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--curves-only", metavar="JSON", help="recompute the latency-vs-trials curves of a "
                    "results file from --trials-db and rewrite it (no timing)")
    args = ap.parse_args()
    args.specs_given = "--specs" in sys.argv
    args.batches_given = "--batches" in sys.argv
    if args.matrix:
        return matrix_main(args)
    if args.curves_only:
        return refresh_curves(Path(args.curves_only), [Path(d) for d in args.trials_db or []], get_target(args.target))

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    os.environ["TVM_NUM_THREADS"] = str(threads)  # every implementation on the same cores (threads.py)
    target = get_target(args.target)
    report: dict[str, Any] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                              "machine": machine(threads), "target": target.config, "repeat": args.repeat,
                              "load_before": [round(v, 2) for v in os.getloadavg()], "cases": []}
    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as tmp:
        work = Path(tmp)
        for name in args.specs:
            for batch in args.batches:
                spec = load_spec(name, batch=batch)
                weights = random_weights(spec, 0)
                spec = spec.with_gelu_for("random")
                x = np.random.default_rng(1).standard_normal((batch, 3, *spec.image_size)).astype(np.float32)
                kernels = kernel_breakdown(spec, target)
                print(f"{spec.fingerprint()}: building", file=sys.stderr, flush=True)
                model, info = ours(spec, args.target, work)  # kernels without a record get default schedules
                fns = peers(spec, weights, x, work)
                if model is not None:
                    fns = {"mixer-compile": lambda m=model: m(x), **fns}
                fns.update(sgemms(threads))
                print(f"{spec.fingerprint()}: timing {', '.join(fns)}", file=sys.stderr, flush=True)
                times = interleaved(fns, args.repeat, args.warmup)
                flops = spec.flops_per_image() * batch
                ceilings = {k: stats(times.pop(k), 2 * SGEMM_N**3) for k in ("sgemm_torch", "sgemm_onnxruntime")}
                best = max(ceilings, key=lambda k: ceilings[k]["gflops"])
                sg = {**ceilings[best], "by": best.removeprefix("sgemm_"),
                      "all_gflops": {k.removeprefix("sgemm_"): v["gflops"] for k, v in ceilings.items()}}
                results = {k: stats(v, flops) for k, v in times.items()}
                fastest = min(results[p]["median_ms"] for p in PEERS)
                for s in results.values():
                    s["vs_fastest_peer"] = s["median_ms"] / fastest
                    s["of_sgemm"] = s["gflops"] / sg["gflops"]
                case = {"spec": name, "batch": batch, "gflop": flops / 1e9, "ours": info, "sgemm": sg,
                        "results": results, "kernels": kernels}
                if args.trials_db:
                    case["curve"] = trials_curve(spec, target, [Path(d) for d in args.trials_db], CURVE_POINTS)
                report["cases"].append(case)
                print("  " + ", ".join(f"{k} {v['median_ms']:.1f} ms" for k, v in results.items()), file=sys.stderr)
    report["load_after"] = [round(v, 2) for v in os.getloadavg()]
    machine_cpu, isa = report["machine"]["llvm_cpu"], built_for(report)  # a file per machine and target ISA
    write_report(Path(args.out), f"cpu_{machine_cpu}" + ("" if isa == machine_cpu else f"_target_{isa}"), report,
                 markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
