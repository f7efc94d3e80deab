"""CUDA builds whose exported library carries compiled GPU code, with or without a GPU.

TVM embeds a cubin/fatbin in a library only when its CUDA runtime (libtvm_runtime_cuda.so)
is loaded in the compiling process, and that library links against the driver,
libcuda.so.1. Without a driver (CI, this build machine) TVM silently falls back to
embedding CUDA *source*, which only a Python process with NVRTC or nvcc can compile at load
time: a C++ deployment could not load it at all. So a CUDA build runs in a child process
with TVM_CUDA_COMPILE_MODE=nvcc (kernels become one fatbin for the target's sm_XY), and,
when this machine has no driver, with a build-only stand-in libcuda.so.1 on the child's
library path: every `cu*` symbol the CUDA runtime imports, each returning
CUDA_ERROR_NO_DEVICE. The stand-in lives in a temporary directory for the child's lifetime;
it is never shipped, and no process that runs a model ever loads it.

`python -m mixer_compile.backend.cuda MODULE.json TARGET.json OUT.so` is that child.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from mixer_compile.backend import cutlass, gemm_choice
from mixer_compile.backend.runner import Runner
from mixer_compile.backend.target import TargetInfo, build_requirements, get_target
from mixer_compile.errors import MixerCompileError, TargetError
from mixer_compile.machine import host_arch
from mixer_compile.passes.context import PassContext

TUNABLE = True
CHOOSES_FORM = False  # its builds run on a GPU, not here; matmul is the form the library GEMMs need
HOST_CHECK_BATCH = 2  # batch of the CPU stand-in check of a GPU build that cannot run here
CUDA_ERROR_NO_DEVICE = 100
CUDA_GRAPH_CONFIG = "relax.backend.use_cuda_graph"
FATBIN_MAGIC = bytes.fromhex("50ed55ba")  # 0xBA55ED50, little-endian, starts every fatbin


class CudaLibrary:
    """A CUDA build exported by the child process: the file, and where it was compiled for.

    Duck-types the one method the artifact writer uses on an executable (`export_library`),
    so an artifact holds exactly the bytes the child wrote.
    """

    def __init__(self, work: tempfile.TemporaryDirectory, target: TargetInfo, kernels: list[Any] | None = None,
                 choices: list[dict] | None = None) -> None:
        self.work = work  # the build's directory (model.so, the host check's library), removed with this object
        self.path = Path(work.name) / "model.so"
        self.target = target
        self.kernels = kernels or []  # the library GEMMs linked in (lower/library.py)
        self.choices = choices or []  # how each call site runs (backend/gemm_choice.py)

    def export_library(self, file_name: str) -> None:
        shutil.copyfile(self.path, file_name)

    def describe(self) -> dict[str, Any]:
        """What GPU code the library carries, for the artifact's metadata."""
        blobs = fatbins(self.path)
        return {"format": "fatbin", "compiler": "nvcc", "arch": str(self.target.tvm_target().attrs["arch"]),
                "fatbins": len(blobs), "bytes": sum(map(len, blobs)),
                "library_gemms": [k.symbol for k in self.kernels], "gemm_choices": self.choices}


