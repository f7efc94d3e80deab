"""The model's side of a report: which kernels it runs and how often.

The tasks are extracted exactly as tuning extracts them (`tune.model_module`, `tune.prepare`,
`tune.extract_tasks`), so their workloads hash to the keys the databases use.
"""

from __future__ import annotations

from typing import Any

from mixer_compile.report.logs import ModelTask, describe_kernel


def model_tasks(spec: Any, form: str, dtype: str, target_config: dict[str, Any] | None) -> dict[int, ModelTask]:
    """Kernel structural hash -> (task name, calls) for the model `spec` compiled in `form`."""
    import tvm_ffi

    from mixer_compile.targets import TargetInfo, get_target
    from mixer_compile.tune import extract_tasks, model_module, prepare

    target = TargetInfo("report", "", target_config) if target_config else get_target("llvm")
    tasks = extract_tasks(prepare(model_module(spec, target, form, dtype), target), target, trials=1)
    keys = [tvm_ffi.structural_hash(t.mod) for t in tasks]
    return {key: ModelTask(t.name, t.calls, describe_kernel(key, t.mod)) for key, t in zip(keys, tasks)}
