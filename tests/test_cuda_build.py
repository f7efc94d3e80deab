"""CUDA builds without a GPU: the library carries compiled kernels (an nvcc fatbin, no CUDA
source), fp16 and bf16 matmuls run on tensor cores (HMMA in the SASS), and half precision is checked
on the CPU against the reference. Tests that need a GPU skip, saying so.

Each CUDA variant is built once (module-scoped). fp32 variants use the tiny spec; the half ones a 72x72 spec (81 tokens, C = 96):
DLight tensorizes a matmul only when every dimension exceeds 64.
"""

from __future__ import annotations

import json
import multiprocessing
import re
import shutil
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from mixer_compile import runtime
from mixer_compile.backend.cuda import fatbins
from mixer_compile.backend.target import get_target, local_gpu
from mixer_compile.check.validate import TOLERANCES, random_images
from mixer_compile.cli import main
from mixer_compile.compiler import CompileOptions, compile_model
from mixer_compile.errors import MixerCompileError
from mixer_compile.ir import build_graph
from mixer_compile.model import reference
from mixer_compile.model.params import random_weights
from mixer_compile.model.spec import MixerSpec
from mixer_compile.passes.context import PassContext
from mixer_compile.passes.pipeline import passes_for, run_passes
from tests.helpers import HALF_WEIGHTS, TINY, TINY_TOML, lines_until_cuda_build, rel_error
from tests.sass import cuobjdump, sass

TINY4 = TINY.replace(batch=4)  # the fp32 GPU builds: checked on the host CPU at batch 2 without a GPU
TENSORIZABLE = MixerSpec("tc", (72, 72), 8, 96, 96, 192, 1, num_classes=10, batch=2)
# fp32 on one architecture: DLight schedules it alike on both, and each CUDA build costs ~15 s of nvcc
VARIANTS = [("sm_80", "float32"), ("sm_80", "float16"), ("sm_90", "float16"), ("sm_90", "bfloat16")]

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("gcc") is None,
                                reason="CUDA builds need nvcc (the CUDA toolkit) and gcc")
needs_cuobjdump = pytest.mark.skipif(cuobjdump() is None,
                                     reason="reading SASS needs cuobjdump: pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm")
needs_gpu = pytest.mark.skipif(local_gpu() is None, reason="needs an NVIDIA GPU; none is visible here "
                               "(tvm.cuda(0).exist is False): the GPU run stays pending")


def _build(variant: tuple[str, str], root: Path) -> Path:
    arch, dtype = variant
    out = root / f"{arch}-{dtype}"
    compile_model(CompileOptions(spec=TINY4 if dtype == "float32" else TENSORIZABLE, target=arch, dtype=dtype,
                                 out_dir=out))
    return out


@pytest.fixture(scope="module")
def cuda_builds(tmp_path_factory) -> dict[tuple[str, str], Path]:
    if shutil.which("nvcc") is None or shutil.which("gcc") is None:
        pytest.skip("CUDA builds need nvcc (the CUDA toolkit) and gcc")
    root = tmp_path_factory.mktemp("cuda")
    # two builds at once, each in a process of its own (Relax's BlockBuilder is not thread-safe):
    # a build's nvcc is single-threaded, and one build after another would leave a core idle
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        return dict(zip(VARIANTS, pool.map(_build, VARIANTS, [root] * len(VARIANTS))))


def _metadata(artifact: Path) -> dict:
    return json.loads((artifact / "metadata.json").read_text())


@needs_nvcc
@pytest.mark.parametrize("arch,dtype", VARIANTS)
def test_library_carries_compiled_gpu_code_not_source(cuda_builds, arch, dtype):
    artifact = cuda_builds[arch, dtype]
    library = (artifact / "model.so").read_bytes()
    blobs = fatbins(artifact / "model.so")
    assert len(blobs) == 1 and len(blobs[0]) > 10_000
    assert b"__global__" not in library and b"extern \"C\"" not in library  # no CUDA source fallback
    meta = _metadata(artifact)
    assert meta["gpu_code"] == {"format": "fatbin", "compiler": "nvcc", "arch": arch, "fatbins": 1,
                                "bytes": len(blobs[0]), "library_gemms": [], "gemm_choices": []}  # all too small for CUTLASS
    assert meta["target"]["requires"]["gpu_arch"] == arch
    assert meta["precision"]["dtype"] == dtype
    assert sorted(p.name for p in artifact.iterdir()) == ["metadata.json", "model.so", "weights.params"]
    maps = Path("/proc/self/maps")
    if maps.is_file():  # the build-only stand-in libcuda was only ever loaded by the build's child process
        assert "stand-in-libcuda" not in maps.read_text()


