"""Production loading: what the runtime imports, what it refuses, inputs, threads.

Numerical bound: the compiled module against the float64 reference, FP32 (tests/helpers.py);
everything else compares the runtime with itself and must be bit-identical.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import torch

from mixer_compile import runtime
from mixer_compile.backend.target import build_requirements
from mixer_compile.compiler import CompileOptions, compile_model
from mixer_compile.errors import ArtifactError, InputError, MixerCompileError, PerformanceWarning
from mixer_compile.machine import X86_FEATURES, check_cpu, check_gpu, host_cpu_features
from mixer_compile.model import reference
from mixer_compile.model.params import random_weights
from mixer_compile.util.progress import Progress
from tests.helpers import FP32, edit_metadata, rel_error

# /proc/cpuinfo flags of an AVX2 machine without AVX-512 (Intel Haswell).
HASWELL = ("flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr "
           "sse sse2 ss ht syscall nx pdpe1gb rdtscp lm pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic "
           "movbe popcnt aes xsave avx f16c rdrand lahf_lm abm bmi1 avx2 smep bmi2 erms invpcid\n")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_spec):
    out = tmp_path_factory.mktemp("rt") / "art"
    compile_model(CompileOptions(spec=tiny_spec, seed=3, out_dir=out), Progress(6, quiet=True))
    return out


@pytest.fixture
def copy(artifact, tmp_path):
    """A private copy of the artifact that a test may damage."""
    return shutil.copytree(artifact, tmp_path / "art")


def _images(seed=0, batch=2):
    return np.random.default_rng(seed).standard_normal((batch, 3, 32, 32)).astype(np.float32)


def test_output_matches_reference(artifact, tiny_spec):
    x = _images()
    ref = reference.forward(tiny_spec.replace(gelu="tanh"), random_weights(tiny_spec, 3), x)
    assert rel_error(runtime.load(artifact)(x), ref) < FP32


def test_serving_process_needs_only_tvm_runtime_and_numpy(artifact, tmp_path):
    """A serving image without torch or scipy, TVM's runtime library alone (no LLVM)."""
    code = """
import json, sys
import numpy as np
class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'scipy', 'xgboost', 'matplotlib', 'onnx'):
            raise ImportError(f'{name} is not installed here')
sys.meta_path.insert(0, NotInstalled())
import mixer_compile.runtime as rt
m = rt.load(sys.argv[1])
np.save(sys.argv[3], m(np.load(sys.argv[2])))
import tvm
print(json.dumps({"libs": sorted(tvm.base._LOADED_LIBS),
                  "mixer": sorted(k for k in sys.modules if k.startswith('mixer_compile')),
                  "heavy": sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'scipy', 'xgboost'))
                           + sorted(k for k in sys.modules if k.startswith(('tvm.relax', 'tvm.s_tir')))}))
"""
    x = _images(1)
    np.save(tmp_path / "x.npy", x)
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(artifact), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["libs"] == ["tvm_runtime"]
    assert seen["heavy"] == []
    # the compile side, by package or module (the package's __init__ brings mixer_compile.model.spec,
    # as it brought mixer_compile.spec before the restructure, and the api module: tolerated here,
    # reported by test_architecture; the model's weights and reference must not come; of util/,
    # only the lock and the temporaries' names that artifact/place.py shares with the compiler's writer,
    # and util.stderr)
    compiler = ("ir", "passes", "lower", "compose", "compiler", "backend", "tune", "check", "frontends",
                "tools", "util.atomic", "util.interrupt", "util.progress", "cli", "model.params", "model.reference")
    assert "mixer_compile.runtime" in seen["mixer"]
    assert [m for m in seen["mixer"] if any(m == f"mixer_compile.{c}" or m.startswith(f"mixer_compile.{c}.")
                                            for c in compiler)] == []
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), runtime.load(artifact)(x))


