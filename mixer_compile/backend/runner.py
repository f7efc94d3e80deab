"""What a backend hands validation: its build made callable, and where that runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class Runner:
    """A build made callable for validation: images in, logits out (NumPy), and where it ran
    (`batch`: the batch it runs at, when not the build's own: a GPU build checked on the host)."""

    run: Callable[[Any], Any]
    where: str
    batch: int | None = None
