"""What a backend hands validation: its build loaded where it runs, and what that place is."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Runner:
    """A build loaded on a device, weights bound: `function(name)` is one of its entry functions
    as NumPy images -> NumPy logits. `where` says what runs it; `batch` is the batch of the
    module it holds when that is a stand-in of another batch (a GPU build checked on the host)."""

    library: Any  # a loaded module or an executable
    device: Any
    params: list[Any]
    where: str
    batch: int | None = None
    _vm: Any = field(default=None, repr=False)

    def function(self, name: str = "main") -> Callable[[Any], Any]:
        import tvm

        if self._vm is None:
            self._vm = tvm.relax.VirtualMachine(self.library, self.device)
            self.params = [tvm.runtime.tensor(v, self.device) for v in self.params]
        vm, dev, args = self._vm, self.device, self.params
        return lambda x: vm[name](tvm.runtime.tensor(x, dev), *args).numpy()
