"""End to end on the host CPU: compile, validate, write the artifact, load it elsewhere.

Bounds: against the float64 reference, FP32 (tests/helpers.py; validation's own bound is 1e-4,
validate.py says why). Against timm's own float32 logits we ask for 2e-5, tight enough that the
wrong GELU flavour (2e-4 away) would fail.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import tvm

from mixer_compile import runtime
from mixer_compile.backend import backend_for
from mixer_compile.backend.target import get_target
from mixer_compile.compiler import CompileOptions, compile_model
from mixer_compile.errors import ArtifactError, ValidationError
from mixer_compile.passes.pipeline import passes_for
from mixer_compile.util.progress import Progress
from tests.helpers import FP32, cannot_run, rel_error, testdata_spec


def _compile(spec, out=None, **kw):
    return compile_model(CompileOptions(spec=spec, out_dir=out, **kw), Progress(6, quiet=True))


@pytest.mark.parametrize("ext, flavour", [("pth", "erf"), ("npz", "tanh")])
def test_checkpoint_compiles_to_timms_output_in_a_fresh_process(tmp_path, testdata, ext, flavour):
    spec = testdata_spec("tiny_wide")
    result = _compile(spec, tmp_path / "art", weights=testdata / f"tiny_wide.{ext}")
    assert result.spec.gelu == flavour and result.validation.passed
    assert result.validation.max_rel_error < 1e-5
    # torch made unimportable: loading must need neither torch nor the compiler stack.
    code = ("import sys; sys.modules['torch'] = None; import numpy as np; from mixer_compile import runtime; "
            "m = runtime.load(sys.argv[1]); np.save(sys.argv[3], m(np.load(sys.argv[2]))); "
            "print(sorted(k for k in ('scipy', 'mixer_compile.compiler', 'mixer_compile.compose', 'mixer_compile.ir', "
            "'mixer_compile.passes', 'mixer_compile.backend') if k in sys.modules))")
    out_file = tmp_path / "logits.npy"
    proc = subprocess.run([sys.executable, "-c", code, str(result.artifact), str(testdata / "tiny_wide_input.npy"),
                           str(out_file)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    assert rel_error(np.load(out_file), np.load(testdata / f"tiny_wide_logits_{flavour}.npy")) < 2e-5


def test_artifact_contents_and_metadata(tmp_path, tiny_spec):
    result = _compile(tiny_spec, tmp_path / "art", seed=4)
    files = sorted(p.name for p in (tmp_path / "art").iterdir())
    assert files == ["metadata.json", "model.so", "weights.params"]
    meta = json.loads((tmp_path / "art" / "metadata.json").read_text())
    assert meta["spec"]["hidden_dim"] == 32 and meta["weights"] == {"origin": "random", "seed": 4, "embedded": False}
    assert meta["validation"]["passed"] and meta["validation"]["max_rel_error"] < FP32
    host = get_target("llvm")
    lanes = backend_for(host).pass_context(host, "float32").panel  # the host's SIMD width: 16 with AVX-512, 8 with AVX2
    names = [p["name"] for p in meta["passes"]]  # the form's, in order: the batch's rows, the panels of `lanes`, precision
    assert names == list(passes_for("matmul")) and names[:5] == ["tokens_major", "fuse_epilogues", "batch_as_rows",
                                                                 "pack_kernels", "precision"]
    assert meta["passes"][2]["changes"] and meta["passes"][3]["changes"]  # batch 2: a batch to fold; panels
    assert not meta["passes"][4]["changes"]  # float32: precision is a no-op
    stored = tvm.runtime.load_param_dict_from_file(str(tmp_path / "art" / "weights.params"))
    assert tuple(stored["b0.ch.fc1.w"].shape) == (128 // lanes, 32, lanes)  # (K, N) stored as panels
    assert meta["input"]["shape"] == [2, 3, 32, 32] and meta["target"]["kind"] == "llvm"
    assert set(meta["timings_s"]) >= {"build", "validate"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    assert result.artifact == tmp_path / "art"


@pytest.mark.parametrize("form, embed", [("conv", False), ("matmul", True)])
def test_conv_form_and_embedded_weights(tmp_path, wide_spec, form, embed, capfd):
    """At LayerNorm epsilon 1e-2 (the default 1e-6 would hide an epsilon lost on the way), float32
    against the float64 reference within 1e-5 (measured ~3e-7)."""
    wide_spec = wide_spec.replace(layer_norm_eps=1e-2)
    result = _compile(wide_spec, tmp_path / "art", form=form, embed_weights=embed, seed=2)
    assert result.validation.max_rel_error < FP32
    # built for a CPU, the conv form's convolutions run as GEMMs (TVM's conv kernels: far slower)
    assert any(p["name"] == "convs_as_gemms" and p["changes"] for p in result.metadata.passes) == (form == "conv")
    assert (tmp_path / "art" / "weights.params").exists() != embed
    assert "Scope Saving" not in capfd.readouterr().err  # TVM's per-constant debug line, filtered out
    model = runtime.load(tmp_path / "art")
    assert "Scope Loaded" not in capfd.readouterr().err  # TVM's per-constant debug line, filtered out
    images = np.random.default_rng(0).standard_normal((2, 3, 32, 48)).astype(np.float32)
    from mixer_compile.model import reference
    from mixer_compile.model.params import random_weights
    spec, weights = wide_spec.replace(gelu="tanh"), random_weights(wide_spec, 2)
    out = model(images)
    assert rel_error(out, reference.forward(spec, weights, images)) < FP32
    assert rel_error(out, reference.forward(spec.replace(layer_norm_eps=1e-6), weights, images)) > FP32


def test_failed_validation_leaves_no_artifact(tmp_path, tiny_spec, monkeypatch):
    from mixer_compile.check import validate

    real = validate.reference.forward
    monkeypatch.setattr(validate.reference, "forward", lambda *a: real(*a) + 1.0)
    with pytest.raises(ValidationError, match="disagrees with the reference: FAILED.*no artifact was marked good"):
        _compile(tiny_spec, tmp_path / "art")
    assert list(tmp_path.iterdir()) == []


def test_build_for_a_cpu_this_machine_lacks_is_checked_here_not_run(tmp_path, tiny_spec):
    """A build for another CPU (Sapphire Rapids: AMX and AVX-512 FP16, which no AMD CPU has) is
    not run here, where it would die of an illegal instruction: the same lowering is built for
    this CPU and validated, and the record names what is missing and that the target's run is
    pending; the artifact is the target's."""
    target = tmp_path / "spr.json"
    target.write_text(json.dumps({"target": {"kind": "llvm", "mtriple": "x86_64-linux-gnu",
                                             "mcpu": "sapphirerapids", "num-cores": 4}}))
    if cannot_run(str(target)) is None:  # a Sapphire Rapids or later with its AMX exposed
        pytest.skip("this CPU runs Sapphire Rapids code")
    result = compile_model(CompileOptions(spec=tiny_spec, target=str(target), out_dir=tmp_path / "a"))
    assert result.validation.passed and result.validation.max_rel_error < FP32
    assert "the same lowering built for it; spr run pending" in result.validation.where
    assert "amx-tile" in result.validation.where
    assert result.metadata.target["requires"]["cpu"]["mcpu"] == "sapphirerapids"
    with pytest.raises(ArtifactError, match="needs CPU features this machine lacks"):
        runtime.load(tmp_path / "a")


