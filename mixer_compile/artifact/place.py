"""Putting a finished artifact directory where it belongs, atomically: the one staging and
swap that the compiler's writer (write.py) and the runtime's `CompiledMixer.save` share.

An artifact is assembled in a temporary sibling of its destination and renamed into place only
when complete, under the destination's advisory lock (util/locking.py), so a crash never leaves
a half-written artifact where a good one is expected, and two writers of one directory (two
compiles, a compile and a save, two saves) swap one after the other, never between each other's
renames. Runtime-side: it imports nothing of the compiler.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mixer_compile.artifact.format import METADATA
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


def refuse_foreign(out: Path) -> None:
    """Refuses a destination that holds something other than an artifact (it would be replaced)."""
    if out.exists() and (not out.is_dir() or not (out / METADATA).is_file() and any(out.iterdir())):
        raise ArtifactError(f"'{out}' exists and is not a mixer-compile artifact; "
                            "choose another output directory")


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
