"""Names for temporaries that outlive a SIGKILL only until the next write beside them.

A SIGKILL (the OOM killer, a CI timeout) skips every `finally`, so a killed compile would leave
its staging directory, possibly hundreds of MB of weights, beside the artifact for good. Each
temporary is named after its host and process; whoever next makes one in that folder removes
those whose process is gone. Runtime-side (`CompiledMixer.save` stages through it too).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
from pathlib import Path


def short(name: str) -> str:
    """`name` as part of a temporary's or a lock's name: itself, or when the host, PID and
    suffix around it could carry it past a file system's 255-byte names, its first 100
    characters and a hash of the whole."""
    if len(name.encode()) <= 120:
        return name
    return f"{name[:100]}~{hashlib.sha256(name.encode()).hexdigest()[:12]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def claim_prefix(parent: Path, prefix: str) -> str:
    """The name prefix for a temporary in `parent`: `prefix`, this host and this process.
    Removes first what processes of this host that no longer run left there under `prefix`; another
    host's (a shared file system) and a live process's stay."""
    host = socket.gethostname().replace("-", "_")
    ours = f"{prefix}{host}-"
    try:
        entries = [e for e in Path(parent).iterdir() if e.name.startswith(ours)]
    except OSError:
        entries = []
    for entry in entries:
        pid = entry.name[len(ours):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    return f"{ours}{os.getpid()}-"