def _mma(code: str) -> set[str]:
    return set(re.findall(r"\bHMMA\.[.A-Z0-9]+", code))


@needs_nvcc
@needs_cuobjdump
@pytest.mark.parametrize("arch,dtype,instruction", [("sm_80", "float16", "HMMA.16816.F32"),
                                                    ("sm_90", "float16", "HMMA.16816.F32"),
                                                    ("sm_90", "bfloat16", "HMMA.16816.F32.BF16")])
def test_half_matmuls_use_tensor_cores_and_fp32_ones_do_not(cuda_builds, arch, dtype, instruction):
    half = sass(cuda_builds[arch, dtype] / "model.so")
    matmuls = {name: _mma(code) for name, code in half.items() if "matmul" in name}
    on_tensor_cores = {name for name, mma in matmuls.items() if mma}
    # stem, token fc1/fc2, channel fc1/fc2; the head (2 x 96 x 10) is too small to tensorize
    assert len(matmuls) == 6 and len(on_tensor_cores) == 5, sorted(matmuls)
    # half in, fp32 accumulators
    assert all(matmuls[n] == {instruction} for n in on_tensor_cores), matmuls
    fp32 = sass(cuda_builds["sm_80", "float32"] / "model.so")
    assert not any("HMMA" in code for code in fp32.values())
    assert any("FFMA" in code for name, code in fp32.items() if "matmul" in name)


@needs_nvcc
@pytest.mark.parametrize("arch,dtype", VARIANTS)
def test_build_without_gpu_is_validated_on_host_cpu_and_says_so(cuda_builds, arch, dtype):
    v = _metadata(cuda_builds[arch, dtype])["validation"]
    assert v["passed"] and v["max_rel_error"] < v["tolerance"] == TOLERANCES[dtype]
    if dtype != "float32":
        assert v["max_rel_error"] > 1e-5  # really ran in half precision, not silently in fp32
    if local_gpu() is None:
        assert v["where"].startswith("host CPU") and "GPU run pending" in v["where"]
        assert v["batch"] == 2
        assert v["where"].endswith(", at batch 2") == (dtype == "float32")  # only when not the build's batch


@needs_gpu
@needs_nvcc
@pytest.mark.parametrize("arch,dtype", VARIANTS)
def test_runs_on_the_gpu_within_bound(cuda_builds, arch, dtype):
    meta = _metadata(cuda_builds[arch, dtype])
    if not meta["validation"]["where"].startswith("GPU"):
        pytest.skip(f"the GPU here cannot run {arch} code: {meta['validation']['where']}")
    spec = TINY4 if dtype == "float32" else TENSORIZABLE
    model = runtime.load(cuda_builds[arch, dtype])
    weights = random_weights(spec.with_gelu_for("random"), 0)
    images = random_images(spec, 7)
    expected = reference.forward(spec.with_gelu_for("random"), weights, images)
    assert rel_error(model(images), expected) < TOLERANCES[dtype]
    # a torch tensor already on the GPU goes in without a copy, and the logits come back there
    # (what benchmarks/bench_gpu.py times as ours)
    on_gpu = model(torch.from_numpy(images).cuda())
    assert on_gpu.is_cuda and rel_error(on_gpu.cpu().numpy(), expected) < TOLERANCES[dtype]


@needs_gpu
@needs_nvcc
def test_threads_calling_at_once_each_capture_their_graph(cuda_builds):
    # each thread's VM captures its CUDA graph on its first call, while the others run theirs
    meta = _metadata(cuda_builds["sm_90", "float16"])
    if not meta["validation"]["where"].startswith("GPU"):
        pytest.skip(f"the GPU here cannot run sm_90 code: {meta['validation']['where']}")
    model = runtime.load(cuda_builds["sm_90", "float16"])
    spec, images = TENSORIZABLE.with_gelu_for("random"), random_images(TENSORIZABLE, 3)
    expected = reference.forward(spec, random_weights(spec, 0), images)
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: [model(images) for _ in range(3)], range(8)))
    assert max(rel_error(o, expected) for runs in outs for o in runs) < TOLERANCES["float16"]


