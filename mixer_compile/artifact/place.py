"""Putting a finished artifact directory where it belongs, atomically: the one staging and
swap that the compiler's writer (write.py) and the runtime's `CompiledMixer.save` share.

An artifact is assembled in a temporary sibling of its destination and renamed into place only
when complete, under the destination's advisory lock (util/locking.py), so a crash never leaves
a half-written artifact where a good one is expected, and two writers of one directory (two
compiles, a compile and a save, two saves) swap one after the other, never between each other's
renames. Runtime-side: it imports nothing of the compiler.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mixer_compile.artifact.format import LIBRARY, METADATA, WEIGHTS
from mixer_compile.errors import ArtifactError
from mixer_compile.util.locking import exclusive
from mixer_compile.util.temps import claim_prefix, short


def _temp_dir_beside(out: Path) -> Path:
    """A new empty directory next to `out`, with the permissions a directory made there gets."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=claim_prefix(out.parent, f".{short(out.name)}."), dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the artifact private
    except OSError as exc:
        raise ArtifactError(f"cannot write artifact to '{out}': {exc.strerror or exc}") from None
    return tmp


def _is_our_metadata(path: Path) -> bool:
    """Whether `path` is a metadata file some version of mixer-compile wrote (an older schema
    is replaced by a rebuild, so only the marker field is asked for)."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(meta, dict) and "format_version" in meta


def refuse_foreign(out: Path) -> None:
    """Refuses a destination that holds anything but an artifact: the swap replaces the whole
    directory, so a user's file in it (notes, calibration data, another tool's metadata.json)
    would be deleted with the old artifact."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ArtifactError(f"'{out}' exists and is not a directory; choose another output directory")
    entries = {p.name for p in out.iterdir()}
    if not entries:
        return
    if METADATA not in entries or not _is_our_metadata(out / METADATA):
        raise ArtifactError(f"'{out}' exists and is not a mixer-compile artifact; choose another output directory")
    others = sorted(entries - {LIBRARY, WEIGHTS, METADATA})
    if others:
        raise ArtifactError(f"'{out}' holds files that are not part of an artifact ({', '.join(others)[:200]}), "
                            "which replacing it would delete; move them out or choose another output directory")


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Renames the complete artifact `tmp` to `out`, replacing an artifact there, under `out`'s lock."""
    with exclusive(out):
        refuse_foreign(out)
        if not out.exists():
            os.rename(tmp, out)
            return
        old = tmp.with_name(f"{tmp.name}-old")  # left by a SIGKILL, claim_prefix removes it too
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged(out: Path, failure: str) -> Iterator[Path]:
    """A new directory beside `out` to assemble an artifact in, swapped into place when the
    block completes and removed when it fails; a file-system error becomes one line,
    `{failure} '{out}': {reason}`."""
    tmp = _temp_dir_beside(out)
    try:
        yield tmp
        _swap_into_place(tmp, out)  # a concurrent writer of `out` swaps before or after, never between
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ArtifactError(f"{failure} '{out}': {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
