"""CPU builds without tuning records (issue #13): every kernel gets a schedule, records transfer
across epilogues, and the parallel split follows the cores of the machine that runs the code.

The parallel-split rule checked here (gemm_space.parallel_split): a GEMM's parallel loop of E
equal tasks keeps `cores` threads busy for E / (ceil(E / cores) x cores) of the time; that share
must be at least 7/8, i.e. E divisible by the cores or E >= 8 x cores.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
from tvm.s_tir import Schedule
from tvm.s_tir.meta_schedule.arg_info import ArgInfo
from tvm.s_tir.meta_schedule.database import MemoryDatabase, TuningRecord

from mixer_compile.backend import cpu, cpu_schedules, gemm_space
from mixer_compile.backend.runner import Runner
from mixer_compile.backend.target import TargetInfo, get_target
from mixer_compile.check.validate import validate
from mixer_compile.compose import compose, model_tasks
from mixer_compile.model.params import random_weights
from mixer_compile.model.spec import MixerSpec
from mixer_compile.tune.tasks import best_latency
from tests.helpers import FP32, HALF_WEIGHTS, cannot_run


@pytest.fixture
def no_records(tmp_path, monkeypatch):
    """An empty user cache and no shipped records."""
    import mixer_compile.tune.database as database

    (tmp_path / "cache").mkdir()
    (tmp_path / "schedules").mkdir()
    monkeypatch.setenv("MIXER_COMPILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(database, "SCHEDULES_DIR", tmp_path / "schedules")
    return tmp_path


def _build(spec: MixerSpec, gelu: str, database=None, target=None, dtype="float32"):
    target = target or get_target("llvm")
    weights = random_weights(spec, 0)
    spec = spec.replace(gelu=gelu)
    model = compose(spec, target, dtype=dtype, weights=weights)
    applied: list[cpu.Applied] = []
    executable = cpu.build(model.module, target, database, on_applied=applied.append)
    run = Runner(executable, tvm.cpu(), list(model.params.values()), "this CPU").function()
    return spec, weights, run, applied[0]


@pytest.mark.parametrize("gelu", ["erf", "tanh"])
def test_without_records_every_kernel_is_scheduled_and_correct(tiny_spec, no_records, gelu) -> None:
    spec, weights, run, applied = _build(tiny_spec, gelu)
    assert applied.kernels >= 8 and not applied.untuned and not applied.tuned
    assert len(applied.defaults) == applied.kernels
    assert applied.summary().startswith(f"{applied.kernels} kernels: 0 from records, {applied.kernels} default")
    assert set(applied.to_dict()) == {"kernels", "tuned", "untuned", "defaults"}
    assert validate(run, spec, weights, seed=1, tolerance=FP32).passed


def _partitioned(func: tvm.tirx.PrimFunc, config: dict) -> str:
    """`func` through the start of TVM's TIR pipeline, up to LoopPartition, under `config`."""
    from tvm import s_tir, tirx

    lower = [s_tir.transform.LowerInitBlock(), s_tir.transform.ConvertBlocksToOpaque(),
             s_tir.transform.LowerOpaqueBlock(), tirx.transform.FlattenBuffer(), s_tir.transform.LoopPartition(),
             tirx.transform.StmtSimplify()]
    with tvm.transform.PassContext(config=config):
        return tvm.transform.Sequential(lower)(tvm.IRModule({"main": func}))["main"].script()


def test_odd_token_count_peels_the_predicated_row_tile(no_records) -> None:
    """49 tokens (the /32 presets' 7 x 7) at batch 3: the GEMMs take row tiles that do not divide
    M, the last one guarded by a predicate. The guard is marked likely (likely_guards) and, under
    BUILD_CONFIG, LoopPartition peels the last tile off: the full tiles' k loop has no branch
    (with it, LLVM spilled the guarded row's accumulators in every tile). Still correct."""
    if why := cannot_run("avx2"):
        pytest.skip(why)
    target = get_target("avx2")  # 5-row tiles are AVX2's (AVX-512's 7 x 2 divides 49)
    odd = MixerSpec("odd", (56, 56), 8, 64, 32, 128, 1, num_classes=10, batch=3)
    spec, weights, run, applied = _build(odd, "erf", target=target)
    assert not applied.untuned
    assert validate(run, spec, weights, seed=1, tolerance=FP32).passed
    fused = cpu.prepare(compose(spec, target).module, target)
    mod, _ = cpu.schedule_kernels(fused, target)
    rows = {name: gemm_space.find_gemm(Schedule(fused[name])).m for name in applied.gemms}
    guarded = [mod[name] for name, c in applied.gemms.items() if rows[name] % c.mr]  # a last row tile to peel
    assert len(guarded) >= 3, "patchify and the channel GEMMs, M = 3 x 49 rows in tiles of 5"
    for func in guarded:
        assert "T.where(T.likely(" in _block_body(func.script(), "matmul_update")
        for config, branch in (({}, True), (cpu_schedules.BUILD_CONFIG, False)):
            script = _partitioned(func, config)
            # peeled: the full tiles' k loop, then the last row tile's (and a column tail's, where there is one)
            assert script.count("for k in") >= (1 if branch else 2)
            assert ("if " in _nested(script, "for k in")) == branch, script


