"""Named targets: the JSON files in targets/ turned into tvm Targets.

TVM 0.27 takes targets as dicts, not CLI strings; a name on our command line maps to one
file, so a target is reviewed and versioned like code. The value "host" in a CPU target
stands for what this machine has (its LLVM CPU name, its core count), resolved at build time;
a CUDA target with `"arch": "local"` stands for this machine's GPU (the file's `default`
target when none is visible), so `--target cuda` builds for the GPU at hand. A CUDA target's
`"host": "portable"` is this machine's CPU architecture at a baseline every server of it has
(PORTABLE_HOSTS): nvcc compiles the GPU kernels' host side for the machine it runs on, so the
host code cannot be for another architecture, and GH200 and GB200 hosts are AArch64.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from mixer_compile.machine import (FEATURES, MAX_THREADS, gpu_arch, host_arch, host_cpu_features, local_gpu,
                                   normalize_arch, physical_cores)
from mixer_compile.errors import TargetError, did_you_mean
from mixer_compile.util.config_file import read_config
from mixer_compile.util.stderr import LLVM_FEATURE_NOISE, without_stderr_lines

# the top-level targets/, installed as the package data mixer_compile.targets (pyproject.toml)
TARGETS_DIR = Path(files("mixer_compile.targets"))

# a GPU build's host code only launches kernels: any CPU of the architecture will do
PORTABLE_HOSTS = {"x86_64": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3"},
                  "aarch64": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "generic"}}

# LLVM's names (case-sensitive) for the architectures mixer-compile builds for (machine.FEATURES):
# the first field of an `mtriple`. TVM's LLVM queries crash the process (SIGSEGV) on a triple
# whose architecture LLVM does not know, so any other is refused before LLVM is asked.
TRIPLE_ARCHES = ("x86_64", "amd64", "aarch64", "arm64")

# at most machine.MAX_THREADS: above the largest servers' core counts (a file may describe another
# machine than this one), below what makes TVM abort or hang spawning threads
CORES_RULE = f"'num-cores' must be the number of cores to run on (1 to {MAX_THREADS}, or \"host\" for this machine's)"


@dataclass(frozen=True)
class TargetInfo:
    name: str
    description: str
    config: dict[str, Any]  # the tvm Target dict, "host" placeholders resolved

    @property
    def kind(self) -> str:
        return "cuda" if "tag" in self.config or self.config.get("kind") == "cuda" else self.config["kind"]

    def tvm_target(self) -> Any:
        import tvm

        return tvm.target.Target(self.config)


def _host_cpu(config: dict[str, Any]) -> dict[str, Any]:
    """`mcpu: host` as clang's -march=native reads it: LLVM's name for this CPU, less the
    features that name implies and this machine does not have. Hypervisors hide some (AMX on
    Sapphire and Emerald Rapids VMs, AVX-512 on some instances): LLVM, given the name alone,
    may use them, and the build's requirements would list them, so the loader would refuse the
    artifact on the very machine that built it."""
    import tvm
    from tvm.target import codegen

    name = codegen.llvm_get_system_cpu()
    have = host_cpu_features()
    if have is None:  # no /proc/cpuinfo: the name is all there is to go on
        return {**config, "mcpu": name}
    implied = {str(f) for f in codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": name}))}
    hidden = sorted(implied & set(FEATURES.get(host_arch(), {})) - have)
    mattr = [*(config.get("mattr") or []), *(f"-{f}" for f in hidden)]
    return {**config, "mcpu": name, **({"mattr": mattr} if mattr else {})}


def _resolve_host(config: dict[str, Any]) -> dict[str, Any]:
    config = dict(config)
    if config.get("mcpu") == "host":
        config = _host_cpu(config)
    if config.get("num-cores") == "host":
        config["num-cores"] = physical_cores()
    if config.get("host") == "portable":
        config["host"] = PORTABLE_HOSTS.get(host_arch(), {"kind": "llvm", "mcpu": "generic"})
    if isinstance(config.get("host"), dict):
        config["host"] = _resolve_host(config["host"])
    return config


def _local_gpu_target(data: dict[str, Any]) -> TargetInfo:
    """The sm_XY target file of the local GPU if there is one, else its limits read off the
    device; with no GPU visible, the file's `default` target. Named by the architecture it
    resolves to: tuning records are kept and shipped by target name, and records tuned on an
    H100 must not reach an A100's `--target cuda` build."""
    dev = local_gpu()
    if dev is None:
        base = get_target(data["default"])
        return TargetInfo(base.name, f"no GPU visible: {base.name} ({base.description})", base.config)
    arch = gpu_arch(dev)
    if (TARGETS_DIR / f"{arch}.json").is_file():
        return TargetInfo(arch, f"local {dev.device_name}: {arch}", get_target(arch).config)
    config = {**data["target"], "arch": arch, "max_shared_memory_per_block": dev.max_shared_memory_per_block,
              "max_threads_per_block": dev.max_threads_per_block, "thread_warp_size": dev.warp_size}
    return TargetInfo(arch, f"local {dev.device_name}: {arch}", _resolve_host(config))


