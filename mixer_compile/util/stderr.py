"""TVM's and LLVM's C++ lines, kept off the user's terminal.

TVM 0.27 logs one warning line per constant when it saves or loads a library with embedded
weights (src/runtime/vm/executable.cc: "Scope Saving:", "Scope Loaded:", debug lines left in):
thirty lines of noise for a tiny model, thousands for a large one. Shared by the artifact
writer and the runtime (which imports nothing else of the compiler). LLVM prints "'x' is not
a recognized feature for this target (ignoring feature)" while a target file's features are
read, before our own one-line refusal of them (backend/target.py).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Iterator

TVM_SAVE_NOISE = "Scope Saving:"
TVM_LOAD_NOISE = "Scope Loaded:"
LLVM_FEATURE_NOISE = "(ignoring feature)"


@contextlib.contextmanager
def without_stderr_lines(marker: str) -> Iterator[None]:
    """Runs the block with the process's stderr (fd 2, where TVM's C++ logging writes) caught,
    then passes on every line but those containing `marker`."""
    sys.stderr.flush()
    try:
        caught_file = tempfile.TemporaryFile()
    except OSError:  # no usable temporary directory (a read-only root file system): unfiltered
        yield
        return
    saved = os.dup(2)
    with caught_file as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [line for line in caught.read().decode(errors="replace").splitlines(keepends=True)
                    if marker not in line]
            sys.stderr.write("".join(kept))