def test_n_no_multiple_of_the_simd_width_gets_the_micro_kernel(no_records) -> None:
    """C = 20, D_C = 60 and 7 classes at batch 3: no GEMM's N is a multiple of the SIMD width, as
    in a user's spec (D_C = 750 ran its channel fc1 by the generic `reduction` rule, far slower:
    benchmarks/results/cpu_matrix_znver3_odd_specs_before.md). Every GEMM now gets the micro-kernel,
    its last column tile predicated and peeled off at lowering: the full tiles' k loop has no
    branch. N's chunks alone run in parallel (LoopPartition cannot peel off a loop fused with the
    batch), and the model is still correct."""
    odd = MixerSpec("cols", (32, 32), 8, 20, 12, 60, 1, num_classes=7, batch=3)
    spec, weights, run, applied = _build(odd, "erf")
    target = get_target("llvm")
    mod, _ = cpu.schedule_kernels(cpu.prepare(compose(spec, target).module, target), target)
    gemms = [gv.name_hint for gv, func in mod.functions.items()
             if isinstance(func, tvm.tirx.PrimFunc) and 'T.sblock("matmul_update")' in func.script()]
    assert len(gemms) == 6 and set(gemms) <= set(applied.gemms), (gemms, applied.gemms)
    assert all(c.mchunks == 1 for c in applied.gemms.values())
    assert validate(run, spec, weights, seed=1, tolerance=FP32).passed
    guarded = [name for name in gemms if "T.where(T.likely(" in _block_body(mod[name].script(), "matmul_update")]
    assert len(guarded) == 6, gemms
    for name in guarded:  # every k loop of the lowered kernel (full tiles, then tails) without a branch
        script = _partitioned(mod[name], cpu_schedules.BUILD_CONFIG)
        nests = script.split("for k in")[1:]
        assert nests and all("if " not in _nested("for k in" + nest, "for k in") for nest in nests), (name, script)


def _assert_computes_as_plain(func: tvm.tirx.PrimFunc, sch: Schedule, target: TargetInfo, tol: float) -> None:
    """The scheduled kernel, built as the model build lowers it (`build_kernel`), computes what
    the unscheduled one does on the same random inputs."""
    args = [tvm.runtime.tensor(np.random.default_rng(0).standard_normal([int(d) for d in a.shape]).astype(a.dtype))
            for a in ArgInfo.from_prim_func(func)]
    want = [tvm.runtime.tensor(a.numpy()) for a in args]
    named = {"global_symbol": "main"}
    tvm.tirx.build(tvm.IRModule({"main": func.with_attrs(named)}), target=target.tvm_target())(*want)
    cpu_schedules.build_kernel(tvm.IRModule({"main": sch.mod["main"].with_attrs(named)}), target.tvm_target())(*args)
    np.testing.assert_allclose(args[-1].numpy(), want[-1].numpy(), rtol=tol, atol=tol)


