"""cuBLASLt as a variant of the library GEMMs (backend/cublaslt.py), and the run-time library an
artifact that uses it declares (artifact/format.py) and the loader checks (machine.py), checked
without a GPU: which GEMMs it serves, that its wrapper compiles for sm_90a and sm_80 and a
library linking it needs libcublasLt.so.13, that the host-CPU check serves its symbols, and the
metadata field with the loader's one-line refusal. On a GPU, also the wrappers' own numerics.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm import relax

from mixer_compile import machine, runtime
from mixer_compile.artifact.format import METADATA, read_metadata
from mixer_compile.backend import cublaslt, cutlass
from mixer_compile.backend.cuda import CudaLibrary, describe
from mixer_compile.backend.target import get_target
from mixer_compile.compiler import CompileOptions, compile_model
from mixer_compile.errors import ArtifactError, TargetError
from mixer_compile.lower.library import GemmKernel
from mixer_compile.util.progress import Progress
from tests.helpers import edit_metadata
from tests.sass import cuobjdump

CUBLAS_MISSING = machine.package_file("nvidia-cublas", cublaslt.HEADER) is None
needs_cublas = pytest.mark.skipif(shutil.which("nvcc") is None or CUBLAS_MISSING,
                                  reason=f"compiling the cuBLASLt wrappers needs nvcc and {machine.CUBLASLT.pip}")


def lt(dtype: str, epilogue: str) -> GemmKernel:
    return GemmKernel(dtype, epilogue, variant=cublaslt.VARIANT)


# --- what cuBLASLt serves -------------------------------------------------------------------------


def test_cublaslt_serves_bias_tanh_gelu_and_residual_right_products():
    for dtype in ("float16", "bfloat16", "float32"):
        assert all(cublaslt.supports(lt(dtype, e)) for e in ("bias", "gelu_tanh", "residual"))
        assert not cublaslt.supports(lt(dtype, "gelu_erf"))  # its GELU epilogue is the tanh one
        assert not cublaslt.supports(GemmKernel(dtype, "bias", "wx", cublaslt.VARIANT))  # bias along D's rows
    with pytest.raises(TargetError, match="cuBLASLt has no such GEMM"):
        cublaslt.source(lt("float16", "gelu_erf"))
    residual = cublaslt.source(lt("bfloat16", "residual"))
    assert "TVM_FFI_DLL_EXPORT_TYPED_FUNC(mixer_gemm_xw_bf16_residual__cublaslt, Run)" in residual
    assert "CUBLASLT_EPILOGUE_BIAS" in residual and "CUDA_R_16BF" in residual and "TensorView r," in residual
    assert "CUBLASLT_EPILOGUE_GELU_BIAS" in cublaslt.source(lt("float16", "gelu_tanh"))
    sgemm = cublaslt.source(lt("float32", "bias"))  # float32 in float32: SGEMM, as PyTorch's default (no TF32)
    assert "kType = CUDA_R_32F" in sgemm and "bits == 32" in sgemm and "(&plan->op, CUBLAS_COMPUTE_32F," in sgemm


def test_a_build_declares_libcublaslt_only_when_it_links_a_cublaslt_gemm(tmp_path):
    cutlass_only = [GemmKernel("float16", "gelu_erf", variant="t128x256x64_c2x1_coop")]
    assert cublaslt.runtime_libraries(cutlass_only) == []
    assert cublaslt.runtime_libraries(cutlass_only + [lt("float16", "residual")]) == ["libcublasLt.so.13"]
    work = tempfile.TemporaryDirectory(dir=tmp_path)
    (Path(work.name) / "model.so").write_bytes(b"")
    target = get_target("sm_90")
    assert describe(CudaLibrary(work, target, cutlass_only))["runtime_libraries"] is None
    mixed = describe(CudaLibrary(work, target, cutlass_only + [lt("float16", "bias")]))
    assert mixed["runtime_libraries"] == [cublaslt.RUNTIME_LIBRARY]


# --- the wrapper, compiled and linked -------------------------------------------------------------


@needs_cublas
@pytest.mark.parametrize("arch, kernel", [("sm_90a", lt("bfloat16", "gelu_tanh")), ("sm_80", lt("float16", "residual")),
                                          ("sm_90a", lt("float32", "residual"))])
def test_wrapper_compiles_exports_its_symbol_and_calls_cublaslt(kernel_cache, monkeypatch, arch, kernel):
    monkeypatch.setenv("MIXER_COMPILE_CACHE", str(kernel_cache))
    obj = cublaslt.gpu_object(kernel, arch)
    symbols = subprocess.run(["nm", str(obj)], check=True, capture_output=True, text=True).stdout
    assert f" T __tvm_ffi_{kernel.symbol}" in symbols
    assert all(f" U {f}\n" in symbols for f in ("cublasLtMatmul", "cublasLtMatmulAlgoGetHeuristic", "cublasLtCreate"))
    if cuobjdump():  # the bias-rounding kernel is compiled for exactly the target's architecture
        listing = subprocess.run([cuobjdump(), "-lelf", str(obj)], check=True, capture_output=True, text=True).stdout
        assert f".{arch}." in listing, listing
    assert cublaslt.gpu_object(kernel, arch) == obj  # cached: the next build compiles nothing


@needs_cublas
def test_a_library_linking_a_wrapper_needs_libcublaslt_by_soname(kernel_cache, monkeypatch, tmp_path):
    """Linked the way a CUDA build exports model.so (export_library's options precede the objects,
    so `--as-needed` would drop the library unless wrapped); no run path to this machine's wheel."""
    monkeypatch.setenv("MIXER_COMPILE_CACHE", str(kernel_cache))
    kernel = lt("float16", "residual")
    obj = cublaslt.gpu_object(kernel, "sm_80")  # compiled by the test above
    library = tmp_path / "model.so"
    _tiny_executable().export_library(str(library), addons=[str(obj)],
                                      options=cublaslt.link_options() + cutlass.link_options())
    dynamic = subprocess.run(["readelf", "-d", str(library)], check=True, capture_output=True, text=True).stdout
    assert "Shared library: [libcublasLt.so.13]" in dynamic and "Shared library: [libcudart.so.13]" in dynamic
    assert "RUNPATH" not in dynamic and "RPATH" not in dynamic
    exported = subprocess.run(["nm", "-D", str(library)], check=True, capture_output=True, text=True).stdout
    assert f" T __tvm_ffi_{kernel.symbol}" in exported


