"""Putting a finished artifact directory where it belongs, atomically: the one swap that the
compiler's writer (write.py) and the runtime's `CompiledMixer.save` share.

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
from pathlib import Path

from mixer_compile.artifact.format import METADATA
from mixer_compile.errors import ArtifactError
from mixer_compile.util.locking import exclusive


def temp_dir_beside(out: Path) -> Path:
    """A new empty directory next to `out`, with the permissions a directory made there gets."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
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


def swap_into_place(tmp: Path, out: Path) -> None:
    """Renames the complete artifact `tmp` to `out`, replacing an artifact there, under `out`'s lock."""
    with exclusive(out):
        refuse_foreign(out)
        if not out.exists():
            os.rename(tmp, out)
            return
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