def test_row_and_column_tails_both_peel_and_compute_right() -> None:
    """A micro-tile whose rows do not divide M and whose columns do not divide N (5 x 2 on the
    GEMMs of 49 rows whose N is 20 or 60): the guard holds two conditions, each marked likely
    on its own, and LoopPartition peels both tails off; with one likely around both, the full
    tiles kept the branch and such tiles timed 3-7x slower
    (benchmarks/results/tiles_emeraldrapids_odd_c100_b3_tanh_before.md). The kernel built as the
    model build lowers it (`build_kernel`) computes what the plain one does."""
    spec = MixerSpec("tails", (56, 56), 8, 20, 12, 60, 1, num_classes=7, batch=1)
    target = get_target("llvm")
    m = cpu.machine(target)
    fused = cpu.prepare(compose(spec, target).module, target)
    kernels = [func for func in fused.functions.values() if cpu.is_kernel(func)]
    tiled = 0
    for func in kernels:
        sch = Schedule(func)
        gemm = gemm_space.find_gemm(sch)
        if gemm is None or gemm.m != 49 or gemm.n % m.lanes == 0:
            continue
        gemm_space.apply(sch, gemm, gemm_space.with_decision(gemm, gemm_space.Decision(5, 2, True), m.vec, m.cores),
                         m.lanes)
        script = _partitioned(cpu_schedules.likely_guards(sch).mod["main"], cpu_schedules.BUILD_CONFIG)
        nests = script.split("for k in")[1:]
        # the full tiles and the last row tile's; and the last column tile's and the corner's
        # where N has a full column tile
        assert len(nests) >= (4 if gemm.n > 2 * m.lanes else 2), script
        assert all("if " not in _nested("for k in" + nest, "for k in") for nest in nests), script
        _assert_computes_as_plain(func, sch, target, tol=1e-5)
        tiled += 1
    assert tiled == 4, "the patchify, token fc1 and channel GEMMs, all of 49 rows"


def test_a_panel_over_three_quarters_of_l2_runs_in_k_blocks_and_computes_right() -> None:
    """Channel fc2 with K = D_C = 4096 and N = C = 64: the default 4-vector tile's B panel is
    1 MB, over 3/4 of a 1 MB L2 (`gemm_space.k_block`), so K runs in blocks of 1024, C's tile carried
    across them in memory and the residual epilogue after the last; at batch 2 (the batch in the
    parallel loop) with 49 rows (a row tail), it computes what the plain kernel does; with C
    re-initialised in every block (a wrong place for the reduction's init) it fails."""
    spec = MixerSpec("deep", (56, 56), 8, 64, 16, 4096, 1, num_classes=7, batch=2)
    target = get_target("znver4")
    if why := cannot_run("znver4"):
        pytest.skip(why)
    m = cpu.machine(target)
    fused = cpu.prepare(compose(spec, target).module, target)
    func = next(f for f in fused.functions.values()
                if cpu.is_kernel(f) and (g := gemm_space.find_gemm(Schedule(f))) is not None and g.k == 4096)
    sch = Schedule(func)
    gemm = gemm_space.find_gemm(sch)
    candidate = gemm_space.default_candidate(gemm, m.vec, m.cores)
    assert (candidate.nv, candidate.kc) == (4, 1024), candidate
    # no blocks of a few rows where K has no divisor near 1024 (a prime D_C): K stays whole
    assert gemm_space.k_block(gemm_space.Gemm("matmul", 1, 49, 64, 4099), 4, 16) == 0
    gemm_space.apply(sch, gemm, candidate, m.lanes)
    # a tuning record of it transfers as the same decision (its K blocks recomputed by the build)
    assert gemm_space.decision_of(sch.trace) == gemm_space.Decision(candidate.mr, 4, True)
    _assert_computes_as_plain(func, sch, target, tol=1e-4)


def test_layer_norm_runs_each_row_inside_one_parallel_loop(tiny_spec) -> None:
    """The `rows` rule: LayerNorm's two sums and its normalisation all run inside one parallel
    loop over rows (the row stays in cache between the passes, where the `reduction` rule made
    three parallel passes over the whole tensor), the sums in vector accumulators; the mean
    over tokens (a column reduction) is left to `reduction`. Same result as the plain kernel."""
    target = get_target("llvm")
    tasks = {t.name: t for t in model_tasks(tiny_spec, target)}
    assert cpu_schedules.default_schedule(Schedule(tasks["mean"].mod), cpu.machine(target))[1] == "reduction"
    task = tasks["layer_norm"]
    sch, rule = cpu_schedules.default_schedule(Schedule(task.mod), cpu.machine(target))
    assert rule == "rows"
    script = sch.mod.script()
    assert len(_parallel_extents(sch.mod["main"])) == 1
    blocks = re.findall(r'T\.sblock\("(\w+)"\)', script)
    assert len([b for b in blocks if b.endswith("_rf_update")]) == 2  # both sums in vector accumulators
    under = _nested(script, "T.parallel(")
    assert all(f'T.sblock("{b}")' in under for b in blocks if b != "root"), script
    _assert_same_result(task.mod, sch.mod, target)


