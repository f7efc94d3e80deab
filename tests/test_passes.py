"""Each pass preserves the model's function (checked through the NumPy interpreter) and
makes the structural change it claims."""

from dataclasses import replace

import numpy as np
import pytest

from mixer_compile.errors import MixerCompileError
from mixer_compile.ir import build_graph, interpret, to_text
from mixer_compile.model import reference
from mixer_compile.model.params import random_weights
from mixer_compile.passes.context import PassContext
from mixer_compile.passes.pipeline import FORMS, PASSES, passes_for, run_passes
from tests.helpers import rel_error

# The interpreter runs in float64, so a correct rewrite agrees to rounding error.
BOUND = 1e-10
# A context in which every pass has work to do on the literal graph: kernels in panels of 16
# columns (pack_kernels), float16 storage (precision), convolutions as GEMMs (convs_as_gemms, on
# the conv form's convolutions), the batch as rows (batch_as_rows); the other passes do not read it.
WORK_FOR_ALL = PassContext(dtype="float16", panel=16, gemm_convs=True, batch_rows=True)
CONVS = ("token_mixing_as_conv", "channel_mixing_as_conv1x1", "fuse_epilogues")


@pytest.fixture(params=["tiny_spec", "wide_spec"])
def case(request):
    """The wide spec at LayerNorm epsilon 1e-2, so that a graph dropping the spec's epsilon differs."""
    spec = request.getfixturevalue(request.param).replace(gelu="erf")
    if request.param == "wide_spec":
        spec = spec.replace(layer_norm_eps=1e-2)
    weights = random_weights(spec, seed=7)
    images = np.random.default_rng(1).standard_normal((spec.batch, 3, *spec.image_size))
    return spec, weights, images


def _run(graph, weights, images):
    return interpret(graph, graph.materialize_params(weights), images)


def test_literal_graph_matches_reference(case):
    spec, weights, images = case
    assert rel_error(_run(build_graph(spec), weights, images), reference.forward(spec, weights, images)) < BOUND


# library_gemms acts only on fused half-precision GEMMs larger than these specs have: its meaning
# is checked in test_library_gemms.py, on a model with such GEMMs
@pytest.mark.parametrize("name", [name for name in PASSES if name != "library_gemms"])
def test_each_pass_alone_is_equivalent(case, name):
    spec, weights, images = case
    before = build_graph(spec)
    if name == "convs_as_gemms":  # the literal graph has no convolution
        before, _ = run_passes(before, CONVS)
    after, reports = run_passes(before, (name,), WORK_FOR_ALL)
    assert reports[0].changes, f"{name} changed nothing on the literal graph"
    if name == "precision":  # storage only: the same function of the weights as stored (rounded)
        weights = {k: v.astype(WORK_FOR_ALL.dtype) if v.ndim > 1 else v for k, v in weights.items()}
    assert rel_error(_run(after, weights, images), _run(before, weights, images)) < BOUND


@pytest.mark.parametrize("form", list(FORMS))
def test_each_form_is_equivalent(case, form):
    spec, weights, images = case
    graph, _ = run_passes(build_graph(spec), passes_for(form))
    assert rel_error(_run(graph, weights, images), reference.forward(spec, weights, images)) < BOUND


def test_token_mixing_is_one_tied_full_receptive_field_conv(wide_spec):
    graph, _ = run_passes(build_graph(wide_spec), ("token_mixing_as_conv",))
    gh, gw = wide_spec.grid
    convs = [op for op in graph.ops if op.kind == "conv2d"]
    mirrors = [op for op in graph.ops if op.kind == "conv2d_transpose"]
    assert len(convs) == len(mirrors) == wide_spec.num_blocks
    for conv in convs:
        kernel = graph.params[conv.inputs[1]].tensor
        # One kernel of D_S maps covering the whole (gh, gw) grid, applied to each channel.
        assert kernel.shape == (wide_spec.tokens_mlp_dim, 1, gh, gw)
        assert graph.tensor(conv.inputs[0]).shape == (wide_spec.batch * wide_spec.hidden_dim, 1, gh, gw)
    assert not any(op.kind == "dense" and op.output.layout == "BCS" for op in graph.ops)


