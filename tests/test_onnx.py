"""ONNX export of the IR forms and ONNX import (recognition, compile, validation against ORT)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from mixer_compile.check import ort
from mixer_compile.check.validate import REFERENCE_IMAGES, random_images
from mixer_compile.cli import main
from mixer_compile.errors import MixerCompileError, ValidationError
from mixer_compile.frontends import load_weights
from mixer_compile.frontends.onnx_import import import_onnx
from mixer_compile.model import reference
from mixer_compile.model.params import random_weights
from mixer_compile.model.spec import MixerSpec, load_spec
from mixer_compile.tools import import_onnx as import_onnx_tool
from mixer_compile.tools.export_onnx import export_onnx
from tests.helpers import error_line, rel_error
from tests.torch_model import torch_mixer

# torch's own notices about its exporters, not about our code
pytestmark = [pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning")]


@pytest.fixture
def spec() -> MixerSpec:
    """Non-square 32x48 image, patch 8 (4x6 grid), C=32, 2 blocks: raster-order mistakes show."""
    return MixerSpec("tiny", (32, 48), 8, 32, 16, 64, 2, num_classes=10, batch=2)


def _torch_onnx(spec: MixerSpec, weights: dict, path, dynamic: bool = True, model=None, dynamo: bool = False,
                opset: int = 17) -> None:
    """Our timm-named PyTorch Mixer exported by torch.onnx: the TorchScript exporter (opset 17 has
    LayerNormalization, older opsets spell it out), or the torch.export-based one (torch's default
    since 2.9, opset 18, GELU as one Gelu node)."""
    model = model or torch_mixer(spec, weights)
    h, w = spec.image_size
    image = (torch.zeros(spec.batch, 3, h, w),)
    if dynamo:
        torch.onnx.export(model, image, str(path), dynamo=True, input_names=["image"], external_data=False,
                          verbose=False, dynamic_shapes=({0: torch.export.Dim("batch")},) if dynamic else None)
        return
    torch.onnx.export(model, image, str(path), dynamo=False, opset_version=opset,
                      input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None)


def _same_weights(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=0, atol=1e-7, err_msg=key)


def test_conv_form_exports_to_conv_nodes_with_dynamic_batch(spec, tmp_path):
    w = random_weights(spec, seed=1)
    ckpt = tmp_path / "w.npz"
    np.savez(ckpt, **w)
    result = export_onnx(spec, tmp_path / "m.onnx", ckpt, form="conv")
    model = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(model, full_check=True)
    counts = Counter(n.op_type for n in model.graph.node)
    # stem + per block one full-grid token conv and two 1x1 channel convs; one mirror per block
    assert counts["Conv"] == 1 + 3 * spec.num_blocks and counts["ConvTranspose"] == spec.num_blocks
    assert counts["MatMul"] + counts["Gemm"] == 1  # only the head
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    kernels = {i.name: numpy_helper.to_array(i).shape for i in model.graph.initializer}
    # token mixing: D_S = 16 filters over the whole 4x6 grid, one input channel (tied across channels)
    assert sum(n.op_type == "Conv" and kernels.get(n.input[1]) == (16, 1, 4, 6) for n in model.graph.node) \
        == spec.num_blocks
    sess = ort.session(tmp_path / "m.onnx")
    for b in (1, 3):
        images = random_images(spec.replace(batch=b), seed=b)
        assert rel_error(ort.run(sess, images), reference.forward(spec.with_gelu_for("jax"), w, images)) < 1e-5
    assert [v.batch for v in result.validations] == [2, 3] and all(v.max_rel_error < 1e-5 for v in result.validations)


def test_cli_exports_matmul_form_and_prints_the_figure(spec, tmp_path, capsys):
    spec_file = tmp_path / "tiny.json"
    spec_file.write_text(json.dumps(spec.to_dict()))
    out = tmp_path / "mm.onnx"
    rc = main(["export-onnx", "--spec", str(spec_file), "--form", "matmul", "--gelu", "erf", "-o", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and out.is_file()
    assert "onnxruntime batch 2: ok: max |out-ref|/max|ref| = " in text
    assert "ConvTranspose" not in text and "MatMul" in text
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_export_to_a_directory_is_refused_before_the_work(spec, tmp_path, monkeypatch):
    monkeypatch.setattr(ort, "session", lambda *a: pytest.fail("exported before checking where to write"))
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(MixerCompileError, match=r"^cannot write '\S+/dir.onnx': it is a directory; give -o a .onnx file"):
        export_onnx(spec, tmp_path / "dir.onnx")


def test_export_that_disagrees_writes_nothing(spec, tmp_path, monkeypatch):
    monkeypatch.setattr(reference, "forward", lambda s, w, x: np.ones((x.shape[0], s.num_classes)))
    with pytest.raises(ValidationError, match="the ONNX model disagrees with the reference at batch 2"):
        export_onnx(spec, tmp_path / "bad.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("gelu, dynamo, opset", [("erf", False, 17), ("tanh", False, 17), ("tanh", True, 18),
                                                 ("erf", False, 13)])
def test_import_torch_export(spec, tmp_path, gelu, dynamo, opset):
    s = spec.replace(gelu=gelu)
    w = random_weights(s, seed=2)
    _torch_onnx(s, w, tmp_path / "timm.onnx", dynamo=dynamo, opset=opset)
    imported = import_onnx(tmp_path / "timm.onnx")
    assert imported.spec == s.replace(name="timm", batch=1)
    _same_weights(imported.weights, w)


def test_import_fixed_batch_one_export(spec, tmp_path):
    s = spec.replace(batch=1, gelu="erf")
    w = random_weights(s, seed=3)
    _torch_onnx(s, w, tmp_path / "b1.onnx", dynamic=False)
    imported = import_onnx(tmp_path / "b1.onnx", batch=4)
    assert imported.spec.batch == 1 and imported.batch_fixed  # the file's batch wins
    _same_weights(imported.weights, w)


@pytest.mark.parametrize("form", ["conv", "matmul"])
def test_import_reads_our_own_export_back(spec, tmp_path, form):
    spec = spec.replace(layer_norm_eps=1e-2)  # not the default: the file's epsilon is read, not assumed
    w = random_weights(spec, seed=4)
    np.savez(tmp_path / "w.npz", **w)
    export_onnx(spec, tmp_path / "ours.onnx", tmp_path / "w.npz", form=form)
    imported = import_onnx(tmp_path / "ours.onnx")
    assert imported.spec == spec.replace(name="ours", batch=1, gelu="tanh")
    _same_weights(imported.weights, w)


def test_cli_import_compiles_and_validates_against_onnxruntime(spec, tmp_path, capsys):
    s = spec.replace(gelu="erf")
    w = random_weights(s, seed=5)
    _torch_onnx(s, w, tmp_path / "timm.onnx")
    art = tmp_path / "art"
    rc = main(["import-onnx", str(tmp_path / "timm.onnx"), "--batch", "10", "-o", str(art)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "compiled vs onnxruntime:         ok: max |out-ref|/max|ref| = " in text
    meta = json.loads((art / "metadata.json").read_text())
    assert meta["spec"]["batch"] == 10 and meta["spec"]["gelu"] == "erf"
    assert meta["validation"]["passed"] and meta["weights"]["file"] == str(tmp_path / "art.npz")
    assert load_spec(tmp_path / "art.json") == s.replace(name="timm", batch=10)
    _same_weights(load_weights(tmp_path / "art.npz", s)[0], w)
    # beside the artifact: what an earlier import of this model wrote is replaced, a file of the user's is not
    assert main(["import-onnx", str(tmp_path / "timm.onnx"), "--batch", "10", "-o", str(art)]) == 0
    (tmp_path / "mine.npz").write_text("keep me\n")
    assert main(["import-onnx", str(tmp_path / "timm.onnx"), "-o", str(tmp_path / "mine")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: cannot write '{tmp_path / 'mine.npz'}': a file that this import did not write is there; move it or "
        "choose another -o (the checkpoint and spec are written beside the artifact as mine.npz and .json)")
    assert (tmp_path / "mine.npz").read_text() == "keep me\n" and not (tmp_path / "mine").exists()
    # the float64 reference recognises the model on the first REFERENCE_IMAGES only
    result = import_onnx_tool.compile_onnx(tmp_path / "timm.onnx", tmp_path / "again", batch=10)
    assert (result.recognition.batch, result.recognition.checked) == (10, REFERENCE_IMAGES) and REFERENCE_IMAGES < 10
    assert (result.against_onnx.batch, result.against_onnx.checked) == (10, 10)


def _strided_stem(path) -> None:
    k = numpy_helper.from_array(np.zeros((8, 3, 8, 8), np.float32), "k")
    node = helper.make_node("Conv", ["image", "k"], ["y"], kernel_shape=[8, 8], strides=[4, 4])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 7, 7])], [k])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_not_a_mixer_names_what_did_not_match(spec, tmp_path):
    _strided_stem(tmp_path / "strided.onnx")
    with pytest.raises(MixerCompileError, match=r"expected a Conv stem with stride == kernel .*found Conv .*"
                                                r"strides=\[4, 4\]"):
        import_onnx(tmp_path / "strided.onnx")
    s = spec.replace(gelu="erf")
    w = random_weights(s)
    relu = torch_mixer(s, w)
    relu.blocks[1].mlp_channels.act = torch.nn.ReLU()
    _torch_onnx(s, w, tmp_path / "relu.onnx", model=relu)
    with pytest.raises(MixerCompileError, match="expected a GELU in block 1 channel mixing, found Relu"):
        import_onnx(tmp_path / "relu.onnx")
    no_norm = torch_mixer(s, w)
    no_norm.blocks[0].norm1 = torch.nn.Identity()
    _torch_onnx(s, w, tmp_path / "nonorm.onnx", model=no_norm)
    with pytest.raises(MixerCompileError, match="expected a LayerNormalization"):
        import_onnx(tmp_path / "nonorm.onnx")


def test_cli_import_error_is_one_line(tmp_path, capsys):
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    rc = main(["import-onnx", str(tmp_path / "junk.onnx"), "-o", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith("error: ") and "is not a readable ONNX file" in err
    assert not (tmp_path / "a").exists()


def test_import_and_export_refusals_name_the_problem_and_write_nothing(spec, tmp_path, capsys, monkeypatch):
    w = random_weights(spec)
    _torch_onnx(spec, w, tmp_path / "timm.onnx")
    torch.onnx.export(torch_mixer(spec, w).half(), (torch.zeros(1, 3, *spec.image_size, dtype=torch.float16),),
                      str(tmp_path / "half.onnx"), dynamo=False, opset_version=17)
    (tmp_path / "empty.onnx").write_bytes(b"")
    np.savez(tmp_path / "w.npz", **w)
    (tmp_path / "x.json").write_text(json.dumps(spec.to_dict()))
    before = sorted(p.name for p in tmp_path.iterdir())
    for args, message in (
            (["import-onnx", "timm.onnx", "--target", "nosuch", "-o", "a"], "unknown target 'nosuch'"),
            (["import-onnx", "half.onnx", "-o", "a"], "the model's input is float16; export it in float32"),
            (["import-onnx", "empty.onnx", "-o", "a"], "'empty.onnx' is empty, not an ONNX model"),
            (["import-onnx", ".", "-o", "a"], "'.' is a directory; give the .onnx file"),
            (["export-onnx", "--spec", "x.json", "--weights", "w.npz", "-o", "m.txt"], "must be a .onnx file")):
        monkeypatch.chdir(tmp_path)
        rc = main(args)
        assert rc == 2 and message in capsys.readouterr().err.splitlines()[-1], args
        assert sorted(p.name for p in tmp_path.iterdir()) == before, args


def test_cli_import_into_a_foreign_directory_writes_nothing(spec, tmp_path, capsys):
    _torch_onnx(spec, random_weights(spec), tmp_path / "timm.onnx")
    (tmp_path / "notart").mkdir()
    (tmp_path / "notart" / "mine.txt").write_text("keep me\n")
    rc = main(["import-onnx", str(tmp_path / "timm.onnx"), "-o", str(tmp_path / "notart")])
    err = capsys.readouterr().err
    assert rc == 2 and err.splitlines()[-1] == (f"error: '{tmp_path / 'notart'}' exists and is not a mixer-compile "
                                                "artifact; choose another output directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notart", "timm.onnx"]


@pytest.mark.parametrize("block, message", [
    ("mount", "error: '{out}' is a mount point, which an artifact cannot be swapped onto; write it into the mount, "
              "e.g. -o {out}/model"),
    ("spec-dir", "error: cannot write '{out}.json': it is a directory; move it or choose another -o (the checkpoint "
                 "and spec are written beside the artifact as art.npz and .json)")])
def test_import_refused_by_compiles_checks_writes_nothing_beside(spec, tmp_path, capsys, monkeypatch, block, message):
    """Compile's refusal of the output (-o a mount point), or a directory where the spec goes,
    comes before the recognition runs and before the checkpoint and spec are written beside the
    artifact: nothing is left behind."""
    _torch_onnx(spec, random_weights(spec), tmp_path / "timm.onnx")
    out = tmp_path.resolve() / "art"
    if block == "mount":
        out.mkdir()
        monkeypatch.setattr(Path, "is_mount", lambda self: self == out)
    else:
        (tmp_path / "art.json").mkdir()
    monkeypatch.setattr(ort, "session", lambda *a: pytest.fail("ran ONNX Runtime before compile's checks"))
    before = sorted(p.name for p in tmp_path.iterdir())
    line = error_line(main(["import-onnx", str(tmp_path / "timm.onnx"), "-o", str(out)]), capsys.readouterr().err)
    assert line == message.format(out=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_import_of_a_batch_beyond_memory_is_refused_as_compile_refuses_it(spec, tmp_path, capsys, monkeypatch):
    """--batch 100000000 is refused by compile's memory check, in compile's words, before the
    recognition draws its images (numpy's MemoryError for 1 TiB of them, otherwise)."""
    _torch_onnx(spec, random_weights(spec), tmp_path / "timm.onnx")
    (tmp_path / "timm.json").write_text(json.dumps(spec.replace(name="timm").to_dict()))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(import_onnx_tool, "random_images", lambda *a: pytest.fail("drew images before the memory check"))
    line = error_line(main(["import-onnx", "timm.onnx", "--batch", "100000000", "-o", "x"]), capsys.readouterr().err)
    assert re.fullmatch(r"error: batch 100000000 of timm needs about [\d,.]+ GiB of memory \(RAM\) \(weights [\d.]+ "
                        r"GiB, activations [\d,.]+ GiB, validation [\d,.]+ GiB\) and this machine has [\d,.]+ GiB; the "
                        r"largest batch that fits is about \d+", line), line
    assert line == error_line(main(["--spec", "timm.json", "--batch", "100000000", "-o", "y"]), capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["timm.json", "timm.onnx"]