def _assert_same_result(plain: tvm.IRModule, scheduled: tvm.IRModule, target: TargetInfo) -> None:
    """A scheduled kernel computes what the plain one does, on random inputs."""
    import numpy as np

    rng = np.random.default_rng(0)
    args = [rng.standard_normal([int(d) for d in a.as_json()[2]]).astype(a.as_json()[1])
            for a in ArgInfo.from_prim_func(plain["main"])]
    outs = []
    for mod in (plain, scheduled):
        out = tvm.runtime.tensor(np.zeros_like(args[-1]))
        tvm.compile(mod, target=target.tvm_target())["main"](*[tvm.runtime.tensor(a) for a in args[:-1]], out)
        outs.append(out.numpy())
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_the_patchify_gather_runs_several_vectors_per_chunk(tiny_spec) -> None:
    """The `injective` rule vectorises chunks of SPATIAL_VECTORS SIMD vectors (the largest
    divisor of the output's last extent up to that), so the patchify gather's address arithmetic
    is shared across a chunk rather than paid per vector. Same result as the plain kernel."""
    target = get_target("llvm")
    m = cpu.machine(target)
    task = next(t for t in model_tasks(tiny_spec, target) if "transpose" in t.name)
    sch, rule = cpu_schedules.default_schedule(Schedule(task.mod), m)
    assert rule == "injective"
    last = tiny_spec.patch_size ** 2 * 3  # the gather's output row: one patch's pixels
    chunk = max(d for d in range(1, cpu_schedules.SPATIAL_VECTORS * m.lanes + 1) if last % d == 0)
    assert chunk > m.lanes
    assert [int(n) for n in re.findall(r"T\.vectorized\((?:T\.int64\()?(\d+)", sch.mod.script())] == [chunk]
    _assert_same_result(task.mod, sch.mod, target)


def test_compile_without_records_is_scheduled(tiny_spec, no_records) -> None:
    from mixer_compile.compiler import CompileOptions, compile_model
    from mixer_compile.util.progress import Progress

    result = compile_model(CompileOptions(spec=tiny_spec.replace(gelu="erf")), Progress(5, quiet=True))
    assert result.validation.passed
    tuning = result.metadata.tuning
    assert tuning["untuned"] == [] and tuning["tuned"] == [] and len(tuning["defaults"]) == tuning["kernels"]


def _record_db(spec: MixerSpec, target: TargetInfo, pick, db: MemoryDatabase | None = None,
               secs: float = 1e-5) -> tuple[MemoryDatabase, dict]:
    """A database (`db`, or a new one) holding one gemm_space record per GEMM kernel of `spec`
    (its decision picked by `pick(gemm, candidates)`, measured `secs`), as a tuning run would
    write it."""
    db = MemoryDatabase() if db is None else db
    tvm_target = target.tvm_target()
    m = cpu.machine(target)
    chosen = {}
    for task in model_tasks(spec, target):
        sch = Schedule(task.mod)
        gemm = gemm_space.find_gemm(sch)
        cands = gemm_space.candidates(gemm, m.vec, m.cores) if gemm else []
        if not cands:
            continue
        c = pick(gemm, cands)
        gemm_space.apply(sch, gemm, c, m.lanes)
        workload = db.commit_workload(task.mod)
        db.commit_tuning_record(TuningRecord(sch.trace, workload, [secs], tvm_target,
                                             ArgInfo.from_prim_func(task.mod["main"])))
        chosen[gemm_space.signature(Schedule(task.mod), gemm, m.lanes)] = gemm_space.Decision(c.mr, c.nv, c.c_outer)
    return db, chosen