@pytest.mark.parametrize("dtype,form,embed", [("float16", "matmul", False), ("bfloat16", "matmul", False),
                                              ("float16", "conv", True), ("bfloat16", "conv", False)])
def test_half_precision_lowering_matches_reference_on_cpu(dtype, form, embed):
    spec = TINY.with_gelu_for("random")
    r = compile_model(CompileOptions(spec=TINY, target="llvm", dtype=dtype, form=form, embed_weights=embed))
    assert r.validation.passed and r.validation.where == "this CPU"
    # above fp32's ~1e-7 (so the half-precision path really ran), and about what rounding only the
    # weights gives: validation's bounds (TOLERANCES), sized for full-size models, are looser
    assert 1e-5 < r.validation.max_rel_error < HALF_WEIGHTS[dtype]
    # a CPU stores the weight matrices in half, its activations in float32 (passes/precision.py)
    assert r.metadata.precision == {"dtype": dtype, "activations": "float32", "accumulate": "float32"}
    graph, _ = run_passes(build_graph(spec), passes_for(form), PassContext(dtype=dtype))
    params = graph.materialize_params(random_weights(spec, 0))
    assert {str(v.dtype) for k, v in params.items() if v.ndim > 1} == {dtype}
    assert {str(v.dtype) for k, v in params.items() if v.ndim == 1} == {"float32"}


def test_precision_pass_marks_reductions_and_keeps_logits_float32():
    graph, reports = run_passes(build_graph(TINY.with_gelu_for("random")), passes_for("matmul"),
                                PassContext(dtype="float16"))
    assert [r.name for r in reports] == list(passes_for("matmul"))
    precision = next(r for r in reports if r.name == "precision")
    assert precision.changes and "stored in float16" in precision.changes[0]
    reducing = [op for op in graph.ops if op.kind in ("dense", "layer_norm", "mean")]
    assert reducing and all(op.attrs["accumulate"] == "float32" for op in reducing)
    assert graph.producer(graph.output).output.dtype == "float32"
    assert {op.output.dtype for op in graph.ops if op.output.name != graph.output} == {"float16"}
    unchanged, fp32_reports = run_passes(build_graph(TINY.with_gelu_for("random")), passes_for("matmul"))
    assert all(op.output.dtype == "float32" and "accumulate" not in op.attrs for op in unchanged.ops)
    assert [r.name for r in fp32_reports] == list(passes_for("matmul"))


def test_unknown_dtype_is_a_one_line_error(capsys):
    with pytest.raises(MixerCompileError, match="unknown dtype 'float8'; choose one of float32, float16, bfloat16"):
        run_passes(build_graph(TINY), passes_for("matmul"), PassContext(dtype="float8"))
    with pytest.raises(SystemExit) as exc:
        main(["--spec", "mixer_s32", "--dtype", "float8"])
    assert exc.value.code == 2 and "invalid choice: 'float8'" in capsys.readouterr().err


class _FakeGPU:
    def __init__(self, compute_version: str) -> None:
        self.compute_version = compute_version
        self.device_name = f"Fake GPU {compute_version}"
        self.max_shared_memory_per_block = 101376
        self.max_threads_per_block = 1024
        self.warp_size = 32


def test_cuda_target_is_the_local_gpu_else_sm_90(monkeypatch):
    import mixer_compile.backend.target as targets

    monkeypatch.setattr(targets, "local_gpu", lambda: None)
    assert get_target("cuda").config == get_target("h100").config
    assert "no GPU visible" in get_target("gpu").description
    monkeypatch.setattr(targets, "local_gpu", lambda: _FakeGPU("8.0"))
    assert get_target("cuda").config == get_target("a100").config
    # named by what it resolves to: the tuning records kept and shipped under that name are this GPU's
    assert get_target("cuda").name == "sm_80"
    monkeypatch.setattr(targets, "local_gpu", lambda: _FakeGPU("8.9"))  # no target file: limits off the device
    t = get_target("cuda")
    assert t.kind == "cuda" and t.config["arch"] == "sm_89" and t.config["max_shared_memory_per_block"] == 101376
    assert t.name == "sm_89"
    assert str(t.tvm_target().attrs["arch"]) == "sm_89" and "Fake GPU 8.9" in t.description


