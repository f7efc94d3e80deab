"""mixer-compile: compiles MLP-Mixer models (arXiv 2105.01601) into validated TVM shared libraries.

    compiled = mixer_compile.compile(model, target="llvm", batch="1-16")   # api.py
    compiled(images); compiled.save(dir); mixer_compile.load(dir)          # runtime.py

Importing the package (as `import mixer_compile.runtime` does in a serving process) loads the
runtime side only; the compiler's entry points load on first use (PEP 562 `__getattr__`).
"""

from typing import Any

from mixer_compile.errors import MixerCompileError
from mixer_compile.runtime import CompiledMixer, load
from mixer_compile.version import __version__

__all__ = ["CompiledMixer", "MixerCompileError", "MixerSpec", "__version__", "compile", "load", "load_spec"]


def __getattr__(name: str) -> Any:
    if name == "compile":
        from mixer_compile.api import compile

        return compile
    if name in ("MixerSpec", "load_spec"):
        from mixer_compile.model import spec

        return getattr(spec, name)
    raise AttributeError(f"module 'mixer_compile' has no attribute '{name}'")