def test_records_transfer_across_epilogues_and_batches(tiny_spec, no_records) -> None:
    """Records of the tanh model at batch 2 decide the GEMMs of the erf model at batch 3 whose
    per-call shape does not grow with the batch (token mixing's): the same micro-tiles and loop
    orders (not the defaults), parallel splits from this machine. Those whose M is the batch (the
    head) or all its rows (the stem and channel MLPs, passes/batch_as_rows.py) have no record of
    their shape at batch 3 and take the defaults."""
    target = get_target("llvm")
    m = cpu.machine(target)

    def not_the_default(gemm, cands):
        default = gemm_space.default_candidate(gemm, m.vec, m.cores)
        return next((c for c in cands if (c.mr, c.nv, c.c_outer) != (default.mr, default.nv, default.c_outer)),
                    cands[0])

    def grows(gemm, spec) -> bool:  # M is the batch, or the batch's rows
        return gemm.m in (spec.batch, spec.batch * spec.grid[0] * spec.grid[1])

    db, chosen = _record_db(tiny_spec.replace(gelu="tanh"), target, not_the_default)
    assert len(chosen) >= 4
    erf = tiny_spec.replace(batch=3)
    spec, weights, run, applied = _build(erf, "erf", db, target)
    assert not applied.untuned and applied.gemms
    fused = cpu.prepare(compose(spec, target).module, target)
    transferred = []
    for gv, func in fused.functions.items():
        if gv.name_hint not in applied.gemms:
            continue
        sch = Schedule(func)
        gemm = gemm_space.find_gemm(sch)
        c = applied.gemms[gv.name_hint]
        if grows(gemm, spec):  # no record of this shape: the default
            default = gemm_space.default_candidate(gemm, m.vec, m.cores)
            assert gv.name_hint in applied.defaults and (c.mr, c.nv) == (default.mr, default.nv)
            continue
        decision = chosen[gemm_space.signature(sch, gemm, m.lanes)]
        assert (c.mr, c.nv, c.c_outer) == (decision.mr, decision.nv, decision.c_outer), gv.name_hint
        assert gv.name_hint in applied.tuned
        assert (c.chunks, c.mchunks) == gemm_space.parallel_split(gemm, c.mr, c.nv, m.lanes, m.cores)
        transferred.append((c.mr, c.nv, c.c_outer))
    assert len(transferred) >= 2  # token mixing's fc1 and fc2
    assert validate(run, spec, weights, seed=1, tolerance=FP32).passed
    # and the tanh build at the records' own batch takes the very same decisions for those kernels
    tanh_spec, _, _, tanh = _build(tiny_spec, "tanh", db, target)
    fused = cpu.prepare(compose(tanh_spec, target).module, target)
    kept = [(c.mr, c.nv, c.c_outer) for name, c in tanh.gemms.items()
            if not grows(gemm_space.find_gemm(Schedule(fused[name])), tanh_spec)]
    assert sorted(kept) == sorted(transferred)


def test_a_kernels_own_record_wins_over_a_faster_one_of_another_epilogue(tiny_spec, no_records) -> None:
    """The best tile can differ with the epilogue (benchmarks/README.md, "A record of another
    epilogue"): the erf model's fc1 takes its own record's tile where the tanh model's record
    of the same shape measured faster, and the tanh model keeps its own."""
    target = get_target("llvm")
    m = cpu.machine(target)
    db, fast = _record_db(tiny_spec.replace(gelu="tanh"), target, lambda gemm, cands: cands[0], secs=1e-6)
    _, slow = _record_db(tiny_spec.replace(gelu="erf"), target, lambda gemm, cands: cands[-1], db=db, secs=1e-3)
    for gelu in ("erf", "tanh"):
        spec, weights, run, applied = _build(tiny_spec, gelu, db, target)
        fused = cpu.prepare(compose(spec, target).module, target)
        gelu_gemms = [gv for gv, _ in fused.functions.items() if gv.name_hint in applied.gemms and gelu in gv.name_hint]
        assert len(gelu_gemms) == 2, list(applied.gemms)  # token and channel fc1
        for gv in gelu_gemms:
            sch = Schedule(fused[gv])
            sig = gemm_space.signature(sch, gemm_space.find_gemm(sch), m.lanes)
            assert fast[sig] != slow[sig]  # records that disagree, or the test could not fail
            own = (slow if gelu == "erf" else fast)[sig]
            c = applied.gemms[gv.name_hint]
            assert (c.mr, c.nv, c.c_outer) == (own.mr, own.nv, own.c_outer), (gelu, gv.name_hint)
        assert validate(run, spec, weights, seed=1, tolerance=FP32).passed


def _block_body(script: str, block: str) -> str:
    """The TVMScript lines of one block (its `with T.sblock(...)` line and everything under it)."""
    return _nested(script, f'T.sblock("{block}")')