def _tiny_executable() -> tvm.runtime.Executable:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4,), "float32"))
    with bb.function("main", [x]):
        bb.emit_func_output(bb.emit(relax.op.add(x, x)))
    return tvm.compile(bb.get(), target="llvm")


def test_host_check_serves_cublaslt_symbols(tmp_path, monkeypatch):
    """A build checked on this CPU runs its cuBLASLt calls by the C++ stand-in, like CUTLASS's:
    X [2, 3, 16] (M = 6) -> tanh GELU -> residual, against NumPy."""
    monkeypatch.setenv("MIXER_COMPILE_CACHE", str(tmp_path))
    gelu, residual = lt("float16", "gelu_tanh"), lt("float16", "residual")
    bb = relax.BlockBuilder()
    f16 = lambda *shape: relax.TensorType(shape, "float16")  # noqa: E731
    x, w1, w2 = relax.Var("x", f16(2, 3, 16)), relax.Var("w1", f16(32, 16)), relax.Var("w2", f16(16, 32))
    b1, b2 = relax.Var("b1", relax.TensorType((32,), "float32")), relax.Var("b2", relax.TensorType((16,), "float32"))
    with bb.function("main", [x, w1, b1, w2, b2]):
        h = bb.emit(relax.op.call_dps_packed(gelu.symbol, [x, w1, b1], out_ty=f16(2, 3, 32)))
        bb.emit_func_output(bb.emit(relax.op.call_dps_packed(residual.symbol, [h, w2, b2, x], out_ty=f16(2, 3, 16))))
    library = tmp_path / "host.so"
    tvm.compile(bb.get(), target="llvm").export_library(str(library),
                                                        addons=[str(cutlass.host_object([gelu, residual]))])
    rng = np.random.default_rng(0)
    args = [rng.standard_normal(s).astype(t) for s, t in
            [((2, 3, 16), np.float16), ((32, 16), np.float16), ((32,), np.float32), ((16, 32), np.float16),
             ((16,), np.float32)]]
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()
    xs, a1, c1, a2, c2 = (a.astype(np.float32) for a in args)
    y = xs @ a1.T + c1
    h = (0.5 * y * (1 + np.tanh(0.7978845608 * (y + 0.044715 * y ** 3)))).astype(np.float16).astype(np.float32)
    expected = (h @ a2.T + c2 + xs).astype(np.float16)
    assert out.dtype == np.float16
    np.testing.assert_allclose(out.astype(np.float32), expected.astype(np.float32), rtol=2e-3, atol=2e-3)


@needs_cublas
@pytest.mark.skipif(machine.local_gpu() is None, reason="runs cuBLASLt on an NVIDIA GPU; there is none here")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_cublaslt_gemms_validate_on_the_gpu(tmp_path, kernel_cache, monkeypatch, dtype):
    """The wrappers' own numerics, which no CPU run checks (the stand-in serves their symbols
    there): every GEMM of a model (stem, tanh-GELU fc1, residual fc2; its 64 tokens leave token
    mixing to TVM) recorded as cuBLASLt's, built for this GPU and validated there."""
    from mixer_compile.backend import gemm_choice
    from mixer_compile.check.validate import TOLERANCES
    from mixer_compile.compose import compose
    from mixer_compile.model.spec import MixerSpec

    monkeypatch.setenv("MIXER_COMPILE_CACHE", str(kernel_cache))
    records = tmp_path / "records.json"
    monkeypatch.setattr(gemm_choice, "user_records_path", lambda family: records)
    monkeypatch.setattr(gemm_choice, "shipped_records_path", lambda family, root=None: tmp_path / "none.json")
    spec = MixerSpec("small", (64, 64), 8, 256, 64, 512, 1, num_classes=10, batch=2, gelu="tanh")
    sites = gemm_choice.call_sites(compose(spec, get_target("cuda"), "matmul", dtype).module)
    assert len(sites) == 3 and all(cublaslt.supports(k.with_variant(cublaslt.VARIANT)) for k, _ in sites)
    gemm_choice.write_records(records, [gemm_choice.Record(k.form, k.dtype, k.epilogue, s.m, s.n, s.k, s.l,
                                                           cublaslt.VARIANT, 1.0, "test") for k, s in sites])
    result = compile_model(CompileOptions(spec=spec, target="cuda", dtype=dtype, form="matmul",
                                          out_dir=tmp_path / "a"), Progress(6, quiet=True))
    meta = json.loads((tmp_path / "a" / METADATA).read_text())
    assert len(meta["gpu_code"]["library_gemms"]) == 3
    assert all(s.endswith(f"__{cublaslt.VARIANT}") for s in meta["gpu_code"]["library_gemms"])
    assert meta["runtime_libraries"] == [cublaslt.RUNTIME_LIBRARY]
    assert result.validation.passed and result.validation.max_rel_error < TOLERANCES[dtype]
    assert result.validation.where.startswith("GPU "), result.validation.where