def test_torch_in_torch_out_and_awkward_arrays(artifact):
    model = runtime.load(artifact)
    x = _images(2)
    out = model(x)
    assert isinstance(out, np.ndarray) and out.shape == (2, 10) and out.dtype == np.float32
    out_t = model(torch.from_numpy(x))
    assert isinstance(out_t, torch.Tensor) and out_t.shape == (2, 10)
    np.testing.assert_array_equal(out_t.numpy(), out)
    # copies are taken where zero-copy is impossible: a transposed view, a misaligned or read-only array
    nhwc = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
    np.testing.assert_array_equal(model(nhwc.permute(0, 3, 1, 2)).numpy(), out)
    buf = np.empty(x.size + 1, np.float32)
    shifted = buf[1:].reshape(x.shape)
    shifted[...] = x
    np.testing.assert_array_equal(model(shifted), out)
    frozen = x.copy()
    frozen.flags.writeable = False
    np.testing.assert_array_equal(model(frozen), out)
    # logits of one call are not overwritten by the next
    other = model(_images(3))
    np.testing.assert_array_equal(out, model(x))
    assert not np.array_equal(other, out)


def test_bad_inputs_are_refused_by_message(artifact):
    model = runtime.load(artifact)
    with pytest.raises(MixerCompileError, match=r"input has batch 1; this module was built for batch 2 "
                                                r"\(rebuild with --batch 1\)"):
        model(_images(batch=1))
    with pytest.raises(MixerCompileError, match=r"input has shape \(2, 32, 32, 3\); this module takes \(2, 3, 32, 32\)"):
        model(_images().transpose(0, 2, 3, 1))
    with pytest.raises(MixerCompileError, match=r"input has dtype float64; this module takes float32 \(convert "
                                                r"with .astype\(np.float32\) or, for a torch tensor, .to\(torch.float32\)\)"):
        model(torch.zeros(2, 3, 32, 32, dtype=torch.float64))
    for bad, kind in ((None, "NoneType"), ("images.png", "str"), (_images().tolist(), "list")):
        with pytest.raises(InputError, match=f"^input is a {kind}, not an array; pass NCHW images as a NumPy array"):
            model(bad)
    with pytest.raises(ValueError, match="^input is a meta tensor, which holds no data"):  # InputError is one
        model(torch.empty(2, 3, 32, 32, device="meta"))
    with pytest.raises(InputError, match=r"^input is a torch.sparse_coo tensor; pass a dense one \(e.g. .to_dense\(\)\)"):
        model(torch.zeros(2, 3, 32, 32).to_sparse())


def test_threads_calling_at_once_match_single_threaded(artifact):
    model = runtime.load(artifact)
    inputs = [_images(10 + i) for i in range(6)]
    expected = [model(x).copy() for x in inputs]
    n_threads, rounds = 6, 8
    start = threading.Barrier(n_threads)
    results: dict[int, list[np.ndarray]] = {}

    def worker(i):
        start.wait()
        results[i] = [model(inputs[(i + r) % len(inputs)]) for r in range(rounds)]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(n_threads))
    for i, outs in results.items():
        for r, out in enumerate(outs):
            np.testing.assert_array_equal(out, expected[(i + r) % len(inputs)])


def _os_threads() -> int:
    return int(open("/proc/self/status").read().split("Threads:")[1].split()[0])


def test_a_thread_per_call_does_not_leak_threads(artifact):
    """TVM keeps a pool of worker threads for every thread that ever ran a kernel: a thread per
    call (a thread-per-request server) must not add a pool per call."""
    model = runtime.load(artifact)
    x = _images()
    expected = model(x).copy()

    def calls(n):
        for _ in range(n):
            t = threading.Thread(target=lambda: np.testing.assert_array_equal(model(x), expected))
            t.start()
            t.join()

    calls(2 * (os.cpu_count() or 2))  # past the threads that run their own calls
    settled = _os_threads()
    calls(40)  # a leak: 40 pools of cores - 1 workers; at most: our callers' pools, not all started yet
    cores = os.cpu_count() or 2
    assert _os_threads() - settled <= max(2, cores) * cores  # a leak adds 40 x (cores - 1)


_FORK_CHILD = """
import multiprocessing as mp, sys
import numpy as np
from mixer_compile import runtime

def child(model, x, q):
    q.put(model(x))

if __name__ == "__main__":
    model = runtime.load(sys.argv[1])
    x = np.load(sys.argv[2])
    first = model(x)  # the parent's thread now holds a TVM pool, which fork() does not copy
    q = mp.get_context("fork").Queue()
    p = mp.get_context("fork").Process(target=child, args=(model, x, q))
    p.start()
    out = q.get(timeout=60)
    p.join(60)
    print("same" if np.array_equal(out, first) else "different")
"""