def test_rebuild_replaces_artifact_atomically(tmp_path, tiny_spec):
    _compile(tiny_spec, tmp_path / "art", seed=1)
    _compile(tiny_spec, tmp_path / "art", seed=2)
    meta = json.loads((tmp_path / "art" / "metadata.json").read_text())
    assert meta["weights"]["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="exists and is not a mixer-compile artifact"):
        _compile(tiny_spec, tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    (tmp_path / "other" / "metadata.json").write_text('{"name": "another tool"}')  # not ours either
    with pytest.raises(ArtifactError, match="exists and is not a mixer-compile artifact"):
        _compile(tiny_spec, tmp_path / "other")
    (tmp_path / "art" / "notes.txt").write_text("mine")  # a user's file inside an artifact: the swap would delete it
    with pytest.raises(ArtifactError, match=r"'.*art' holds files that are not part of an artifact \(notes.txt\), "
                                            r"which replacing it would delete; move them out or choose another"):
        _compile(tiny_spec, tmp_path / "art", seed=3)
    assert (tmp_path / "art" / "notes.txt").read_text() == "mine"
    assert json.loads((tmp_path / "art" / "metadata.json").read_text())["weights"]["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "other"]


@pytest.mark.slow
def test_mixer_b16_compiles_and_validates(tmp_path):
    from mixer_compile.model.spec import PRESETS

    result = _compile(PRESETS["mixer_b16"], tmp_path / "b16")
    assert result.validation.max_rel_error < 1e-4


def test_cli_reads_the_spec_off_a_checkpoint_without_spec(tmp_path, testdata, capsys):
    """`mixer-compile --weights ckpt` with no --spec: the configuration is the checkpoint's
    (its shapes: widths, depth, classes, a square grid), its GELU the format's (timm: erf)."""
    from mixer_compile.cli import main

    assert main(["--weights", str(testdata / "tiny_square.pth"), "--batch", "2", "-o", str(tmp_path / "art")]) == 0
    assert "compiled tiny_square (32x32, patch 8, batch 2, erf GELU)" in capsys.readouterr().out
    logits = runtime.load(tmp_path / "art")(np.load(testdata / "tiny_square_input.npy"))
    assert rel_error(logits, np.load(testdata / "tiny_square_logits_erf.npy")) < 2e-5
