"""GPU GEMMs by CUTLASS (passes/library_gemms.py, lower/library.py, backend/cutlass.py), checked
without a GPU: which GEMMs go to the library, the whole Relax program with its external calls
run on this CPU against the reference (the calls served by their C++ stand-in), the compiled
kernels' machine code (wgmma + TMA on sm_90a, mma.sync + cp.async on sm_80), and a CUDA
artifact that links them in.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tvm

from mixer_compile.backend import cpu, cutlass
from mixer_compile.backend.runner import Runner
from mixer_compile.backend.target import get_target
from mixer_compile.check.validate import TOLERANCES
from mixer_compile.compiler import CompileOptions, compile_model
from mixer_compile.compose import compose, optimized_graph
from mixer_compile.ir import interpret
from mixer_compile.lower.library import GemmKernel, from_symbol, kernel_for
from mixer_compile.machine import gpu_arch, local_gpu
from mixer_compile.model import reference
from mixer_compile.model.params import random_weights
from mixer_compile.model.spec import MixerSpec
from mixer_compile.passes.context import PassContext
from tests.helpers import TINY, rel_error
from tests.sass import cuobjdump

# Big enough that its channel GEMMs (128 x 128 x 512 per call at batch 2) go to the library,
# small enough to run in NumPy in a blink; timm's erf GELU.
MID = MixerSpec("mid", (64, 64), 8, 128, 32, 512, 2, num_classes=10, batch=2, gelu="erf")

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="compiling CUTLASS kernels needs nvcc")
needs_cuobjdump = pytest.mark.skipif(cuobjdump() is None, reason="reading SASS needs cuobjdump: "
                                     "pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm")


@pytest.fixture(scope="module")
def kernel_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One kernel cache for this module's builds: each CUTLASS kernel is compiled once."""
    return tmp_path_factory.mktemp("cache")


def _library_ops(graph) -> dict[str, str]:
    return {op.output.name: op.attrs["library"] for op in graph.ops if op.attrs.get("library")}


def test_large_aligned_half_gemms_go_to_the_library_and_keep_their_meaning():
    ctx = PassContext(dtype="float16", gemm_library="cutlass")
    graph, reports = optimized_graph(MID, "matmul", ctx)
    assert sorted(_library_ops(graph)) == ["b0.ch.gelu", "b0.ch.res", "b1.ch.gelu", "b1.ch.res"]
    assert reports[-1].name == "library_gemms" and len(reports[-1].changes) == 4
    fc1 = next(op for op in graph.ops if op.output.name == "b0.ch.gelu")
    assert fc1.attrs["kernel_layout"] == "NK" and graph.params[fc1.inputs[1]].tensor.shape == (512, 128)
    weights = random_weights(MID, 0)
    x = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
    plain, _ = optimized_graph(MID, "matmul", PassContext(dtype="float16"))  # no library: not handed over
    assert not _library_ops(plain)
    out = interpret(graph, graph.materialize_params(weights), x)  # in float64: only the layouts differ
    assert rel_error(out, interpret(plain, plain.materialize_params(weights), x)) < 1e-9
    # not handed over either: float32 storage, or GEMMs too small to gain (the tiny test model)
    assert not _library_ops(optimized_graph(MID, "matmul", PassContext(gemm_library="cutlass"))[0])
    assert not _library_ops(optimized_graph(TINY, "matmul", ctx)[0])


def test_gpu_targets_use_the_library_and_the_cpu_does_not():
    from mixer_compile.compose import target_graph

    assert _library_ops(target_graph(MID, get_target("sm_90"), dtype="bfloat16")[0])
    assert _library_ops(target_graph(MID, get_target("sm_80"), dtype="float16")[0])
    assert not _library_ops(target_graph(MID, get_target("llvm"), dtype="float16")[0])