def _nested(script: str, head: str) -> str:
    """The first TVMScript line that contains `head` and every line nested under it."""
    lines = script.splitlines()
    start = next(i for i, line in enumerate(lines) if head in line)
    indent = len(lines[start]) - len(lines[start].lstrip())
    end = next((i for i in range(start + 1, len(lines)) if len(lines[i]) - len(lines[i].lstrip()) <= indent),
               len(lines))
    return "\n".join(lines[start:end])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_weights_are_widened_once_per_panel_not_at_every_use(tiny_spec, no_records, dtype) -> None:
    """A CPU computes in float32 whatever the weights' storage. Converted inside the micro-kernel,
    a half weight is re-converted for every row tile (a right product's B panel) or column tile
    (token mixing's broadcast A weight); each is widened by a stage of its own instead: a B panel
    under its panel loop, inside the one parallel nest, a left product's A weight once per call
    in its own parallel loop. The micro-kernel then reads float32 only, and the model is right."""
    spec, weights, run, applied = _build(tiny_spec, "erf", dtype=dtype)
    target = get_target("llvm")
    fused = cpu.prepare(compose(spec, target, dtype=dtype).module, target)
    mod, _ = cpu.schedule_kernels(fused, target)
    forms = []
    for name, c in applied.gemms.items():
        gemm = gemm_space.find_gemm(Schedule(fused[name]))
        if gemm.m <= c.mr:  # one row tile (the head at batch 2): B is read once, converted where it is used
            continue
        script = mod[name].script()
        update, widen = _block_body(script, "matmul_update"), _block_body(script, "widen")
        assert "T.Cast" not in update and f'"{dtype}"' not in update, name
        assert 'T.Cast("float32", ' in widen, name
        left = not gemm_space.signature(Schedule(fused[name]), gemm, cpu.machine(target).lanes)[-1]  # B not panels
        assert len(_parallel_extents(mod[name])) == (2 if left else 1), name
        assert c.c_outer and gemm.m > c.mr
        forms.append(left)
    assert True in forms and False in forms, "both a token (left) and a channel (right) GEMM checked"
    assert validate(run, spec, weights, seed=1, tolerance=HALF_WEIGHTS[dtype]).max_rel_error > 1e-5


def test_token_gemms_read_b_from_a_panel_packed_per_panel_loop(tiny_spec, no_records) -> None:
    """Token mixing's B is the activations, (K, N) row-major: read in place, a tile's K rows lie a
    row of N apart (for N a power of two, one cache set). Each panel is copied once under its
    panel loop, inside the one parallel nest, and the micro-kernel reads only the copy; the
    channel GEMMs' B is already in panels (weights, laid out at build time) and is not copied."""
    spec, weights, run, applied = _build(tiny_spec, "erf")
    target = get_target("llvm")
    fused = cpu.prepare(compose(spec, target).module, target)
    mod, _ = cpu.schedule_kernels(fused, target)
    packed = 0
    for name in applied.gemms:
        script = mod[name].script()
        sch = Schedule(fused[name])
        gemm = gemm_space.find_gemm(sch)
        in_panels = gemm_space.signature(sch, gemm, cpu.machine(target).lanes)[-1]
        copies = re.findall(r'T\.sblock\("(\w+_global)"\)', script)
        once = gemm.m <= applied.gemms[name].mr  # one row tile (the head at batch 2) reads B once: no copy
        assert len(copies) == (0 if in_panels or once else 1), (name, copies)
        if copies:
            b = copies[0][: -len("_global")]
            assert f"{copies[0]}[" in _block_body(script, "matmul_update")
            assert f"{b}[" not in _block_body(script, "matmul_update").replace(f"{copies[0]}[", ""), name
            assert len(_parallel_extents(mod[name])) == 1, name
            packed += 1
    assert packed == 2  # token fc1 and fc2 of the one block shape
    assert validate(run, spec, weights, seed=1, tolerance=FP32).passed


def test_decisions_round_trip_through_a_trace(tiny_spec) -> None:
    target = get_target("llvm")
    m = cpu.machine(target)
    for task in model_tasks(tiny_spec, target):
        sch = Schedule(task.mod)
        gemm = gemm_space.find_gemm(sch)
        for c in (gemm_space.candidates(gemm, m.vec, m.cores) if gemm else [])[:4]:
            copy = sch.copy()
            gemm_space.apply(copy, gemm, c, m.lanes)
            assert gemm_space.decision_of(copy.trace) == gemm_space.Decision(c.mr, c.nv, c.c_outer)


def _parallel_extents(func) -> list[int]:
    """Extents of the parallel loops of a scheduled kernel (read off its TVMScript)."""
    return [int(n) for n in re.findall(r"T\.parallel\((?:T\.int64\()?(\d+)", func.script())]


