"""Our compiled Mixer against PyTorch on the same GPU, in one run.

For each batch size (default 1, 64, 256): our module built for `--target` (default cuda, the
local GPU) in fp16, bf16 and fp32 (the default dtype: 3xTF32 CUTLASS GEMMs, float32 accuracy)
and validated on the GPU by the compile itself; PyTorch eager with
fp16 autocast, in bf16 (weights and inputs bf16) and in fp32, and torch.compile of each (at batch 1 also with mode="reduce-overhead", i.e. CUDA graphs, as ours), and timm's model
as torch.onnx.export writes it in ONNX Runtime's CUDA provider where onnxruntime-gpu is
installed (said in the table otherwise); then a large
fp16 matmul (torch, 8192^3) to measure the tensor-core peak the GPU targets refer to. Same
random weights (seed 0) everywhere.

Ours is timed as production calls it (`mixer_compile.runtime.load`, a torch tensor on the
device in and out). Timing: after warm-up, `--repeat` runs of `--number` calls each, bracketed by device
synchronisation, wall clock; the median run is reported. Results go to
`--out/gpu_<device>_<spec>[_<tag>].json` and `.md`, named with the device, rewritten after each
batch size so a run cut short still leaves what it measured.

    python benchmarks/bench_gpu.py --spec mixer_b16 --out benchmarks/results
    python benchmarks/bench_gpu.py --spec tiny.toml --target llvm --batches 2 --dtypes float32   # CPU smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mixer_compile.compiler import CompileOptions, compile_model  # noqa: E402
from mixer_compile.model.spec import MixerSpec, load_spec  # noqa: E402
from mixer_compile.backend.target import get_target  # noqa: E402
from mixer_compile.model.params import random_weights  # noqa: E402

PEAK_N = 8192


def timed(fn: Callable[[], Any], sync: Callable[[], None], number: int, repeat: int, warmup: int) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    sync()
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        sync()
        runs.append((time.perf_counter() - start) / number)
    return statistics.median(runs)


def tensor_core_peak(torch: Any, device: str, sync: Callable[[], None], n: int = PEAK_N) -> dict[str, Any]:
    a = torch.randn(n, n, dtype=torch.float16, device=device)
    b = torch.randn(n, n, dtype=torch.float16, device=device)
    seconds = timed(lambda: torch.matmul(a, b), sync, number=10, repeat=5, warmup=3)
    return {"what": f"torch.matmul fp16 {n}x{n}x{n}", "seconds": seconds, "tflops": 2 * n**3 / seconds / 1e12}


def build_ours(spec: MixerSpec, target: str, dtype: str, artifacts: Path) -> tuple[Path, dict[str, Any]]:
    """Compiles (and validates, on the GPU when there is one) unless the artifact exists."""
    out = artifacts / f"{spec.fingerprint()}-{target}-{dtype}"
    if not (out / "metadata.json").is_file():
        compile_model(CompileOptions(spec=spec, target=target, dtype=dtype, out_dir=out))
    return out, json.loads((out / "metadata.json").read_text())


def ours(artifact: Path, images: Any, sync: Callable[[], None], number: int, repeat: int) -> float:
    """Timed as production calls it: `mixer_compile.runtime.load`, a torch tensor already on the
    device in, its logits back there (no host copy, as for the torch contenders)."""
    from mixer_compile import runtime

    model = runtime.load(artifact)
    return timed(lambda: model(images), sync, number, repeat, warmup=3)


def torch_contenders(torch: Any, spec: MixerSpec, weights: dict[str, np.ndarray], device: str,
                     dtypes: list[str], compiled: bool) -> dict[str, tuple[Callable[[Any], Any], str]]:
    """name -> (forward taking float32 images, dtype) for PyTorch eager and torch.compile."""
    from tests.torch_model import torch_mixer  # the repository's PyTorch Mixer (timm's names)

    torch._dynamo.reset()  # a fresh compile per batch size, not a dynamic-shape recompile mid-timing
    fp32 = torch_mixer(spec, weights).to(device)
    out: dict[str, tuple[Callable[[Any], Any], str]] = {}
    for dtype in dtypes:
        if dtype == "float16":
            model = fp32

            def eager(x: Any, m: Any = model) -> Any:
                with torch.autocast(device_type=device, dtype=torch.float16):
                    return m(x)
            label = "PyTorch eager, fp16 autocast"
        elif dtype == "bfloat16":
            model = torch_mixer(spec, weights).to(device=device, dtype=torch.bfloat16)

            def eager(x: Any, m: Any = model) -> Any:
                return m(x.to(torch.bfloat16))
            label = "PyTorch eager, bf16"
        else:
            model = fp32

            def eager(x: Any, m: Any = model) -> Any:
                return m(x)
            label = "PyTorch eager, fp32"
        out[label] = (eager, dtype)
        if compiled:
            out[label.replace("eager", "torch.compile")] = (torch.compile(eager, dynamic=False), dtype)
            if spec.batch == 1:  # launch-bound: CUDA graphs are the peer to beat (ours captures one too)
                out[label.replace("eager", "torch.compile reduce-overhead")] = (
                    torch.compile(eager, dynamic=False, mode="reduce-overhead"), dtype)
    return out


def onnxruntime_cuda(spec: MixerSpec, weights: dict[str, np.ndarray], images: np.ndarray,
                     work: Path) -> tuple[Callable[[], Any] | None, str]:
    """timm's model exported by `torch.onnx.export` (float32, what its users deploy) in ONNX
    Runtime's CUDA provider: the peer a user would otherwise run; None, and why, where the
    installed onnxruntime has no CUDA provider (the CPU wheel)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None, "onnxruntime is not installed"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None, f"onnxruntime {ort.__version__} has no CUDA provider (install onnxruntime-gpu)"
    from benchmarks.bench_cpu import onnxruntime_session
    from tests.torch_model import torch_mixer

    work.mkdir(parents=True, exist_ok=True)
    run = onnxruntime_session(torch_mixer(spec, weights), images, work / f"{spec.fingerprint()}.onnx",
                              ("CUDAExecutionProvider",))
    return run, ""


