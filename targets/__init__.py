"""The named target files, installed as the package data `mixer_compile.targets` (see
pyproject.toml); read through importlib.resources by mixer_compile.backend.target. The
__init__ makes this a regular package, which an editable install needs to find it."""
