"""mixer-compile: compiles MLP-Mixer models (arXiv 2105.01601) into validated TVM shared libraries.

    compiled = mixer_compile.compile(model, target="llvm", batch="1-16")   # api.py
    compiled(images); compiled.save(dir); mixer_compile.load(dir)          # runtime.py

Importing the package loads nothing but the standard library: the runtime (`load`) and the
compiler's entry points load on first use (PEP 562 `__getattr__`), so a serving process that
imports `mixer_compile.runtime` gets the runtime side only, and the command line has its
Ctrl-C handler in place before NumPy or TVM start loading.
"""

import os
from pathlib import Path
from typing import Any


def _cache_home_without_a_home() -> None:
    """TVM works out ~/.cache when it is imported and raises without a home directory (a
    container's user with no passwd entry and no $HOME), as would our cache: such a user gets
    a cache under the temporary directory instead (XDG_CACHE_HOME, which both read first)."""
    if os.environ.get("XDG_CACHE_HOME"):
        return
    try:
        Path.home()
    except (RuntimeError, KeyError):
        import tempfile

        os.environ["XDG_CACHE_HOME"] = os.path.join(tempfile.gettempdir(), f"mixer-compile-cache-{os.getuid()}")


_cache_home_without_a_home()

from mixer_compile.errors import MixerCompileError  # noqa: E402 (after the cache home is settled)
from mixer_compile.version import __version__  # noqa: E402

__all__ = ["CompiledMixer", "MixerCompileError", "MixerSpec", "__version__", "compile", "load", "load_spec"]


def __getattr__(name: str) -> Any:
    if name in ("CompiledMixer", "load"):
        from mixer_compile import runtime

        return getattr(runtime, name)
    if name == "compile":
        from mixer_compile.api import compile

        return compile
    if name in ("MixerSpec", "load_spec"):
        from mixer_compile.model import spec

        return getattr(spec, name)
    raise AttributeError(f"module 'mixer_compile' has no attribute '{name}'")