def markdown(report: dict[str, Any]) -> str:
    peak = report["tensor_core_peak"]
    lines = [f"# {report['spec']} on {report['device']}", "",
             f"{report['date']}; torch {report['torch']} (float32 matmul precision "
             f"'{report['torch_float32_matmul_precision']}'), TVM {report['tvm']}, one run; "
             f"median of {report['repeat']} x {report['number']} calls per entry.", ""]
    if peak:
        lines += [f"Tensor-core peak ({peak['what']}): {peak['tflops']:.0f} TFLOP/s; "
                  f"{report['gflop_per_image']:.2f} GFLOP per image.", ""]
    lines += ["| batch | contender | dtype | ms/batch | images/s | TFLOP/s | % of peak |",
              "|---:|---|---|---:|---:|---:|---:|"]
    for r in report["rows"]:
        pct = f"{100 * r['fraction_of_peak']:.0f}%" if r.get("fraction_of_peak") is not None else ""
        lines.append(f"| {r['batch']} | {r['contender']} | {r['dtype']} | {1e3 * r['seconds']:.3f} | "
                     f"{r['images_per_s']:,.0f} | {r['tflops']:.1f} | {pct} |")
    lines += [f"\n{k}: not measured, {v}." for k, v in report.get("not_measured", {}).items()]
    lines += ["", "Ours / torch.compile (same batch and dtype, images/s):", ""]
    lines += [f"- batch {k}: {v:.2f}x" for k, v in report["ours_vs_torch_compile"].items()]
    validation = [f"- {k}: {v}" for k, v in report["validation"].items()]
    return "\n".join(lines + ["", "Validation of our builds (max |out-ref|/max|ref|):", ""] + validation) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", default="mixer_b16")
    ap.add_argument("--target", default="cuda")
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--dtypes", default="float16,bfloat16,float32")
    ap.add_argument("--number", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-torch-compile", action="store_true")
    ap.add_argument("--artifacts", default="out/bench", help="where our builds go (reused when present)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--tag", default="", help="suffix of the result files' names (one per subset run)")
    args = ap.parse_args(argv)

    import torch
    import tvm

    target = get_target(args.target)
    device = "cuda" if target.kind == "cuda" else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    base = load_spec(args.spec).with_gelu_for("random")
    dtypes = args.dtypes.split(",")
    peak = tensor_core_peak(torch, device, sync) if device == "cuda" else None
    print(f"device {name}; peak {peak}", flush=True)
    rows: list[dict[str, Any]] = []
    validation: dict[str, str] = {}
    report = {"spec": base.name, "device": name, "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "tvm": tvm.__version__, "python": platform.python_version(),
              "torch_float32_matmul_precision": torch.get_float32_matmul_precision(),
              "gflop_per_image": base.flops_per_image() / 1e9, "number": args.number, "repeat": args.repeat,
              "tensor_core_peak": peak, "rows": rows, "ours_vs_torch_compile": {}, "validation": validation}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu_{re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_').lower()}_{base.name}" + (f"_{args.tag}" if args.tag else "")
    for batch in (int(b) for b in args.batches.split(",")):
        spec = base.replace(batch=batch)
        weights = random_weights(spec, 0)
        images = np.random.default_rng(1).standard_normal((batch, spec.in_channels, *spec.image_size)).astype(np.float32)
        flop = spec.flops_per_image() * batch
        entries: list[tuple[str, str, float]] = []
        x = torch.from_numpy(images).to(device)
        for dtype in dtypes:
            artifact, meta = build_ours(spec, args.target, dtype, Path(args.artifacts))
            v = meta["validation"]
            origins = [c["from"] for c in meta.get("gpu_code", {}).get("gemm_choices", [])]
            gemms = f"; library GEMM calls: {origins.count('record')} from records, {origins.count('default')} default"
            validation[f"batch {batch} {dtype}"] = (f"{v['max_rel_error']:.2e} (bound {v['tolerance']:.0e}) on {v['where']}"
                                                    + (gemms if origins else ""))
            entries.append((f"mixer-compile ({target.name})", dtype,
                            ours(artifact, x, sync, args.number, args.repeat)))
        with torch.no_grad():
            for label, (fn, dtype) in torch_contenders(torch, spec, weights, device, dtypes,
                                                       not args.no_torch_compile).items():
                entries.append((label, dtype, timed(lambda: fn(x), sync, args.number, args.repeat, warmup=5)))
        ort_run, why_not = onnxruntime_cuda(spec, weights, images, Path(args.artifacts) / "onnx")
        if ort_run is None:
            report["not_measured"] = {"ONNX Runtime (CUDA)": why_not}
        else:
            entries.append(("ONNX Runtime CUDA, fp32 (timm's torch.onnx.export)", "float32",
                            timed(ort_run, sync, args.number, args.repeat, warmup=5)))
        for contender, dtype, seconds in entries:
            row = {"batch": batch, "contender": contender, "dtype": dtype, "seconds": seconds,
                   "images_per_s": batch / seconds, "tflops": flop / seconds / 1e12}
            if peak:
                row["fraction_of_peak"] = row["tflops"] / peak["tflops"]
            rows.append(row)
            print(f"batch {batch:>4} {contender:<45} {dtype:<9} {1e3 * seconds:9.3f} ms "
                  f"{row['images_per_s']:10,.0f} img/s", flush=True)
        report["ours_vs_torch_compile"] = ratios_to_torch_compile(rows)
        (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / f"{stem}.md").write_text(markdown(report))
        print(f"wrote {out / stem}.json and .md", flush=True)
    return 0


def ratios_to_torch_compile(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Our images/s over each torch.compile's (plain, and reduce-overhead where measured: the
    batch-1 target), for each batch and dtype both were measured at."""
    ratios = {}
    for r in rows:
        if r["contender"].startswith("mixer-compile"):
            for c in rows:
                if (c["batch"], c["dtype"]) == (r["batch"], r["dtype"]) and c["contender"].startswith("PyTorch torch.compile"):
                    mode = " vs reduce-overhead" if "reduce-overhead" in c["contender"] else ""
                    ratios[f"{r['batch']} {r['dtype']}{mode}"] = r["images_per_s"] / c["images_per_s"]
    return ratios


if __name__ == "__main__":
    sys.exit(main())
