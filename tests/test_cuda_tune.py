"""MetaSchedule for CUDA targets, without a GPU: the two fixes that make its tensor-core
candidates usable (DESIGN.md section 6), records applied by a CUDA build ahead of DLight, and
the one-line refusal to tune where no GPU can measure.

Candidates are sampled from MetaSchedule's tensor-core space and built (CUDA code generated,
never run); one CUDA build of the 72x72 fp16 spec (its GEMMs tensorizable, too small for
CUTLASS) applies a record.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tvm
from tvm import te
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.arg_info import ArgInfo
from tvm.s_tir.meta_schedule.builder import BuilderInput
from tvm.s_tir.meta_schedule.database import JSONDatabase, TuningRecord

from mixer_compile.backend import cuda
from mixer_compile.backend.target import get_target
from mixer_compile.cli import main
from mixer_compile.compiler import CompileOptions, compile_model
from mixer_compile.compose import model_tasks
from mixer_compile.errors import TuningError
from mixer_compile.machine import local_gpu
from mixer_compile.model.spec import MixerSpec
from mixer_compile.tune.database import RECORDS, WORKLOADS
from mixer_compile.tune.search import _build, _worker_pools, tune
from mixer_compile.tune.tasks import tensor_core_space
from mixer_compile.util.progress import Progress
from tests.helpers import lines_until_cuda_build

TENSORIZABLE = MixerSpec("tc", (72, 72), 8, 96, 96, 192, 1, num_classes=10, batch=2)  # as in test_cuda_build
STORAGE_REWRITE_ERROR = "tvm_access_ptr element type must match the source buffer"

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("gcc") is None,
                                reason="CUDA builds need nvcc (the CUDA toolkit) and gcc")


def _fp16_matmul(n: int) -> tvm.IRModule:
    """n x n x n, fp16 operands, fp32 accumulator: the shape of our half-precision GEMMs."""
    a = te.placeholder((n, n), "float16", name="A")
    b = te.placeholder((n, n), "float16", name="B")
    k = te.reduce_axis((0, n), "k")
    c = te.compute((n, n), lambda i, j: te.sum(a[i, k].astype("float32") * b[k, j].astype("float32"), axis=k),
                   name="C")
    return tvm.IRModule({"main": te.create_prim_func([a, b, c])})


def _candidates(mod: tvm.IRModule, tvm_target: tvm.target.Target, seeds: int) -> tuple[list, int]:
    """Tensor-core design-space samples that pass MetaSchedule's postprocessors (its GPU code
    check among them), and how many the postprocessors rejected."""
    kept, rejected = [], 0
    for seed in range(seeds):
        context = ms.TuneContext(mod=mod, target=tvm_target, space_generator=tensor_core_space(), rand_state=seed)
        for sch in context.generate_design_space():
            if all(p.apply(sch) for p in context.space_generator.postprocs):
                kept.append(sch)
            else:
                rejected += 1
    return kept, rejected


def _builds_plain(sch: tvm.s_tir.Schedule, tvm_target: tvm.target.Target) -> str | None:
    try:
        with tvm.transform.PassContext():
            tvm.compile(sch.mod, target=tvm_target)
    except Exception as exc:  # TVM's own error type
        return str(exc)
    return None


def test_fp32_accumulate_wmma_candidates_build_with_storage_rewrite_off():
    tvm_target = get_target("sm_90").tvm_target()
    kept, _ = _candidates(_fp16_matmul(128), tvm_target, 4)
    assert len(kept) >= 6 and all("wmma_sync_16x16x16_f16f16f32" in str(s.trace) for s in kept)
    plain = [_builds_plain(s, tvm_target) for s in kept]
    assert sum(STORAGE_REWRITE_ERROR in (e or "") for e in plain) >= len(kept) // 2, plain  # the bug is real
    for sch in kept:  # tuning's build function (both builders') carries the fix
        _build(sch.mod, tvm_target)
    # ... into the worker processes too (MetaSchedule pickles the build function over)
    pool = _worker_pools(tvm_target, runner="not measured")[0]
    results = pool.build([BuilderInput(s.mod, tvm_target) for s in kept[:3]])
    assert [r.error_msg for r in results] == [None] * 3


def test_gpu_targets_admit_candidates_beyond_48kb_of_shared_memory():
    sm_90 = get_target("sm_90")
    assert sm_90.tvm_target().attrs["max_shared_memory_per_block"] == 232448  # 227 KB opt-in
    assert get_target("sm_80").tvm_target().attrs["max_shared_memory_per_block"] == 166912  # 163 KB opt-in
    tag_only = tvm.target.Target({k: v for k, v in sm_90.config.items() if k != "max_shared_memory_per_block"})
    assert tag_only.attrs["max_shared_memory_per_block"] == 49152
    mod = _fp16_matmul(512)
    kept, rejected = _candidates(mod, sm_90.tvm_target(), 3)
    capped, capped_rejected = _candidates(mod, tag_only, 3)
    assert len(kept) > len(capped) and capped_rejected > rejected
    for sch in kept:  # what the larger limit admits builds: it stages in dynamic shared memory
        _build(sch.mod, sm_90.tvm_target())
        assert "shared.dyn" in str(sch.trace)


@pytest.fixture(scope="module")
def gpu_tasks() -> list:
    return model_tasks(TENSORIZABLE, get_target("sm_90"), "matmul", "float16", 1)


def test_every_kernel_default_schedule_is_a_record(gpu_tasks, tmp_path):
    """Tuning commits each kernel's DLight schedule as its first record (search._measure_defaults):
    its trace must round-trip through a database and schedule the kernel again."""
    target = get_target("sm_90")
    db = JSONDatabase(str(tmp_path / WORKLOADS), str(tmp_path / RECORDS), allow_missing=True)
    for t in gpu_tasks:
        sch = cuda.default_schedule(t.mod, target)
        assert sch is not None, t.name
        db.commit_tuning_record(TuningRecord(sch.trace, db.commit_workload(t.mod), [1e-3], target.tvm_target(),
                                             ArgInfo.from_prim_func(t.mod["main"])))
    reread = JSONDatabase(str(tmp_path / WORKLOADS), str(tmp_path / RECORDS))
    for t in gpu_tasks:
        with target.tvm_target():
            assert reread.query_schedule(t.mod, target.tvm_target(), "main") is not None, t.name


@needs_nvcc
def test_a_cuda_build_applies_a_record_and_dlight_schedules_the_rest(gpu_tasks, tmp_path, monkeypatch):
    monkeypatch.setenv("MIXER_COMPILE_CACHE", str(tmp_path / "cache"))
    target = get_target("sm_90")
    tvm_target = target.tvm_target()
    task = next(t for t in gpu_tasks if t.name.startswith("fused_matmul_add_cast"))
    # a WMMA candidate that fails to build without the fix: the model build must apply it
    kept, _ = _candidates(task.mod, tvm_target, 6)
    sch = next(s for s in kept if STORAGE_REWRITE_ERROR in (_builds_plain(s, tvm_target) or ""))
    db_dir = tmp_path / "db"
    db_dir.mkdir()
    db = JSONDatabase(str(db_dir / WORKLOADS), str(db_dir / RECORDS), allow_missing=True)
    db.commit_tuning_record(TuningRecord(sch.trace, db.commit_workload(task.mod), [1e-6], tvm_target,
                                         ArgInfo.from_prim_func(task.mod["main"])))
    out = tmp_path / "art"
    r = compile_model(CompileOptions(spec=TENSORIZABLE, target="sm_90", dtype="float16", db=db_dir, out_dir=out),
                      Progress(6, quiet=True))
    tuning = json.loads((out / "metadata.json").read_text())["tuning"]
    assert tuning["tuned"] == [task.name] and task.name not in tuning["defaults"]
    assert tuning["kernels"] == len(tuning["defaults"]) + 1 and not tuning["untuned"]
    assert tuning["databases"] == [str(db_dir)]
    assert r.validation.passed and (local_gpu() is not None or "GPU run pending" in r.validation.where)


def test_tuning_for_a_gpu_refuses_without_one(tiny_toml, tmp_path, capsys):
    if local_gpu() is not None:
        pytest.skip("a GPU is visible here: tuning would measure on it")
    code = main(["tune", "--spec", str(tiny_toml), "--target", "sm_90", "--trials", "1", "--db", str(tmp_path / "db")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == ["error: tuning for sm_90 measures on a GPU; none is visible here (build with the defaults, "
                      "or tune on a GPU machine)"]
    assert err.strip().splitlines()[-1] == errors[0]
    assert not (tmp_path / "db").exists()  # refused before any work


def test_tuning_for_a_cpu_this_one_cannot_run_refuses(tmp_path):
    """znver4 (AVX-512) on an AVX2 machine: every candidate died in the runner, two minutes, exit 0."""
    from mixer_compile.backend.target import build_requirements
    from mixer_compile.errors import ArtifactError
    from mixer_compile.machine import check_cpu

    target = get_target("znver4")
    try:
        check_cpu(build_requirements(target.tvm_target())["cpu"], "here")
        pytest.skip("this CPU runs znver4 code")
    except ArtifactError:
        pass
    with pytest.raises(TuningError, match=r"^tuning for znver4 measures on this CPU, which cannot run its code "
                                          r"\(mcpu=znver4 and needs CPU features this machine lacks: .*avx512f.*\): "
                                          r"tune on such a machine, or measure on one with --rpc-tracker$"):
        tune([], target, tmp_path / "db")
    assert not (tmp_path / "db").exists()


class _FakeGPU:
    compute_version = "8.0"


def test_tuning_for_another_gpu_refuses(monkeypatch, tmp_path):
    import mixer_compile.machine as machine

    monkeypatch.setattr(machine, "local_gpu", lambda: _FakeGPU())
    with pytest.raises(TuningError, match=r"^tuning for sm_90 measures on a sm_90 GPU; this one is sm_80 "
                                          r"\(tune with --target sm_80, or on a sm_90 machine\)$"):
        tune([], get_target("sm_90"), tmp_path / "db")


def _unmeasured_runner() -> ms.runner.PyRunner:
    """Every candidate 'runs' in 1 ms (later ones a little slower): the tuning driver without a GPU."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner.local_runner import LocalRunnerFuture

    @derived_object
    class _Unmeasured(ms.runner.PyRunner):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def run(self, runner_inputs: list) -> list:
            self.calls += len(runner_inputs)
            return [LocalRunnerFuture([1e-3 * (1 + self.calls / 100)], None) for _ in runner_inputs]

    return _Unmeasured()