def _read(path: Path) -> dict[str, Any]:
    data = read_config(path, "target", TargetError)
    if not isinstance(data, dict) or not isinstance(data.get("target"), dict):
        raise TargetError(f"target file '{path}' must hold an object with a 'target' object")
    _settle(path, data["target"])
    return data


def _settle(path: Path, config: dict[str, Any]) -> None:
    """Puts `mattr` in TVM's form before TVM or _resolve_host sees it: LLVM's own comma-separated
    string becomes a list (`mcpu: host` adds to that list, and would split a string into letters),
    and anything else that is no list of strings is refused. A `num-cores` given is checked here:
    TVM says a wrong type in its own terms and takes 100000, then aborts or hangs spawning the
    threads. A missing one is said last (_checked), so that it hides no other error."""
    mattr = config.get("mattr")
    if isinstance(mattr, str):
        config["mattr"] = [feature.strip() for feature in mattr.split(",") if feature.strip()]
    elif mattr is not None and not (isinstance(mattr, list) and all(isinstance(f, str) for f in mattr)):
        raise TargetError(f"target file '{path}': 'mattr' must be a list of CPU features such as "
                          f"[\"+avx2\", \"-avx512f\"] (or LLVM's \"+avx2,-avx512f\"), got {mattr!r}")
    cores = config.get("num-cores")
    if config.get("kind") == "llvm" and cores not in (None, "host") and (
            not isinstance(cores, int) or isinstance(cores, bool) or not 1 <= cores <= MAX_THREADS):
        raise TargetError(f"target file '{path}': {CORES_RULE}, got {cores!r}")
    if isinstance(config.get("host"), dict):
        _settle(path, config["host"])


def known_targets() -> dict[str, dict[str, Any]]:
    """Every target file by name (aliases not included)."""
    return {p.stem: _read(p) for p in sorted(TARGETS_DIR.glob("*.json"))}


def get_target(name: str) -> TargetInfo:
    """A target by name or alias, or from a JSON file path. A name that is no target's and ends
    in .json (any case) or names an existing file or directory is taken as a path, so that a
    missing or wrong one is said as such, not as an unknown target name."""
    if not name.strip():  # as Path(""), the current directory, it would be refused as a directory
        raise TargetError("an empty target name or path (an unset shell variable?)")
    targets = known_targets()
    for stem, data in targets.items():
        if name == stem or name in data.get("aliases", []):
            if data["target"].get("arch") == "local":
                return _local_gpu_target(data)
            return TargetInfo(stem, data.get("description", ""), _resolve_host(data["target"]))
    path = Path(name)
    if path.is_dir():
        raise TargetError(f"'{path}' is a directory, not a target .json file")
    if path.exists():
        data = _read(path)
        return _checked(path, TargetInfo(path.stem, data.get("description", ""), _resolve_host(data["target"])))
    if path.suffix.lower() == ".json":
        raise TargetError(f"target file '{path}' does not exist")
    words = [*targets, *(alias for data in targets.values() for alias in data.get("aliases", []))]
    raise TargetError(f"unknown target '{name}'{did_you_mean(name, words)} (known: {', '.join(sorted(targets))}; "
                      "or a path to a target .json file)")