def test_convs_become_gemms_where_the_target_has_gemm_kernels(wide_spec):
    """Every convolution of the conv form is a GEMM written as one: built for a target whose
    kernels are GEMMs, each becomes a dense op (1x1: over the pixels, transposed to them; the
    full-grid conv and its mirror: right products, all of them), its kernel re-laid; the ONNX export's context
    keeps them convolutions."""
    conv_form, _ = run_passes(build_graph(wide_spec), CONVS)
    graph, reports = run_passes(conv_form, ("convs_as_gemms",), PassContext(gemm_convs=True))
    assert not [op for op in graph.ops if op.kind.startswith("conv")]
    assert len(reports[0].changes) == 4 * wide_spec.num_blocks
    gemms = {op.output.name: op for op in graph.ops if op.kind == "dense" and op.output.name.endswith(".gemm")}
    layouts = sorted((op.attrs["kernel_layout"], op.attrs["axis"], len(op.output.shape)) for op in gemms.values())
    assert layouts == sorted([("KN", 1, 2)] * 2 * wide_spec.num_blocks + [("KN", 2, 3)] * 2 * wide_spec.num_blocks)
    assert all(op.attrs.get("bias") for name, op in gemms.items() if ".ch." in name)  # the fused epilogues kept
    kept, reports = run_passes(conv_form, ("convs_as_gemms",), PassContext())
    assert kept.ops == conv_form.ops and reports[0].changes == []


def test_channel_mixing_is_1x1_conv(tiny_spec):
    graph, _ = run_passes(build_graph(tiny_spec), ("channel_mixing_as_conv1x1",))
    kernels = [graph.params[op.inputs[1]].tensor.shape for op in graph.ops if op.kind == "conv2d"]
    assert kernels == [(128, 32, 1, 1), (32, 128, 1, 1)] * tiny_spec.num_blocks


def test_tokens_major_removes_every_transpose(wide_spec):
    before = build_graph(wide_spec)
    assert sum(op.kind == "transpose" for op in before.ops) == 2 * wide_spec.num_blocks
    graph, reports = run_passes(before, ("tokens_major",))
    assert not any(op.kind == "transpose" for op in graph.ops)
    left = [op for op in graph.ops if op.kind == "dense" and op.attrs["axis"] == 1 and len(op.output.shape) == 3]
    assert len(left) == 2 * wide_spec.num_blocks
    assert all(op.attrs["kernel_layout"] == "NK" for op in left)
    assert "0 transposes remain" in reports[0].changes[-1]


def test_fusion_leaves_one_op_per_mlp_layer(tiny_spec):
    graph, _ = run_passes(build_graph(tiny_spec), passes_for("matmul"))
    assert graph.op_counts() == {"patchify": 1, "dense": 2 + 4 * tiny_spec.num_blocks,
                                 "layer_norm": 1 + 2 * tiny_spec.num_blocks, "mean": 1}
    fc1 = [op for op in graph.ops if op.attrs.get("gelu")]
    assert len(fc1) == 2 * tiny_spec.num_blocks and all(op.attrs["gelu"] == "tanh" for op in fc1)
    assert sum(bool(op.attrs.get("residual")) for op in graph.ops) == 2 * tiny_spec.num_blocks


def test_text_form_and_pass_selection(tiny_spec):
    text = to_text(run_passes(build_graph(tiny_spec), passes_for("matmul"))[0])
    assert "dense(%b0.ln0, %b0.tok.fc1.w, %b0.tok.fc1.b; axis=1, kernel_layout=NK" in text
    assert "param %b0.tok.fc1.w: f32[16,16] NK = transpose(MixerBlock_0/token_mixing/Dense_0/kernel, (1,0))" in text
    assert passes_for("conv", "token_mixing_as_conv") == ("token_mixing_as_conv",)
    with pytest.raises(MixerCompileError, match="pass 'tokens_major' is not in the conv pipeline"):
        passes_for("conv", "tokens_major")