def test_the_tuning_driver_runs_a_gpu_target(gpu_tasks, tmp_path):
    """tune() for sm_90 with every step real but the measurement: DLight's defaults committed
    first, tensor-core candidates built (with the fix) and recorded, the records applied."""
    target = get_target("sm_90")
    tasks = [t for t in gpu_tasks if t.name.startswith(("fused_matmul_add_cast", "fused_layer_norm"))][:2]
    for t in tasks:
        t.trials, t.done = 2, 0
    summary = tune(tasks, target, tmp_path / "db", say=lambda _: None, runner=_unmeasured_runner())
    assert summary.tuned_now == 4 and all(t.default_secs is not None for t in tasks)
    db = JSONDatabase(str(tmp_path / "db" / WORKLOADS), str(tmp_path / "db" / RECORDS))
    records = db.get_all_tuning_records()
    assert len(records) == 4 and all(r.run_secs and float(r.run_secs[0]) < 1 for r in records)  # all built
    assert any("wmma_sync_16x16x16_f16f16f32" in str(r.trace) and "meta_schedule" in str(r.trace) for r in records)


def test_a_search_that_meets_a_metaschedule_error_is_retried_with_another_seed(gpu_tasks, tmp_path, monkeypatch):
    """MetaSchedule applies mutated traces unguarded, so a tensor-core candidate can abort a
    task's search; the task is searched again (its records so far kept), the run goes on."""
    from mixer_compile.tune import search

    real, calls = search._search_task, []

    def flaky(t, *args):
        calls.append(t.name)
        if len(calls) == 1:
            raise tvm.error.InternalError("ScheduleError: The scope s_tir.SBlock#0 is not a stage pipeline.")
        return real(t, *args)

    monkeypatch.setattr(search, "_search_task", flaky)
    task = next(t for t in gpu_tasks if t.name.startswith("fused_layer_norm"))
    task.trials, task.done = 2, 0
    lines: list[str] = []
    summary = tune([task], get_target("sm_90"), tmp_path / "db", say=lines.append, runner=_unmeasured_runner())
    assert summary.tuned_now == 2 and calls == [task.name, task.name]
    assert any("the search stopped on a MetaSchedule error (ScheduleError: The scope" in line
               and line.endswith("retrying with another seed") for line in lines)