@pytest.mark.parametrize("cores", [2, 16, 64])
def test_parallel_split_keeps_every_core_busy(no_records, cores) -> None:
    """A small model (64 tokens, C=128, D_C=512) built for 2, 16 and 64 cores (AVX-512, compile
    only): every GEMM's parallel loop satisfies the rule in the module docstring."""
    spec = MixerSpec("small", (64, 64), 8, 128, 64, 512, 1, num_classes=16, batch=2)
    target = TargetInfo("t", "", {"kind": "llvm", "mcpu": "znver4", "num-cores": cores})
    fused = cpu.prepare(compose(spec, target).module, target)
    mod, applied = cpu.schedule_kernels(fused, target)
    assert not applied.untuned and len(applied.gemms) >= 5
    for name, c in applied.gemms.items():
        extents = _parallel_extents(mod[name])
        assert len(extents) == 1, (name, extents)
        assert extents[0] % cores == 0 or extents[0] >= 8 * cores, (name, extents, c)
        assert gemm_space.filled(extents[0], cores) >= gemm_space.BALANCE
    for gv, func in mod.functions.items():  # every kernel runs on more than one thread
        if cpu.is_kernel(func):
            assert _parallel_extents(func), gv.name_hint
    if cores == 64:  # and the machine code builds
        from tvm.relax.backend.cpu_generic import pipeline as p

        with target.tvm_target():
            rest = tvm.transform.Sequential(p.dataflow_lower_passes(target.tvm_target())
                                            + p.finalize_passes(target.tvm_target()))
            tvm.compile(mod, target.tvm_target(), relax_pipeline=rest)


def test_parallel_split_rule() -> None:
    g = gemm_space.Gemm("matmul", 1, 196, 3072, 768)
    for cores in (1, 2, 3, 4, 6, 16, 64):
        chunks, mchunks = gemm_space.parallel_split(g, 4, 3, 8, cores)
        e = chunks * mchunks
        assert gemm_space.filled(e, cores) >= gemm_space.BALANCE, (cores, e)
        assert 3072 // 8 // 3 % chunks == 0 and 196 // 4 % mchunks == 0
    assert gemm_space.parallel_split(g, 4, 3, 8, 2) == (2, 1)  # N split first
    assert gemm_space.parallel_split(gemm_space.Gemm("m", 8, 196, 768, 3072), 4, 3, 8, 2) == (1, 1)  # the batch suffices


def test_default_tiles_keep_b_off_the_critical_path() -> None:
    """The register model counts B's vectors as streamed from L2 (gemm_space.tile_efficiency):
    where N's vector count has no factor 3 (Mixer-H/14's 5120 and 1280 on AVX2) it takes a two
    vector tile (6 x 2, BLIS's Haswell kernel), not the 2 x 5 whose five B loads per k bound it;
    Mixer-B/16 keeps its 4 x 3."""
    avx2 = gemm_space.Vector(8, 16)
    for m, n, k, tile in ((256, 5120, 1280, (6, 2)), (256, 1280, 5120, (6, 2)), (196, 3072, 768, (4, 3)),
                          (196, 768, 3072, (4, 3))):
        c = gemm_space.default_candidate(gemm_space.Gemm("matmul", 1, m, n, k), avx2, 2)
        assert (c.mr, c.nv) == tile, (m, n, c)
    assert gemm_space.tile_efficiency(2, 5) < gemm_space.tile_efficiency(4, 2) == 1.0


def test_avx512_default_tiles_keep_a_in_l1_and_slack_in_the_units() -> None:
    """On AVX-512, rows of A K = 1024 x n floats apart share one L1 set: a tile takes at most 8
    of them (B/16's channel fc2 gets 8 x 3, not the 9 x 3 of its fc1), and of tiles rated
    within MODEL_TOLERANCE of the best, one without a column tail and with slack on its busiest
    unit wins, a row tail notwithstanding (6 x 4 on S/16's and L/16's GEMMs: 14 x 2 issued a
    broadcast every cycle, x3 tiles leave a tail of N = 512 or 1024; 9 x 3 on B/16's)."""
    avx512 = gemm_space.Vector(16, 32)
    assert [gemm_space.rows_in_one_set(14, k) for k in (1024, 2048, 3072, 768, 512, 384, 196)] == [14, 14, 14, 4, 7, 2, 1]
    for m, n, k, tile in ((196, 512, 2048, (6, 4)), (196, 1024, 4096, (6, 4)), (196, 4096, 1024, (6, 4)),
                          (196, 768, 3072, (8, 3)), (196, 3072, 768, (9, 3)), (196, 1024, 512, (6, 4))):
        c = gemm_space.default_candidate(gemm_space.Gemm("matmul", 1, m, n, k), avx512, 2)
        assert (c.mr, c.nv) == tile, (m, n, k, c)
        assert gemm_space.rows_in_one_set(c.mr, k) <= gemm_space.L1_WAYS
    assert gemm_space.tile_pressure(7, 3) < gemm_space.tile_pressure(14, 2) == 1.0


