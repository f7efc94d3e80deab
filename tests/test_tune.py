"""Tuning: a tiny spec tuned end to end with a few trials, resumed after a SIGKILL, reused
without tuning, corrupt database lines skipped, shipped records applied for a target.

One tuning run (module fixture) serves every test: it is the slow part (MetaSchedule's
worker start-up and search), ~1 minute on the shared 2-core machine.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

from mixer_compile.backend.target import get_target
from mixer_compile.compiler import CompileOptions, compile_model
from mixer_compile.compose import model_tasks
from mixer_compile.errors import TuningError
from mixer_compile.model.spec import MixerSpec
from mixer_compile.tune import database as tuning_db
from mixer_compile.tune.database import RECORDS, WORKLOADS, TuningWarning, open_database
from mixer_compile.tune.tasks import best_latency, count_records
from mixer_compile.util.progress import Progress
from tests.helpers import TINY, cannot_run

TRIALS = 2  # per large kernel; the small ones get max(1, TRIALS // 4) = 1
# every test measures or validates code of a named target on this machine: AVX-512 (znver4) where
# this CPU runs it, else AVX2; OTHER is the family whose shipped records are checked against it
TARGET = next((name for name in ("znver4", "avx2") if cannot_run(name) is None), None)
OTHER = "avx2" if TARGET == "znver4" else "znver4"
pytestmark = pytest.mark.skipif(TARGET is None, reason=str(cannot_run("avx2")))


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


def _with_valid_record(db_dir: Path) -> set[str]:
    """Kernels of the tiny spec whose records include a successful measurement (a candidate
    may fail to build in time on a loaded machine; such a kernel has no record to apply)."""
    target = get_target(TARGET)
    database = open_database(db_dir)
    tasks = model_tasks(TINY, target, trials=TRIALS)
    return {t.name for t in tasks if best_latency(database, t.mod, target) is not None}


def _tune_cmd(spec_file: Path, db: Path) -> list[str]:
    return [sys.executable, "-m", "mixer_compile.cli", "tune", "--spec", str(spec_file), "--target", TARGET,
            "--trials", str(TRIALS), "--db", str(db)]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tuning subprocess SIGKILLed while it searches, then run again to the end. Tuning first
    records every kernel's default schedule, which is the whole budget of a small kernel: the kill
    waits for as many records as kernels, so that the killed run has finished some kernels (killed
    after the first record, it had at times finished none: only large kernels' defaults were on
    disk)."""
    kernels = len(model_tasks(TINY, get_target(TARGET), trials=TRIALS))
    root = tmp_path_factory.mktemp("tune")
    spec_file, db = root / "tiny.json", root / "db"
    spec_file.write_text(json.dumps(TINY.to_dict()))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # its own process group, killed whole: the tuner and its build/measure workers, as kill -9 of a job would
    first = subprocess.Popen(_tune_cmd(spec_file, db), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and first.poll() is None:
        if (db / RECORDS).is_file() and len(_lines(db / RECORDS)) >= kernels:
            break
        time.sleep(0.2)
    killed_running = first.poll() is None
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    kept = _lines(db / RECORDS)
    shipped = root / "schedules"  # the resumed run ships its results, as a maintainer does into schedules/
    second = subprocess.run(_tune_cmd(spec_file, db) + ["--ship-to", str(shipped)], env=env, capture_output=True,
                            text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    return {"db": db, "kept": kept, "killed_running": killed_running, "resume_log": second.stderr,
            "resume_out": second.stdout, "shipped": shipped}


def test_records_survive_sigkill_and_tuning_resumes(tuned: dict) -> None:
    assert tuned["killed_running"], "the tuning process finished before it could be killed"
    assert tuned["kept"], "no record reached the disk before the kill"
    after = _lines(tuned["db"] / RECORDS)
    assert after[: len(tuned["kept"])] == tuned["kept"]  # nothing lost, nothing rewritten
    resumed = re.search(r"(\d+) kernels, (\d+) already tuned", tuned["resume_log"])
    assert resumed and int(resumed.group(2)) >= 1, tuned["resume_log"]  # the killed run's kernel is not redone
    # every kernel now has its budget of records, the ones done before the kill not tuned twice
    tasks = model_tasks(TINY, get_target(TARGET), trials=TRIALS)
    count_records(open_database(tuned["db"]), tasks)
    for t in tasks:
        assert t.done >= t.trials, (t.name, t.done, t.trials)
    assert len(after) <= sum(t.trials for t in tasks) + 1  # +1: a search space that ran out early


def test_tensor_intrinsics_are_registered_and_inspect_is_left_as_it_was() -> None:
    """What every TuneContext imports, through backend/intrinsics.py (its plain import took most
    of a tiny tuning run): x86's and CUDA's intrinsics registered, and `inspect.getmodule`,
    memoized while they are parsed, the standard one again afterwards."""
    import inspect

    from tvm.s_tir import TensorIntrin

    from mixer_compile.backend.intrinsics import tensor_intrinsics

    standard = inspect.getmodule
    package = tensor_intrinsics()
    assert inspect.getmodule is standard
    assert package.__name__ == "tvm.s_tir.tensor_intrin"
    for name in ("dot_16x4_avx512", package.cuda.WMMA_SYNC_16x16x16_f16f16f32_INTRIN):
        assert TensorIntrin.get(name) is not None, name


def test_compile_applies_records_and_second_compile_does_not_tune(tuned: dict, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MIXER_COMPILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tuning_db, "SCHEDULES_DIR", tmp_path / "no-schedules")
    db = tmp_path / "db"
    shutil.copytree(tuned["db"], db)
    before = (db / RECORDS).read_text()
    opts = CompileOptions(spec=TINY, target=TARGET, db=db, tune=True, trials=TRIALS)
    result = compile_model(opts, Progress(6, quiet=True))
    tuning = result.metadata.tuning
    assert tuning["kernels"] == 9 and set(tuning["tuned"]) == _with_valid_record(db), tuning
    assert len(tuning["tuned"]) >= 5, tuning  # most kernels: a tiny kernel rarely fails every candidate
    assert result.validation.passed
    assert (db / RECORDS).read_text() == before  # everything was in the database: no tuning happened


def _opened(db: Path, writable: bool = False) -> tuple[Any, list[str]]:
    """The database and every TuningWarning its opening gave (each bad line warns once)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        database = open_database(db, writable=writable)
    return database, [str(w.message) for w in caught if issubclass(w.category, TuningWarning)]


def test_corrupt_lines_are_skipped_with_file_and_line(tuned: dict, tmp_path: Path) -> None:
    db = tmp_path / "db"
    shutil.copytree(tuned["db"], db)
    good = _lines(db / RECORDS)
    lines = list(good)
    lines.insert(1, '[0, ["not a trace"')  # line 2: truncated JSON
    lines.insert(3, '[99, []]')  # line 4: points at no workload
    (db / RECORDS).write_text("\n".join(lines) + "\n" + good[0][: len(good[0]) // 2])  # last: cut mid-write
    damaged = (db / RECORDS).read_text()
    database, messages = _opened(db)
    path = db / RECORDS
    assert any(m.startswith(f"{path}:2: bad tuning record") for m in messages), messages
    assert any(m.startswith(f"{path}:4: bad tuning record") and "workload 99" in m for m in messages), messages
    assert any(m.startswith(f"{path}:{len(lines) + 1}: bad tuning record") for m in messages), messages
    assert len(database.get_all_tuning_records()) == len(good)
    assert path.read_text() == damaged  # read-only use never touches the user's file

    writable, messages = _opened(db, writable=True)
    assert any("original files are kept" in m for m in messages), messages
    assert len(writable.get_all_tuning_records()) == len(good)
    backups = list(db.glob(f"{RECORDS}.corrupt-*"))
    assert len(backups) == 1 and backups[0].read_text() == damaged


def test_bad_workload_line_drops_its_records(tuned: dict, tmp_path: Path) -> None:
    db = tmp_path / "db"
    shutil.copytree(tuned["db"], db)
    workloads = _lines(db / WORKLOADS)
    records = _lines(db / RECORDS)
    on_first = sum(1 for r in records if json.loads(r)[0] == 0)
    (db / WORKLOADS).write_text("\n".join(["{garbage"] + workloads[1:]) + "\n")
    database, messages = _opened(db)
    assert any(m.startswith(f"{db / WORKLOADS}:1: bad workload line skipped") for m in messages), messages
    assert len(database.get_all_tuning_records()) == len(records) - on_first


def test_shipped_records_apply_for_matching_target(tuned: dict, tmp_path: Path, monkeypatch) -> None:
    schedules = tuned["shipped"]  # `tune --ship-to`: each kernel's best record, not the whole search
    shipped = re.search(rf"shipped (\d+) kernels' best records \(\d+ of this model's\) -> "
                        rf"{re.escape(str(schedules / TARGET))}$", tuned["resume_out"], re.M)
    assert shipped and int(shipped.group(1)) >= 5, tuned["resume_out"]
    assert len(_lines(schedules / TARGET / RECORDS)) == int(shipped.group(1)) < len(_lines(tuned["db"] / RECORDS))
    again = tmp_path / "again"
    shutil.copytree(schedules / TARGET, again)
    tuning_db.export_best(tuned["db"], again, [t.mod for t in model_tasks(TINY, get_target(TARGET), trials=TRIALS)])
    for name in (WORKLOADS, RECORDS):  # shipped again, the same records are the same bytes (a stable order)
        assert (again / name).read_bytes() == (schedules / TARGET / name).read_bytes(), name
    expected = _with_valid_record(schedules / TARGET)
    assert expected == _with_valid_record(tuned["db"])  # the export keeps every kernel's best
    monkeypatch.setattr(tuning_db, "SCHEDULES_DIR", schedules)
    monkeypatch.setenv("MIXER_COMPILE_CACHE", str(tmp_path / "empty-cache"))
    # records shaped for one SIMD width serve no CPU of another: AVX-512 ones not AVX2 CPUs (nor run
    # there), AVX2 ones not AVX-512 CPUs (their LayerNorm and mean ran slower than the defaults there)
    assert tuning_db.shipped_db_dirs(get_target(OTHER)) == []
    # by name; and the host by instruction sets, where it has TARGET's (an Intel AVX-512 CPU lacks
    # Zen 4's SSE4a: test_a_host_takes_the_shipped_records_of_its_simd_unit)
    hosts = ["llvm"] if tuning_db.shipped_db_dirs(get_target("llvm")) else []
    for target in (TARGET, *hosts):
        result = compile_model(CompileOptions(spec=TINY, target=target), Progress(6, quiet=True))
        tuning = result.metadata.tuning
        assert tuning["databases"] == [str(schedules / TARGET)]
        assert set(tuning["tuned"]) == expected and tuning["kernels"] == 9, (target, tuning)
        assert result.validation.passed


@pytest.mark.parametrize("mcpu, shipped", [("znver5", ["znver4"]), ("znver3", ["avx2"]), ("haswell", ["avx2"]),
                                           ("emeraldrapids", [])])
def test_a_host_takes_the_shipped_records_of_its_simd_unit(mcpu: str, shipped: list[str]) -> None:
    """A Zen 5 takes Zen 4's AVX-512 records, an AVX2 CPU the AVX2 ones; an Intel AVX-512 CPU
    neither: not the AVX2 set, shaped for another vector width (its LayerNorm and mean ran 1.2x
    the defaults' time on an Emerald Rapids), nor Zen 4's, whose CPU has AMD's SSE4a."""
    from mixer_compile.backend.target import TargetInfo

    host = TargetInfo("llvm", "", {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu, "num-cores": 2})
    assert tuning_db.shipped_db_dirs(host) == [tuning_db.SCHEDULES_DIR / name for name in shipped]


def test_export_takes_only_the_kernels_asked_for(tuned: dict, tmp_path: Path) -> None:
    """A database holds every model tuned for its target; shipping one model's records takes its
    kernels only, and a model with none in the database is one line, with nothing written."""
    tasks = model_tasks(TINY, get_target(TARGET), trials=TRIALS)
    first = next(t for t in tasks if t.name in _with_valid_record(tuned["db"]))
    assert tuning_db.export_best(tuned["db"], tmp_path / "one", [first.mod]) == 1
    assert _with_valid_record(tmp_path / "one") == {first.name}
    other = MixerSpec("other", (32, 32), 8, 24, 8, 48, 1, num_classes=5, batch=1)  # no kernel in common
    with pytest.raises(TuningError, match=r"'.*db' holds no tuning records of these kernels to export; "
                                          r"run `mixer-compile tune` first"):
        tuning_db.export_best(tuned["db"], tmp_path / "none", [t.mod for t in model_tasks(other, get_target(TARGET))])
    assert not (tmp_path / "none").exists()


def test_export_keeps_each_record_with_its_own_workload(tuned: dict, tmp_path: Path) -> None:
    """Two models' kernels can be structurally equal under different block names (the token
    mean after a tanh GELU and after an erf one): a faster record of the erf model's mean,
    shipped over the tanh model's, is written with its own workload, so its trace replays."""
    from tvm.s_tir import Schedule
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.database import TuningRecord

    target = get_target(TARGET)
    dest = tmp_path / "schedules"
    tuning_db.export_best(tuned["db"], dest, [t.mod for t in model_tasks(TINY, target, trials=TRIALS)])
    assert "mean" in _with_valid_record(dest)
    means = {gelu: next(t.mod for t in model_tasks(TINY.replace(gelu=gelu), target) if t.name == "mean")
             for gelu in ("tanh", "erf")}
    red = {gelu: re.search(r'T\.sblock\("(\w+_red)"\)', mod.script()).group(1) for gelu, mod in means.items()}
    assert red["tanh"] != red["erf"]  # equal workloads, different names
    mean = means["erf"]
    db = open_database(tmp_path / "erf", writable=True)
    sch = Schedule(mean)  # a trace that names its block, as MetaSchedule's do
    sch.parallel(sch.get_loops(sch.get_sblock(red["erf"]))[0])
    db.commit_tuning_record(TuningRecord(sch.trace, db.commit_workload(mean), [1e-9], target.tvm_target(),
                                         ArgInfo.from_prim_func(mean["main"])))
    tuning_db.export_best(tmp_path / "erf", dest, [mean])
    assert tuning_db.scan(dest).problems == []
    shipped = open_database(dest)
    assert best_latency(shipped, mean, target) == 1e-9
    with target.tvm_target():
        assert shipped.query_schedule(means["tanh"], target.tvm_target(), "main") is not None


def test_no_records_builds_default_schedules_and_says_how_to_tune(tmp_path: Path, monkeypatch) -> None:
    """Without any record the build is not slow (every kernel gets its default schedule, issue
    #13), so it says how to refine it instead of warning."""
    monkeypatch.setattr(tuning_db, "SCHEDULES_DIR", tmp_path / "none")
    monkeypatch.setenv("MIXER_COMPILE_CACHE", str(tmp_path / "cache"))
    lines = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("error", TuningWarning)
        result = compile_model(CompileOptions(spec=TINY, target=TARGET), Progress(6, stream=lines))
    # TINY is no preset: `tune --spec tiny` would not find it, so the hint is --tune
    assert "every kernel gets its default schedule; adding --tune to this build refines them" in lines.getvalue()
    assert not (result.metadata.tuning or {}).get("tuned") and not result.metadata.tuning["untuned"]


def test_tune_hint_names_the_same_kernels() -> None:
    """The `tune` command the hint gives makes this build's kernels: the preset, the batch (range),
    the GELU flavour the weights gave, the target as typed and a precision other than the default;
    a spec that only shares a preset's name gets --tune instead."""
    from mixer_compile.artifact.format import BatchRange
    from mixer_compile.compiler import _tune_hint
    from mixer_compile.model.spec import get_preset

    spec = get_preset("mixer_s32").replace(batch=16, gelu="erf")
    opts = CompileOptions(spec=spec, target="my targets/cpu.json", dtype="bfloat16")
    assert _tune_hint(opts, spec, BatchRange.of(1, 16)) == ("`mixer-compile tune --spec mixer_s32 --batch 1-16 --gelu "
                                                          "erf --target 'my targets/cpu.json' --dtype bfloat16` (or --tune)")
    assert _tune_hint(opts, spec, None).startswith("`mixer-compile tune --spec mixer_s32 --batch 16 --gelu erf")
    assert _tune_hint(opts, spec.replace(num_classes=10), None) == "adding --tune to this build"


def test_database_that_matches_nothing_warns_loudly(tuned: dict, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(tuning_db, "SCHEDULES_DIR", tmp_path / "none")
    other = MixerSpec("other", (32, 32), 8, 24, 8, 48, 1, num_classes=5, batch=1)  # no kernel in common
    with pytest.warns(UserWarning, match="applied to none of the"):
        result = compile_model(CompileOptions(spec=other, target=TARGET, db=tuned["db"]), Progress(6, quiet=True))
    assert result.metadata.tuning["tuned"] == []


def test_choose_form_builds_the_fastest_form_and_records_the_choice(tuned: dict, tmp_path: Path, monkeypatch) -> None:
    """Both forms are built and timed (each call really runs, then reports a fixed time: the first
    form timed is the slower), and the faster is what gets built and recorded."""
    from mixer_compile.passes.pipeline import FORMS
    from mixer_compile.tune import choose_form

    slower, faster = FORMS
    ms = iter([0.02, 0.01])
    real_time = choose_form.time_call

    def fixed_time(executable, args):
        assert real_time(executable, args, repeat=1) > 0
        return next(ms)

    monkeypatch.setattr(tuning_db, "SCHEDULES_DIR", tmp_path / "none")
    monkeypatch.setattr(choose_form, "time_call", fixed_time)
    result = compile_model(CompileOptions(spec=TINY, target=TARGET, db=tuned["db"], choose_form=True),
                           Progress(7, quiet=True))
    choice = result.metadata.tuning["form_choice"]
    assert {f: d["ms"] for f, d in choice["figures"].items()} == {slower: 20.0, faster: 10.0}
    assert choice["chosen"] == faster == result.metadata.form
    assert result.validation.passed


def test_choose_form_does_not_time_a_form_with_unscheduled_kernels(tuned: dict) -> None:
    """Without the default rules only records schedule a kernel: the database was tuned on the
    matmul form, so the conv form's own kernels would run as plain loops and it is not timed."""
    from mixer_compile.backend import cpu_schedules
    from mixer_compile.model.params import random_weights
    from mixer_compile.tune.choose_form import choose_form

    lines: list[str] = []
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the conv build's "got no schedule" warning
        mp.setattr(cpu_schedules, "RULES", [])
        choice = choose_form(TINY, random_weights(TINY, 0), get_target(TARGET), open_database(tuned["db"]),
                             say=lines.append)
    assert choice.form == "matmul" and choice.figures["matmul"]["ms"] > 0
    assert choice.figures["conv"]["ms"] is None
    assert choice.figures["conv"]["note"].startswith("unscheduled kernels: ")
    assert [line.split(":")[0].strip() for line in lines] == ["form matmul"]
