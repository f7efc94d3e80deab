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

Threads and processes: a Relax VM keeps per-call state (registers, its allocator), so each
thread that runs calls gets its own VM over the one loaded library and the one set of weights.
On a CPU, calls run concurrently and without a lock, on the caller's thread for the first as
many calling threads as there are cores (a fixed pool, the main thread), and on as many threads of
our own for any later one: TVM gives every thread that runs a kernel its own pool of worker threads
and never frees it, so a server making a thread per request would otherwise leak a pool per
request. A pool does not survive fork(): in a forked child (gunicorn --preload, multiprocessing's
fork) the thread that forked hands its calls over too. On a GPU calls take turns on the caller's
thread: each VM captures its CUDA graph on its first call, and a launch from another thread
meanwhile (on the default stream, which every call uses) would break the capture; the GPU runs
one stream's work in order anyway.

A library is loaded by its path, and the dynamic loader hands back the one already loaded from
that path: an artifact rebuilt in place and loaded again in the same process would run the old
code. So a library whose path was loaded before with other contents is loaded through a link of
its own name.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from mixer_compile.artifact.format import LIBRARY, METADATA, WEIGHTS, BatchRange, Metadata, read_metadata, sha256
from mixer_compile.artifact.place import refuse_foreign, staged
from mixer_compile.errors import ArtifactError, InputError, PerformanceWarning
from mixer_compile.util.stderr import TVM_LOAD_NOISE, without_stderr_lines
from mixer_compile.machine import (check_cpu, check_gpu, check_tvm_version, gpu_arch, load_runtime_libraries,
                                   local_gpu, use_all_cores)

ALIGNMENT = 64  # TVM refuses DLPack tensors with less (kAllocAlignment)

_LOADED: dict[Path, str] = {}  # library path -> SHA-256 of what this process loaded from it
_LOAD_LOCK = threading.Lock()
# CPU calls (module docstring): the first threads to call run their calls themselves, as many as
# there are cores; any later thread hands its calls to as many threads of our own
_ADOPTABLE = max(2, os.cpu_count() or 2)
_THREADS_LOCK = threading.Lock()
_threads = threading.local()  # .own: this thread runs its calls itself
_adopted = 0
_forked_in: int | None = None  # in a forked child: the thread that forked (its pool stayed behind)
_callers: ThreadPoolExecutor | None = None


def _cpu_call(call: Any) -> Any:
    global _adopted, _callers
    if getattr(_threads, "own", False):
        return call()
    with _THREADS_LOCK:
        own = _adopted < _ADOPTABLE and threading.get_ident() != _forked_in
        if own:
            _adopted += 1
            _threads.own = True
        elif _callers is None:
            _callers = ThreadPoolExecutor(_ADOPTABLE, thread_name_prefix="mixer-compile")
        callers = _callers
    return call() if own else callers.submit(call).result()


def _forget_threads() -> None:
    """In a forked child: the parent's threads, and TVM's pools in them, did not come along (nor
    would a lock one of them held be released)."""
    global _LOAD_LOCK, _THREADS_LOCK, _threads, _adopted, _forked_in, _callers
    _LOAD_LOCK, _THREADS_LOCK = threading.Lock(), threading.Lock()
    _threads, _adopted, _callers, _forked_in = threading.local(), 0, None, threading.get_ident()


os.register_at_fork(after_in_child=_forget_threads)


def _load_library(tvm: Any, path: Path, digest: str) -> Any:
    """`tvm.runtime.load_module(path)`, through a link named after `digest` when this process
    loaded other contents from `path` before (module docstring)."""
    path = path.resolve()
    with _LOAD_LOCK:
        if _LOADED.setdefault(path, digest) != digest:
            own = Path(tempfile.mkdtemp(prefix="mixer-compile-lib-")) / f"{digest[:16]}{path.suffix}"
            atexit.register(shutil.rmtree, own.parent, True)  # the mapping outlives the file
            try:
                os.link(path, own)
            except OSError:  # another file system
                shutil.copyfile(path, own)
            path = own
        with without_stderr_lines(TVM_LOAD_NOISE):
            return tvm.runtime.load_module(str(path))