def test_choose_form_on_a_gpu_target_keeps_the_form_and_says_why(monkeypatch, capsys):
    """--choose-form times builds on this CPU: a CUDA compile keeps its form, in a stage of its
    own (the stage count stays right), and tunes only that form."""
    lines = lines_until_cuda_build(monkeypatch, CompileOptions(spec=TENSORIZABLE, target="sm_90", dtype="float16",
                                                               choose_form=True), 6)
    assert "[3/6] choose    not for sm_90: keeping form matmul" in lines
    assert any(line.startswith("[4/6] graph") and "form matmul" in line for line in lines)


def test_the_gpu_session_kit_dispatches_its_stages_and_tunes_into_out(tmp_path, tiny_toml):
    """scripts/gpu_session.sh, what a device call runs (README, "NVIDIA GPUs"): it cannot be
    tried on the GPU machine before the call that matters, so its dispatch and the tune stage's
    records-into-$OUT links are checked here (the tuning itself stops: no GPU)."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "gpu_session.sh"
    env = {**os.environ, "OUT": str(tmp_path / "out"), "SPEC": str(tiny_toml), "TRIALS": "1",
           "MIXER_COMPILE_CACHE": str(tmp_path / "cache"), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    run = subprocess.run(["bash", str(script), "nonsense"], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 2 and "unknown stage 'nonsense' (stage, install, targets, test, bench, tune, cpuscale)" \
        in run.stdout, run.stdout + run.stderr
    if local_gpu() is not None:
        pytest.skip("a GPU is visible: the tune stage would tune for real")
    subprocess.run(["bash", str(script), "tune"], capture_output=True, text=True, env=env, timeout=300)
    log = (tmp_path / "out" / "tune.log").read_text()
    assert "none is visible here" in log, log
    database = Path(re.search(r"database (\S+)", log).group(1))  # the cache's tuning/<target>, through the link
    assert database.parent.is_symlink() and database.parent.resolve() == (tmp_path / "out" / "tuning").resolve()
    assert (tmp_path / "out" / "library_gemms").is_dir()
