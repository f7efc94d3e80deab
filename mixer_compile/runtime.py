"""Loading a built artifact for inference: `load(dir)(images) -> logits`.

Needs only the TVM runtime and NumPy: nothing of the compiler is imported, and torch only
when the caller passes torch tensors (then it is already imported). In a serving process,
set `TVM_USE_RUNTIME_LIB=1` before TVM is first imported so that TVM loads
`libtvm_runtime.so` alone, not its compiler library (LLVM).

Everything in the metadata is checked before any code of the library runs: the TVM version,
the CPU features (or GPU architecture) the build needs, and the size and SHA-256 of every
file. A refusal is an ArtifactError with a one-line message naming the problem and the fix.

Inputs are NCHW float32 images at the batch size the module was built for, as a NumPy array
or a torch tensor; the output is of the same kind. Contiguous arrays aligned to 64 bytes (all
torch tensors, most NumPy arrays) are passed to the module without a copy through DLPack, and
the logits come back without a copy too.

Thread safety: a Relax VM keeps per-call state (registers, its allocator), so each thread
gets its own VM over the one loaded library and the one set of weights; calls from several
threads run concurrently without a lock.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from mixer_compile.artifact.format import LIBRARY, METADATA, WEIGHTS, read_metadata, sha256
from mixer_compile.errors import ArtifactError, MixerCompileError
from mixer_compile.machine import check_cpu, check_gpu, check_tvm_version, gpu_arch, local_gpu, use_all_cores

ALIGNMENT = 64  # TVM refuses DLPack tensors with less (kAllocAlignment)


class CompiledMixer:
    """A compiled Mixer: call it with NCHW float32 images (numpy or torch), get logits."""

    def __init__(self, artifact_dir: str | Path) -> None:
        import tvm
        from tvm.runtime.vm import VirtualMachine

        use_all_cores()  # before the pool starts: TVM alone would use half the cores on x86
        self.path = Path(artifact_dir)
        self.metadata = read_metadata(self.path)
        self._check_machine(tvm)
        self._check_files()
        self.input_shape = tuple(self.metadata.input["shape"])
        self.input_dtype = self.metadata.input["dtype"]
        self._device = tvm.cuda() if self.metadata.target["kind"] == "cuda" else tvm.cpu()
        try:
            self._library = tvm.runtime.load_module(str(self.path / LIBRARY))
        except Exception as exc:  # TVM raises its own error types for unloadable libraries
            raise ArtifactError(f"cannot load '{self.path / LIBRARY}': {str(exc).splitlines()[0]}") from None
        self._vm_class = VirtualMachine
        self._params: list[Any] = []
        if WEIGHTS in self.metadata.files:
            try:
                loaded = tvm.runtime.load_param_dict_from_file(str(self.path / WEIGHTS))
            except Exception as exc:  # TVM raises its own error types for a malformed file
                raise ArtifactError(f"cannot load '{self.path / WEIGHTS}': {str(exc).splitlines()[0]}; "
                                    "rebuild the artifact") from None
            order = self.metadata.params
            if sorted(loaded) != sorted(order):
                raise ArtifactError(f"'{self.path / WEIGHTS}' does not hold the parameters the module takes")
            on_cpu = self._device.dlpack_device_type() == tvm.cpu().dlpack_device_type()
            self._params = [loaded[n] if on_cpu else loaded[n].copyto(self._device) for n in order]
        self._local = threading.local()

    def _check_machine(self, tvm: Any) -> None:
        where = f"artifact '{self.path}'"
        check_tvm_version(self.metadata.tvm_version, tvm.__version__, where)
        requires = self.metadata.target.get("requires") or {}
        if "gpu_arch" in requires:
            check_gpu(requires["gpu_arch"], gpu_arch(local_gpu()), where)
        if "cpu" in requires:
            check_cpu(requires["cpu"], where)

    def _check_files(self) -> None:
        sizes = self.metadata.file_sizes
        for name, digest in self.metadata.files.items():
            f = self.path / name
            if not f.is_file():
                raise ArtifactError(f"artifact '{self.path}' is incomplete: {name} is missing; "
                                    "copy the whole directory again or rebuild it")
            size = f.stat().st_size
            if name in sizes and size < sizes[name]:
                raise ArtifactError(f"artifact '{self.path}': {name} is truncated ({size} of {sizes[name]} "
                                    "bytes); copy the whole directory again or rebuild it")
            if sha256(f) != digest:
                raise ArtifactError(f"artifact '{self.path}': {name} does not match the SHA-256 recorded in "
                                    f"{METADATA} (altered, or from another build); rebuild the artifact")

    def _vm(self) -> Any:
        vm = getattr(self._local, "vm", None)
        if vm is None:
            vm = self._local.vm = self._vm_class(self._library, self._device)
        return vm

    def _check(self, shape: tuple[int, ...], dtype: str) -> None:
        if tuple(shape) != self.input_shape:
            if tuple(shape[1:]) == self.input_shape[1:]:
                raise MixerCompileError(f"input has batch {shape[0]}; this module was built for batch "
                                        f"{self.input_shape[0]} (rebuild with --batch {shape[0]})")
            raise MixerCompileError(f"input has shape {tuple(shape)}; this module takes "
                                    f"{self.input_shape} (NCHW, batch {self.input_shape[0]})")
        if dtype != self.input_dtype:
            raise MixerCompileError(f"input has dtype {dtype}; this module takes {self.input_dtype}")

    def __call__(self, images: Any) -> Any:
        import tvm

        torch = sys.modules.get("torch")
        if torch is not None and isinstance(images, torch.Tensor):
            self._check(tuple(images.shape), str(images.dtype).removeprefix("torch."))
            x = images.detach().contiguous()
            if x.data_ptr() % ALIGNMENT:
                x = x.clone()  # a fresh allocation is aligned
            out = self._run(tvm.runtime.from_dlpack(x))
            return torch.from_dlpack(out)
        images = np.asarray(images)
        self._check(images.shape, str(images.dtype))
        if images.flags.c_contiguous and images.flags.writeable and images.ctypes.data % ALIGNMENT == 0:
            x = tvm.runtime.from_dlpack(images)
        else:
            x = tvm.runtime.tensor(np.ascontiguousarray(images), self._device)
        out = self._run(x)
        return np.from_dlpack(out) if out.device.dlpack_device_type() == 1 else out.numpy()

    def _run(self, x: Any) -> Any:
        if x.device != self._device:
            x = x.copyto(self._device)
        return self._vm()["main"](x, *self._params)


def load(artifact_dir: str | Path) -> CompiledMixer:
    """Checks the artifact against this machine and loads it; see the module docstring."""
    return CompiledMixer(artifact_dir)
