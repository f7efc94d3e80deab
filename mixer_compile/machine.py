"""What this machine has (cores, CPU features, GPU), and whether it can run a build.

Imported by the runtime as well as the compiler, so it needs only the standard library
(and TVM's runtime, for the GPU query).

TVM's thread pool: left to itself, TVM's runtime starts half as many workers as there are
CPUs on x86 (it assumes every core has two hyper-threads). On a machine without SMT, like this
2-core one, every kernel then runs on one core: half the speed, in tuning measurements and in
deployment alike. The pool reads TVM_NUM_THREADS once, when it first starts, and child
processes (MetaSchedule's runners) inherit it, so `use_all_cores` runs before any kernel does.

Build requirements: a library compiled for one CPU (say `-mcpu=znver4`, AVX-512) dies with
SIGILL on a machine without those instructions, and a CUDA build for sm_90 fails deep inside
the driver on an sm_80 GPU. The build records its requirements in the artifact's metadata
(backend/target.py); the runtime checks them here against the host before it runs a single
instruction of the library. Only instruction-set features are checked. LLVM's feature list for
a CPU name also holds tuning flags (`fast-lzcnt`, `macrofusion`) and system features that
hypervisors commonly hide (`rdseed`, `shstk`, `movdir64b`): an artifact built with `mcpu`
detected on a VM would be refused on that very VM if those counted. The host's side comes from
/proc/cpuinfo, so the check needs neither LLVM nor the TVM compiler.

Run-time libraries: a build may link a library beyond TVM's and CUDA's runtimes (cuBLASLt, for
the GEMMs measured faster with it: backend/cublaslt.py). Its artifact names it
(`Metadata.runtime_libraries`) and the loader loads each here before model.so, so that a missing
one is one line naming the pip command rather than dlopen's error from deep inside TVM. NVIDIA's
wheels put their libraries in site-packages/nvidia/cu13/lib, on no loader's search path, so a
library not found by name is looked for in the pip package that ships it.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixer_compile.errors import ArtifactError, MixerCompileError


def physical_cores() -> int:
    """Distinct physical cores among the CPUs this process is allowed to use (affinity,
    cgroup cpusets), counting two hyper-threads of one core once."""
    cpus = sorted(os.sched_getaffinity(0))
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:  # no sysfs (containers without it): count logical CPUs
            return len(cpus)
    return max(1, len(cores))


MAX_THREADS = 1024  # TVM starts every thread it is told to: 100000 aborted the process or hung it


def use_all_cores() -> int:
    """The number of threads TVM will use: TVM_NUM_THREADS (or OMP_NUM_THREADS) when the
    user set one, else all physical cores, which this sets for the pool and child processes."""
    for name in ("TVM_NUM_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(name, "").strip().isdigit():
            threads = int(os.environ[name])
            if not 1 <= threads <= MAX_THREADS:
                raise MixerCompileError(f"{name}={threads} asks TVM for {threads} threads; set it to 1 to "
                                        f"{MAX_THREADS} (this machine has {physical_cores()} cores) or unset it")
            return threads
    cores = physical_cores()
    os.environ["TVM_NUM_THREADS"] = str(cores)
    return cores


# LLVM feature name -> /proc/cpuinfo flag, for the features generated code may use.
X86_FEATURES = {
    "sse3": "pni", "ssse3": "ssse3", "sse4.1": "sse4_1", "sse4.2": "sse4_2", "popcnt": "popcnt",
    "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2",
    "lzcnt": "abm", "movbe": "movbe", "avx512f": "avx512f", "avx512cd": "avx512cd",
    "avx512bw": "avx512bw", "avx512dq": "avx512dq", "avx512vl": "avx512vl",
    "avx512ifma": "avx512ifma", "avx512vbmi": "avx512vbmi", "avx512vbmi2": "avx512_vbmi2",
    "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16",
    "avx512bitalg": "avx512_bitalg", "avx512vpopcntdq": "avx512_vpopcntdq",
    "avx512vp2intersect": "avx512_vp2intersect", "avxvnni": "avx_vnni", "gfni": "gfni",
    "vaes": "vaes", "vpclmulqdq": "vpclmulqdq", "amx-tile": "amx_tile", "amx-int8": "amx_int8",
    "amx-bf16": "amx_bf16",
}
AARCH64_FEATURES = {
    "neon": "asimd", "fullfp16": "asimdhp", "dotprod": "asimddp", "fp16fml": "asimdfhm",
    "i8mm": "i8mm", "bf16": "bf16", "sve": "sve", "sve2": "sve2",
}
FEATURES = {"x86_64": X86_FEATURES, "aarch64": AARCH64_FEATURES}
_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}


def normalize_arch(name: str) -> str:
    name = name.lower()
    return _ARCH_ALIASES.get(name, name)


def host_cpu_features(cpuinfo: str | None = None) -> set[str] | None:
    """This machine's CPU features in LLVM's names, or None where /proc/cpuinfo is unreadable."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    match = re.search(r"^(?:flags|Features)\s*:(.*)$", cpuinfo, re.MULTILINE)
    if match is None:
        return None
    flags = set(match.group(1).split())
    table = FEATURES.get(host_arch(), {})
    return {llvm for llvm, flag in table.items() if flag in flags}