def driver_present() -> bool:
    """Whether the real CUDA driver library loads here (a GPU may still be absent)."""
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def _tool(name: str, fix: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise TargetError(f"'{name}' is not on PATH; {fix}")
    return path


def _cuda_runtime_library() -> Path:
    import tvm

    lib = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
    if not lib.is_file():
        raise TargetError(f"this TVM has no CUDA runtime ({lib} is missing); install the apache-tvm wheel")
    return lib


def write_stand_in_libcuda(directory: Path) -> Path:
    """A build-only libcuda.so.1 in `directory` (see the module docstring)."""
    nm = _tool("nm", "install binutils")
    gcc = _tool("gcc", "install gcc (needed to build for CUDA on a machine without a GPU driver)")
    listing = subprocess.run([nm, "-D", "--undefined-only", str(_cuda_runtime_library())],
                             check=True, capture_output=True, text=True).stdout
    symbols = sorted({line.split()[-1] for line in listing.splitlines()
                      if line.split() and line.split()[-1].startswith("cu") and "@" not in line})
    source = directory / "libcuda_stand_in.c"
    source.write_text("".join(f"int {s}(void) {{ return {CUDA_ERROR_NO_DEVICE}; }}\n" for s in symbols))
    lib = directory / "libcuda.so.1"
    subprocess.run([gcc, "-shared", "-fPIC", "-o", str(lib), str(source)], check=True, capture_output=True)
    return lib


def pass_context(target: TargetInfo, dtype: str) -> PassContext:
    """The large GEMMs go to CUTLASS kernels on sm_80 and newer GPUs (passes/library_gemms.py,
    backend/cutlass.py), token mixing's left products included (batched kernels: TMA + wgmma
    on sm_90a, mma.sync + cp.async with a visitor-tree epilogue on the sm_80 family and for
    float32, as 3xTF32); the rest keeps the (K, N) weight layout DLight's schedules expect."""
    arch = _arch(target)
    if not cutlass.has_family(arch):
        return PassContext(dtype=dtype, gemm_convs=True)
    return PassContext(dtype=dtype, gemm_library="cutlass", gemm_convs=True)


def _arch(target: TargetInfo) -> str:
    return str(target.tvm_target().attrs["arch"])


def gemm_family(target: TargetInfo) -> str | None:
    """The library-GEMM family whose records a build for `target` applies (gemm_choice), None
    for a GPU without CUTLASS kernels."""
    arch = _arch(target)
    return cutlass.gpu_arch_flag(arch)[0] if cutlass.has_family(arch) else None


def build(mod: Any, target: TargetInfo, database: Any = None, on_applied: Any = None) -> CudaLibrary:
    """Compiles `mod` for the CUDA `target` in a child process. The records of `database` are
    applied here, where the database is open (cuda_schedules.apply_records); the child gives
    DLight's default schedules to the other kernels. `on_applied` hears which kernel got what."""
    from mixer_compile.backend.cuda_schedules import apply_records

    mod, applied = apply_records(prepare(mod, target), target, database)
    if on_applied is not None:
        on_applied(applied)
    return build_cuda_library(mod, target)


def prepare(mod: Any, target: TargetInfo) -> Any:
    """The legalized, fused module whose kernels are the tuning tasks (cuda_schedules.prepare)."""
    from mixer_compile.backend import cuda_schedules

    return cuda_schedules.prepare(mod, target)


def default_schedule(mod: Any, target: TargetInfo) -> Any:
    """The schedule a build without records gives the kernel `mod["main"]`: DLight's
    (cuda_schedules.default_schedule), what tuning measures first."""
    from mixer_compile.backend import cuda_schedules

    return cuda_schedules.default_schedule(mod, target)


def runner(executable: CudaLibrary, target: TargetInfo, params: list[Any],
           rebuild: Callable[[int], tuple[Any, list[Any], int]]) -> Runner:
    """On this machine's GPU when it has one that runs the build; otherwise the same Relax
    module (same lowering, same precision) at a small batch (`rebuild(at_most)`: the GPU's
    batch, 256 say, would cost the host minutes), compiled for this CPU, and the record says
    the GPU run is pending."""
    import tvm

    from mixer_compile.backend import cpu

    why = runnable_here(executable)
    if why is None:
        dev = tvm.cuda()
        lib = tvm.runtime.load_module(str(executable.path))
        return Runner(lib, dev, params, f"GPU {dev.device_name}")
    mod, small_params, batch = rebuild(HOST_CHECK_BATCH)
    lib = cpu.build(mod, get_target("llvm"))
    kernels = gemm_choice.kernels_called(mod)
    if kernels:  # the library GEMMs' CPU implementation, linked in like the GPU build links CUTLASS's
        lib = _with_addons(lib, [cutlass.host_object(kernels)], Path(executable.work.name) / "host_check.so")
    return Runner(lib, tvm.cpu(), small_params,
                  "host CPU: the same lowering and precision built for llvm"
                  + (f" ({len(kernels)} library GEMMs by their C++ stand-in)" if kernels else "")
                  + f"; GPU run pending ({why})", batch)


def _with_addons(executable: Any, addons: list[Path], path: Path) -> Any:
    """`executable` exported to `path` with `addons` linked in and loaded back (call_dps_packed
    finds external symbols in the loaded library only)."""
    import tvm

    executable.export_library(str(path), addons=[str(a) for a in addons])
    return tvm.runtime.load_module(str(path))


def describe(executable: CudaLibrary) -> dict[str, Any]:
    from mixer_compile.backend.cublaslt import runtime_libraries

    return {"gpu_code": executable.describe(), "runtime_libraries": runtime_libraries(executable.kernels) or None}


def check_host(target: TargetInfo) -> None:
    """Refuses host code for another CPU architecture: nvcc compiles the kernels' launch code
    for this machine, and TVM's link would fail on the mix (a target without a host gets LLVM's
    default, this machine's)."""
    cpu, here = build_requirements(target.tvm_target()).get("cpu"), host_arch()
    if cpu is not None and cpu["arch"] != here:
        raise TargetError(f"the {target.name} target's host code is for {cpu['arch']} and this machine is {here}; a "
                          f"CUDA build's host side is compiled for the machine that builds: build on a {cpu['arch']} "
                          "machine, or give the target \"host\": \"portable\" (this machine's architecture)")


def build_cuda_library(mod: Any, target: TargetInfo) -> CudaLibrary:
    """Compiles `mod` for the CUDA `target` in a child process, into a directory of its own."""
    import tvm

    check_host(target)
    _tool("nvcc", "install the CUDA toolkit (nvcc compiles the GPU kernels at build time)")
    temp = tempfile.gettempdir()
    if os.statvfs(temp).f_flag & os.ST_NOEXEC:  # TVM would fall back to CUDA source, saying why only in a log
        raise MixerCompileError(f"the temporary directory '{temp}' is on a file system mounted noexec, and the CUDA "
                                "build loads the libraries it writes there; set TMPDIR to a directory that is not")
    work = tempfile.TemporaryDirectory(prefix="mixer-compile-cuda-")
    work_dir = Path(work.name)
    module_json, target_json, out = work_dir / "module.json", work_dir / "target.json", work_dir / "model.so"
    family = gemm_family(target)
    mod, choices = gemm_choice.apply_choices(mod, family) if family else (mod, [])
    module_json.write_text(tvm.ir.save_json(mod))
    kernels = gemm_choice.kernels_called(mod)
    built = gemm_choice.gpu_objects(kernels, _arch(target))
    objects = [built[k] for k in kernels]
    gemm_choice.check_implementable(gemm_choice.call_sites(mod), built)
    target_json.write_text(json.dumps({"name": target.name, "description": target.description,
                                       "config": target.config, "addons": [str(o) for o in objects],
                                       "options": gemm_choice.link_options(kernels) if objects else []}))
    env = {**os.environ, "TVM_CUDA_COMPILE_MODE": "nvcc"}
    if not driver_present():
        stand_in = write_stand_in_libcuda(Path(tempfile.mkdtemp(prefix="stand-in-libcuda.", dir=work_dir)))
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(stand_in.parent), env.get("LD_LIBRARY_PATH")]))
    child = subprocess.run([sys.executable, "-m", "mixer_compile.backend.cuda", str(module_json),
                            str(target_json), str(out)], env=env, capture_output=True, text=True)
    if child.returncode != 0:
        raise MixerCompileError(f"the CUDA build for {target.name} failed (exit {child.returncode}): "
                                f"{_what_failed(child.stderr)}")
    if not fatbins(out):
        raise MixerCompileError(f"the CUDA build for {target.name} embedded no compiled GPU code (TVM fell back "
                                "to CUDA source); check that nvcc works: nvcc --version")
    return CudaLibrary(work, target, kernels, choices)


