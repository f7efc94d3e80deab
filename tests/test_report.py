"""Tuning reports from databases written by two tiny MetaSchedule runs made here.

Run A (znver4 where this CPU runs AVX-512, else the host; 6 trials, 3 per round) and run B
(avx2, 3 trials) tune the first matmul
kernels of a tiny Mixer in the scheduler's order (replayed traces: cheap), so B lacks a
kernel A has: across targets, across runs, and the "not in every input" list all get
exercised. Candidates compile in this process (the tuner's inline builder: a worker pool's
start-up made the two runs take ~3 minutes). Every figure the report prints is
checked against the raw JSON lines, read here independently of the report's code.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from mixer_compile.cli import main
from mixer_compile.errors import TuningError
from mixer_compile.model.spec import MixerSpec
from tests.helpers import cannot_run, error_line

# run A measures its code here, and an artifact built from it is validated here; run B measures AVX2 code
RUN_A = "znver4" if cannot_run("znver4") is None else "llvm"
pytestmark = pytest.mark.skipif(cannot_run("avx2") is not None, reason=str(cannot_run("avx2")))
SPEC = MixerSpec("tiny", (16, 16), 8, 16, 8, 32, 1, num_classes=4, batch=1)
WORKLOADS, RECORDS = "database_workload.json", "database_tuning_record.json"


def _tune(work_dir: Path, target_name: str, trials: int, seed: int) -> Path:
    """MetaSchedule on the legalized, fused Relax module of SPEC, as the CPU backend prepares it
    for tuning and for the build (`compose.model_tasks`, `backend.cpu.prepare`)."""
    from tvm.s_tir import meta_schedule as ms

    from mixer_compile.backend.cpu import prepare
    from mixer_compile.backend.target import get_target
    from mixer_compile.compose import compose
    from mixer_compile.tune.search import _inline_builder

    target = get_target(target_name)
    fused = prepare(compose(SPEC, target).module, target)
    fast = ms.runner.EvaluatorConfig(number=1, repeat=1, min_repeat_ms=0, enable_cpu_cache_flush=False)
    ms.relax_integration.tune_relax(
        fused, {}, target.tvm_target(), work_dir=str(work_dir), max_trials_global=trials, num_trials_per_iter=3,
        builder=_inline_builder(),  # the tuner's own: no worker pool to start per batch
        runner=ms.runner.LocalRunner(timeout_sec=300, evaluator_config=fast), cost_model="random", seed=seed,
        strategy="replay-trace", op_names=["matmul"])
    return work_dir


@pytest.fixture(scope="module")
def dbs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tuning")
    return _tune(root / "runA", RUN_A, 6, 1), _tune(root / "runB", "avx2", 3, 2)


def _named(target_name: str) -> tuple[str, str]:
    """(mcpu, the report's name of the target: kind, mcpu, cores) of a target, from its TVM target."""
    from mixer_compile.backend.target import get_target

    attrs = get_target(target_name).tvm_target().attrs
    return str(attrs["mcpu"]), f"llvm {attrs['mcpu']} {attrs['num-cores']} cores"


def _raw(db: Path) -> dict[int, dict]:
    """Workload hash -> trials, valid latencies and targets, straight from the JSON lines."""
    hashes = [int(json.loads(line)[0]) for line in (db / WORKLOADS).read_text().splitlines() if line.strip()]
    out: dict[int, dict] = {}
    for line in (db / RECORDS).read_text().splitlines():
        index, (_, run_secs, target, _) = json.loads(line)
        entry = out.setdefault(hashes[index], {"trials": 0, "valid": [], "mcpu": target["mcpu"]})
        entry["trials"] += 1
        secs = sum(run_secs) / len(run_secs)
        if secs < 1e9:
            entry["valid"].append(secs)
    return out


def _rows(md: str) -> list[list[str]]:
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def test_report_of_two_runs_matches_the_records(dbs, tmp_path, capsys):
    from mixer_compile.tools.report import write_report

    a, b = dbs
    raw_a, raw_b = _raw(a), _raw(b)
    assert {v["mcpu"] for v in raw_a.values()} == {_named(RUN_A)[0]}
    assert {v["mcpu"] for v in raw_b.values()} == {_named("avx2")[0]} == {"x86-64-v3"}
    assert set(raw_b) < set(raw_a)  # B stopped earlier: A has kernels B lacks

    files = write_report([a, b], tmp_path / "rep")
    c = files.comparison
    assert not c.weights_known
    by_key = {row.kernel.key: row for row in c.rows}
    assert set(by_key) == set(raw_a) | set(raw_b)
    for key, row in by_key.items():
        for raw, cell in ((raw_a, row.cells[0]), (raw_b, row.cells[1])):
            assert (cell is None) == (key not in raw)
            if cell is not None:
                assert cell.trials == raw[key]["trials"]
                assert cell.best == (min(raw[key]["valid"]) if raw[key]["valid"] else None)
        if row.cells[1] is not None and row.cells[1].best and row.cells[0].best:
            assert row.cells[1].speedup == pytest.approx(min(raw_a[key]["valid"]) / min(raw_b[key]["valid"]))
    # whole model (every kernel once: the model is unknown), and B's speedup on the kernels both have
    est_a, est_b = c.estimates
    assert est_a.latency == pytest.approx(sum(min(v["valid"]) for v in raw_a.values() if v["valid"]))
    common = [k for k in raw_b if raw_b[k]["valid"] and raw_a[k]["valid"]]
    assert common, (raw_a, raw_b)  # each run measured at least its kernels' defaults
    assert est_b.speedup == pytest.approx(sum(min(raw_a[k]["valid"]) for k in common)
                                          / sum(min(raw_b[k]["valid"]) for k in common))
    # the Markdown: one table row per kernel, speedups as printed figures, the missing ones listed
    md = files.markdown.read_text()
    header, *rows = _rows(md)
    assert header[:5] == ["kernel", "operator", "shapes", "MFLOP", "calls"] and header[-1] == "speedup [runB]"
    assert len(rows) == len(by_key) and any(r[1].startswith("matmul") for r in rows)
    for row in rows:
        key = next(k for k, r in by_key.items() if r.kernel.shapes == row[2] and r.kernel.operator == row[1])
        if key in raw_b and raw_b[key]["valid"] and raw_a[key]["valid"]:
            assert row[-1] == f"{min(raw_a[key]['valid']) / min(raw_b[key]['valid']):.2f}x"
        if key not in raw_b:
            assert row[-5] == "absent"
    missing = md.split("## Kernels not in every input")[1]
    assert len(re.findall(r"^- .* is in runA; not in runB$", missing, re.MULTILINE)) == len(set(raw_a) - set(raw_b))
    assert "runA: " in md and "runB: " in md and _named(RUN_A)[1] in md and _named("avx2")[1] in md
    page = files.html.read_text()
    assert page.count("data:image/png;base64,") == 2 and "<table>" in page and "src=\"http" not in page


def test_matmul_row_names_operator_shapes_and_flops(dbs, tmp_path):
    from mixer_compile.tools.report import write_report

    c = write_report([dbs[0]], tmp_path / "rep").comparison
    head = next(r for r in c.rows if r.kernel.shapes == "1x16, 16x4, 1x4 -> 1x4")  # C=16 -> 4 classes, + bias
    assert head.kernel.operator == "matmul+add"
    assert head.kernel.flops == 2 * 16 * 4 + 4
    cell = head.cells[0]
    assert cell.trials == 3 and cell.best is not None
    assert cell.gflops == pytest.approx(head.kernel.flops / cell.best / 1e9)


def test_artifact_input_gives_task_names_calls_and_shares(dbs, tmp_path):
    from mixer_compile.compiler import CompileOptions, compile_model
    from mixer_compile.util.progress import Progress
    from mixer_compile.tools.report import write_report

    art = tmp_path / "art"
    compile_model(CompileOptions(spec=SPEC, target=RUN_A, db=dbs[0], out_dir=art), Progress(6, quiet=True))
    assert str(dbs[0]) in json.loads((art / "metadata.json").read_text())["tuning"]["databases"]
    c = write_report([art], tmp_path / "rep").comparison
    assert c.weights_known and c.logs[0].label == "art"
    names = {r.name: r for r in c.rows}
    assert "layer_norm" in names  # task names from the model
    tuned = [r for r in c.rows if r.in_model and r.cells[0] is not None and r.cells[0].best]
    shares = [r.cells[0].share for r in tuned]
    assert sum(shares) == pytest.approx(1.0)
    est = c.estimates[0]
    assert est.kernels == len([r for r in c.rows if r.in_model]) and est.counted == len(tuned)
    assert est.latency == pytest.approx(sum(r.cells[0].calls * r.cells[0].best for r in tuned))
    assert names["layer_norm"].calls == 2 * SPEC.num_blocks + 1  # two per block and the final one
    assert all(r.in_model for r in c.rows)  # not the other models' kernels of the databases it was built with
    not_tuned = [r for r in c.rows if r.in_model and r.cells[0] is None]
    md = (tmp_path / "rep" / "report.md").read_text()
    for r in not_tuned:
        assert f"- {r.name} (" in md and "is in the model only; not in art" in md


def test_cli_report_and_bad_lines_named_by_file_and_line(dbs, tmp_path, capsys):
    bad = shutil.copytree(dbs[0], tmp_path / "bad", ignore=shutil.ignore_patterns("logs"))
    lines = (bad / RECORDS).read_text().splitlines()
    lines[1] = lines[1][: len(lines[1]) // 2]  # a record cut short, as by a killed tuning run
    lines.append("[99, [null, [0.001], {\"kind\": \"llvm\"}, null]]")  # a record of a workload that is not there
    (bad / RECORDS).write_text("\n".join(lines) + "\n")
    assert main(["report", str(dbs[0]), str(bad), "-o", str(tmp_path / "rep")]) == 0
    out, err = capsys.readouterr()
    assert f"warning: {bad / RECORDS}:2: bad tuning record skipped" in err
    assert f"warning: {bad / RECORDS}:{len(lines)}: bad tuning record skipped (refers to workload 99" in err
    assert "report on 2 input(s)" in out and "report.html" in out
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Skipped lines" in md and f"{bad / RECORDS}:2:" in md


def test_bad_inputs_are_refused_by_message(dbs, tmp_path, capsys):
    from mixer_compile.tools.report import write_report

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    with pytest.raises(TuningError, match="is neither a tuning database .* nor an artifact"):
        write_report([tmp_path / "notes"], tmp_path / "rep")
    with pytest.raises(TuningError, match="is not a directory"):
        write_report([tmp_path / "notes" / "a.txt"], tmp_path / "rep")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / WORKLOADS).write_text("")
    (empty / RECORDS).write_text("")
    with pytest.raises(TuningError, match="'.*empty' holds no usable tuning records"):
        write_report([empty], tmp_path / "rep")
    half = shutil.copytree(dbs[0], tmp_path / "half", ignore=shutil.ignore_patterns("logs"))
    (half / RECORDS).unlink()
    with pytest.raises(TuningError, match="is not a complete tuning database: database_tuning_record.json is missing"):
        write_report([half], tmp_path / "rep")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / WORKLOADS).write_text("not json\n")
    (garbage / RECORDS).write_text("[0, 1]\n")
    with pytest.raises(TuningError, match=r"holds no usable tuning records; 2 bad line\(s\), the first: .*garbage/"
                                          r"database_workload.json:1: bad workload line skipped"):
        write_report([garbage], tmp_path / "rep")
    code = main(["report", str(empty), "-o", str(tmp_path / "rep")])
    assert "holds no usable tuning records" in error_line(code, capsys.readouterr().err)
    (tmp_path / "file.md").write_text("mine")
    with pytest.raises(TuningError, match="is a file; -o names the report directory"):
        write_report([dbs[0]], tmp_path / "file.md")


def test_a_database_of_another_model_is_said_and_an_artifact_without_records_refused(dbs, tmp_path, capsys,
                                                                                   monkeypatch):
    from mixer_compile.compiler import CompileOptions, compile_model
    from mixer_compile.util.progress import Progress

    other = tmp_path / "other.json"
    other.write_text(json.dumps(MixerSpec("other", (16, 16), 8, 24, 8, 48, 1, num_classes=5).to_dict()))
    assert main(["report", str(dbs[0]), "--spec", str(other), "--target", RUN_A, "-o", str(tmp_path / "rep")]) == 0
    assert "is a kernel of other" in capsys.readouterr().err
    monkeypatch.setenv("MIXER_COMPILE_CACHE", str(tmp_path / "cache"))  # no user records: the shipped ones only
    art = tmp_path / "art"
    compile_model(CompileOptions(spec=SPEC, target="avx2", out_dir=art), Progress(6, quiet=True))
    assert main(["report", str(art), "-o", str(tmp_path / "rep2")]) == 2
    assert "has no tuning record for any of its kernels (each ran its default schedule): nothing to report" \
        in capsys.readouterr().err
    assert not (tmp_path / "rep2").exists()