# --- the run-time dependency: metadata and loader -------------------------------------------------


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_spec) -> Path:
    out = tmp_path_factory.mktemp("lt") / "art"
    compile_model(CompileOptions(spec=tiny_spec, seed=3, out_dir=out), Progress(6, quiet=True))
    return out


@pytest.fixture
def copy(artifact, tmp_path) -> Path:
    return shutil.copytree(artifact, tmp_path / "art")


def test_runtime_libraries_round_trip_and_older_metadata_reads(copy):
    raw = json.loads((copy / METADATA).read_text())
    assert "runtime_libraries" not in raw and read_metadata(copy).runtime_libraries is None  # as every older one
    edit_metadata(copy, lambda m: m.update(runtime_libraries=["libcublasLt.so.13"]))
    meta = read_metadata(copy)
    assert meta.runtime_libraries == ["libcublasLt.so.13"]
    assert meta.to_json() == json.loads((copy / METADATA).read_text())
    for bad in (["/tmp/evil.so"], ["../libx.so.1"], "libcublasLt.so.13", [3]):
        edit_metadata(copy, lambda m: m.update(runtime_libraries=bad))
        with pytest.raises(ArtifactError, match=r"field 'runtime_libraries' must be a list of library file names"):
            read_metadata(copy)


def test_a_missing_declared_library_is_refused_in_one_line_before_loading(copy):
    (copy / "model.so").write_bytes(b"not a library" * 10)  # would fail to load, if it got that far
    edit_metadata(copy, lambda m: m.update(runtime_libraries=["libdoesnotexist.so.1"]))
    with pytest.raises(ArtifactError) as err:
        runtime.load(copy)
    assert str(err.value) == (f"artifact '{copy}' needs libdoesnotexist.so.1, which is not installed here: "
                              "put its directory on LD_LIBRARY_PATH")


def test_missing_cublaslt_names_the_pip_command(copy, monkeypatch, tmp_path):
    """Neither on the loader's path nor installed: the one line names the extra; installed but
    unloadable: it says where it looked."""
    real = machine.ctypes.CDLL

    def cdll(name: str, *args, **kwargs):
        if name == "libcublasLt.so.13":
            raise OSError(f"{name}: cannot open shared object file: No such file or directory")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(machine.ctypes, "CDLL", cdll)
    monkeypatch.setattr(machine, "package_file", lambda distribution, name: None)
    edit_metadata(copy, lambda m: m.update(runtime_libraries=["libcublasLt.so.13"]))
    with pytest.raises(ArtifactError) as err:
        runtime.load(copy)
    assert str(err.value) == (f"artifact '{copy}' calls cuBLASLt (libcublasLt.so.13), which is not installed here: "
                              "pip install 'mixer-compile[cublas]' (or put it on LD_LIBRARY_PATH)")
    damaged = tmp_path / "libcublasLt.so.13"
    damaged.write_bytes(b"truncated")
    monkeypatch.setattr(machine, "package_file", lambda distribution, name: damaged)
    with pytest.raises(ArtifactError, match=rf"calls cuBLASLt \(libcublasLt.so.13\), which does not load from "
                                            rf"{damaged} \(.*\); reinstall it: pip install 'mixer-compile\[cublas\]'$"):
        runtime.load(copy)


@pytest.mark.skipif(CUBLAS_MISSING, reason=f"loading cuBLASLt from its wheel needs it: {machine.CUBLASLT.pip}")
def test_declared_cublaslt_is_loaded_from_its_wheel(copy):
    """The wheel's library is on no loader path: the loader finds it through the package."""
    edit_metadata(copy, lambda m: m.update(runtime_libraries=["libcublasLt.so.13"]))
    model = runtime.load(copy)
    assert model(np.zeros((2, 3, 32, 32), np.float32)).shape == (2, 10)
    assert str(machine.package_file("nvidia-cublas", "libcublasLt.so.13").resolve()) in Path("/proc/self/maps").read_text()