def _what_failed(stderr: str) -> str:
    """The error of a failed child build: TVM follows its message with the IR it was working on
    (hundreds of lines), so the exception's line and the pass it names, or nvcc's error after
    the CUDA source TVM prints, else the last lines."""
    lines = stderr.strip().splitlines()
    found = [line.strip() for line in lines if re.match(r"\w+(Error|Exception): .|Error in pass: |nvcc fatal|.*\berror: ", line)]
    return " / ".join(found[-2:]) if found else "\n".join(lines[-15:])


def runnable_here(library: CudaLibrary) -> str | None:
    """Why this machine cannot run `library` on a GPU, or None when it can."""
    from mixer_compile.machine import check_gpu, local_gpu

    dev = local_gpu()
    if dev is None:
        return "no GPU visible here"
    try:
        check_gpu(str(library.target.tvm_target().attrs["arch"]), "sm_" + dev.compute_version.replace(".", ""),
                  f"the {library.target.name} build")
    except MixerCompileError as exc:
        return str(exc)
    return None


def fatbins(library: Path) -> list[bytes]:
    """The fatbins embedded in a library file (none: the build fell back to CUDA source)."""
    data = library.read_bytes()
    found, at = [], data.find(FATBIN_MAGIC)
    while at >= 0:
        header_size = int.from_bytes(data[at + 6:at + 8], "little")
        body_size = int.from_bytes(data[at + 8:at + 16], "little")
        end = at + header_size + body_size
        if header_size == 16 and end <= len(data):
            found.append(data[at:end])
            at = data.find(FATBIN_MAGIC, end)
        else:
            at = data.find(FATBIN_MAGIC, at + 4)
    return found


def _child(module_json: str, target_json: str, out: str) -> None:
    import tvm

    from mixer_compile.backend.cuda_schedules import BUILD_CONFIG, cuda_pipeline

    mod = tvm.ir.load_json(Path(module_json).read_text())
    # kernels arriving scheduled got a tuning record (build()): built as they were measured
    recorded = any(isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and "tirx.is_scheduled" in f.attrs
                   for f in mod.functions.values())
    info = json.loads(Path(target_json).read_text())
    tvm_target = TargetInfo(info["name"], info["description"], info["config"]).tvm_target()
    # CUDA graphs: the kernel launches of the forward pass are captured once and replayed
    # (Relax's RewriteCUDAGraph; the weights are static inputs, `num_input` = 1), so a small
    # batch is not bound by ~60 launches per call
    with tvm_target, tvm.transform.PassContext(config={CUDA_GRAPH_CONFIG: True,
                                                       **(BUILD_CONFIG if recorded else {})}):
        executable = tvm.compile(mod, tvm_target, relax_pipeline=cuda_pipeline(tvm_target))
    executable.export_library(out, addons=info["addons"], options=info["options"])


if __name__ == "__main__":
    _child(*sys.argv[1:4])
