"""What the checkpoint readers share about the archives they open (zip members, library errors):
kept apart from the package's __init__, which imports the readers."""

from __future__ import annotations

import re
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager


def first_line(exc: BaseException) -> str:
    """The first line of a library's error, without terminal colour codes or torch's
    "(Could this error message be improved? ...)" request."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    text = text.split("(Could this error message be improved?")[0].strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextmanager
def zip_member(name: str) -> Iterator[None]:
    """Reading zip member `name`: its damaged deflate data, which zipfile lets through as a bare
    zlib.error naming nothing, raised as zipfile's own BadZipFile naming the member, as a bad
    CRC-32 is, so that each reader reports both alike."""
    try:
        yield
    except zlib.error as exc:
        raise zipfile.BadZipFile(f"Bad compressed data for file {name!r}: {exc}") from None