def test_a_resolved_target_says_what_it_became(monkeypatch):
    """`--target gpu` (an alias of `cuda`) names the GPU it resolved to in its target stage, and
    the summary line says what the code is for beyond that name."""
    import mixer_compile.backend.target as targets
    from mixer_compile.cli import _code_for
    from mixer_compile.machine import physical_cores

    monkeypatch.setattr(targets, "local_gpu", lambda: None)
    assert "      sm_90: no GPU visible: sm_90 (NVIDIA Hopper, compute capability 9.0 (H100, H200, GH200))" \
        in lines_until_cuda_build(monkeypatch, CompileOptions(spec=TINY, target="gpu"), 5)
    h100 = get_target("h100")
    assert _code_for({"name": h100.name, "config": h100.config}) == ["x86-64-v3 host"]
    assert _code_for({"name": "grace", "config": {**h100.config, "host": {"kind": "llvm", "mcpu": "neoverse-v2"}}}) \
        == ["sm_90", "neoverse-v2 host"]
    cores = physical_cores()  # avx2 splits its parallel loops for the building machine's cores
    assert _code_for({"name": "avx2", "config": get_target("avx2").config}) == ["x86-64-v3", f"{cores} cores"]
    vm = {"kind": "llvm", "mcpu": "emeraldrapids", "num-cores": 2, "mattr": ["-amx-bf16", "-amx-tile"]}
    assert _code_for({"name": "llvm", "config": vm}) == ["emeraldrapids without amx-bf16/amx-tile", "2 cores"]


def test_gpu_host_code_is_for_the_building_machines_architecture(monkeypatch, tmp_path, capsys):
    """GH200 and GB200 hosts are AArch64: "host": "portable" follows the machine that builds,
    and a target file naming another architecture is refused before nvcc runs (its objects
    would be for this machine)."""
    import mixer_compile.backend.target as targets
    from mixer_compile.backend.cuda import check_host
    from mixer_compile.backend.target import TargetInfo, build_requirements

    assert build_requirements(get_target("h100").tvm_target())["cpu"]["arch"] == "x86_64"
    monkeypatch.setattr(targets, "host_arch", lambda: "aarch64")
    gh200 = get_target("gh200")
    assert gh200.name == "sm_90" and gh200.config["host"] == {"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                                                               "mcpu": "generic"}
    assert build_requirements(gh200.tvm_target()) == {"gpu_arch": "sm_90", "cpu": {
        "arch": "aarch64", "mcpu": "generic", "features": ["neon"]}}
    monkeypatch.undo()
    foreign = tmp_path / "grace.json"
    foreign.write_text(json.dumps({"target": {"tag": "nvidia/nvidia-h100", "arch": "sm_90", "host": {
        "kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-v2"}}}))
    here = targets.host_arch()
    if here == "aarch64":
        pytest.skip("this machine is AArch64: the target file is its own architecture")
    check_host(TargetInfo("bare", "", {"kind": "cuda", "arch": "sm_90"}))  # no host: LLVM's default, this machine's
    (tmp_path / "tiny.toml").write_text(TINY_TOML)
    code = main(["--spec", str(tmp_path / "tiny.toml"), "--target", str(foreign), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err == (f"error: the grace target's host code is for aarch64 and this machine is {here}; a CUDA build's "
                   "host side is compiled for the machine that builds: build on a aarch64 machine, or give the "
                   "target \"host\": \"portable\" (this machine's architecture)"), err
    assert not (tmp_path / "out").exists()


def test_gpu_targets_are_listed_and_unknown_ones_rejected(capsys):
    assert main(["targets"]) == 0
    listed = capsys.readouterr().out
    for line in ("cuda ", "sm_80", "aliases: a100", "sm_90", "aliases: h100, h200", "aliases: b200, b100, gb200",
                 "aliases: rtx5090, rtx-pro-6000"):
        assert line in listed
    assert main(["--spec", "mixer_s32", "--target", "sm_99"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress line of the stage
    assert err.startswith("error: unknown target 'sm_99'; did you mean 'sm_90'? (known: ") and "cuda, llvm, sm_100, sm_120, sm_80, sm_90" in err