def host_arch() -> str:
    return normalize_arch(platform.machine())


def check_cpu(cpu: dict[str, Any], where: str, host_features: set[str] | None = None,
              arch: str | None = None) -> None:
    """Refuses a build whose CPU requirements this machine does not meet."""
    arch = arch or host_arch()
    if cpu["arch"] != arch:
        raise ArtifactError(f"{where} was built for {cpu['arch']} CPUs and this machine is {arch}; "
                            f"rebuild it here (--target llvm)")
    have = host_cpu_features() if host_features is None else host_features
    if have is None:  # no /proc/cpuinfo: nothing to check against, the loader will find out
        return
    missing = [f for f in cpu["features"] if f not in have]
    if missing:
        raise ArtifactError(f"{where} was built for mcpu={cpu['mcpu']} and needs CPU features this "
                            f"machine lacks: {', '.join(missing)}; rebuild it for this CPU "
                            f"(--target llvm) or for a common baseline (--target avx2)")


def check_gpu(required: str, local: str | None, where: str) -> None:
    """Refuses a CUDA build for another GPU architecture.

    A cubin for sm_XY runs on GPUs of the same major version with a minor >= Y; the
    architecture-specific variants (sm_90a) run on that exact architecture only.
    """
    if local is None:
        raise ArtifactError(f"{where} was built for a CUDA GPU ({required}) and no CUDA GPU is visible here")
    want, have = _sm(required), _sm(local)
    if want is None or have is None:
        raise ArtifactError(f"{where}: cannot compare GPU architectures '{required}' and '{local}'")
    exact = required.endswith("a")
    if want[0] != have[0] or have[1] < want[1] or (exact and have != want):
        raise ArtifactError(f"{where} was built for {required} and this GPU is {local}; "
                            f"rebuild it with a target for {local}")


def _sm(arch: str) -> tuple[int, int] | None:
    match = re.fullmatch(r"sm_(\d+)(\d)a?", arch)
    return (int(match.group(1)), int(match.group(2))) if match else None


def check_tvm_version(built: str, local: str, where: str) -> None:
    """TVM's runtime ABI and VM bytecode change between minor versions: major.minor must match."""
    if _major_minor(built) != _major_minor(local):
        raise ArtifactError(f"{where} was built with TVM {built} and this runtime is TVM {local}; "
                            f"install apache-tvm=={built} or rebuild the artifact with this TVM")


def _major_minor(version: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def local_gpu() -> Any | None:
    """This machine's first CUDA device, or None (no GPU, no driver, or a TVM without CUDA)."""
    try:
        import tvm

        dev = tvm.cuda(0)
        return dev if dev.exist else None
    except Exception:  # TVM raises its own error types when the CUDA runtime is missing
        return None


def gpu_arch(dev: Any | None) -> str | None:
    """A CUDA device's architecture as 'sm_XY' (None for no device)."""
    return None if dev is None else "sm_" + dev.compute_version.replace(".", "")


@dataclass(frozen=True)
class RuntimeLibrary:
    """A shared library an artifact may link beyond TVM's and CUDA's runtimes, and the pip
    package (and our extra) that installs it."""

    soname: str
    what: str  # what the user knows it as
    distribution: str  # the pip package shipping it
    extra: str  # mixer-compile's extra that installs that package

    @property
    def pip(self) -> str:
        return f"pip install 'mixer-compile[{self.extra}]'"


CUBLASLT = RuntimeLibrary("libcublasLt.so.13", "cuBLASLt", "nvidia-cublas", "cublas")
KNOWN_LIBRARIES = {lib.soname: lib for lib in (CUBLASLT,)}


def package_file(distribution: str, name: str) -> Path | None:
    """The file called `name` that the installed pip package `distribution` holds, or None (no
    such package, or no such file in it): found through the package's record, not a guessed path."""
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = (Path(str(f.locate())) for f in files if f.name == name)
    return next((path for path in found if path.is_file()), None)


def load_runtime_libraries(names: list[str], where: str) -> None:
    """Loads each library an artifact declares, by name (LD_LIBRARY_PATH, the system's paths),
    else from the pip package known to ship it, so that the dynamic loader resolves model.so's
    dependency on it by soname. A library that cannot be loaded is refused in one line."""
    for name in names:
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
            continue
        except OSError:
            pass
        known = KNOWN_LIBRARIES.get(name)
        if known is None:
            raise ArtifactError(f"{where} needs {name}, which is not installed here: put its directory on "
                                "LD_LIBRARY_PATH")
        shipped = package_file(known.distribution, name)
        if shipped is None:
            raise ArtifactError(f"{where} calls {known.what} ({name}), which is not installed here: {known.pip} "
                                "(or put it on LD_LIBRARY_PATH)")
        try:
            ctypes.CDLL(str(shipped), mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:  # installed, but damaged or built for another machine
            raise ArtifactError(f"{where} calls {known.what} ({name}), which does not load from {shipped} "
                                f"({str(exc).splitlines()[0]}); reinstall it: {known.pip}") from None