def test_a_forked_child_runs_the_model_its_parent_ran(artifact, tmp_path):
    x = _images()
    np.save(tmp_path / "x.npy", x)
    proc = subprocess.run([sys.executable, "-c", _FORK_CHILD, str(artifact), str(tmp_path / "x.npy")],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and proc.stdout.split() == ["same"], proc.stderr[-2000:]


def test_pickled_it_loads_again_from_its_artifact(artifact):
    """What multiprocessing's spawn workers receive: the path, loaded and checked again."""
    import pickle

    model = runtime.load(artifact)
    again = pickle.loads(pickle.dumps(model))
    assert again is not model and again.path == model.path
    np.testing.assert_array_equal(again(_images()), model(_images()))


def test_an_artifact_rebuilt_in_place_loads_as_the_new_build(tmp_path, tiny_spec):
    """The dynamic loader returns the library already loaded from a path: without a name of its
    own, the rebuilt library would run the old code (10 classes where the metadata says 7)."""
    out, x = tmp_path / "art", _images()
    compile_model(CompileOptions(spec=tiny_spec, seed=1, out_dir=out), Progress(6, quiet=True))
    assert runtime.load(out)(x).shape == (2, 10)
    seven = tiny_spec.replace(num_classes=7)
    compile_model(CompileOptions(spec=seven, seed=2, out_dir=out), Progress(6, quiet=True))
    ref = reference.forward(seven.replace(gelu="tanh"), random_weights(seven, 2), x)
    assert rel_error(runtime.load(out)(x), ref) < FP32


def test_a_load_while_a_compile_swaps_the_artifact_reads_the_new_build(artifact, tmp_path, tiny_spec, monkeypatch):
    """The loader read the old metadata, then the compile swapped the new build in: the new
    files failed the old hashes ("altered, rebuild it"). It reads again and loads the new build."""
    live = shutil.copytree(artifact, tmp_path / "live")
    compile_model(CompileOptions(spec=tiny_spec, seed=4, out_dir=tmp_path / "new"), Progress(6, quiet=True))
    real, calls = runtime.read_metadata, []

    def read_then_swap(path):
        meta = real(path)
        calls.append(path)
        if len(calls) == 1:  # the compile's two renames, just after the loader's first read
            shutil.rmtree(live)
            shutil.copytree(tmp_path / "new", live)
        return meta

    monkeypatch.setattr(runtime, "read_metadata", read_then_swap)
    model = runtime.load(live)
    assert len(calls) >= 2 and model.metadata.weights["seed"] == 4
    x = _images()
    ref = reference.forward(tiny_spec.replace(gelu="tanh"), random_weights(tiny_spec, 4), x)
    assert rel_error(model(x), ref) < FP32


def test_metadata_records_cpu_requirements(artifact):
    requires = json.loads((artifact / "metadata.json").read_text())["target"]["requires"]
    assert requires["cpu"]["arch"] == "x86_64" and "avx2" in requires["cpu"]["features"]
    check_cpu(requires["cpu"], "it")  # built here, so this machine qualifies


def test_avx512_build_is_refused_on_an_avx2_machine():
    from mixer_compile.backend.target import get_target

    avx512 = build_requirements(get_target("znver4").tvm_target())["cpu"]
    avx2 = build_requirements(get_target("avx2").tvm_target())["cpu"]
    assert {"avx512f", "avx512bw", "avx512vl"} <= set(avx512["features"])
    assert "avx2" in avx2["features"] and not [f for f in avx2["features"] if f.startswith("avx512")]
    haswell = host_cpu_features(HASWELL)
    check_cpu(avx2, "the avx2 build", haswell, "x86_64")
    with pytest.raises(ArtifactError, match=r"the znver4 build was built for mcpu=znver4 and needs CPU features "
                                            r"this machine lacks: .*avx512bw.*avx512f.*; rebuild it for this CPU"):
        check_cpu(avx512, "the znver4 build", haswell, "x86_64")


def test_host_build_needs_only_what_this_machine_has(monkeypatch):
    """mcpu=host is LLVM's name for this CPU less what the name implies and the machine hides
    (a VM's hypervisor hid AMX on an Emerald Rapids here, and the loader refused the artifact
    its own compile had just written)."""
    from mixer_compile.backend import target

    have = host_cpu_features()
    assert set(build_requirements(target.get_target("llvm").tvm_target())["cpu"]["features"]) <= have
    monkeypatch.setattr(target, "host_cpu_features", lambda: have - {"avx2"})  # a VM hiding AVX2
    resolved = target.get_target("llvm")
    assert "-avx2" in resolved.config["mattr"]
    needs = set(build_requirements(resolved.tvm_target())["cpu"]["features"])
    assert "avx2" not in needs and needs <= have - {"avx2"}


def test_refusals_happen_before_loading(copy):
    (copy / "model.so").write_bytes(b"not a library" * 10)  # would fail to load, if it got that far
    have = host_cpu_features()
    lacking = next(f for f in X86_FEATURES if f not in have)  # AMX on any AMD CPU or most VMs
    edit_metadata(copy, lambda m: m["target"]["requires"]["cpu"]["features"].append(lacking))
    with pytest.raises(ArtifactError, match=rf"needs CPU features this machine lacks: {lacking};"):
        runtime.load(copy)
    edit_metadata(copy, lambda m: m["target"]["requires"]["cpu"].update(arch="aarch64"))
    with pytest.raises(ArtifactError, match=r"was built for aarch64 CPUs and this machine is x86_64"):
        runtime.load(copy)
    edit_metadata(copy, lambda m: m.update(tvm_version="0.26.0"))
    with pytest.raises(ArtifactError, match=r"was built with TVM 0.26.0 and this runtime is TVM 0.27.\S*; "
                                            r"install apache-tvm==0.26.0 or rebuild"):
        runtime.load(copy)


def test_a_build_split_for_fewer_cores_than_run_here_says_so(copy, monkeypatch):
    monkeypatch.setenv("TVM_NUM_THREADS", "8")  # the threads runtime.load will run
    edit_metadata(copy, lambda m: m["target"]["config"].update({"num-cores": 2}))
    with pytest.warns(PerformanceWarning, match=re.escape(
            f"artifact '{copy}' splits its parallel loops for 2 cores and this machine runs 8 threads, which may "
            "leave most of them idle; rebuild it here (--target llvm) or for \"num-cores\": 8 in its target file")):
        model = runtime.load(copy)
    assert model(_images()).shape == (2, 10)  # it runs, only slower
    edit_metadata(copy, lambda m: m["target"]["config"].update({"num-cores": 8}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runtime.load(copy)


def test_cuda_build_is_refused_without_its_gpu(copy):
    edit_metadata(copy, lambda m: m["target"].update(kind="cuda", requires={"gpu_arch": "sm_90"}))
    with pytest.raises(ArtifactError, match=r"was built for a CUDA GPU \(sm_90\) and no CUDA GPU is visible here"):
        runtime.load(copy)
    with pytest.raises(ArtifactError, match="it was built for sm_90 and this GPU is sm_80; rebuild it with a target for sm_80"):
        check_gpu("sm_90", "sm_80", "it")
    with pytest.raises(ArtifactError, match="built for sm_86 and this GPU is sm_80"):
        check_gpu("sm_86", "sm_80", "it")
    with pytest.raises(ArtifactError, match="built for sm_90a and this GPU is sm_100"):
        check_gpu("sm_90a", "sm_100", "it")
    check_gpu("sm_80", "sm_86", "it")  # same major, newer minor: the cubin runs
    check_gpu("sm_90a", "sm_90", "it")


@pytest.mark.parametrize("name", ["model.so", "weights.params"])
def test_damaged_files_are_refused_by_message(copy, name):
    f = copy / name
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=rf"{name} is truncated \({len(data) // 2} of {len(data)} bytes\); "
                                            "copy the whole directory again or rebuild it"):
        runtime.load(copy)
    f.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    with pytest.raises(ArtifactError, match=rf"{name} does not match the SHA-256 recorded in metadata.json "
                                            r"\(altered, or from another build\)"):
        runtime.load(copy)
    meta = json.loads((copy / "metadata.json").read_text())
    (copy / "metadata.json").write_text(json.dumps({**meta, "file_sizes": None}))  # sizes lost: the digests still check
    with pytest.raises(ArtifactError, match=rf"{name} does not match the SHA-256 recorded in metadata.json"):
        runtime.load(copy)
    f.unlink()
    with pytest.raises(ArtifactError, match=rf"is incomplete: {name} is missing"):
        runtime.load(copy)
    (copy / "metadata.json").unlink()
    with pytest.raises(ArtifactError, match="is not an artifact: metadata.json is missing"):
        runtime.load(copy)
    with pytest.raises(ArtifactError, match=r"^artifact directory '\S+/nowhere' does not exist$"):
        runtime.load(copy.parent / "nowhere")
