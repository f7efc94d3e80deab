"""Serving a batch range: one range artifact against fixed-batch artifacts and ONNX Runtime,
and a soak run of the loaded artifact under load from many threads.

    python benchmarks/bench_serving.py speed --out benchmarks/results             # ~10 min here
    TVM_NUM_THREADS=1 python benchmarks/bench_serving.py speed --reuse            # one thread each
    python benchmarks/bench_serving.py soak --duration 120 --out benchmarks/results

`speed`: for `--spec` (default mixer_s16, random weights seed 0), builds ONE artifact for
`--range` (default 1-16) and one fixed-batch artifact for each of `--batches` (default 1, 3, 8,
16), all with the same compile driver the CLI uses and the records it finds by itself; the same
weights in a timm-structured PyTorch Mixer exported with `torch.onnx.export` with a dynamic batch
axis, run by ONNX Runtime. At each batch, rounds interleave the three (bench_cpu.interleaved:
a pause and an untimed call before each timed call); median, spread and the ratios
range/fixed and range/ONNX Runtime are reported, with compile times and library sizes. Threads:
TVM_NUM_THREADS for ours and ONNX Runtime alike (default: every CPU); on a loaded shared machine
one thread each is the steadier comparison (spinning thread pools suffer most from contention).

`soak`: loads the range artifact (built by `speed`, or built here) and runs it from
`--threads` (8) threads: a warm-up where all threads run each entry batch at once (TVM's pooled
allocator is shared by the VMs and keeps freed buffers by size, so it then holds as many of
each as can be in use together), then `--duration` seconds of calls, each on a random one of
`--inputs` inputs with mixed batch sizes across the range. Every output must equal (bit for bit)
the single-threaded output of the same input. Resident memory (VmRSS) is sampled every second
after the warm-up; "flat" means it grew no more than `--rss-slack-mib` during the second half of
the run (a pool filling up stops; a leak does not), and the growth over the whole run is
reported too. Any error, mismatch or late growth fails the run (exit 1).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_cpu import interleaved, machine, stats, threads_phrase, write_report  # noqa: E402

from mixer_compile.compiler import CompileOptions, compile_model  # noqa: E402
from mixer_compile.model.params import random_weights  # noqa: E402
from mixer_compile.model.spec import MixerSpec, load_spec, parse_batch  # noqa: E402
from mixer_compile.util.progress import Progress  # noqa: E402


def torch_mixer(spec: MixerSpec, weights: dict[str, np.ndarray]) -> Any:
    """The timm-structured PyTorch Mixer (module and parameter names as timm's MlpMixer)."""
    from tests.torch_model import torch_mixer as make

    return make(spec, weights)


def build(spec: MixerSpec, batches: tuple[int, int], out: Path, reuse: bool = False) -> tuple[Any, dict[str, Any]]:
    from mixer_compile import runtime

    if reuse and (out / "info.json").is_file():  # a previous run's build, and what it recorded
        return runtime.load(out / "artifact"), json.loads((out / "info.json").read_text())
    start = time.perf_counter()
    result = compile_model(CompileOptions(spec=spec.replace(batch=batches[1]), out_dir=out / "artifact",
                                          batches=batches), Progress(7, quiet=True))
    info = {"compile_s": round(time.perf_counter() - start, 1), "validation": result.metadata.validation,
            "library_bytes": (out / "artifact" / "model.so").stat().st_size, "batch": result.metadata.batch,
            "tuning": {k: (len(v) if isinstance(v, list) else v) for k, v in (result.metadata.tuning or {}).items()
                       if k in ("kernels", "tuned", "defaults", "untuned")}}
    (out / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return runtime.load(out / "artifact"), info


def onnx_session(spec: MixerSpec, weights: dict[str, np.ndarray], path: Path, threads: int) -> Any:
    import onnxruntime as ort
    import torch

    model = torch_mixer(spec, weights)
    x = torch.zeros((1, spec.in_channels, *spec.image_size))
    with torch.inference_mode():
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def speed(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    low, high = parse_batch(args.range)
    batches = [int(b) for b in args.batches.split(",")]
    work = Path(args.work)
    weights = random_weights(spec.replace(gelu=spec.resolved_gelu), 0)
    threads = int(os.environ.get("TVM_NUM_THREADS") or os.cpu_count() or 1)
    print(f"building {spec.name} for batches {low}-{high} and fixed {batches} in {work}", file=sys.stderr)
    ranged, range_info = build(spec, (low, high), work / f"{spec.name}-range-{low}-{high}", args.reuse)
    fixed, fixed_info = {}, {}
    for b in batches:
        fixed[b], fixed_info[b] = build(spec, (b, b), work / f"{spec.name}-b{b}", args.reuse)
    session = onnx_session(spec, weights, work / f"{spec.name}-dynamic.onnx", threads)
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(threads), "spec": spec.name, "range": [low, high],
        "range_artifact": range_info, "fixed_artifacts": {str(b): i for b, i in fixed_info.items()},
        "load_before": list(os.getloadavg()), "results": {}}
    for b in batches:
        x = np.random.default_rng(b).standard_normal((b, spec.in_channels, *spec.image_size), dtype=np.float32)
        outs = {"range": ranged(x), "fixed": fixed[b](x), "onnxruntime": session.run(None, {"image": x})[0]}
        agree = {k: float(np.abs(v - outs["fixed"]).max() / np.abs(outs["fixed"]).max()) for k, v in outs.items()}
        fns: dict[str, Callable[[], Any]] = {
            "range": lambda x=x: ranged(x), "fixed": lambda x=x, b=b: fixed[b](x),
            "onnxruntime": lambda x=x: session.run(None, {"image": x})}
        times = interleaved(fns, args.repeat, warmup=1)
        flops = spec.flops_per_image() * b
        row = {k: stats(v, flops) for k, v in times.items()}
        row["split"] = "+".join(map(str, ranged.batches.split(b)))
        row["range_vs_fixed"] = row["range"]["median_ms"] / row["fixed"]["median_ms"]
        row["range_vs_onnxruntime"] = row["range"]["median_ms"] / row["onnxruntime"]["median_ms"]
        row["max_rel_difference_vs_fixed"] = agree
        report["results"][str(b)] = row
        print(f"batch {b} ({row['split']}): range {row['range']['median_ms']:.1f} ms, fixed "
              f"{row['fixed']['median_ms']:.1f} ms, onnxruntime {row['onnxruntime']['median_ms']:.1f} ms",
              file=sys.stderr)
    report["load_after"] = list(os.getloadavg())
    threads_tag = threads_phrase(report["machine"]).replace(" ", "")  # '1thread', '8threads'
    stem = f"serving_{report['machine']['llvm_cpu']}_{spec.name}_{threads_tag}"
    write_report(Path(args.out), stem, report, speed_markdown(report))
    print(f"wrote {Path(args.out) / stem}.json and .md", file=sys.stderr)
    return 0


def speed_markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    low, high = r["range"]
    ra = r["range_artifact"]
    lines = [f"# Serving a batch range: {r['spec']}, one artifact for batches {low}-{high}", "",
             f"{r['date']}; {m['cpu']} (LLVM cpu `{m['llvm_cpu']}`), {m['threads']} threads; TVM {m['tvm']}, "
             f"onnxruntime {m['onnxruntime']}, torch {m['torch']}, Python {m['python']}. Load average before "
             f"{[round(v, 2) for v in r['load_before']]}, after {[round(v, 2) for v in r['load_after']]} (a shared "
             "machine: figures move between runs). Rounds interleave the three implementations; each timed call "
             "follows a pause and an untimed call of its own.", "",
             f"Range artifact: entries {', '.join(map(str, ra['batch']['entries']))} "
             f"(functions {', '.join(ra['batch']['functions'])}); compiled in {ra['compile_s']:.0f} s; "
             f"library {ra['library_bytes'] / 1e6:.1f} MB; validated at batches "
             f"{', '.join(str(v['batch']) for v in ra['validation'].get('batches', []))} "
             f"(max rel. error {ra['validation']['max_rel_error']:.1e}). ONNX Runtime runs timm's structure "
             "exported by `torch.onnx.export` with a dynamic batch axis, the same weights.", "",
             "| batch | split | range ms (median) | fixed-batch ms | ONNX Runtime ms | range / fixed | "
             "range / ORT | fixed artifact: compile s, library MB |",
             "|---|---|---|---|---|---|---|---|"]
    for b, row in r["results"].items():
        f = r["fixed_artifacts"][b]
        lines.append(f"| {b} | {row['split']} | {row['range']['median_ms']:.1f} "
                     f"({row['range']['min_ms']:.1f}-{row['range']['max_ms']:.1f}) | "
                     f"{row['fixed']['median_ms']:.1f} ({row['fixed']['min_ms']:.1f}-{row['fixed']['max_ms']:.1f}) | "
                     f"{row['onnxruntime']['median_ms']:.1f} ({row['onnxruntime']['min_ms']:.1f}-"
                     f"{row['onnxruntime']['max_ms']:.1f}) | {row['range_vs_fixed']:.2f}x | "
                     f"{row['range_vs_onnxruntime']:.2f}x | {f['compile_s']:.0f}, {f['library_bytes'] / 1e6:.1f} |")
    lines += ["", "Runs per cell: " + ", ".join(f"batch {b}: {row['range']['runs']}" for b, row in r["results"].items())
              + ". Outputs of the range artifact vs the fixed one (max |diff| / max |fixed|): "
              + ", ".join(f"batch {b}: {row['max_rel_difference_vs_fixed']['range']:.1e}"
                          for b, row in r["results"].items()) + ".", ""]
    return "\n".join(lines)


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def soak(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    low, high = parse_batch(args.range)
    model, _ = build(spec, (low, high), Path(args.work) / f"{spec.name}-range-{low}-{high}", reuse=True)
    rng = np.random.default_rng(0)
    sizes = sorted({low, high, *(int(v) for v in rng.integers(low, high + 1, size=args.inputs - 2))})
    inputs = [rng.standard_normal((n, spec.in_channels, *spec.image_size), dtype=np.float32) for n in sizes]
    expected = [model(x) for x in inputs]  # single-threaded, this thread's VM
    entries = list(model.batches.entries)
    warm_inputs = [rng.standard_normal((n, spec.in_channels, *spec.image_size), dtype=np.float32) for n in entries]
    warm_expected = [model(x) for x in warm_inputs]
    barrier = threading.Barrier(args.threads + 1)
    counts = [0] * args.threads
    images = [0] * args.threads
    problems: list[str] = []
    lock = threading.Lock()
    stop = [float("inf")]

    def check(i: int, out: np.ndarray, want: np.ndarray) -> None:
        if not np.array_equal(out, want):
            with lock:
                problems.append(f"thread {i}: batch {len(want)} differs from the single-threaded output "
                                f"(max |diff| {np.abs(out - want).max():.2e})")

    def worker(i: int) -> None:
        pick = random.Random(i)
        try:
            # Warm-up: every thread runs every entry batch at once, so the (shared, pooled) allocator
            # holds as many buffers of each size as can ever be in use together: after this, growth
            # would be a leak.
            for x, want in zip(warm_inputs, warm_expected):
                barrier.wait()
                check(i, model(x), want)
            barrier.wait()
            while time.monotonic() < stop[0] and not problems:
                k = pick.randrange(len(inputs))
                check(i, model(inputs[k]), expected[k])
                counts[i] += 1
                images[i] += len(inputs[k])
        except threading.BrokenBarrierError:
            pass
        except Exception as exc:  # any error fails the soak; it is reported, not raised in a thread
            with lock:
                problems.append(f"thread {i}: {type(exc).__name__}: {exc}")
            barrier.abort()

    samples: list[tuple[float, int]] = []
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.threads)]
    warm_start = time.monotonic()
    for t in threads:
        t.start()
    try:
        for _ in range(len(warm_inputs) + 1):
            barrier.wait()
    except threading.BrokenBarrierError:
        pass
    warmup_s = time.monotonic() - warm_start
    start = time.monotonic()
    stop[0] = start + args.duration
    while any(t.is_alive() for t in threads):
        samples.append((round(time.monotonic() - start, 1), rss_bytes()))
        time.sleep(1.0)
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    baseline = samples[0][1]
    growth = max(r for _, r in samples) - baseline
    middle = next(r for t, r in samples if t >= elapsed / 2)
    late_growth = max(r for t, r in samples if t >= elapsed / 2) - middle
    flat = late_growth <= args.rss_slack_mib * 2**20
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(int(os.environ.get("TVM_NUM_THREADS") or os.cpu_count() or 1)),
        "spec": spec.name, "range": [low, high], "threads": args.threads, "duration_s": round(elapsed, 1),
        "warmup_s": round(warmup_s, 1), "warmup_batches": entries,
        "input_batches": sizes, "calls": sum(counts), "images": sum(images), "calls_per_thread": counts,
        "images_per_s": sum(images) / elapsed, "problems": problems,
        "rss_mib": {"after_warmup": baseline / 2**20, "max": max(r for _, r in samples) / 2**20,
                    "end": samples[-1][1] / 2**20, "growth_after_warmup": growth / 2**20,
                    "growth_second_half": late_growth / 2**20},
        "rss_flat": flat, "rss_slack_mib": args.rss_slack_mib,
        "rss_samples": [[t, round(r / 2**20, 1)] for t, r in samples],
        "passed": not problems and flat and sum(counts) > 0,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"soak_{report['machine']['llvm_cpu']}_{spec.name}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(soak_markdown(report))
    print(soak_markdown(report), file=sys.stderr)
    return 0 if report["passed"] else 1


def soak_markdown(r: dict[str, Any]) -> str:
    m, rss = r["machine"], r["rss_mib"]
    verdict = "PASSED" if r["passed"] else "FAILED"
    return "\n".join([
        f"# Soak: {r['spec']} range artifact ({r['range'][0]}-{r['range'][1]}), {r['threads']} threads, "
        f"{r['duration_s']:.0f} s: {verdict}", "",
        f"{r['date']}; {m['cpu']} (`{m['llvm_cpu']}`), {m['logical_cpus']} logical CPUs, TVM {m['tvm']}.", "",
        f"- warm-up ({r['warmup_s']:.0f} s): all threads at once on each entry batch "
        f"({', '.join(map(str, r['warmup_batches']))}); then {r['duration_s']:.0f} s of random picks:",
        f"- {r['calls']} calls, {r['images']} images ({r['images_per_s']:.1f} images/s) on inputs of batch "
        f"{', '.join(map(str, r['input_batches']))}; calls per thread {r['calls_per_thread']}",
        f"- every output equal bit for bit to the single-threaded output of its input: "
        f"{'yes' if not r['problems'] else 'no'}; errors: {len(r['problems'])}"
        + (f" (first: {r['problems'][0]})" if r["problems"] else ""),
        f"- resident memory (VmRSS, sampled every second): {rss['after_warmup']:.0f} MiB after warm-up, "
        f"{rss['end']:.0f} MiB at the end, at most {rss['max']:.0f} MiB: {rss['growth_after_warmup']:+.1f} MiB over "
        f"the run, {rss['growth_second_half']:+.1f} MiB in its second half (flat: "
        f"{'yes' if r['rss_flat'] else 'no'}, slack {r['rss_slack_mib']} MiB). Growth that stops is TVM's pooled "
        "allocator (shared by the threads' VMs, never returned) taking one more buffer of a size when more "
        "threads than ever before run that entry at once: bounded by threads x the entries' storage; a leak "
        "would keep growing.",
        ""])


def main() -> int:
    top = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = top.add_subparsers(dest="command", required=True)
    for name in ("speed", "soak"):
        p = sub.add_parser(name)
        p.add_argument("--spec", default="mixer_s16")
        p.add_argument("--range", default="1-16", help="the batch range of the range artifact")
        p.add_argument("--work", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "bench_serving"),
                       help="where the artifacts are built (kept: soak reuses speed's range artifact)")
        p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    speed_p, soak_p = sub.choices["speed"], sub.choices["soak"]
    speed_p.add_argument("--batches", default="1,3,8,16")
    speed_p.add_argument("--repeat", type=int, default=9)
    speed_p.add_argument("--reuse", action="store_true", help="load the artifacts a previous run built in --work")
    soak_p.add_argument("--duration", type=float, default=120.0, help="seconds (default 120)")
    soak_p.add_argument("--threads", type=int, default=8)
    soak_p.add_argument("--inputs", type=int, default=8, help="distinct inputs (batch sizes across the range)")
    soak_p.add_argument("--rss-slack-mib", type=float, default=16.0)
    args = top.parse_args()
    return speed(args) if args.command == "speed" else soak(args)


if __name__ == "__main__":
    sys.exit(main())