class CompiledMixer:
    """A compiled Mixer: call it with NCHW float32 images (numpy or torch), get logits."""

    def __init__(self, artifact_dir: str | Path) -> None:
        import tvm
        from tvm.runtime.vm import VirtualMachine

        threads = use_all_cores()  # before the pool starts: TVM alone would use half the cores on x86
        try:
            self.path = Path(artifact_dir).resolve()
        except RuntimeError as exc:  # a symlink loop (Python before 3.13; an OSError after, met below)
            raise ArtifactError(f"artifact directory '{artifact_dir}': {exc}; fix the link") from None
        self._read_checked()
        _warn_split_for_fewer_cores(self.metadata, f"artifact '{self.path}'", threads)
        self.input_shape = tuple(self.metadata.input["shape"])  # at the largest batch served
        self.input_dtype = self.metadata.input["dtype"]
        self.batches = BatchRange.from_metadata(self.metadata.batch, list(self.input_shape))
        on_cpu = self.metadata.target["kind"] != "cuda"
        self._device = tvm.cpu() if on_cpu else tvm.cuda()
        try:
            self._library = _load_library(tvm, self.path / LIBRARY, self.metadata.files[LIBRARY])
        except Exception as exc:  # TVM raises its own error types for unloadable libraries
            if os.statvfs(self.path).f_flag & os.ST_NOEXEC:
                raise ArtifactError(f"cannot load '{self.path / LIBRARY}': its file system is mounted noexec, and "
                                    "a library's code cannot be mapped from there; copy the artifact elsewhere "
                                    "(or give compile an out_dir that is not noexec)") from None
            raise ArtifactError(f"cannot load '{self.path / LIBRARY}': {str(exc).splitlines()[0]}") from None
        self._vm_class = VirtualMachine
        self._local = threading.local()
        self._check_functions()
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
        self._on_cpu = on_cpu
        self._turns = threading.Lock()  # a GPU's calls take turns (module docstring)

    def _read_checked(self, attempts: int = 3) -> None:
        """The metadata, checked against this machine and the files. A compile swapping a new
        build into place meanwhile (two renames, artifact/place.py) can show a reader the old
        metadata with the new files, or no directory for an instant: then it reads again."""
        for attempt in range(attempts):
            seen = None
            try:
                self.metadata = seen = read_metadata(self.path)
                check_machine(self.metadata, f"artifact '{self.path}'")
                self._check_files()
                return
            except ArtifactError:
                if attempt == attempts - 1 or not self._replaced_since(seen):
                    raise

    def _replaced_since(self, seen: Metadata | None) -> bool:
        time.sleep(0.05)
        try:
            return read_metadata(self.path) != seen
        except ArtifactError:
            return seen is not None  # gone for an instant after being there

    def _check_files(self) -> None:
        sizes = self.metadata.file_sizes or {}  # null in an edited file: the digests still guard
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

    def _check_functions(self) -> None:
        """The library against its metadata (a library of another build that was given this one's
        hashes, or a reordered `params` list, say), here rather than as TVM's error on the first
        call."""
        takes = 1 + (0 if self.metadata.weights["embedded"] else len(self.metadata.params))
        try:
            vm = self._vm()
        except AttributeError as exc:  # TVM's word for a library that holds no Relax VM executable
            raise ArtifactError(f"artifact '{self.path}': {LIBRARY} is no compiled model ({exc}); the files are "
                                "of different builds, rebuild the artifact") from None
        for name in (self.batches.function(e) for e in self.batches.entries):
            try:
                arity = vm._get_function_arity(name)
            except Exception:  # TVM's error type for an unknown function
                arity = None
            if arity != takes:
                found = "has no function" if arity is None else f"takes {arity} arguments in"
                raise ArtifactError(f"artifact '{self.path}': {LIBRARY} {found} '{name}', which {METADATA} "
                                    f"says takes {takes}; the files are of different builds, rebuild the artifact")
            names = [vm._get_function_param_name(name, i) for i in range(1, takes)]
            if takes > 1 and names != self.metadata.params:  # embedded weights: the library takes the image alone
                how = "in another order than" if sorted(names) == sorted(self.metadata.params) else "other than those"
                raise ArtifactError(f"artifact '{self.path}': {LIBRARY}'s '{name}' takes parameters {how} "
                                    f"{METADATA}'s 'params' lists; the file was edited or damaged, "
                                    "rebuild the artifact")

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
            raise InputError(f"input has shape {tuple(shape)}; this module takes {taken} "
                             f"(NCHW, batch {self.batches.describe()})")
        n = shape[0]
        if n < 1:
            raise InputError(f"input has batch {n}; this module serves batches {self.batches.describe()}")
        if not self.batches.min <= n <= self.batches.max:
            if self.batches.is_range:
                raise InputError(f"input has batch {n}; this module serves batches "
                                 f"{self.batches.min} to {self.batches.max} (rebuild with --batch "
                                 f"{min(n, self.batches.min)}-{max(n, self.batches.max)})")
            raise InputError(f"input has batch {n}; this module was built for batch "
                             f"{self.input_shape[0]} (rebuild with --batch {n})")
        if dtype != self.input_dtype:
            raise InputError(f"input has dtype {dtype}; this module takes {self.input_dtype} (convert with "
                             f".astype(np.{self.input_dtype}) or, for a torch tensor, .to(torch.{self.input_dtype}))")

    def __call__(self, images: Any) -> Any:
        import tvm

        torch = sys.modules.get("torch")
        if torch is not None and isinstance(images, torch.Tensor):
            if images.is_meta:
                raise InputError("input is a meta tensor, which holds no data; pass images in memory")
            if images.layout != torch.strided:
                raise InputError(f"input is a {images.layout} tensor; pass a dense one (e.g. .to_dense())")
            self._check(tuple(images.shape), str(images.dtype).removeprefix("torch."))
            x = images.detach().contiguous()
            return self._pieces(x.shape[0], lambda at, b: torch.from_dlpack(
                self._run(self._entry(b), _torch_tensor(tvm, x[at:at + b]))),
                lambda first: torch.empty((x.shape[0], *first.shape[1:]), dtype=first.dtype, device=first.device))
        if not isinstance(images, np.ndarray) and not hasattr(images, "__array__"):
            raise InputError(f"input is a {type(images).__name__}, not an array; pass NCHW images as a NumPy "
                             "array or a torch tensor")
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
        if self._on_cpu:
            return _cpu_call(lambda: self._vm()[function](x, *self._params))
        with self._turns:
            return self._vm()[function](x, *self._params)

    def save(self, out_dir: str | Path) -> Path:
        """Copies this artifact (metadata.json and every file it lists) to `out_dir`, atomically
        and under its lock, as a compile writes one (artifact/place.py). An existing artifact
        at `out_dir` is replaced; anything else there is refused, and so is a copy that is no
        longer what was loaded (the directory rebuilt since)."""
        out = Path(out_dir).resolve()
        if out == self.path:
            return out
        refuse_foreign(out)
        with staged(out, "cannot save the artifact to") as tmp:
            for name in [*self.metadata.files, METADATA]:
                shutil.copyfile(self.path / name, tmp / name)
            changed = [n for n, digest in self.metadata.files.items() if sha256(tmp / n) != digest]
            if changed or read_metadata(tmp) != self.metadata:
                raise ArtifactError(f"artifact '{self.path}' changed on disk since it was loaded "
                                    f"({', '.join(changed) or METADATA}); load it again to save what is there now")
        return out

    def __reduce__(self) -> tuple:
        """Pickled as its artifact's path, loaded again (and checked again) where it is unpickled:
        what multiprocessing's spawn and forkserver workers receive."""
        return load, (str(self.path),)

    def __repr__(self) -> str:
        spec = self.metadata.spec
        return (f"CompiledMixer({spec.get('name')}, batch {self.batches.describe()}, "
                f"{self.metadata.target.get('name')}, '{self.path}')")


