"""TVM's tensor intrinsics (`tvm.s_tir.tensor_intrin`), imported in seconds instead of a minute.

The import parses ~500 TVMScript functions, each calling `inspect.stack()`, whose per-frame
`inspect.getmodule` scans all of `sys.modules` for every frame of a pseudo-file (the frozen
import machinery, `<string>`): tens of seconds, more with torch loaded. Two things need them:
a MetaSchedule TuneContext imports them when it is created (every tuning run, CPU ones too),
and the CUDA schedules use the WMMA generators (and register bf16 ones). Both come here first,
where `getmodule` is memoized by file name while the functions are parsed.
"""

from __future__ import annotations

import contextlib
import inspect
from types import ModuleType
from typing import Any, Iterator


@contextlib.contextmanager
def memoized_getmodule() -> Iterator[None]:
    """For code that parses TVMScript functions in bulk (registering intrinsics)."""
    original, cache = inspect.getmodule, {}

    def getmodule(obj: Any, _filename: str | None = None) -> Any:
        key = _filename or getattr(getattr(obj, "f_code", None), "co_filename", None)
        if key is None:
            return original(obj, _filename)
        if key not in cache:
            cache[key] = original(obj, _filename)
        return cache[key]

    inspect.getmodule = getmodule
    try:
        yield
    finally:
        inspect.getmodule = original


def tensor_intrinsics() -> ModuleType:
    """`tvm.s_tir.tensor_intrin`, every target's intrinsics registered (imported once)."""
    with memoized_getmodule():
        import tvm.s_tir.tensor_intrin
        import tvm.s_tir.tensor_intrin.cuda  # noqa: F401 (the package imports it; named for the attribute)

    return tvm.s_tir.tensor_intrin