def test_column_tail_tiles_rated_by_what_runs_in_parallel() -> None:
    """Where N is no multiple of the SIMD width (a user's C = 100 or 200), every tile leaves a
    column tail: its full column tiles run as parallel tasks and the tail after them on one core
    (`gemm_space.tail_share`). On two cores 9 x 3 keeps both busy on N = 100 (two full tiles,
    then one vector), where 6 x 4 ran one full tile on one core and 14 x 2 three on two; each
    column tile is its own task."""
    avx512 = gemm_space.Vector(16, 32)
    share = {t: gemm_space.tail_share(gemm_space.Gemm("m", 1, 196, 100, 750), *t, 16, 2) for t in ((9, 3), (6, 4), (14, 2))}
    assert share[(9, 3)] > share[(14, 2)] > share[(6, 4)], share
    for n in (100, 200):
        gemm = gemm_space.Gemm("matmul", 1, 196, n, 750)
        c = gemm_space.default_candidate(gemm, avx512, 2)
        assert (c.mr, c.nv, c.chunks, c.mchunks) == (9, 3, -(-n // 48), 1), (n, c)
    # N a multiple of the SIMD width: a tile without a column tail, as before (S/16's 6 x 4, not 7 x 3)
    assert gemm_space.default_candidate(gemm_space.Gemm("matmul", 1, 196, 512, 768), avx512, 2).nv == 4


def test_loud_warning_when_a_kernel_stays_unscheduled(tiny_spec, no_records, monkeypatch) -> None:
    monkeypatch.setattr(cpu_schedules, "RULES", [lambda sch, m: False])
    target = get_target("llvm")
    fused = cpu.prepare(compose(tiny_spec, target).module, target)
    with pytest.warns(UserWarning, match=r"plain loops, ~100x slower.*layer_norm"):
        _, applied = cpu.schedule_kernels(fused, target)
    # the tiled GEMMs still get gemm_space's micro-kernel; everything else is named
    assert "layer_norm" in applied.untuned and "mean" in applied.untuned
    assert applied.defaults == list(applied.gemms)
    assert f"{len(applied.untuned)} unscheduled" in applied.summary()


def test_tuning_starts_from_the_defaults(tiny_spec, no_records) -> None:
    """With a budget of one trial per kernel, tuning measures each kernel's default schedule (the
    same the build would run), commits it as the first record, and says what it gained: for a GEMM
    whose best record is the default's own micro-tile, that it kept the default (the ratio of two
    measurements of one schedule is noise, not a gain)."""
    from mixer_compile.tune.database import open_database
    from mixer_compile.tune.search import tune

    target = get_target("llvm")
    every = model_tasks(tiny_spec, target, trials=1)
    tasks = [t for t in every if t.micro_kernel][:2] + [t for t in every if not t.micro_kernel][:1]
    lines: list[str] = []
    summary = tune(tasks, target, no_records / "db", say=lines.append)
    assert any("measuring the default schedules of 3 kernels" in line for line in lines), lines
    assert all(t.default_secs and t.done == 1 for t in tasks), [(t.name, t.default_secs, t.done) for t in tasks]
    db = open_database(no_records / "db")
    assert len(db.get_all_tuning_records()) == 3
    first = summary.table(db, target)
    for t in tasks:  # a GEMM whose best is the default's own micro-tile says so, whatever the figures
        t.default_secs *= 1.5  # (a first measurement the machine's noise made slower)
    for t, before, line in zip(tasks, first, summary.table(db, target)):
        expected = "the default schedule (no candidate beat it)" if t.micro_kernel else "1.50x over the default"
        assert line.endswith(expected) and before.endswith(expected.replace("1.50x", "1.00x")), line
    fused = cpu.prepare(compose(tiny_spec, target).module, target)
    _, applied = cpu.schedule_kernels(fused, target, db)
    assert {t.name for t in tasks} <= set(applied.tuned)
    # run again (resumed, or asked for its table): the defaults are found among the records, not re-measured
    names = {t.name: t for t in tasks}
    again = [t for t in model_tasks(tiny_spec, target, trials=1) if t.name in names]
    lines.clear()
    tune(again, target, no_records / "db", say=lines.append)
    assert not any("measuring the default" in line for line in lines), lines
    for t in again:
        assert t.default_secs == best_latency(db, t.mod, target), t.name
        assert t.default_decision == names[t.name].default_decision, t.name
