"""Loading a built artifact for inference: `load(dir)(images) -> logits`.

Needs only the TVM runtime and NumPy (torch tensors are accepted when torch is already
imported by the caller, and returned as torch tensors). The metadata is checked before any
code is run: missing or altered files are refused rather than loaded.

Thread safety: a Relax VM keeps per-call state, so each thread gets its own VM over the one
loaded library and the one set of weights on the device; calls from several threads run
concurrently without a lock.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from mixer_compile.artifact import LIBRARY, METADATA, WEIGHTS, read_metadata, sha256
from mixer_compile.errors import ArtifactError, MixerCompileError


class CompiledMixer:
    """A compiled Mixer: call it with NCHW float32 images (numpy or torch), get logits."""

    def __init__(self, artifact_dir: str | Path) -> None:
        import tvm
        from tvm import relax

        self.path = Path(artifact_dir)
        self.metadata = read_metadata(self.path)
        for name, digest in self.metadata.get("files", {}).items():
            f = self.path / name
            if not f.is_file():
                raise ArtifactError(f"artifact '{self.path}' is incomplete: {name} is missing")
            if sha256(f) != digest:
                raise ArtifactError(f"artifact '{self.path}': {name} does not match the hash in {METADATA} "
                                    "(truncated or altered); rebuild the artifact")
        self.input_shape = tuple(self.metadata["input"]["shape"])
        self.input_dtype = self.metadata["input"]["dtype"]
        self._device = tvm.cpu() if self.metadata["target"]["kind"] != "cuda" else tvm.cuda()
        try:
            self._library = tvm.runtime.load_module(str(self.path / LIBRARY))
        except Exception as exc:  # TVM raises its own error types for unloadable libraries
            raise ArtifactError(f"cannot load '{self.path / LIBRARY}': {str(exc).splitlines()[0]}") from None
        self._relax = relax
        self._params: list[Any] = []
        if WEIGHTS in self.metadata["files"]:
            loaded = tvm.runtime.load_param_dict_from_file(str(self.path / WEIGHTS))
            order = self.metadata["params"]
            if sorted(loaded) != sorted(order):
                raise ArtifactError(f"'{self.path / WEIGHTS}' does not hold the parameters the module takes")
            self._params = [loaded[name].copyto(self._device) for name in order]
        self._local = threading.local()

    def _vm(self) -> Any:
        vm = getattr(self._local, "vm", None)
        if vm is None:
            vm = self._local.vm = self._relax.VirtualMachine(self._library, self._device)
        return vm

    def _check(self, shape: tuple[int, ...], dtype: str) -> None:
        if tuple(shape) != self.input_shape:
            raise MixerCompileError(f"input has shape {tuple(shape)}; this module was built for "
                                    f"{self.input_shape} (NCHW, batch {self.input_shape[0]})")
        if dtype != self.input_dtype:
            raise MixerCompileError(f"input has dtype {dtype}; this module takes {self.input_dtype}")

    def __call__(self, images: Any) -> Any:
        import tvm

        torch = sys.modules.get("torch")
        if torch is not None and isinstance(images, torch.Tensor):
            self._check(tuple(images.shape), str(images.dtype).removeprefix("torch."))
            x = tvm.runtime.from_dlpack(images.detach().contiguous())
            out = self._vm()["main"](x.copyto(self._device), *self._params)
            return torch.from_dlpack(out.copyto(tvm.cpu()))
        images = np.asarray(images)
        self._check(images.shape, str(images.dtype))
        x = tvm.runtime.tensor(np.ascontiguousarray(images), self._device)
        return self._vm()["main"](x, *self._params).numpy()


def load(artifact_dir: str | Path) -> CompiledMixer:
    return CompiledMixer(artifact_dir)
