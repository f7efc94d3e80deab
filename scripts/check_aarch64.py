"""Runs aarch64 builds on an x86_64 machine: each compiled by the CLI for an Arm server CPU
(Graviton 2, 3 and 4), linked with the cross toolchain, run under qemu-user by examples/cpp
built against the aarch64 wheel of the installed TVM, and its logits compared with the
float64 reference (and, for the timm checkpoint of ../shared/testdata, with timm's own). A
compile validates a foreign build only as the same lowering built for this CPU ("run
pending"); this runs the NEON code itself. Emulated: it checks results, not speed.

    apt install g++-aarch64-linux-gnu qemu-user        # Debian/Ubuntu
    python scripts/check_aarch64.py [--full] [--out benchmarks/results]

The aarch64 runtime (TVM's and tvm-ffi's wheels for aarch64, the versions installed here) is
downloaded once from the package index into the user cache. Exits 1 if any build disagrees.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from bench_cpu import machine  # noqa: E402
from mixer_compile.check.validate import TOLERANCES, random_images  # noqa: E402
from mixer_compile.model import reference  # noqa: E402
from mixer_compile.model.params import random_weights  # noqa: E402
from mixer_compile.model.spec import spec_from_dict  # noqa: E402
from mixer_compile.tune.database import cache_root  # noqa: E402

TRIPLE = "aarch64-linux-gnu"
SYSROOT = Path("/usr") / TRIPLE  # the cross toolchain's libc, which qemu-user loads the binary with
TESTDATA = REPO.parent / "shared" / "testdata"
# the runtime's files that examples/cpp/build.sh compiles and links against
RUNTIME_FILES = ("tvm/__init__.py", "tvm/include/", "tvm/lib/libtvm_runtime.so",
                 "tvm_ffi/__init__.py", "tvm_ffi/include/", "tvm_ffi/lib/libtvm_ffi.so")


@dataclass(frozen=True)
class Case:
    name: str
    cpu: str  # LLVM's name of the Arm CPU built for
    args: tuple[str, ...]  # the compile's options besides --target and -o
    run_batch: int  # the batch the binary runs (an artifact of a batch range serves several)
    full: bool = False  # only with --full (minutes under qemu)


CASES = [
    Case("S/32, batch 3, erf", "neoverse-v1", ("--spec", "mixer_s32", "--batch", "3", "--gelu", "erf"), 3),
    Case("S/32, batch 1, tanh", "neoverse-n1", ("--spec", "mixer_s32", "--batch", "1"), 1),
    Case("odd spec (C = 100, D_C = 750), batch 3", "neoverse-v2",
         ("--spec", str(REPO / "benchmarks/specs/odd_c100.toml"), "--batch", "3", "--gelu", "erf"), 3),
    Case("S/32, bfloat16", "neoverse-v1", ("--spec", "mixer_s32", "--batch", "2", "--dtype", "bfloat16"), 2),
    Case("S/32, float16", "neoverse-n1", ("--spec", "mixer_s32", "--batch", "2", "--dtype", "float16"), 2),
    Case("S/32, conv form, weights embedded", "neoverse-v1",
         ("--spec", "mixer_s32", "--batch", "2", "--form", "conv", "--embed-weights"), 2),
    Case("S/32, batch range 1-4, run at 3", "neoverse-v1", ("--spec", "mixer_s32", "--batch", "1-4"), 3),
    Case("timm checkpoint (tiny_square.pth)", "neoverse-v1", ("--weights", str(TESTDATA / "tiny_square.pth"),
                                                                "--batch", "2"), 2),
    Case("B/16, batch 1, erf", "neoverse-v1", ("--spec", "mixer_b16", "--gelu", "erf"), 1, full=True),
]


def tools() -> tuple[str, str]:
    cxx, qemu = shutil.which(f"{TRIPLE}-g++"), shutil.which("qemu-aarch64")
    if cxx is None or qemu is None or not SYSROOT.is_dir():
        raise SystemExit(f"error: needs {TRIPLE}-g++ and qemu-aarch64 (Debian/Ubuntu: apt install "
                         f"g++-{TRIPLE} qemu-user)")
    return cxx, qemu


PINS = [f"{p}=={importlib.metadata.version(p)}" for p in ("apache-tvm", "apache-tvm-ffi")]


def runtime_dir() -> Path:
    """Where the aarch64 runtime of the installed versions is kept (in the user cache)."""
    return cache_root() / "aarch64-runtime" / "-".join(p.split("==")[1] for p in PINS)


def aarch64_runtime() -> Path:
    """A directory with the aarch64 TVM runtime and tvm-ffi of the versions installed here,
    laid out as their packages are (what examples/cpp/build.sh looks for)."""
    site = runtime_dir()
    if (site / "tvm/lib/libtvm_runtime.so").is_file():
        return site
    with tempfile.TemporaryDirectory() as tmp:
        print(f"downloading the aarch64 wheels of {', '.join(PINS)} (~100 MB, once)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.11", *(a for p in ("manylinux_2_28_aarch64", "manylinux2014_aarch64")
                                                      for a in ("--platform", p)), "-d", tmp, *PINS], check=True)
        partial = site.with_name(site.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        for wheel in Path(tmp).glob("*.whl"):
            with zipfile.ZipFile(wheel) as z:
                z.extractall(partial, [n for n in z.namelist() if n.startswith(RUNTIME_FILES)])
        os.replace(partial, site)
    return site


def build_example(cxx: str, site: Path, out: Path) -> Path:
    env = {**os.environ, "CXX": cxx, "PYTHON": sys.executable, "PYTHONPATH": str(site)}
    subprocess.run(["sh", str(REPO / "examples/cpp/build.sh"), str(out)], env=env, check=True)
    return out


def top5(stdout: str) -> list[list[tuple[int, float]]]:
    """The example's output: per image ("# image I" heads each block of several), its top-5
    classes and logits."""
    blocks: list[list[tuple[int, float]]] = [[]]
    for line in stdout.splitlines():
        if line.startswith("#"):
            if blocks[-1]:
                blocks.append([])
        elif line.strip():
            cls, logit = line.split()
            blocks[-1].append((int(cls), float(logit)))
    return blocks


def expected(meta: dict, batch: int, images_seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """The images, the logits they should give and where those come from: timm's own for the
    shared checkpoint (its images), else the float64 reference on the build's random weights."""
    if meta["weights"]["origin"] != "random":
        return (np.load(TESTDATA / "tiny_square_input.npy"), np.load(TESTDATA / "tiny_square_logits_erf.npy"),
                "timm")
    spec = spec_from_dict(meta["spec"]).replace(batch=batch)
    images = random_images(spec, images_seed)
    return images, reference.forward(spec, random_weights(spec, meta["weights"]["seed"]), images), "reference"


