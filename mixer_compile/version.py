"""The package's version: defined once, in pyproject.toml, read from the installed metadata."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mixer-compile")
except PackageNotFoundError:  # the source tree on sys.path, not installed
    __version__ = "0+unknown"
