"""How each library GEMM of a GPU build runs: a CUTLASS configuration (or cuBLASLt) per call site.

The lowering names *what* a call computes (lower/library.py); before the build, every call is
renamed to `<symbol>__<variant>` with the variant chosen for its problem (M, N, K, L):

1. a record measured on a GPU of the family, when one matches the call exactly: the user's
   (`$MIXER_COMPILE_CACHE/library_gemms/<family>.json`, written by tune/gemms.py) before the
   shipped ones (`schedules/<family>/library_gemms.json`);
2. otherwise a default chosen by the shape, so that the first build is sound: a problem with
   many output tiles takes the large tile (and a 2-CTA cluster, sharing the W loads, where its
   M tiles pair up), one that would leave most of the GPU's SMs idle takes smaller tiles.

Each distinct (kernel, variant) is one compiled object (cached by backend/cutlass.py), so a
default set that is small keeps first builds short.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from mixer_compile.backend.cutlass import Config, configs
from mixer_compile.errors import TargetError, TuningError
from mixer_compile.lower.library import PREFIX, GemmKernel, GemmShape, from_symbol, shape_of

RECORDS = "library_gemms.json"
STREAM_K_MIN_STEPS = 8  # K tiles a problem needs before dividing its K loop can pay
# SMs of each family's flagship (H100, A100, B200, Jetson Thor, RTX 5090)
SMS = {"sm_90a": 132, "sm_80": 108, "sm_100": 148, "sm_110": 20, "sm_120": 170}

@dataclass(frozen=True)
class Record:
    """One measured choice: the variant that ran a problem fastest on a GPU of the family."""

    form: str
    dtype: str
    epilogue: str
    m: int
    n: int
    k: int
    l: int
    variant: str
    us: float  # its time per call
    device: str  # the GPU that measured it

    def key(self) -> tuple:
        return (self.form, self.dtype, self.epilogue, self.m, self.n, self.k, self.l)


def key_of(kernel: GemmKernel, shape: GemmShape) -> tuple:
    return (kernel.form, kernel.dtype, kernel.epilogue, shape.m, shape.n, shape.k, shape.l)


def _tiles(config: Config, shape: GemmShape) -> int:
    return math.ceil(shape.m / config.tile[0]) * math.ceil(shape.n / config.tile[1]) * shape.l


def _sms_per_tile(config: Config) -> int:
    """The SMs one output tile occupies: a pair for sm_100's 2-SM tcgen05 MMA (M 256, cluster
    2x1, the pair being the cluster), else one."""
    return config.cluster[0] if config.schedule == "auto" and config.tile[0] == 256 else 1


def default_config(kernel: GemmKernel, shape: GemmShape, family: str) -> Config:
    """The largest data-parallel candidate that gives every SM at least two tiles (a cluster
    only where the M tiles pair up). When none does, a problem of fewer tiles than SMs with a
    long K loop (batch 1's channel GEMMs: 12 tiles of K = 3072 on 132 SMs) takes stream-K where
    the family has it, dividing its K loop among the SMs (CUTLASS's heuristic decomposition
    keeps a tile whole where splitting does not pay); any other, the smallest tiles."""
    space = configs(family, kernel.dtype)
    parallel = [c for c in space if c.schedule != "sk"]
    for config in parallel:
        sms = _sms_per_tile(config)
        pairs = config.cluster[0] in (1, sms) or math.ceil(shape.m / config.tile[0]) % config.cluster[0] == 0
        if pairs and _tiles(config, shape) * sms >= 2 * SMS[family]:
            return config
    for config in (c for c in space if c.schedule == "sk"):
        if _tiles(config, shape) < SMS[family] and shape.k >= STREAM_K_MIN_STEPS * config.tile[2]:
            return config
    return parallel[-1]


def user_records_path(family: str) -> Path:
    from mixer_compile.tune.database import cache_root

    return cache_root() / "library_gemms" / f"{family}.json"


def shipped_records_path(family: str, root: Path | None = None) -> Path:
    """Where `family`'s shipped records are: in the installed schedules, or under another
    schedules tree `root` (a checkout's `schedules/`, when tuning results are shipped)."""
    from mixer_compile.tune.database import SCHEDULES_DIR

    return Path(root or SCHEDULES_DIR) / family / RECORDS


def read_records(path: Path) -> list[Record]:
    if not path.is_file():
        return []
    try:
        return [Record(**r) for r in json.loads(path.read_text())["records"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TuningError(f"cannot read GEMM records '{path}' ({exc}); delete it or re-run the GEMM tuning") from None


def write_records(path: Path, records: Iterable[Record]) -> None:
    """Merges `records` into the file at `path` (a record replaces one of the same problem), atomically."""
    from mixer_compile.util.atomic import write_bytes

    merged = {r.key(): r for r in read_records(path)}
    merged.update({r.key(): r for r in records})
    body = {"records": [asdict(r) for r in sorted(merged.values(), key=lambda r: r.key())]}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, (json.dumps(body, indent=1) + "\n").encode())


def records_for(family: str) -> dict[tuple, Record]:
    """The records a build of `family` applies: the user's win over the shipped ones."""
    found = {r.key(): r for r in read_records(shipped_records_path(family))}
    found.update({r.key(): r for r in read_records(user_records_path(family))})
    return found


def choose(kernel: GemmKernel, shape: GemmShape, family: str, records: dict[tuple, Record]) -> tuple[str, str]:
    """The variant of one call site, and where it came from ("record" or "default")."""
    record = records.get(key_of(kernel, shape))
    if record is not None:
        return record.variant, "record"
    return default_config(kernel, shape, family).variant, "default"


def call_sites(mod: Any) -> list[tuple[GemmKernel, GemmShape]]:
    """Every library GEMM call of a Relax module, with its problem."""
    found: list[tuple[GemmKernel, GemmShape]] = []
    _visit_calls(mod, lambda kernel, shape: found.append((kernel, shape)) or None)
    return found


def kernels_called(mod: Any) -> list[GemmKernel]:
    """The distinct library kernels a Relax module calls: what its library links."""
    return sorted({kernel for kernel, _ in call_sites(mod)}, key=lambda k: k.symbol)


def apply_choices(mod: Any, family: str, records: dict[tuple, Record] | None = None) -> tuple[Any, list[dict]]:
    """`mod` with every library GEMM call renamed to its chosen variant; one line per call site
    (problem, variant, origin) for the build's report."""
    records = records_for(family) if records is None else records
    report: list[dict] = []

    def rename(kernel: GemmKernel, shape: GemmShape) -> str:
        variant, origin = choose(kernel, shape, family, records)
        report.append({"symbol": kernel.symbol, **asdict(shape), "variant": variant, "from": origin})
        return kernel.with_variant(variant).symbol

    return _visit_calls(mod, rename), report


def gpu_object(kernel: GemmKernel, arch: str) -> Path:
    """The compiled object of a chosen kernel: its variant names the library that implements it."""
    from mixer_compile.backend import cublaslt, cutlass

    return cublaslt.gpu_object(kernel, arch) if kernel.variant == cublaslt.VARIANT else cutlass.gpu_object(kernel, arch)


def gpu_objects(kernels: Iterable[GemmKernel], arch: str, jobs: int = 0,
                on_error: Callable[[GemmKernel, TargetError], None] | None = None) -> dict[GemmKernel, Path]:
    """The compiled objects of `kernels`, `jobs` at once (0: as many as cores and memory allow,
    `cutlass.compile_jobs`): nvcc is single-threaded, so one at a time would leave every other
    core idle. A kernel that cannot be built here raises its TargetError, or, given `on_error`,
    is handed to it and left out (a tuning candidate that does not compile, say)."""
    from concurrent.futures import ThreadPoolExecutor

    from mixer_compile.backend import cutlass

    def build(kernel: GemmKernel) -> Path | None:
        try:
            return gpu_object(kernel, arch)
        except TargetError as exc:
            if on_error is None:
                raise
            on_error(kernel, exc)
            return None

    kernels = list(kernels)
    with ThreadPoolExecutor(max_workers=jobs or cutlass.compile_jobs()) as pool:
        return {k: obj for k, obj in zip(kernels, pool.map(build, kernels)) if obj is not None}


def link_options(kernels: list[GemmKernel]) -> list[str]:
    """Linker options for a library holding `kernels`' objects (the CUDA runtime; cuBLASLt if called)."""
    from mixer_compile.backend import cublaslt, cutlass

    uses_cublaslt = any(k.variant == cublaslt.VARIANT for k in kernels)
    return cutlass.link_options() + (cublaslt.link_options() if uses_cublaslt else [])


def check_implementable(sites: list[tuple[GemmKernel, GemmShape]], objects: dict[GemmKernel, Path]) -> None:
    """Asks each compiled CUTLASS kernel, on this CPU, whether it can run the problems it is
    called with (CUTLASS's `can_implement`: alignment of the contiguous axes, shapes), so that a
    choice it would refuse fails the build here, in one line, and not the first call on a GPU.
    cuBLASLt picks its algorithm per call and has no such check."""
    import tempfile

    from mixer_compile.backend import cublaslt, cutlass

    sites = [(k, s) for k, s in sites if k.variant != cublaslt.VARIANT]
    if not sites:
        return
    kernels = sorted({k for k, _ in sites}, key=lambda k: k.symbol)
    with tempfile.TemporaryDirectory(prefix="mixer-compile-check-") as tmp:
        lib = cutlass.load_on_host([objects[k] for k in kernels], cutlass.link_options(), Path(tmp))
        for kernel, shape in sites:
            if not lib[f"{kernel.symbol}_implementable"](shape.m, shape.n, shape.k, shape.l):
                raise TargetError(f"the CUTLASS kernel {kernel.symbol} cannot run the {shape.m}x{shape.n}x{shape.k}"
                                  f"x{shape.l} problem it was chosen for (its can_implement says no): delete "
                                  "that problem's record from the GEMM records, or report the default")


def _visit_calls(mod: Any, rename: Callable[[GemmKernel, GemmShape], str | None]) -> Any:
    """Calls `rename(kernel, shape)` on each library call; a returned symbol replaces the call's."""
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class Rename(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:  # noqa: N802 (TVM's visitor name)
            call = super().visit_call_(call)
            func = call.args[0] if call.args else None
            if not isinstance(func, relax.ExternFunc) or not str(func.global_symbol).startswith(PREFIX):
                return call
            kernel = from_symbol(str(func.global_symbol))
            x, w = call.args[1].fields[0], call.args[1].fields[1]
            shape = shape_of(kernel, tuple(int(d) for d in x.ty.shape),
                             tuple(int(d) for d in w.ty.shape))
            symbol = rename(kernel, shape)
            if symbol is None:
                return call
            return relax.Call(call.op, [relax.ExternFunc(symbol), call.args[1]], call.attrs, call.ty_args)

    mutator = Rename()
    return tvm.IRModule({gvar: mutator.visit_expr(func) if isinstance(func, relax.Function) else func
                         for gvar, func in mod.functions.items()}, attrs=mod.attrs)