def check(case: Case, binary: Path, qemu: str, work: Path) -> dict:
    target = work / f"{case.cpu}.json"
    target.write_text(json.dumps({"target": {"kind": "llvm", "mtriple": TRIPLE, "mcpu": case.cpu, "num-cores": 4}}))
    art = work / "art"
    shutil.rmtree(art, ignore_errors=True)
    build = subprocess.run([sys.executable, "-m", "mixer_compile.cli", *case.args, "--target", str(target),
                            "-o", str(art)], capture_output=True, text=True)
    if build.returncode != 0:
        return {"case": case.name, "cpu": case.cpu, "ok": False, "problem": build.stderr.strip().splitlines()[-1]}
    meta = json.loads((art / "metadata.json").read_text())
    images, want, oracle = expected(meta, case.run_batch, images_seed=11)
    images.astype(np.float32).tofile(work / "images.bin")
    start = time.time()
    proc = subprocess.run([qemu, "-L", str(SYSROOT), str(binary), str(art), str(work / "images.bin"),
                           "--batch", str(case.run_batch)], capture_output=True, text=True)
    seconds = time.time() - start
    if proc.returncode != 0:
        return {"case": case.name, "cpu": case.cpu, "ok": False, "problem": proc.stderr.strip()[-300:]}
    got = top5(proc.stdout)
    scale = float(np.abs(want).max())
    tolerance = TOLERANCES[meta["precision"]["dtype"]]
    # each printed logit against the expected one of its class; the printed classes must be the
    # expected top 5, but for ties within the tolerance (half precision reorders near-equal logits)
    err = float(max(abs(v - want[i][c]) / scale for i, block in enumerate(got) for c, v in block))
    same = bool(all(want[i][c] >= np.sort(want[i])[-5] - tolerance * scale for i, block in enumerate(got) for c, _ in block))
    ok = len(got) == case.run_batch and all(len(b) == 5 for b in got) and same and err < tolerance
    return {"case": case.name, "cpu": case.cpu, "dtype": meta["precision"]["dtype"], "oracle": oracle,
            "split": proc.stderr.strip(), "max_rel_error": err, "tolerance": tolerance, "top5_agree": same,
            "qemu_s": round(seconds, 1), "ok": ok}