@pytest.mark.parametrize("panel", [8, 16])
def test_right_product_kernels_stored_in_panels(case, panel):
    spec, weights, images = case
    graph, reports = run_passes(build_graph(spec), passes_for("matmul"), PassContext(panel=panel))
    assert [r.name for r in reports] == list(passes_for("matmul"))
    packed = next(r for r in reports if r.name == "pack_kernels")
    assert packed.changes and all(c.endswith(f", {panel})") for c in packed.changes)  # "... panels of (K, P)"
    assert rel_error(_run(graph, weights, images), reference.forward(spec, weights, images)) < BOUND
    for op in (op for op in graph.ops if op.kind == "dense"):
        param, layout = graph.params[op.inputs[1]], op.attrs["kernel_layout"]
        if layout == "NKn":
            assert param.tensor.shape[-1] == panel and param.materialize(weights).shape == param.tensor.shape
        elif op.attrs["axis"] == len(op.output.shape) - 1:  # a right product left as it was: N is no multiple
            assert layout == "KN" and param.tensor.shape[1] % panel
        else:
            assert layout == "NK"  # left products (token mixing) keep (N, K)


@pytest.mark.parametrize("form", list(FORMS))
def test_a_batch_of_images_runs_each_right_product_as_one_gemm_over_all_their_rows(case, form):
    """A CPU's context: every right product over images becomes one GEMM over all their rows
    (batch x tokens), and the model still computes the reference; between two such GEMMs (channel
    fc1 -> fc2) the rows stay rows, no reshape there and back. At batch 1, and where the context
    does not ask for it (a GPU's), nothing changes."""
    spec, weights, images = case
    cpu = PassContext(panel=16, gemm_convs=True, batch_rows=True)
    graph, reports = run_passes(build_graph(spec), passes_for(form), cpu)
    assert rel_error(_run(graph, weights, images), reference.forward(spec, weights, images)) < BOUND
    right = [op for op in graph.ops if op.kind == "dense" and op.attrs["axis"] == len(op.output.shape) - 1]
    tokens = spec.grid[0] * spec.grid[1]
    rows = [op for op in right if op.output.layout.startswith("R")]  # stem, channel fc1, fc2: R(ows) x N
    assert len(rows) == 1 + 2 * spec.num_blocks and all(len(op.output.shape) == 2 for op in right)
    assert all(op.output.shape[0] == spec.batch * tokens for op in rows)
    if form == "matmul":  # (the conv form transposes to channels-major between its 1x1 convs)
        fc2 = [op for op in rows if op.attrs.get("residual")]
        assert len(fc2) == spec.num_blocks and all(graph.producer(op.inputs[0]).kind == "dense" for op in fc2)
    assert next(r for r in reports if r.name == "batch_as_rows").changes[0].endswith(
        f"{spec.batch} images of {tokens} rows as one {spec.batch * tokens}x{spec.hidden_dim} GEMM")
    for unchanged in (run_passes(build_graph(spec.replace(batch=1)), passes_for(form), cpu)[1],
                      run_passes(build_graph(spec), passes_for(form), replace(cpu, batch_rows=False))[1]):
        assert next(r for r in unchanged if r.name == "batch_as_rows").changes == []


def test_half_precision_stores_activations_in_half_only_where_the_hardware_computes_in_half(tiny_spec):
    """GPUs (tensor cores) keep every activation in the storage dtype; a CPU, whose arithmetic is
    float32 whatever the storage, keeps activations in float32 and only the weight matrices in
    half (passes/precision.py): a half-precision activation costs a conversion at every use."""
    from mixer_compile.backend.target import get_target
    from mixer_compile.compose import target_graph

    cpu, reports = target_graph(tiny_spec, get_target("llvm"), dtype="bfloat16")
    gpu, _ = target_graph(tiny_spec, get_target("sm_90"), dtype="bfloat16")
    for graph, activations in ((cpu, "float32"), (gpu, "bfloat16")):
        assert {p.tensor.dtype for p in graph.params.values() if len(p.tensor.shape) > 1} == {"bfloat16"}
        assert {op.output.dtype for op in graph.ops if op.output.name != graph.output} == {activations}
        assert graph.meta["precision"] == {"dtype": "bfloat16", "activations": activations, "accumulate": "float32"}
    assert f"stored in bfloat16, {len(cpu.ops) - 1} activations in float32" in reports[-2].changes[0]