def check_machine(metadata: Metadata, where: str) -> None:
    """Refuses (ArtifactError) an artifact this machine cannot run: another TVM, a CPU without
    the build's features, no GPU or another GPU, a run-time library missing."""
    import tvm

    check_tvm_version(metadata.tvm_version, tvm.__version__, where)
    requires = metadata.target.get("requires") or {}
    if "gpu_arch" in requires:
        check_gpu(requires["gpu_arch"], gpu_arch(local_gpu()), where)
    if "cpu" in requires:
        check_cpu(requires["cpu"], where)
    load_runtime_libraries(metadata.runtime_libraries or [], where)


def _warn_split_for_fewer_cores(metadata: Metadata, where: str, threads: int) -> None:
    """A CPU build's parallel loops are split for the cores of its target (a CI machine's 2,
    say): on a machine running more threads, most of them may wait. Said once per load, since
    the build runs correctly, only slower than one for this machine."""
    built = (metadata.target.get("config") or {}).get("num-cores")
    if metadata.target.get("kind") == "llvm" and isinstance(built, int) and built < threads:
        warnings.warn(f"{where} splits its parallel loops for {built} cores and this machine runs {threads} "
                      f"threads, which may leave most of them idle; rebuild it here (--target llvm) or for "
                      f"\"num-cores\": {threads} in its target file", PerformanceWarning, stacklevel=4)


def _torch_tensor(tvm: Any, x: Any) -> Any:
    """A contiguous torch tensor as a TVM tensor, without a copy when it is aligned."""
    if x.data_ptr() % ALIGNMENT:
        x = x.clone()  # a fresh allocation is aligned
    return tvm.runtime.from_dlpack(x)


def load(artifact_dir: str | Path) -> CompiledMixer:
    """Checks the artifact against this machine and loads it; see the module docstring."""
    return CompiledMixer(artifact_dir)