def markdown(report: dict) -> str:
    lines = [f"# aarch64 builds run under qemu-user, on {report['host']}", "",
             f"{report['when']}; {report['qemu']}; TVM {report['tvm']} (its aarch64 runtime for examples/cpp). "
             "Each case compiled by `mixer-compile` for the Arm CPU named (a target file: mtriple "
             f"`{TRIPLE}`, 4 cores), linked with `{TRIPLE}-g++`, run by examples/cpp under qemu-aarch64, and its "
             "top-5 logits per image compared with the float64 reference's (timm's own for the timm checkpoint), "
             "relative to the largest |logit|. Emulated: results, not speed. "
             "`python scripts/check_aarch64.py" + (" --full" if report["full"] else "") + "`.", "",
             "| case | built for | dtype | checked against | batch split | max rel. error (bound) | top-5 | ok |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        if "problem" in r:
            lines.append(f"| {r['case']} | {r['cpu']} | | | | {r['problem']} | | FAIL |")
        else:
            lines.append(f"| {r['case']} | {r['cpu']} | {r['dtype']} | {r['oracle']} | {r['split']} | "
                         f"{r['max_rel_error']:.1e} ({r['tolerance']:.0e}) | {'same' if r['top5_agree'] else 'DIFFERENT'} "
                         f"| {'ok' if r['ok'] else 'FAIL'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="also Mixer-B/16 (minutes under qemu)")
    ap.add_argument("--only", default="", help="only the cases whose name contains this (e.g. timm)")
    ap.add_argument("--out", type=Path, help="write aarch64_qemu_<host>.md/.json there (e.g. benchmarks/results)")
    args = ap.parse_args()
    cxx, qemu = tools()
    import tvm

    cases = [c for c in CASES if (args.full or not c.full) and args.only in c.name]
    if not TESTDATA.is_dir():
        cases = [c for c in cases if str(TESTDATA) not in c.args]
    with tempfile.TemporaryDirectory(prefix="mixer-aarch64-") as tmp:
        work = Path(tmp)
        binary = build_example(cxx, aarch64_runtime(), work / "mixer_infer")
        results = []
        for case in cases:
            results.append(check(case, binary, qemu, work))
            r = results[-1]
            print(f"{'ok  ' if r['ok'] else 'FAIL'} {case.name} ({case.cpu}): "
                  + (r.get("problem") or f"max rel. error {r['max_rel_error']:.1e}, {r['qemu_s']} s under qemu"),
                  flush=True)
    host = machine(os.cpu_count() or 1)
    report = {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "host": f"{host['cpu']} ({host['llvm_cpu']})", "tvm": tvm.__version__,
              "qemu": subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout.splitlines()[0],
              "full": args.full, "results": results}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = f"aarch64_qemu_{host['llvm_cpu']}"
        (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
