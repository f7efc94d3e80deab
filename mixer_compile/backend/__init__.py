"""Backends: one module per target kind, each exposing the same few functions.

    pass_context(target, dtype) -> PassContext     what the passes may know of the target
    build(mod, target, database=None, on_applied=None) -> executable
    runner(executable, target, params, rebuild) -> Runner   how validation runs a build, where (runner.py)
    describe(executable) -> dict                   what the artifact's metadata says of its code
    CHOOSES_FORM                                   whether --choose-form can time its builds here
    TUNABLE                                        whether MetaSchedule records apply; if so also
    prepare(mod, target) -> mod                    the legalized, fused module whose kernels are the tasks
    default_schedule(mod, target) -> mod           a kernel as a build without records schedules it

`target.py` reads the target files. Adding a target kind is one module here and one entry in
`backend_for`'s table, plus a target file in the top-level `targets/`; the compile driver
never asks which kind it holds.
"""

from __future__ import annotations

from types import ModuleType

from mixer_compile.backend.target import TargetInfo
from mixer_compile.errors import TargetError


def backend_for(target: TargetInfo) -> ModuleType:
    """The backend module of `target`'s kind."""
    from mixer_compile.backend import cpu, cuda

    backends = {"llvm": cpu, "cuda": cuda}
    if target.kind not in backends:
        raise TargetError(f"target '{target.name}' has kind '{target.kind}'; mixer-compile builds for "
                          f"{', '.join(backends)}")
    return backends[target.kind]
