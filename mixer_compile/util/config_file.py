"""Reading a user's TOML or JSON file (a spec, a target), its every fault one line."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from mixer_compile.errors import MixerCompileError


def read_config(path: Path, what: str, error: type[MixerCompileError], toml: bool = False) -> Any:
    """The file's data, TOML or JSON; a file that cannot be read or parsed raised as `error`,
    naming `what` the file was meant to be. Read as UTF-8 with an optional BOM, which editors on
    Windows write and neither parser takes."""
    try:
        raw = path.read_text(encoding="utf-8-sig")
        return tomllib.loads(raw) if toml else json.loads(raw)
    except OSError as exc:
        raise error(f"cannot read {what} file '{path}': {exc.strerror or exc}") from None
    except ValueError as exc:  # bad syntax, bad UTF-8, an integer of thousands of digits
        raise error(f"{what} file '{path}' is not valid {'TOML' if toml else 'JSON'}: "
                    f"{str(exc).splitlines()[0].split(';')[0]}") from None  # not Python's advice after ';'
    except RecursionError:  # both parsers recurse per nesting level
        raise error(f"{what} file '{path}' is nested too deeply to be a {what}") from None
