"""How each library GEMM call of a GPU build is configured (backend/gemm_choice.py): a default
by shape when nothing was measured, a record measured on a GPU when one matches, the user's
records before the shipped ones; and the variants' spelling (backend/cutlass.py Config)."""

from __future__ import annotations

import re
import json
import zlib

import pytest

from mixer_compile.backend import gemm_choice
from mixer_compile.backend.cutlass import CANDIDATES, Config
from mixer_compile.backend.gemm_choice import Record, apply_choices, default_config, records_for, write_records
from mixer_compile.backend.target import get_target
from mixer_compile.compose import compose
from mixer_compile.errors import TargetError, TuningError
from mixer_compile.lower.library import GemmKernel, GemmShape, from_symbol
from mixer_compile.model.spec import MixerSpec
from mixer_compile.tune import database as tuning_db
from mixer_compile.tune.ship import ship

FC1 = GemmKernel("float16", "gelu_erf")
TOKEN_FC1 = GemmKernel("float16", "gelu_erf", "wtx")
SMALL = MixerSpec("small", (112, 112), 8, 256, 64, 512, 1, num_classes=10, batch=2, gelu="erf")


@pytest.mark.parametrize("kernel,shape,family,variant", [
    # Mixer-B/16 at batch 256: thousands of tiles; W loads shared by a 2-CTA cluster
    (FC1, GemmShape(50176, 3072, 768), "sm_90a", "t128x256x64_c2x1_coop"),
    # its token fc1: 384 rows are 3 M tiles, which do not pair up in a cluster
    (TOKEN_FC1, GemmShape(384, 768, 196, 256), "sm_90a", "t128x256x64_c1x1_coop"),
    # batch 1: 196 rows would fill 24 of 132 SMs with 128x256 tiles; 48 128x128 tiles with 12 K
    # steps each: stream-K divides the K loops among the SMs
    (FC1, GemmShape(196, 3072, 768), "sm_90a", "t128x128x64_c1x1_sk"),
    (GemmKernel("float16", "residual"), GemmShape(196, 768, 3072), "sm_90a", "t128x128x64_c1x1_sk"),
    # batch 1's token fc1: 18 tiles, but only 4 K steps (196 tokens): the smallest tiles
    (TOKEN_FC1, GemmShape(384, 768, 196, 1), "sm_90a", "t64x128x64_c1x1_pp"),
    (FC1, GemmShape(50176, 3072, 768), "sm_80", "t128x128x32_w64x64_s4"),
    (FC1, GemmShape(196, 768, 768), "sm_80", "t64x64x32_w32x32_s6"),
    # datacenter Blackwell: 2-SM tcgen05 tiles (a 256-row tile per SM pair) for the large
    # problems, stream-K for batch 1's channel GEMMs, the smallest 1-SM tile else
    (FC1, GemmShape(50176, 3072, 768), "sm_100", "t256x128x64_c2x1_auto"),
    (FC1, GemmShape(196, 3072, 768), "sm_100", "t128x128x64_c1x1_sk"),
    (TOKEN_FC1, GemmShape(384, 768, 196, 1), "sm_100", "t128x64x64_c1x1_auto"),
    # float32 on Hopper: the 3xTF32 mma.sync kernels (wgmma's tf32 would lose float32 accuracy)
    (GemmKernel("float32", "gelu_erf"), GemmShape(50176, 3072, 768), "sm_90a", "t128x128x16_w32x64_s4"),
    (GemmKernel("float32", "gelu_erf"), GemmShape(196, 768, 768), "sm_90a", "t64x64x16_w32x32_s3"),
])
def test_default_configuration_follows_the_shape(kernel, shape, family, variant):
    assert default_config(kernel, shape, family).variant == variant


def test_variants_round_trip_and_a_bad_one_is_named():
    for configs in CANDIDATES.values():
        for config in configs:
            assert Config.parse(config.variant) == config
    with pytest.raises(TargetError, match="'t128x' is not a CUTLASS configuration"):
        Config.parse("t128x")


