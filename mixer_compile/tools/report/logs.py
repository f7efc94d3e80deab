"""Reading tuning logs: a MetaSchedule database directory, or the records an artifact names.

A database holds kernels (workloads: TIR modules keyed by their structural hash) and, in the
order they were measured, one record per trial: [workload index, [trace, run_secs, target,
args]]. A failed candidate is recorded with run_secs 1e10; it counts as a trial but never as
a latency. Bad lines are skipped by `tuning_db.scan`, which names the file and the line.

A database does not say how often the model calls each kernel. When the model is known (an
artifact's metadata, or a spec given by the user) the tasks are extracted from it again the
way tuning extracts them, and matched to the workloads by structural hash.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixer_compile.errors import TuningError
from mixer_compile.tune.database import RECORDS, WORKLOADS, scan

FAILED_SECS = 1e9  # MetaSchedule records a failed run as 1e10 seconds


@dataclass(frozen=True)
class Kernel:
    key: int  # the workload's structural hash, the same in every database
    operator: str  # from the TIR's blocks, e.g. "matmul+add+multiply+compute"
    shapes: str  # "1x16x192, 192x32 -> 1x16x32"
    flops: float  # per call


@dataclass
class TaskLog:
    kernel: Kernel
    trials: list[float | None] = field(default_factory=list)  # seconds per trial, measured order

    @property
    def best(self) -> float | None:
        valid = [t for t in self.trials if t is not None]
        return min(valid) if valid else None

    def best_so_far(self) -> list[float | None]:
        out: list[float | None] = []
        best = None
        for t in self.trials:
            if t is not None and (best is None or t < best):
                best = t
            out.append(best)
        return out


@dataclass
class ModelTask:
    name: str  # the task name tuning printed (the fused Relax function)
    calls: int  # how many times the model calls the kernel
    kernel: Kernel


@dataclass
class TuningLog:
    label: str
    source: Path
    tasks: dict[int, TaskLog]
    targets: list[str]  # the targets the records were measured on
    model: dict[int, ModelTask] | None = None  # None: the model is unknown
    model_name: str | None = None
    problems: list[str] = field(default_factory=list)


def read_input(path: str | Path, model: tuple[Any, str, str, dict[str, Any]] | None = None) -> TuningLog:
    """A database directory or an artifact directory; `model` = (spec, form, dtype, target
    config) names the model when the input does not (a bare database)."""
    path = Path(path)
    if not path.is_dir():
        raise TuningError(f"'{path}' is not a directory: give a tuning database directory "
                          f"({WORKLOADS} + {RECORDS}) or an artifact directory")
    if (path / WORKLOADS).is_file() or (path / RECORDS).is_file():
        log = read_database(path)
        if model is not None:
            _attach_model(log, *model)
            if not any(key in log.model for key in log.tasks):
                log.problems.append(f"none of the {len(log.tasks)} kernels of '{path}' is a kernel of "
                                    f"{log.model_name}: another model's database, or give the --form, --dtype "
                                    "and --target it was tuned for")
        return log
    if (path / "metadata.json").is_file():
        return _read_artifact(path)
    raise TuningError(f"'{path}' is neither a tuning database ({WORKLOADS} + {RECORDS}) nor an artifact "
                      "(metadata.json)")


def read_database(db_dir: Path, label: str | None = None) -> TuningLog:
    db_dir = Path(db_dir)
    for name in (WORKLOADS, RECORDS):
        if not (db_dir / name).is_file():
            raise TuningError(f"'{db_dir}' is not a complete tuning database: {name} is missing")
    result = scan(db_dir)
    if not result.records:
        detail = f"; {len(result.problems)} bad line(s), the first: {result.problems[0]}" if result.problems else ""
        raise TuningError(f"'{db_dir}' holds no usable tuning records{detail}")
    kernels = [_kernel(json.loads(line)) for line in result.workloads]
    tasks: dict[int, TaskLog] = {}
    targets: list[str] = []
    for line in result.records:
        index, (_trace, run_secs, target, _args) = json.loads(line)
        kernel = kernels[index]
        task = tasks.setdefault(kernel.key, TaskLog(kernel))
        secs = sum(run_secs) / len(run_secs) if run_secs else None
        task.trials.append(secs if secs is not None and secs < FAILED_SECS else None)
        name = target_name(target)
        if name not in targets:
            targets.append(name)
    return TuningLog(label or db_dir.name, db_dir, tasks, targets, problems=list(result.problems))


def target_name(target: dict[str, Any] | str) -> str:
    """A short readable name for a record's target: kind, mcpu or arch, cores."""
    if isinstance(target, str):
        return target
    parts = [str(target.get("kind", "?"))]
    for key in ("mcpu", "arch"):
        if target.get(key):
            parts.append(str(target[key]))
    if target.get("num-cores"):
        parts.append(f"{target['num-cores']} cores")
    return " ".join(parts)


