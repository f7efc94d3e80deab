"""mixer-compile: compiles MLP-Mixer models (arXiv 2105.01601) into validated TVM shared libraries.

    compiled = mixer_compile.compile(model, target="llvm", batch="1-16")   # api.py
    compiled(images); compiled.save(dir); mixer_compile.load(dir)          # runtime.py
"""

from importlib.metadata import PackageNotFoundError, version

from mixer_compile.api import compile
from mixer_compile.errors import MixerCompileError
from mixer_compile.model.spec import MixerSpec, load_spec
from mixer_compile.runtime import CompiledMixer, load

__all__ = ["CompiledMixer", "MixerCompileError", "MixerSpec", "compile", "load", "load_spec"]
try:
    __version__ = version("mixer-compile")  # defined once, in pyproject.toml
except PackageNotFoundError:  # the source tree on sys.path, not installed
    __version__ = "0+unknown"
