"""Atomic single-file outputs: written to a temporary sibling and renamed into place.

A crash, an interrupt or an error mid-write leaves the previous file (or none) where the
output is expected, never a truncated one; what a SIGKILL leaves goes with the next write
(util/temps.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mixer_compile.errors import MixerCompileError
from mixer_compile.util.temps import claim_prefix, short


def why_unwritable(directory: str | Path) -> str | None:
    """Why files could not be created in `directory`, or in the directories that creating it
    would make (no permission, a read-only or full file system, a file in the way); None when
    they could. Checked before long work, not after it; creates nothing that outlives the check,
    not even the missing directories."""
    directory = Path(directory).resolve()
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    if not existing.is_dir():
        return f"'{existing}' is not a directory"
    try:
        shutil.rmtree(tempfile.mkdtemp(prefix=".probe-", dir=existing))
    except OSError as exc:
        return str(exc.strerror or exc)
    return None


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path (same suffix, same folder) that becomes `path` if the block succeeds."""
    out = Path(path).resolve()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=claim_prefix(out.parent, f".{short(out.stem)}."), suffix=out.suffix,
                                    dir=out.parent)
        os.close(fd)
    except OSError as exc:  # a file where a folder must be says so, not "File exists"
        reason = why_unwritable(out.parent) or exc.strerror or exc
        raise MixerCompileError(f"cannot write '{out}': {reason}") from None
    tmp = Path(name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the output private
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise MixerCompileError(f"cannot write '{out}': {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
