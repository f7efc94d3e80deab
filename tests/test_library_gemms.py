"""GPU GEMMs by CUTLASS (passes/library_gemms.py, lower/library.py, backend/cutlass.py,
backend/gemm_choice.py), checked without a GPU: which GEMMs go to the library and in which form,
the configuration each call site gets, the whole Relax program with its external calls run on
this CPU against the reference (the calls served by their C++ stand-in), the compiled kernels'
machine code (wgmma + TMA on sm_90a, mma.sync + cp.async on sm_80), and a CUDA artifact that
links them in.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tvm

from mixer_compile.backend import cpu, cutlass, gemm_choice
from mixer_compile.backend.cutlass import Config
from mixer_compile.backend.runner import Runner
from mixer_compile.backend.target import get_target
from mixer_compile.check.validate import TOLERANCES
from mixer_compile.compiler import CompileOptions, compile_model
from mixer_compile.compose import compose, optimized_graph
from mixer_compile.ir import interpret
from mixer_compile.errors import TargetError
from mixer_compile.lower.library import GemmKernel, GemmShape, from_symbol, kernel_for
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
# 196 tokens, as every /16 preset at 224 px: token mixing's GEMMs (2 x 64 x 256 x 196) large
# enough for the library, with a contraction (196) that is not a multiple of 8
TOKENS = MixerSpec("tokens", (112, 112), 8, 256, 64, 512, 2, num_classes=10, batch=2, gelu="erf")

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="compiling CUTLASS kernels needs nvcc")
needs_cuobjdump = pytest.mark.skipif(cuobjdump() is None, reason="reading SASS needs cuobjdump: "
                                     "pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm")


def _library_ops(graph) -> dict[str, str]:
    return {op.output.name: op.attrs["library"] for op in graph.ops if op.attrs.get("library")}


def test_large_aligned_gemms_go_to_the_library_and_keep_their_meaning():
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
    # float32 storage goes too (3xTF32 kernels); GEMMs too small to gain (the tiny test model) do not
    assert _library_ops(optimized_graph(MID, "matmul", PassContext(gemm_library="cutlass"))[0]) == _library_ops(graph)
    assert not _library_ops(optimized_graph(TINY, "matmul", ctx)[0])


def test_gpu_targets_use_the_library_and_the_cpu_does_not():
    from mixer_compile.compose import target_graph

    assert _library_ops(target_graph(MID, get_target("sm_90"), dtype="bfloat16")[0])
    assert _library_ops(target_graph(MID, get_target("sm_80"), dtype="float16")[0])
    assert _library_ops(target_graph(MID, get_target("b200"), dtype="float16")[0])
    assert not _library_ops(target_graph(MID, get_target("llvm"), dtype="float16")[0])


def test_symbols_name_form_dtype_epilogue_and_variant():
    assert kernel_for("float16", "erf", False).symbol == "mixer_gemm_xw_f16_gelu_erf"
    assert kernel_for("bfloat16", None, True, "wx").symbol == "mixer_gemm_wx_bf16_residual"
    assert kernel_for("float16", None, False, "wtx").symbol == "mixer_gemm_wtx_f16_bias"
    assert kernel_for("float32", "tanh", False).symbol == "mixer_gemm_xw_f32_gelu_tanh"
    chosen = GemmKernel("float16", "gelu_tanh", "wtx", "t128x256x64_c1x1_coop")
    assert chosen.symbol == "mixer_gemm_wtx_f16_gelu_tanh__t128x256x64_c1x1_coop"
    for k in (GemmKernel("bfloat16", "gelu_tanh"), GemmKernel("float16", "residual", "wx"), chosen):
        assert from_symbol(k.symbol) == k


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_token_mixing_goes_to_the_library_with_its_kernel_layout_chosen_for_aligned_rows(arch):
    """Both families take left products. fc1 contracts the 196 tokens: its kernel is stored
    (K, M) so that no contiguous axis is 196 long (rows neither TMA nor cp.async's 16-byte
    loads can address); fc2 contracts 64 and keeps (M, K)."""
    from mixer_compile.compose import target_graph

    graph = target_graph(TOKENS, get_target(arch), dtype="float16")[0]
    ops = {op.output.name: op for op in graph.ops if op.attrs.get("library")}
    assert {"b0.tok.gelu.t", "b0.tok.res", "b0.ch.gelu", "b0.ch.res", "stem.bias"} <= set(ops)
    assert len(ops) == 9  # stem + 2 x (token fc1, fc2, channel fc1, fc2)
    fc1, fc2 = ops["b0.tok.gelu.t"], ops["b0.tok.res"]
    assert fc1.attrs["kernel_layout"] == "KN" and graph.params[fc1.inputs[1]].tensor.shape == (196, 64)
    assert fc2.attrs["kernel_layout"] == "NK" and graph.params[fc2.inputs[1]].tensor.shape == (196, 64)
    weights = random_weights(TOKENS, 0)
    x = np.random.default_rng(1).standard_normal((2, 3, 112, 112)).astype(np.float32)
    plain, _ = optimized_graph(TOKENS, "matmul", PassContext(dtype="float16"))
    assert rel_error(interpret(graph, graph.materialize_params(weights), x),
                     interpret(plain, plain.materialize_params(weights), x)) < 1e-9


@pytest.mark.parametrize("dtype, gelu", [("float16", "erf"), ("float16", "tanh"), ("bfloat16", "erf"),
                                         ("bfloat16", "tanh"), ("float32", "erf")])
def test_relax_program_with_library_calls_matches_reference_on_cpu(tmp_path, monkeypatch, dtype, gelu):
    """The GPU build's very Relax program (layouts, bias direction, residual, the calls in all
    three forms, each renamed to its chosen variant) on this CPU, the calls served by the C++
    stand-in of the CUTLASS kernels."""
    monkeypatch.setenv("MIXER_COMPILE_CACHE", str(tmp_path))
    spec = TOKENS.replace(gelu=gelu)
    weights = random_weights(spec, 0)
    model = compose(spec, get_target("sm_90"), "matmul", dtype, weights)
    module, choices = gemm_choice.apply_choices(model.module, "sm_90a")
    kernels = gemm_choice.kernels_called(module)
    assert {(k.form, k.epilogue) for k in kernels} == {("xw", "bias"), ("xw", f"gelu_{gelu}"), ("xw", "residual"),
                                                      ("wtx", f"gelu_{gelu}"), ("wx", "residual")}
    assert {k.dtype for k in kernels} == {dtype} and all(k.variant for k in kernels) and len(choices) == 9
    library = tmp_path / "host.so"
    cpu.build(module, get_target("llvm")).export_library(str(library), addons=[str(cutlass.host_object(kernels))])
    run = Runner(tvm.runtime.load_module(str(library)), tvm.cpu(), list(model.params.values()), "this CPU").function()
    x = np.random.default_rng(2).standard_normal((2, 3, 112, 112)).astype(np.float32)
    assert rel_error(run(x), reference.forward(spec, weights, x)) < TOLERANCES[dtype]


def test_kernel_cache_keys_do_not_depend_on_where_the_packages_are_installed(tmp_path, monkeypatch):
    """A cache filled here serves a machine whose packages live elsewhere (the GPU machine's
    /tmp/site): include directories enter the key relative to their site directory."""
    import sys

    elsewhere = tmp_path / "site" / "cutlass_library" / "source" / "include"
    elsewhere.mkdir(parents=True)
    monkeypatch.setattr(sys, "path", [str(tmp_path / "site"), *sys.path])
    here = cutlass.cutlass_includes()[0]
    assert cutlass._portable(f"-I{elsewhere}") == cutlass._portable(f"-I{here}")
    assert cutlass._portable(f"-I{here}").startswith("-Icutlass_library/source/include (nvidia-cutlass ")


def _sass(path: Path) -> str:
    tool = cuobjdump()
    env = {"PATH": f"{Path(tool).parent}:/usr/bin:/bin"}
    return subprocess.run([tool, "-sass", str(path)], check=True, capture_output=True, text=True, env=env).stdout


# sm_90a and sm_100 kernels take about a minute of CPU each to compile (CUTLASS 3.x), sm_80 ones
# ~20 s: the default run checks the sm_80 templates (on sm_80 and sm_120), the slow run
# (--runslow) Hopper and Blackwell too
ARCHS = [pytest.param("sm_90", marks=pytest.mark.slow), "sm_80"]
FAMILY = {"sm_90": "sm_90a", "sm_80": "sm_80", "sm_100": "sm_100", "sm_120": "sm_120"}


def _mid(arch: str, epilogue: str = "residual") -> GemmKernel:
    """MID's channel fc1 (`gelu_erf`: 128 x 512 x 128 at batch 2) or fc2 (`residual`: 128 x 128
    x 512) as its build will call it (the artifact test below then finds both cached)."""
    kernel = GemmKernel("bfloat16", epilogue)
    shape = GemmShape(2 * 64, 512, 128) if epilogue == "gelu_erf" else GemmShape(2 * 64, 128, 512)
    return kernel.with_variant(gemm_choice.default_config(kernel, shape, FAMILY[arch]).variant)


# the tensor-core instruction and the loads that feed it, by arch: wgmma + TMA (Hopper), tcgen05
# + TMA (datacenter Blackwell), mma.sync + cp.async (the sm_80 templates)
TENSOR_CORE_CODE = {"sm_90": ("HGMMA", "UTMALDG"), "sm_100": ("UTCHMMA", "UTMALDG"),
                    "sm_80": ("HMMA.16816.F32", "LDGSTS"), "sm_120": ("HMMA.16816.F32", "LDGSTS")}


@pytest.mark.parametrize("arch, family, gencode", [
    ("sm_80", "sm_80", "arch=compute_80,code=sm_80"), ("sm_89", "sm_80", "arch=compute_80,code=sm_89"),
    ("sm_90", "sm_90a", "arch=compute_90a,code=sm_90a"),
    # datacenter Blackwell: tcgen05 kernels, family-specific code (B200 and B300 alike)
    ("sm_100", "sm_100", "arch=compute_100f,code=sm_100f"), ("sm_103", "sm_100", "arch=compute_100f,code=sm_100f"),
    # Thor and workstation Blackwell: the sm_80 templates (mma.sync), for their own arch, records of their own
    ("sm_110", "sm_110", "arch=compute_110,code=sm_110"), ("sm_120", "sm_120", "arch=compute_120,code=sm_120")])
def test_each_gpu_generation_has_its_family_and_arch_code(arch, family, gencode):
    assert cutlass.gpu_arch_flag(arch) == (family, gencode)
    assert cutlass.template(family, "float16") == (family if family in ("sm_90a", "sm_100") else "sm_80")
    assert cutlass.template(family, "float32") == "tf32x3"


def test_gpus_before_ampere_keep_tvms_kernels():
    assert not cutlass.has_family("sm_75")
    with pytest.raises(TargetError, match="GPU sm_75 has no tensor-core GEMM family here"):
        cutlass.gpu_arch_flag("sm_75")


# token mixing on sm_80 (visitor-tree epilogue, bias per row): both kernel layouts, both dtypes
SM80_LEFT = (GemmKernel("float16", "gelu_erf", "wtx", "t128x128x32_w64x64_s4"),
             GemmKernel("bfloat16", "residual", "wx", "t64x128x32_w32x64_s4"))

# float32 (3xTF32) on both families: mma.sync m16n8k8 on tf32, three per product (big x big,
# big x small, small x big), fed by cp.async; no wgmma on Hopper (its tf32 would keep 10 bits)
F32 = (("sm_80", GemmKernel("float32", "gelu_erf", "xw", "t128x128x16_w32x64_s4")),
       ("sm_90", GemmKernel("float32", "residual", "wx", "t64x64x16_w32x32_s3")))


@pytest.fixture(scope="module")
def compiled(kernel_cache: Path) -> Path:
    """The kernel cache, with the kernels of this module's default run compiled into it as a
    build compiles its own, as many at once as `cutlass.compile_jobs` allows: nvcc is
    single-threaded, and compiled test by test they would leave every other core idle."""
    kernels = [_mid("sm_80", "gelu_erf"), _mid("sm_80"), SM80_LEFT[0], F32[0][1]]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MIXER_COMPILE_CACHE", str(kernel_cache))
        gemm_choice.gpu_objects(kernels, "sm_80")
        cutlass.gpu_object(F32[1][1], F32[1][0])
    return kernel_cache


@needs_nvcc
@needs_cuobjdump
@pytest.mark.parametrize("arch, kernel",
                         [pytest.param("sm_90", _mid("sm_90"), marks=pytest.mark.slow, id="sm_90"),
                          pytest.param("sm_80", _mid("sm_80"), id="sm_80"),
                          pytest.param("sm_100", _mid("sm_100"), marks=pytest.mark.slow, id="sm_100"),
                          # sm_120 builds sm_80's code (test_each_gpu_generation_has_its_family_and_arch_code)
                          pytest.param("sm_120", _mid("sm_120"), marks=pytest.mark.slow, id="sm_120"),
                          pytest.param("sm_80", SM80_LEFT[0], id="sm_80-wtx"),
                          # the other kernel layout of the same template: ~25 s more of nvcc
                          pytest.param("sm_80", SM80_LEFT[1], marks=pytest.mark.slow, id="sm_80-wx")])
def test_cutlass_kernels_compile_to_tensor_core_code(compiled, monkeypatch, arch, kernel):
    """sm_90a: wgmma (HGMMA) fed by TMA (UTMALDG), no mma.sync; sm_100: tcgen05 (UTCHMMA) fed by
    TMA; sm_80, right and left products: mma.sync m16n8k16 (HMMA.16816) fed by cp.async
    (LDGSTS), and the same on sm_120; each exports its tvm-ffi symbol; compiled once."""
    monkeypatch.setenv("MIXER_COMPILE_CACHE", str(compiled))
    obj = cutlass.gpu_object(kernel, arch)
    code = _sass(obj)
    assert all(instruction in code for instruction in TENSOR_CORE_CODE[arch])
    instructions = {name for name in ("HMMA.16816", "HGMMA", "UTCHMMA") if re.search(rf"\b{name}\b", code)}
    assert instructions == {TENSOR_CORE_CODE[arch][0].removesuffix(".F32")}  # that one kind only
    symbols = subprocess.run(["nm", str(obj)], check=True, capture_output=True, text=True).stdout
    assert f" T __tvm_ffi_{kernel.symbol}" in symbols and f" T __tvm_ffi_{kernel.symbol}_implementable" in symbols
    assert cutlass.gpu_object(kernel, arch) == obj  # cached: the next build compiles nothing


@needs_nvcc
@needs_cuobjdump
@pytest.mark.parametrize("arch, kernel", F32, ids=lambda v: getattr(v, "form", v))
def test_float32_kernels_run_3xtf32_on_tensor_cores(compiled, monkeypatch, arch, kernel):
    monkeypatch.setenv("MIXER_COMPILE_CACHE", str(compiled))
    code = _sass(cutlass.gpu_object(kernel, arch))
    warp_m, warp_n = Config.parse(kernel.variant).warp
    per_k_tile = 3 * (warp_m // 16) * (warp_n // 8) * (16 // 8)  # m16n8k8 over a warp tile, K tile 16
    assert code.count("HMMA.1688.F32.TF32") == per_k_tile and "LDGSTS" in code and "HGMMA" not in code


# (kernel, a problem it runs, one it refuses): the contiguous axes must be multiples of 8
IMPLEMENTABLE = [(_mid("sm_80"), GemmShape(128, 128, 512), GemmShape(128, 128, 196)),
                 (SM80_LEFT[0], GemmShape(64, 256, 196, 2), GemmShape(196, 256, 64, 2))]


@needs_nvcc
@pytest.mark.parametrize("kernel, runs, refused", IMPLEMENTABLE, ids=lambda v: getattr(v, "form", ""))
def test_a_kernel_says_on_the_cpu_which_problems_it_can_run(tmp_path, compiled, monkeypatch, kernel, runs,
                                                            refused):
    """CUTLASS's can_implement, exported beside each kernel and asked on this CPU (no GPU): a
    build refuses a choice its kernel would reject at the first call on the GPU."""
    monkeypatch.setenv("MIXER_COMPILE_CACHE", str(compiled))
    obj = cutlass.gpu_object(kernel, "sm_80")
    lib = cutlass.load_on_host([obj], cutlass.link_options(), tmp_path)
    implementable = lib[f"{kernel.symbol}_implementable"]
    assert implementable(runs.m, runs.n, runs.k, runs.l) and not implementable(refused.m, refused.n, refused.k, refused.l)
    gemm_choice.check_implementable([(kernel, runs)], {kernel: obj})
    with pytest.raises(TargetError, match=f"the CUTLASS kernel {kernel.symbol} cannot run the "
                                          f"{refused.m}x{refused.n}x{refused.k}x{refused.l} problem"):
        gemm_choice.check_implementable([(kernel, runs), (kernel, refused)], {kernel: obj})


@needs_nvcc
@needs_cuobjdump
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_artifact_links_the_library_gemms_and_validates_on_host(tmp_path, compiled, monkeypatch, arch):
    """A CUDA build links its CUTLASS kernels into model.so (on sm_80 from the cache `compiled`
    filled) and validates the same program on this CPU."""
    monkeypatch.setenv("MIXER_COMPILE_CACHE", str(compiled))
    result = compile_model(CompileOptions(spec=MID, target=arch, dtype="bfloat16", out_dir=tmp_path / "a"))
    meta = json.loads((tmp_path / "a" / "metadata.json").read_text())
    linked = [from_symbol(s) for s in meta["gpu_code"]["library_gemms"]]
    assert linked == [_mid(arch, "gelu_erf"), _mid(arch)]
    assert [c["from"] for c in meta["gpu_code"]["gemm_choices"]] == ["default"] * 4
    gpu = local_gpu()
    on_gpu = gpu is not None and gpu_arch(gpu)[:4] == arch[:4]  # same major version: it runs there
    assert result.validation.passed
    assert ("C++ stand-in" in result.validation.where) != on_gpu, result.validation.where
    library = tmp_path / "a" / "model.so"
    exported = subprocess.run(["nm", "-D", str(library)], check=True, capture_output=True, text=True).stdout
    assert all(f" T __tvm_ffi_{k.symbol}" in exported for k in linked)
    assert b"vm.builtin.cuda_graph.run_or_capture" in library.read_bytes()  # the forward pass is a CUDA graph
    assert TENSOR_CORE_CODE[arch][0] in _sass(library)


@needs_nvcc
@needs_cuobjdump
@pytest.mark.slow
@pytest.mark.parametrize("kernel", [GemmKernel("float16", "gelu_erf", "wtx", "t128x256x64_c1x1_coop"),
                                    GemmKernel("bfloat16", "residual", "wx", "t64x128x64_c1x1_pp"),
                                    GemmKernel("float16", "residual", "xw", "t128x128x64_c1x1_sk"),
                                    GemmKernel("bfloat16", "residual", "wx", "t128x128x64_c1x1_sk")],
                         ids=lambda k: f"{k.form}-{k.variant.rsplit('_', 1)[1]}")
def test_token_mixing_kernels_are_batched_wgmma_fed_by_tma(kernel_cache, monkeypatch, kernel):
    """The left products (one W for every image, per-row bias) compile to the same wgmma + TMA
    code as the right ones, in both kernel layouts and every schedule (stream-K included, for
    right and left products)."""
    monkeypatch.setenv("MIXER_COMPILE_CACHE", str(kernel_cache))
    code = _sass(cutlass.gpu_object(kernel, "sm_90"))
    assert "HGMMA" in code and "UTMALDG" in code and "HMMA" not in code.replace("HGMMA", "")


@needs_nvcc
@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_model_with_library_token_mixing_validates_where_it_can_run(tmp_path, kernel_cache, monkeypatch, dtype):
    """TOKENS (196 tokens) built for this machine's GPU (sm_90 without one): all three forms of
    library call, validated against the reference on the GPU when there is one (the numerics of
    the CUTLASS kernels themselves), else on this CPU through the stand-in."""
    monkeypatch.setenv("MIXER_COMPILE_CACHE", str(kernel_cache))
    result = compile_model(CompileOptions(spec=TOKENS, target="cuda", dtype=dtype, out_dir=tmp_path / "a"))
    meta = json.loads((tmp_path / "a" / "metadata.json").read_text())
    assert {from_symbol(s).form for s in meta["gpu_code"]["library_gemms"]} == {"xw", "wx", "wtx"}
    assert result.validation.passed and result.validation.max_rel_error < TOLERANCES[dtype]
    assert result.validation.where.startswith("GPU ") == (local_gpu() is not None), result.validation.where