def test_symbols_name_dtype_and_epilogue():
    assert kernel_for("float16", "erf", False).symbol == "mixer_gemm_f16_gelu_erf"
    assert kernel_for("bfloat16", None, True).symbol == "mixer_gemm_bf16_residual"
    assert kernel_for("float16", None, False).symbol == "mixer_gemm_f16_bias"
    for k in (GemmKernel("bfloat16", "gelu_tanh"), GemmKernel("float16", "residual")):
        assert from_symbol(k.symbol) == k


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("gelu", ["erf", "tanh"])
def test_relax_program_with_library_calls_matches_reference_on_cpu(tmp_path, monkeypatch, dtype, gelu):
    """The GPU build's very Relax program (layouts, bias direction, residual, the calls) on
    this CPU, the calls served by the C++ stand-in of the CUTLASS kernels."""
    monkeypatch.setenv("MIXER_COMPILE_CACHE", str(tmp_path))
    spec = MID.replace(gelu=gelu)
    weights = random_weights(spec, 0)
    model = compose(spec, get_target("sm_90"), "matmul", dtype, weights)
    kernels = cutlass.symbols(model.module)
    assert {k.epilogue for k in kernels} == {f"gelu_{gelu}", "residual"} and {k.dtype for k in kernels} == {dtype}
    library = tmp_path / "host.so"
    cpu.build(model.module, get_target("llvm")).export_library(str(library),
                                                               addons=[str(cutlass.host_object(kernels))])
    run = Runner(tvm.runtime.load_module(str(library)), tvm.cpu(), list(model.params.values()), "this CPU").function()
    x = np.random.default_rng(2).standard_normal((2, 3, 64, 64)).astype(np.float32)
    assert rel_error(run(x), reference.forward(spec, weights, x)) < TOLERANCES[dtype]


def _sass(path: Path) -> str:
    tool = cuobjdump()
    env = {"PATH": f"{Path(tool).parent}:/usr/bin:/bin"}
    return subprocess.run([tool, "-sass", str(path)], check=True, capture_output=True, text=True, env=env).stdout


# sm_90a kernels take about a minute of CPU each to compile (CUTLASS 3.x), sm_80 ones ~20 s: the
# default run checks sm_80, the slow run (--runslow) Hopper too
ARCHS = [pytest.param("sm_90", marks=pytest.mark.slow), "sm_80"]
TENSOR_CORE_CODE = {"sm_90": ("HGMMA", "UTMALDG"), "sm_80": ("HMMA.16816.F32", "LDGSTS")}


@needs_nvcc
@needs_cuobjdump
@pytest.mark.parametrize("arch", ARCHS)
def test_cutlass_kernels_compile_to_tensor_core_code(kernel_cache, monkeypatch, arch):
    """sm_90a: wgmma (HGMMA) fed by TMA (UTMALDG), no mma.sync; sm_80: mma.sync m16n8k16
    (HMMA.16816) fed by cp.async (LDGSTS); each exports its tvm-ffi symbol; compiled once."""
    monkeypatch.setenv("MIXER_COMPILE_CACHE", str(kernel_cache))
    kernel = GemmKernel("bfloat16", "residual")
    obj = cutlass.gpu_object(kernel, arch)
    code = _sass(obj)
    assert all(instruction in code for instruction in TENSOR_CORE_CODE[arch])
    assert ("HMMA" in code) == (arch == "sm_80") and ("HGMMA" in code) == (arch == "sm_90")
    symbols = subprocess.run(["nm", str(obj)], check=True, capture_output=True, text=True).stdout
    assert f" T __tvm_ffi_{kernel.symbol}" in symbols
    assert cutlass.gpu_object(kernel, arch) == obj  # cached: the next build compiles nothing


@needs_nvcc
@needs_cuobjdump
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_artifact_links_the_library_gemms_and_validates_on_host(tmp_path, kernel_cache, monkeypatch, arch):
    """A CUDA build links its CUTLASS kernels into model.so (the residual one compiled by the
    test above, from the cache) and validates the same program on this CPU."""
    monkeypatch.setenv("MIXER_COMPILE_CACHE", str(kernel_cache))
    result = compile_model(CompileOptions(spec=MID, target=arch, dtype="bfloat16", out_dir=tmp_path / "a"))
    meta = json.loads((tmp_path / "a" / "metadata.json").read_text())
    assert meta["gpu_code"]["library_gemms"] == ["mixer_gemm_bf16_gelu_erf", "mixer_gemm_bf16_residual"]
    gpu = local_gpu()
    on_gpu = gpu is not None and gpu_arch(gpu)[:4] == arch[:4]  # same major version: it runs there
    assert result.validation.passed
    assert ("C++ stand-in" in result.validation.where) != on_gpu, result.validation.where
    library = tmp_path / "a" / "model.so"
    exported = subprocess.run(["nm", "-D", str(library)], check=True, capture_output=True, text=True).stdout
    assert all(f" T __tvm_ffi_mixer_gemm_bf16_{e}" in exported for e in ("gelu_erf", "residual"))
    assert b"vm.builtin.cuda_graph.run_or_capture" in library.read_bytes()  # the forward pass is a CUDA graph
    assert TENSOR_CORE_CODE[arch][0] in _sass(library)