def _kernel(workload: list[Any]) -> Kernel:
    from tvm.s_tir.meta_schedule.database import Workload

    return describe_kernel(int(workload[0]), Workload.from_json(workload).mod)


def describe_kernel(key: int, mod: Any) -> Kernel:
    """Operator, shapes and FLOPs of a one-PrimFunc module (a workload, or a model's task)."""
    from tvm.s_tir.analysis import estimate_tir_flops

    func = mod[mod.get_global_vars()[0]]
    blocks = re.findall(r'T\.sblock\("([^"]+)"\)', mod.script(show_meta=False))
    shapes = ["x".join(str(int(d)) for d in p.shape) or "scalar" for p in func.params if hasattr(p, "shape")]
    io = f"{', '.join(shapes[:-1])} -> {shapes[-1]}" if len(shapes) > 1 else "".join(shapes)
    return Kernel(key, operator_name(blocks), io, float(estimate_tir_flops(mod)))


def operator_name(blocks: list[str]) -> str:
    """The distinct computations of a kernel in order, from its TIR block names:
    'T_add_intermediate_1' -> 'add', 'lv5_red' -> 'reduce' (TOPI names some elementwise ops
    just 'compute': the fused task name, when the model is known, says more)."""
    words: list[str] = []
    for block in blocks:
        if block == "root":
            continue
        word = re.sub(r"^T_", "", block)
        word = re.sub(r"(_intermediate)?(_?\d+)*$", "", word)
        if word.endswith("_red"):
            word = "reduce"
        elif re.match(r"lv\d*_", word):
            word = word.split("_", 1)[1]
        if word and word not in words:
            words.append(word)
    return "+".join(words) or "kernel"


def _read_artifact(path: Path) -> TuningLog:
    from mixer_compile.artifact.format import read_metadata
    from mixer_compile.model.spec import spec_from_dict

    meta = read_metadata(path)
    dbs = artifact_databases(path, meta)
    if not dbs:
        raise TuningError(f"artifact '{path}' names no tuning database (it was built without tuning records)")
    missing = [d for d in dbs if not d.is_dir()]
    if missing:
        raise TuningError(f"artifact '{path}' was built with the tuning database '{missing[0]}', "
                          "which is not there any more")
    logs = [read_database(d) for d in dbs]
    log = logs[0]
    for other in logs[1:]:  # several databases were applied together: the best of each kernel counts
        log.problems += other.problems
        log.targets += [t for t in other.targets if t not in log.targets]
        for key, task in other.tasks.items():
            log.tasks.setdefault(key, TaskLog(task.kernel)).trials.extend(task.trials)
    log.label, log.source = path.name, path
    spec = spec_from_dict(meta.spec, name=meta.spec.get("name"))
    _attach_model(log, spec, meta.form, meta.precision.get("dtype", "float32"), meta.target["config"])
    # the databases applied (the shipped ones among them) hold other models' kernels too
    log.tasks = {key: task for key, task in log.tasks.items() if key in log.model}
    if not log.tasks:
        raise TuningError(f"artifact '{path}' has no tuning record for any of its kernels (each ran its "
                          "default schedule): nothing to report; tune it (`mixer-compile tune`) and rebuild")
    return log


def artifact_databases(path: Path, meta: Any) -> list[Path]:
    """The databases an artifact was built with: its own `tuning/` directory, or the paths in
    its metadata's `tuning` ("databases": [...] or "db": "...")."""
    if (path / "tuning" / RECORDS).is_file():
        return [path / "tuning"]
    tuning = meta.tuning or {}
    paths = tuning.get("databases") or ([tuning["db"]] if tuning.get("db") else [])
    return [Path(p) if Path(p).is_absolute() else path / p for p in paths]


def _attach_model(log: TuningLog, spec: Any, form: str, dtype: str, target_config: dict[str, Any]) -> None:
    log.model = _model_kernels(spec, form, dtype, target_config)
    log.model_name = f"{spec.fingerprint()}, form {form}"


def _model_kernels(spec: Any, form: str, dtype: str, target_config: dict[str, Any]) -> dict[int, ModelTask]:
    """Kernel structural hash -> (task name, calls) for the model `spec` built in `form` for the
    target: the tasks of the one composition (compose.model_tasks), so they hash to the
    databases' keys."""
    import tvm_ffi

    from mixer_compile.backend.target import TargetInfo
    from mixer_compile.compose import model_tasks

    tasks = model_tasks(spec, TargetInfo("report", "", target_config), form, dtype)
    keys = [tvm_ffi.structural_hash(t.mod) for t in tasks]
    return {key: ModelTask(t.name, t.calls, describe_kernel(key, t.mod)) for key, t in zip(keys, tasks)}
