"""Loading a built artifact for inference: `load(dir)(images) -> logits`.

Needs only the TVM runtime and NumPy: nothing of the compiler is imported, and torch only
when the caller passes torch tensors (then it is already imported). In a serving process,
set `TVM_USE_RUNTIME_LIB=1` before TVM is first imported so that TVM loads
`libtvm_runtime.so` alone, not its compiler library (LLVM).

Everything in the metadata is checked before any code of the library runs: the TVM version,
the CPU features (or GPU architecture) the build needs, the run-time libraries it links
(cuBLASLt, say: loaded here first, from its pip package if need be), and the size and
SHA-256 of every file. A refusal is an ArtifactError with a one-line message naming the
problem and the fix.

Inputs are NCHW float32 images at the batch size the module was built for, or at any batch of
its range (a `--batch 1-16` build), as a NumPy array or a torch tensor; the output is of the
same kind. A batch outside what the artifact serves is refused with one line naming the range.
A range build runs a batch of n as the binary decomposition of n over its entry functions
(11 = 8+2+1: no padding, no wasted work) and writes each piece's logits into one output.
Contiguous arrays aligned to 64 bytes (all torch tensors, most NumPy arrays) are passed to the
module without a copy through DLPack (a piece of a batch too: it is a view), and a batch that
is one call's gets its logits back without a copy too.

`CompiledMixer.save(dir)` copies the artifact (every file its metadata lists) to `dir`, which
`load(dir)` then loads: the object `mixer_compile.compile(...)` returns is one of these.

Thread safety: a Relax VM keeps per-call state (registers, its allocator), so each thread
gets its own VM over the one loaded library and the one set of weights; on a CPU, calls from
several threads run concurrently without a lock. On a GPU they take turns: each VM captures its
CUDA graph on its first call, and a launch from another thread meanwhile (on the default stream,
which every call uses) would break the capture; the GPU runs one stream's work in order anyway.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from mixer_compile.artifact.format import LIBRARY, METADATA, WEIGHTS, BatchRange, read_metadata, sha256
from mixer_compile.artifact.place import refuse_foreign, staged
from mixer_compile.errors import ArtifactError, MixerCompileError
from mixer_compile.util.stderr import TVM_LOAD_NOISE, without_stderr_lines
from mixer_compile.machine import (check_cpu, check_gpu, check_tvm_version, gpu_arch, load_runtime_libraries,
                                   local_gpu, use_all_cores)

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
        self.input_shape = tuple(self.metadata.input["shape"])  # at the largest batch served
        self.input_dtype = self.metadata.input["dtype"]
        self.batches = BatchRange.from_metadata(self.metadata.batch, list(self.input_shape))
        on_cpu = self.metadata.target["kind"] != "cuda"
        self._device = tvm.cpu() if on_cpu else tvm.cuda()
        try:
            with without_stderr_lines(TVM_LOAD_NOISE):
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
            self._params = [loaded[n] if on_cpu else loaded[n].copyto(self._device) for n in order]
        self._local = threading.local()
        self._turns = contextlib.nullcontext() if on_cpu else threading.Lock()  # see the module docstring

    def _check_machine(self, tvm: Any) -> None:
        where = f"artifact '{self.path}'"
        check_tvm_version(self.metadata.tvm_version, tvm.__version__, where)
        requires = self.metadata.target.get("requires") or {}
        if "gpu_arch" in requires:
            check_gpu(requires["gpu_arch"], gpu_arch(local_gpu()), where)
        if "cpu" in requires:
            check_cpu(requires["cpu"], where)
        load_runtime_libraries(self.metadata.runtime_libraries or [], where)

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

    @property
    def batch_range(self) -> tuple[int, int]:
        """The smallest and the largest batch this artifact serves (equal for a fixed batch)."""
        return self.batches.min, self.batches.max

    def _check(self, shape: tuple[int, ...], dtype: str) -> None:
        if len(shape) != 4 or tuple(shape[1:]) != self.input_shape[1:]:
            taken = ("(N" if self.batches.is_range else f"({self.input_shape[0]}") + \
                ", " + ", ".join(map(str, self.input_shape[1:])) + ")"
            raise MixerCompileError(f"input has shape {tuple(shape)}; this module takes {taken} "
                                    f"(NCHW, batch {self.batches.describe()})")
        n = shape[0]
        if n < 1:
            raise MixerCompileError(f"input has batch {n}; this module serves batches {self.batches.describe()}")
        if not self.batches.min <= n <= self.batches.max:
            if self.batches.is_range:
                raise MixerCompileError(f"input has batch {n}; this module serves batches "
                                        f"{self.batches.min} to {self.batches.max} (rebuild with --batch "
                                        f"{min(n, self.batches.min)}-{max(n, self.batches.max)})")
            raise MixerCompileError(f"input has batch {n}; this module was built for batch "
                                    f"{self.input_shape[0]} (rebuild with --batch {n})")
        if dtype != self.input_dtype:
            raise MixerCompileError(f"input has dtype {dtype}; this module takes {self.input_dtype}")

    def __call__(self, images: Any) -> Any:
        import tvm

        torch = sys.modules.get("torch")
        if torch is not None and isinstance(images, torch.Tensor):
            self._check(tuple(images.shape), str(images.dtype).removeprefix("torch."))
            x = images.detach().contiguous()
            return self._pieces(x.shape[0], lambda at, b: torch.from_dlpack(
                self._run(self._entry(b), _torch_tensor(tvm, x[at:at + b]))),
                lambda first: torch.empty((x.shape[0], *first.shape[1:]), dtype=first.dtype, device=first.device))
        images = np.asarray(images)
        self._check(images.shape, str(images.dtype))
        if not (images.flags.c_contiguous and images.flags.writeable):
            images = np.ascontiguousarray(images)
        return self._pieces(images.shape[0], lambda at, b: self._numpy(
            self._run(self._entry(b), self._tensor(tvm, images[at:at + b]))),
            lambda first: np.empty((images.shape[0], *first.shape[1:]), first.dtype))

    def _pieces(self, n: int, run: Any, empty: Any) -> Any:
        """A batch of `n` run as its pieces (BatchRange.split): `run(at, b)` gives the logits of
        images [at, at + b); one piece is returned as it comes (no copy), several are written
        into one output made by `empty(first piece's logits)`."""
        pieces = self.batches.split(n)
        if len(pieces) == 1:
            return run(0, n)
        out, at = None, 0
        for b in pieces:
            logits = run(at, b)
            if out is None:
                out = empty(logits)
            out[at:at + b] = logits
            at += b
        return out

    def _entry(self, batch: int) -> str:
        return self.batches.function(batch)

    def _tensor(self, tvm: Any, images: np.ndarray) -> Any:
        if images.flags.c_contiguous and images.flags.writeable and images.ctypes.data % ALIGNMENT == 0:
            return tvm.runtime.from_dlpack(images)
        return tvm.runtime.tensor(np.ascontiguousarray(images), self._device)

    @staticmethod
    def _numpy(out: Any) -> np.ndarray:
        return np.from_dlpack(out) if out.device.dlpack_device_type() == 1 else out.numpy()

    def _run(self, function: str, x: Any) -> Any:
        if x.device != self._device:
            x = x.copyto(self._device)
        with self._turns:
            return self._vm()[function](x, *self._params)

    def save(self, out_dir: str | Path) -> Path:
        """Copies this artifact (metadata.json and every file it lists) to `out_dir`, atomically
        and under its lock, as a compile writes one (artifact/place.py). An existing artifact
        at `out_dir` is replaced; anything else there is refused."""
        out = Path(out_dir).resolve()
        if out == self.path.resolve():
            return out
        refuse_foreign(out)
        with staged(out, "cannot save the artifact to") as tmp:
            for name in [*self.metadata.files, METADATA]:
                shutil.copyfile(self.path / name, tmp / name)
        return out

    def __repr__(self) -> str:
        spec = self.metadata.spec
        return (f"CompiledMixer({spec.get('name')}, batch {self.batches.describe()}, "
                f"{self.metadata.target.get('name')}, '{self.path}')")


def _torch_tensor(tvm: Any, x: Any) -> Any:
    """A contiguous torch tensor as a TVM tensor, without a copy when it is aligned."""
    if x.data_ptr() % ALIGNMENT:
        x = x.clone()  # a fresh allocation is aligned
    return tvm.runtime.from_dlpack(x)


def load(artifact_dir: str | Path) -> CompiledMixer:
    """Checks the artifact against this machine and loads it; see the module docstring."""
    return CompiledMixer(artifact_dir)
