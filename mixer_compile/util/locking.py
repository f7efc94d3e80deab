"""Advisory locks that serialise writers of one output (an artifact directory, a tuning database).

Two compiles into the same directory, or two tuning runs into the same cache, would otherwise
interleave: both rename into place at once (one fails, or an old artifact survives half-replaced),
or both append to a MetaSchedule database whose records point at workloads by line number, so
a record of one process would name another process's workload. A writer holds an exclusive
`fcntl.flock` on a lock file beside its target (`.NAME.lock`) for as long as it writes; a
second writer waits, saying so, and then proceeds on the finished result.

The lock file is removed by its holder on release, so no lock file is left behind; a waiter
that wakes on a removed file retries on the new one (the usual inode check). A process that
dies holding the lock releases it with its file descriptor, so a crash never wedges the target.
"""

from __future__ import annotations

import errno
import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from mixer_compile.errors import MACHINE_FIXES, MixerCompileError
from mixer_compile.util.temps import short


def lock_path(target: str | Path) -> Path:
    """The lock file of `target`: a hidden sibling, so locking never touches the target itself."""
    target = Path(target).resolve()
    return target.with_name(f".{short(target.name)}.lock")


@contextmanager
def exclusive(target: str | Path, say: Callable[[str], None] | None = None) -> Iterator[None]:
    """Holds the exclusive lock of `target` for the block; `say` hears once that we wait."""
    path = lock_path(target)
    fd = _acquire(path, say)
    try:
        yield
    finally:
        try:
            os.unlink(path)  # while still holding it: a waiter then sees a stale inode and retries
        except FileNotFoundError:
            pass
        os.close(fd)  # releases the flock


def _acquire(path: Path, say: Callable[[str], None] | None) -> int:
    told = False
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise MixerCompileError(f"cannot create lock file '{path}': {exc.strerror or exc}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if say is not None and not told:
                    say(f"      waiting for another mixer-compile process writing {path.name[1:-5]} "
                        f"(lock {path})")
                    told = True
                fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, path):
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            except OSError as exc:  # a full disk: the lock file goes, as a release would remove it
                os.unlink(path)
                os.close(fd)
                raise MixerCompileError(f"cannot write lock file '{path}': {exc.strerror or exc}; "
                                        f"{MACHINE_FIXES.get(exc.errno, MACHINE_FIXES[errno.ENOSPC])}") from None
            return fd
        os.close(fd)  # the holder removed the file after we opened it: lock the new one


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)
