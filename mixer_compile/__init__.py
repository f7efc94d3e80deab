"""mixer-compile: compiles MLP-Mixer models (arXiv 2105.01601) into validated TVM shared libraries."""

from importlib.metadata import PackageNotFoundError, version

from mixer_compile.errors import MixerCompileError
from mixer_compile.model.spec import MixerSpec, load_spec

__all__ = ["MixerCompileError", "MixerSpec", "load_spec"]
try:
    __version__ = version("mixer-compile")  # defined once, in pyproject.toml
except PackageNotFoundError:  # the source tree on sys.path, not installed
    __version__ = "0+unknown"
