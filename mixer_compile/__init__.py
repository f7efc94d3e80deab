"""mixer-compile: compiles MLP-Mixer models (arXiv 2105.01601) into validated TVM shared libraries."""

from mixer_compile.errors import MixerCompileError
from mixer_compile.spec import MixerSpec, load_spec

__all__ = ["MixerCompileError", "MixerSpec", "load_spec"]
__version__ = "0.1.0"
