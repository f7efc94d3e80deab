"""Ctrl-C (or SIGTERM) during tuning: stop after the batch in flight is recorded, or at once on a
second one.

MetaSchedule's search runs in C++ and calls back into Python (builders, runners, measure
callbacks), so Python's default handler would raise KeyboardInterrupt inside one of those
callbacks, where it comes back out of C++ as a TVM error with the worker pools left running.
A handler that only records the request raises nothing inside TVM: the tuner's measure
callback ends the task once its batch is in the database, and the tuner stops between tasks.
A second Ctrl-C restores the default action and ends the process at once; records already
written are kept either way, so a re-run resumes.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any, Callable


# Ctrl-C, and SIGTERM: what `timeout`, CI runners and job schedulers send first
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnInterrupt:
    """`with StopOnInterrupt(say) as stop:` ... `stop.requested` is True after a first Ctrl-C.

    Outside the main thread (where Python cannot install handlers) it does nothing."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.requested = False
        self._say = say
        self._previous: Any = None

    def __enter__(self) -> "StopOnInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        for s in SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        self._say(f"      interrupted ({signal.Signals(signum).name}): stopping once the trials in flight are "
                  "recorded (again to stop at once and lose them); re-run to resume")

    def __exit__(self, kind: type | None, value: BaseException | None, tb: TracebackType | None) -> None:
        for s, previous in (self._previous or {}).items():
            signal.signal(s, previous)


def ignore_sigint() -> None:
    """Initializer of MetaSchedule's builder and runner worker processes: a Ctrl-C in a terminal
    reaches the whole process group, and a worker it killed would turn the candidates in flight
    into failed records. The tuner alone decides when to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