def _record(shape: GemmShape, variant: str, us: float = 10.0, kernel: GemmKernel = FC1) -> Record:
    return Record(kernel.form, kernel.dtype, kernel.epilogue, shape.m, shape.n, shape.k, shape.l, variant, us, "test GPU")


def test_records_win_over_defaults_and_the_users_over_the_shipped(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXER_COMPILE_CACHE", str(tmp_path / "cache"))
    shipped = tmp_path / "schedules" / "sm_90a" / gemm_choice.RECORDS
    monkeypatch.setattr(gemm_choice, "shipped_records_path", lambda family: shipped)
    big, small = GemmShape(50176, 3072, 768), GemmShape(196, 3072, 768)
    write_records(shipped, [_record(big, "t128x128x64_c1x1_coop"), _record(small, "t64x256x64_c1x1_pp")])
    write_records(gemm_choice.user_records_path("sm_90a"), [_record(small, "t128x128x64_c1x1_coop")])
    records = records_for("sm_90a")
    assert gemm_choice.choose(FC1, big, "sm_90a", records) == ("t128x128x64_c1x1_coop", "record")
    assert gemm_choice.choose(FC1, small, "sm_90a", records) == ("t128x128x64_c1x1_coop", "record")
    other = GemmShape(12544, 3072, 768)  # no record for this batch: the default
    assert gemm_choice.choose(FC1, other, "sm_90a", records) == ("t128x256x64_c2x1_coop", "default")
    # a record replaces the one of the same problem; the file stays one sorted list
    write_records(shipped, [_record(big, "t64x256x64_c1x1_pp", 9.0)])
    assert [r.variant for r in gemm_choice.read_records(shipped)] == ["t64x256x64_c1x1_pp", "t64x256x64_c1x1_pp"]


def test_shipping_merges_a_runs_gemm_records_into_a_schedules_tree(tmp_path, monkeypatch):
    """`tune --ship-to DIR`: a run's GEMM records land where a build of the family reads shipped
    ones; a problem measured again replaces its shipped record, the others stay."""
    root = tmp_path / "schedules"
    big, small = GemmShape(50176, 3072, 768), GemmShape(196, 3072, 768)
    shipped = gemm_choice.shipped_records_path("sm_90a", root)
    write_records(shipped, [_record(big, "t128x128x64_c1x1_coop"), _record(small, "t64x256x64_c1x1_pp")])
    lines = ship(get_target("sm_90"), tmp_path / "no-db", root, [], [_record(small, "t128x128x64_c1x1_coop")])
    assert lines == [f"1 library GEMM records -> {shipped}"]
    monkeypatch.setattr(tuning_db, "SCHEDULES_DIR", root)
    monkeypatch.setenv("MIXER_COMPILE_CACHE", str(tmp_path / "empty-cache"))  # the shipped tree alone
    variants = {(r.m, r.variant) for r in records_for("sm_90a").values()}
    assert variants == {(big.m, "t128x128x64_c1x1_coop"), (small.m, "t128x128x64_c1x1_coop")}


def test_unreadable_records_are_one_line_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXER_COMPILE_CACHE", str(tmp_path))
    path = gemm_choice.user_records_path("sm_80")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(TuningError, match=f"cannot read GEMM records '{path}'.*delete it") as info:
        records_for("sm_80")
    assert "\n" not in str(info.value)


def test_every_call_site_is_renamed_to_its_choice(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXER_COMPILE_CACHE", str(tmp_path))
    model = compose(SMALL, get_target("sm_90"), "matmul", "float16")
    token_fc1 = GemmShape(64, 256, 196, 2)
    records = {gemm_choice.key_of(TOKEN_FC1, token_fc1): _record(token_fc1, "t128x128x64_c1x1_coop", kernel=TOKEN_FC1)}
    module, report = apply_choices(model.module, "sm_90a", records)
    assert len(report) == 5  # stem, token fc1 + fc2, channel fc1 + fc2 of its one block
    called = {from_symbol(r["symbol"]).form for r in report}
    chosen = [(r["symbol"], r["variant"], r["from"]) for r in report]
    assert ("mixer_gemm_wtx_f16_gelu_erf", "t128x128x64_c1x1_coop", "record") in chosen
    assert {origin for *_, origin in chosen} == {"record", "default"} and called == {"xw", "wtx", "wx"}
    linked = {kernel.symbol for kernel, _ in gemm_choice.call_sites(module)}
    assert linked == {f"{symbol}__{variant}" for symbol, variant, _ in chosen}
    assert json.loads(json.dumps(report)) == report  # the artifact's metadata carries it as it is


def test_gemm_tuning_needs_a_gpu_of_the_family(monkeypatch):
    from mixer_compile import machine
    from mixer_compile.tune.gemms import tune_gemms

    monkeypatch.setattr(machine, "local_gpu", lambda: None)
    model = compose(SMALL, get_target("sm_90"), "matmul", "float16")
    with pytest.raises(TuningError, match="measures on a sm_90a GPU, and none is visible here; build with the defaults"):
        tune_gemms(model.module, "sm_90", print)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_gemm_tuning_measures_every_candidate_records_the_fastest_and_resumes(tmp_path, monkeypatch, dtype):
    """The whole measure -> record -> apply loop, with this CPU standing in for the GPU: each
    candidate's object is the C++ stand-in (one object serving every variant), timed by TVM.
    float32 measures its own design space (3xTF32 tiles, and cuBLASLt's SGEMM where it serves)."""
    import tvm

    from mixer_compile import machine
    from mixer_compile.backend import cutlass
    from mixer_compile.tune import gemms

    monkeypatch.setenv("MIXER_COMPILE_CACHE", str(tmp_path))
    monkeypatch.setattr(machine, "local_gpu", lambda: tvm.cpu(0))
    monkeypatch.setattr(machine, "gpu_arch", lambda dev: "sm_90")
    model = compose(SMALL.replace(image_size=(64, 64)), get_target("sm_90"), "matmul", dtype)
    problems = {(k.symbol, s) for k, s in gemm_choice.call_sites(model.module)}
    kernels = [k.with_variant(v) for k, _ in gemm_choice.call_sites(model.module)
               for v in gemms.candidates(k, "sm_90a")]
    stand_in = cutlass.host_object(kernels)
    monkeypatch.setattr(gemm_choice, "gpu_object", lambda kernel, arch: stand_in)
    monkeypatch.setattr(gemm_choice, "link_options", lambda kernels: [])
    # one stand-in serves every variant, so its timings are noise: each timed call runs for real
    # and then reports a time fixed per symbol, which makes the fastest known
    fake = {k.symbol: 1e-4 * (1 + zlib.crc32(k.symbol.encode()) % 97) for k in kernels}
    real_time = gemms._time

    def fixed_time(lib, symbol, *args):
        assert real_time(lib, symbol, *args) > 0
        return fake[symbol]

    monkeypatch.setattr(gemms, "_time", fixed_time)
    lines: list[str] = []
    records = gemms.tune_gemms(model.module, "sm_90", lines.append, jobs=1)
    assert len(records) == len(problems) == 3  # stem, channel fc1 and fc2 (64 tokens: token mixing too small)
    for r in records:
        kernel = GemmKernel(r.dtype, r.epilogue, r.form)
        timed = {v: fake[kernel.with_variant(v).symbol] for v in gemms.candidates(kernel, "sm_90a")}
        assert r.variant == min(timed, key=timed.__getitem__) and r.us == round(min(timed.values()) * 1e6, 2)
    assert {r.dtype for r in records} == {dtype}
    space = {c.variant for c in cutlass.CANDIDATES["tf32x3" if dtype == "float32" else "sm_90a"]}
    assert space <= {k.variant for k in kernels}
    assert f"[{len(problems)}/{len(problems)}]" in lines[-1]
    assert {r["from"] for r in apply_choices(model.module, "sm_90a")[1]} == {"record"}
    # measured problems are not measured again
    monkeypatch.setattr(gemm_choice, "gpu_object", lambda kernel, arch: pytest.fail("compiled again"))
    lines.clear()
    assert gemms.tune_gemms(model.module, "sm_90", lines.append) == records  # what a run ships
    assert lines == [f"library GEMMs: {len(problems)} problems, {len(problems)} already measured on None"]


def test_gemm_tuning_skips_a_candidate_whose_call_fails_and_says_so(tmp_path, monkeypatch):
    import tvm

    from mixer_compile import machine
    from mixer_compile.backend import cutlass
    from mixer_compile.tune import gemms

    monkeypatch.setenv("MIXER_COMPILE_CACHE", str(tmp_path))
    monkeypatch.setattr(machine, "local_gpu", lambda: tvm.cpu(0))
    monkeypatch.setattr(machine, "gpu_arch", lambda dev: "sm_90")
    model = compose(SMALL.replace(image_size=(64, 64)), get_target("sm_90"), "matmul", "float16")
    kernels = [k.with_variant(v) for k, _ in gemm_choice.call_sites(model.module) for v in gemms.candidates(k, "sm_90a")]
    monkeypatch.setattr(gemm_choice, "gpu_object", lambda kernel, arch: cutlass.host_object(kernels))
    monkeypatch.setattr(gemm_choice, "link_options", lambda kernels: [])
    refused = kernels[0].variant
    timed = gemms._time

    def refusing(lib, symbol, args, dev):  # as a call the library refuses at run time fails
        if symbol.endswith(f"__{refused}"):
            raise RuntimeError(f"{symbol}: initialize")
        return timed(lib, symbol, args, dev)

    monkeypatch.setattr(gemms, "_time", refusing)
    lines: list[str] = []
    records = gemms.tune_gemms(model.module, "sm_90", lines.append, jobs=1)
    assert len(records) == 3 and refused not in {r.variant for r in records}
    skipped = [line.strip() for line in lines if "skipped" in line]
    assert skipped and all(re.fullmatch(rf"(\S+__{refused}): skipped, its call failed \(\1: initialize\)", line)
                           for line in skipped), skipped


def test_tune_for_a_gpu_measures_the_library_gemms_first_and_refuses_without_a_gpu(tmp_path, capsys, monkeypatch):
    """`mixer-compile tune --target sm_90 --dtype float16`: a model with library GEMMs starts
    with them, and on this GPU-less machine stops in one line before compiling anything."""
    from mixer_compile import machine
    from mixer_compile.cli import main
    from tests.helpers import spec_toml

    monkeypatch.setattr(machine, "local_gpu", lambda: None)
    spec = tmp_path / "small.toml"
    spec.write_text(spec_toml(SMALL))
    code = main(["tune", "--spec", str(spec), "--target", "sm_90", "--dtype", "float16", "--db", str(tmp_path / "db")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: tuning the GEMMs of a sm_90a build measures on a sm_90a GPU")
    assert not (tmp_path / "db").exists() and not any(tmp_path.glob("**/*.o"))


def test_gpu_objects_raise_or_hand_over_a_kernel_that_cannot_be_built(monkeypatch, tmp_path):
    broken = FC1.with_variant("t128x128x64_c1x1_sk")
    fine = [FC1.with_variant("t128x256x64_c2x1_coop"), TOKEN_FC1.with_variant("t64x128x64_c1x1_pp")]

    def gpu_object(kernel, arch):
        if kernel == broken:
            raise TargetError(f"compiling the CUTLASS kernel {kernel.symbol} failed:\nerror: no")
        return tmp_path / f"{kernel.symbol}.{arch}.o"

    monkeypatch.setattr(gemm_choice, "gpu_object", gpu_object)
    with pytest.raises(TargetError, match=f"{broken.symbol} failed"):
        gemm_choice.gpu_objects([*fine, broken], "sm_90", jobs=2)
    handed = []
    objects = gemm_choice.gpu_objects([broken, *fine], "sm_90", jobs=2, on_error=lambda k, e: handed.append((k, e)))
    assert objects == {k: tmp_path / f"{k.symbol}.sm_90.o" for k in fine}
    assert [k for k, _ in handed] == [broken] and "failed" in str(handed[0][1])