def _checked(path: Path, target: TargetInfo) -> TargetInfo:
    """A user's target file as TVM reads it: a kind, key or host TVM does not know, a triple, CPU
    name or feature LLVM does not know, a CPU target without `num-cores`, or a GPU arch that is no
    `sm_XY`, is refused here, in one line, not as a traceback mid-build."""
    try:
        tvm_target = target.tvm_target()
    except (ValueError, RuntimeError) as exc:  # TVM's errors: an unknown kind, key or value type
        raise TargetError(f"target file '{path}' is no target TVM can build: {str(exc).splitlines()[0]}") from None
    _check_cpu_names(path, tvm_target)
    if tvm_target.kind.name == "llvm" and target.config.get("num-cores") is None:
        raise TargetError(f"target file '{path}': 'num-cores' is missing; {CORES_RULE}")
    if tvm_target.kind.name != "cuda":
        return target
    if "arch" not in target.config and "tag" not in target.config:  # TVM would guess: the GPU here, else sm_50
        raise TargetError(f"target file '{path}' names no GPU: give it an 'arch' (sm_80, sm_90...), or build "
                          "with --target cuda for this machine's GPU")
    arch = str(tvm_target.attrs.get("arch", ""))
    if not re.fullmatch(r"sm_\d{2,3}a?", arch):
        raise TargetError(f"target file '{path}': 'arch' must name an NVIDIA GPU architecture as sm_XY "
                          f"(sm_80, sm_90, sm_90a...), got {arch!r}")
    return target


def _check_cpu_names(path: Path, tvm_target: Any) -> None:
    """Refuses a CPU name or a `+feature` LLVM does not know, in the target or its host: LLVM
    would build for its generic CPU, or without the feature, with a log line as the only sign,
    and the code would run without the vector units the file names. First an `mtriple` for an
    architecture not in TRIPLE_ARCHES: asking LLVM about it would crash the process. An `mattr`
    entry with no '+' or '-' fails LLVM's module verification only at the end of the build."""
    import tvm
    from tvm.target import codegen

    for config in (tvm_target, tvm_target.host):
        if config is None or config.kind.name != "llvm":
            continue
        triple = str(config.attrs.get("mtriple") or "")
        if triple and triple.split("-")[0] not in TRIPLE_ARCHES:
            supported = [host["mtriple"] for host in PORTABLE_HOSTS.values()]
            raise TargetError(f"target file '{path}': unknown mtriple '{triple}'{did_you_mean(triple, supported)} "
                              f"(mixer-compile builds for {' and '.join(supported)})")
        triple = triple or str(codegen.llvm_get_system_triple())
        mcpu = str(config.attrs.get("mcpu") or "generic")
        if not codegen.llvm_is_valid_cpu(mcpu, triple):
            known = [str(c) for c in codegen.llvm_get_cpu_archlist(tvm.target.Target({"kind": "llvm", "mtriple": triple}))]
            raise TargetError(f"target file '{path}': LLVM knows no CPU '{mcpu}' for {triple}"
                              f"{did_you_mean(mcpu, known)} (give one of `llc -mtriple={triple} "
                              "-mcpu=help`, or \"host\" for this machine's)")
        mattr = [str(f) for f in config.attrs.get("mattr") or []]
        bare = next((f for f in mattr if not f.startswith(("+", "-"))), None)
        if bare is not None:
            raise TargetError(f"target file '{path}': 'mattr' entry '{bare}' lacks its '+' or '-': write "
                              f"\"+{bare}\" to use the feature, \"-{bare}\" not to")
        wanted = [f[1:] for f in mattr if f.startswith("+")]
        with without_stderr_lines(LLVM_FEATURE_NOISE):  # LLVM's own line: the error below says it
            have = {str(f) for f in codegen.llvm_get_cpu_features(config)} if wanted else set()
        unknown = [f for f in wanted if f not in have]
        if unknown:
            raise TargetError(f"target file '{path}': LLVM knows no CPU feature '{unknown[0]}' for {triple}"
                              f"{did_you_mean(unknown[0], sorted(have))} (give ones of `llc -mtriple={triple} "
                              "-mattr=help`)")


def build_requirements(tvm_target: Any) -> dict[str, Any]:
    """What code built for `tvm_target` needs from the loading machine (recorded at build time).

    Uses LLVM (the TVM compiler library), so it runs at build time only.
    """
    from tvm.target import codegen

    host = tvm_target.host if tvm_target.kind.name == "cuda" else tvm_target
    req: dict[str, Any] = {}
    if tvm_target.kind.name == "cuda":
        req["gpu_arch"] = str(tvm_target.attrs.get("arch", ""))
    if host is not None and host.kind.name == "llvm":
        triple = str(host.attrs.get("mtriple") or codegen.llvm_get_system_triple())
        arch = normalize_arch(triple.split("-")[0])
        llvm_features = {str(f) for f in codegen.llvm_get_cpu_features(host)}
        req["cpu"] = {"arch": arch, "mcpu": str(host.attrs.get("mcpu") or "generic"),
                      "features": sorted(llvm_features & set(FEATURES.get(arch, {})))}
    return req
