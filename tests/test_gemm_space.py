"""The hand-written GEMM design spaces (backend/gemm_space.py) and the thread-pool sizing (machine.py).

Every candidate of every GEMM kernel of a tiny spec is built and run against the same kernel
untouched by any schedule: a loop nest that computes something else must fail here, not in
a tuning run. The speed of the candidates is the benchmark's business, not a test's.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import tvm
from tvm.s_tir import Schedule
from tvm.s_tir.meta_schedule.arg_info import ArgInfo

from mixer_compile.backend.cpu_schedules import build_kernel
from mixer_compile.backend.gemm_space import (COLUMNS_USED, MAX_CANDIDATES, ROWS_USED, Gemm, Vector, apply, candidates,
                                               default_candidate, design_spaces, find_gemm, prefetch_rows, vector_unit)
from mixer_compile.backend.target import get_target
from mixer_compile.compose import model_tasks
from mixer_compile.errors import MixerCompileError
from mixer_compile.machine import physical_cores, use_all_cores
from mixer_compile.model.spec import MixerSpec
from tests.helpers import cannot_run


def _tasks(spec: MixerSpec, target_name: str = "znver4") -> list:
    return model_tasks(spec, get_target(target_name), trials=64)


def _run(mod: tvm.IRModule, target: tvm.target.Target, inputs: list[np.ndarray]) -> np.ndarray:
    """The kernel built as a model build lowers it (guards, prefetches), run on `inputs`."""
    out_shape = [int(s) for s in ArgInfo.from_prim_func(mod["main"])[-1].shape]
    args = [tvm.runtime.tensor(x) for x in inputs] + [tvm.runtime.tensor(np.zeros(out_shape, np.float32))]
    build_kernel(mod, target)["main"](*args)
    return args[-1].numpy()


def test_gemm_kernels_match_and_others_keep_the_generic_space(tiny_spec: MixerSpec) -> None:
    found = {t.name: find_gemm(Schedule(t.mod)) for t in _tasks(tiny_spec)}
    gemms = [n for n, g in found.items() if g is not None]
    # fc1 and fc2 of token and channel mixing, and the patch embedding; the 10-class head too
    assert len(gemms) == 6, found
    assert found["layer_norm"] is None and found["mean"] is None
    tokens = (32 // 8) ** 2
    # channel fc1: the batch's rows (passes/batch_as_rows.py) x C -> D_C
    assert Gemm("matmul", 1, tiny_spec.batch * tokens, 128, 32) in found.values()


@pytest.mark.parametrize("target_name", ["znver4", "avx2"])
def test_every_candidate_computes_the_kernel(tiny_spec: MixerSpec, target_name: str) -> None:
    target = get_target(target_name).tvm_target()
    vec = vector_unit(target)
    assert vec == (Vector(16, 32) if target_name == "znver4" else Vector(8, 16))
    if why := cannot_run(target_name):
        pytest.skip(why)
    rng = np.random.default_rng(0)
    checked = 0
    for task in _tasks(tiny_spec, target_name):
        spaces = design_spaces(Schedule(task.mod), vec, 2)
        if not spaces:
            continue
        inputs = [rng.standard_normal([int(s) for s in a.shape]).astype(np.float32)
                  for a in ArgInfo.from_prim_func(task.mod["main"])[:-1]]
        expected = _run(task.mod, target, inputs)
        for space in spaces:
            np.testing.assert_allclose(_run(space.mod, target, inputs), expected, rtol=1e-5, atol=1e-5)
            checked += 1
    assert checked >= 8


def test_weight_panels_are_prefetched_with_the_accumulators_on_the_stack(tiny_spec: MixerSpec) -> None:
    """backend/cpu_prefetch.py: a GEMM reading a weight's panels in place prefetches the next
    column tile's panels in its k loop, its accumulators on the stack, not in a TVM workspace
    (which kept them in memory across the prefetches: a tile 2x slower); a GEMM whose B is staged
    (token mixing's activations, copied into a panel) prefetches nothing."""
    target = get_target("znver4").tvm_target()
    vec = vector_unit(target)
    asm = {}
    for task in _tasks(tiny_spec.replace(hidden_dim=64, channels_mlp_dim=256)):
        sch = Schedule(task.mod)
        gemm = find_gemm(sch)
        if gemm is None or gemm.m <= 8:
            continue
        apply(sch, gemm, default_candidate(gemm, vec, 2), vec.lanes)
        asm[(gemm.m, gemm.n, gemm.k)] = build_kernel(sch.mod, target).inspect_source("asm")
    weights = [(32, 64, 192), (32, 256, 64), (32, 64, 256)]  # (M, N, K) of the stem, channel fc1 and fc2
    for shape in weights:
        assert "prefetcht1" in asm[shape] and "TVMBackendAllocWorkspace" not in asm[shape], shape
    token_mixing = asm[(16, 64, 16)]  # D_S x C x tokens: B, the activations, copied into a panel first
    assert "prefetcht1" not in token_mixing
    # as much of the next panels as 3/4 of a 1 MB L2 holds beside the current ones (7 x 3 tiles on AVX-512)
    assert prefetch_rows(Gemm("fc1", 1, 196, 3072, 768), 3, 16) == 3  # B/16's channel fc1: 147 KB of panels
    assert prefetch_rows(Gemm("fc2", 1, 196, 768, 3072), 3, 16) == 1  # its fc2: 590 KB, a third of the next
    assert prefetch_rows(Gemm("stem", 1, 49, 768, 3072), 4, 16) == 0  # 768 KB: no room beside them


def test_candidates_fit_the_registers_and_fill_their_row_tiles() -> None:
    """Neither rows nor vectors need divide M or N (the last row tile is peeled off at lowering)
    but fill at least ROWS_USED of the tiles: 49 tokens (the /32 presets) get a tuning space."""
    for m in (196, 49):
        gemm = Gemm("matmul", 1, m, 3072, 768)
        for vec in (Vector(16, 32), Vector(8, 16)):
            cands = candidates(gemm, vec, cores=2)
            assert cands and len(cands) <= MAX_CANDIDATES
            for c in cands:
                blocks = -(-3072 // (c.nv * vec.lanes))  # column tiles, the last one predicated when c.nv does not divide
                assert m / (-(-m // c.mr) * c.mr) >= ROWS_USED and 3072 / (blocks * c.nv * vec.lanes) >= COLUMNS_USED
                assert blocks % c.chunks == 0
                assert c.mr * c.nv + c.nv + 1 <= vec.registers  # C tile, B vectors, A broadcast
                assert gemm.batch * c.chunks >= 2  # both cores busy
    assert candidates(Gemm("matmul", 1, 7, 13 * 16, 64), Vector(16, 32), 2) == []  # no tile fits: generic space
    # N no multiple of the SIMD width (D_C = 750): any vectors, the last column tile predicated; the
    # parallel loop is N's chunks alone (gemm_space.apply), which keep both cores busy
    tail = Gemm("matmul", 3, 196, 750, 384)
    for vec in (Vector(16, 32), Vector(8, 16)):
        cands = candidates(tail, vec, cores=2)
        assert cands and any(750 % (c.nv * vec.lanes) for c in cands)
        for c in cands:
            assert c.mchunks == 1 and -(-750 // (c.nv * vec.lanes)) % c.chunks == 0 and c.chunks >= 2


def test_tvm_threads_default_to_physical_cores(monkeypatch) -> None:
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert use_all_cores() == physical_cores() >= 1
    assert os.environ["TVM_NUM_THREADS"] == str(physical_cores())
    monkeypatch.setenv("TVM_NUM_THREADS", "1")  # the user's choice wins
    assert use_all_cores() == 1
    monkeypatch.setenv("TVM_NUM_THREADS", "100000")  # TVM would start them all: aborted, or hung
    with pytest.raises(MixerCompileError, match=r"^TVM_NUM_THREADS=100000 asks TVM for 100000 threads; set it to 1 "
                                                r"to 1024 \(this machine has \d+ cores\) or unset it$"):
        use_all_cores()
