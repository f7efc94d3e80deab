"""Serving (issue #15): one artifact for a batch range, `mixer_compile.compile(model)` on a
timm-structured module and on a checkpoint, and batches that cannot fit refused up front.

The oracle is the shared testdata: logits of timm's own MlpMixer on its checkpoints (erf and
tanh GELU are 2e-4 apart there, so 2e-5 tells the flavours apart), and the float64 reference.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import mixer_compile
from mixer_compile import cli, runtime
from mixer_compile.artifact.format import BatchRange
from mixer_compile.errors import ArtifactError, MixerCompileError, SpecError, TargetError
from mixer_compile.frontends.timm import read as read_timm
from mixer_compile.model import reference
from mixer_compile.model.spec import MixerSpec, parse_batch

from tests.torch_model import TorchMixer

TESTDATA = Path(__file__).resolve().parent.parent.parent / "shared" / "testdata"
TIMM_TOLERANCE = 2e-5


def _spec(name: str, gelu: str) -> MixerSpec:
    config = json.loads((TESTDATA / "configs.json").read_text())[name]
    config.pop("tokens")
    config["image_size"] = tuple(config["image_size"])
    return MixerSpec(name, **config, gelu=gelu)


def _timm_module(name: str, gelu: str) -> TorchMixer:
    module = TorchMixer(_spec(name, gelu))
    module.load_state_dict(torch.load(TESTDATA / f"{name}.pth", weights_only=True))
    return module.eval()


def _rel(out, ref) -> float:
    out = out.numpy() if isinstance(out, torch.Tensor) else out
    return float(np.abs(np.asarray(out, np.float64) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """tiny_wide (non-square 4x6 grid) as a timm-structured module, compiled for batches 1-5."""
    module = _timm_module("tiny_wide", "erf")
    compiled = mixer_compile.compile(module, batch="1-5", image_size=(32, 48))
    saved = compiled.save(tmp_path_factory.mktemp("serving") / "wide")
    return compiled, saved


def test_range_artifact_records_its_entries_and_validation(wide):
    compiled, _ = wide
    meta = compiled.metadata
    assert meta.batch == {"min": 1, "max": 5, "entries": [1, 2, 4, 5],
                          "functions": ["main_b1", "main_b2", "main_b4", "main_b5"]}
    assert meta.input["shape"] == [5, 3, 32, 48] and meta.format_version == 1
    assert [v["batch"] for v in meta.validation["batches"]] == [1, 3, 5]
    assert all(v["passed"] for v in meta.validation["batches"])
    assert meta.spec["gelu"] == "erf" and meta.spec["layer_norm_eps"] == 1e-6
    assert meta.weights["origin"] == "timm" and "TorchMixer module" in meta.weights["module"]


def test_module_compile_matches_timm_logits(wide):
    compiled, saved = wide
    x = np.load(TESTDATA / "tiny_wide_input.npy")
    timm_logits = np.load(TESTDATA / "tiny_wide_logits_erf.npy")
    assert _rel(compiled(x), timm_logits) < TIMM_TOLERANCE
    out = compiled(torch.from_numpy(x))
    assert isinstance(out, torch.Tensor) and _rel(out, timm_logits) < TIMM_TOLERANCE
    np.testing.assert_array_equal(runtime.load(saved)(x), compiled(x))  # save -> load round trip


@pytest.mark.parametrize("batch", [1, 3, 5])
def test_range_matches_reference_at_its_ends_and_an_odd_batch(wide, batch):
    compiled, saved = wide
    spec = _spec("tiny_wide", "erf").replace(batch=batch)
    weights = read_timm(TESTDATA / "tiny_wide.pth")
    x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 48), dtype=np.float32)
    out = runtime.load(saved)(x)
    assert out.shape == (batch, 7)
    assert _rel(out, reference.forward(spec, weights, x)) < 1e-5
    # each image's logits are its own, however the batch was split (3 = 2+1)
    np.testing.assert_allclose(out[-1:], compiled(x[-1:]), rtol=1e-5, atol=1e-6)


def test_batch_outside_the_range_is_refused_naming_it(wide):
    compiled, _ = wide
    for n in (6, 0):
        with pytest.raises(MixerCompileError, match="serves batches 1"):
            compiled(np.zeros((n, 3, 32, 48), np.float32))
    with pytest.raises(MixerCompileError, match=r"input has batch 6; this module serves batches 1 to 5 "
                                                r"\(rebuild with --batch 1-6\)"):
        compiled(torch.zeros(6, 3, 32, 48))


def test_damaged_batch_record_is_refused(wide, tmp_path):
    _, saved = wide
    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    meta = json.loads((copy / "metadata.json").read_text())
    meta["batch"]["entries"] = [2, 4, 5]  # batch 1 could not be made
    (copy / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=r"field 'batch\.entries' must be ascending batch sizes from 1 to \d+, "
                                            r"got \[2, 4, 5\]; the file was edited or damaged, rebuild the artifact"):
        runtime.load(copy)


def test_batch_range_split_is_binary():
    r = BatchRange.of(1, 16)
    assert r.entries == (1, 2, 4, 8, 16)
    assert r.split(11) == [8, 2, 1] and r.split(16) == [16] and r.split(15) == [8, 4, 2, 1]
    assert BatchRange.of(1, 12).split(12) == [12] and BatchRange.of(1, 12).split(11) == [8, 2, 1]
    assert BatchRange.of(8, 8).entries == (8,) and BatchRange.of(8, 8).function(8) == "main"
    assert parse_batch("1-16") == parse_batch((1, 16)) == parse_batch(range(1, 17)) == (1, 16)
    assert parse_batch(8) == parse_batch("8") == (8, 8)
    empty, malformed = "is empty or not positive; give MIN-MAX with 0 < MIN <= MAX", "must be a positive integer or a range"
    for bad, why in (("16-1", empty), ((3, 2), empty), ("0-4", empty), ("0", malformed), (0, malformed),
                     (-1, malformed), ("1-2-3", malformed), ("a", malformed), (True, malformed)):
        with pytest.raises(SpecError, match=re.escape(why)):
            parse_batch(bad)


def test_checkpoint_compile_reads_its_spec_and_keeps_the_old_schema():
    compiled = mixer_compile.compile(str(TESTDATA / "tiny_square.npz"), batch=2)
    x = np.load(TESTDATA / "tiny_square_input.npy")
    assert _rel(compiled(x), np.load(TESTDATA / "tiny_square_logits_tanh.npy")) < TIMM_TOLERANCE
    assert compiled.metadata.batch is None  # a fixed batch writes what older readers read
    assert "batch" not in json.loads((compiled.path / "metadata.json").read_text())
    with pytest.raises(MixerCompileError, match="this module was built for batch 2"):
        compiled(x[:1])


def test_modules_that_are_not_a_mixer_are_refused():
    with pytest.raises(SpecError, match=r"^the module \(Linear\) is not an MLP-Mixer this compiler reads: "
                                        r"it has no 'stem' submodule"):
        mixer_compile.compile(torch.nn.Linear(3, 4))
    relu = _timm_module("tiny_square", "erf")
    relu.blocks[1].mlp_channels.act = torch.nn.ReLU()
    with pytest.raises(SpecError, match="block 1's mlp_channels activation is ReLU, not GELU"):
        mixer_compile.compile(relu)

    class Swapped(TorchMixer):  # the right parts, the wrong forward: channel mixing before token mixing
        def forward(self, x):
            x = self.stem(x)
            for block in self.blocks:
                x = x + block.mlp_channels(block.norm2(x))
                x = x + block.mlp_tokens(block.norm1(x).transpose(1, 2)).transpose(1, 2)
            return self.head(self.norm(x).mean(dim=1))

    swapped = Swapped(_spec("tiny_square", "erf"))
    swapped.load_state_dict(torch.load(TESTDATA / "tiny_square.pth", weights_only=True))
    with pytest.raises(SpecError, match="its forward is not an MLP-Mixer's"):
        mixer_compile.compile(swapped)


def test_api_arguments_are_checked_in_one_line_and_dtypes_taken_as_objects(tiny_spec):
    with pytest.raises(TargetError, match=r"^target must be a name \(llvm, avx2, cuda, sm_90...\) or a target JSON "
                                          r"file, got None$"):
        mixer_compile.compile(tiny_spec, target=None)
    with pytest.raises(SpecError, match=r"^batch must be a positive integer or a range MIN-MAX .* got -1$"):
        mixer_compile.compile(tiny_spec, batch=-1)
    compiled = mixer_compile.compile(tiny_spec, dtype=torch.float16)  # as np.float16, or "float16"
    assert compiled.metadata.precision["dtype"] == "float16" and compiled.compile_result.validation.passed


def test_a_batch_that_cannot_fit_is_refused_before_any_work(tmp_path, capsys):
    start = time.perf_counter()
    code = cli.main(["--spec", "mixer_b16", "--batch", "100000", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line, = [line for line in err.splitlines() if line.startswith("error:")]
    assert "batch 100000 of mixer_b16 needs about" in line and "GiB of memory (RAM)" in line
    assert "the largest batch that fits is about" in line
    assert not (tmp_path / "out").exists() and "[1/" not in err  # no stage started
    assert time.perf_counter() - start < 10
    with pytest.raises(MixerCompileError, match="batch 1-100000 of mixer_b16 needs about"):
        mixer_compile.compile("mixer_b16", batch="1-100000")


def test_timm_mlpmixer_itself_when_installed():
    """timm's own class (not installed here: then the timm-structured TorchMixer above stands in)."""
    mlp_mixer = pytest.importorskip("timm.models.mlp_mixer")
    config = json.loads((TESTDATA / "configs.json").read_text())["tiny_wide"]
    c = config["hidden_dim"]
    module = mlp_mixer.MlpMixer(num_classes=config["num_classes"], img_size=tuple(config["image_size"]),
                                patch_size=config["patch_size"], num_blocks=config["num_blocks"], embed_dim=c,
                                mlp_ratio=(config["tokens_mlp_dim"] / c, config["channels_mlp_dim"] / c))
    module.load_state_dict(torch.load(TESTDATA / "tiny_wide.pth", weights_only=True))
    compiled = mixer_compile.compile(module.eval(), batch="1-2")  # image size from timm's PatchEmbed
    x = np.load(TESTDATA / "tiny_wide_input.npy")
    assert _rel(compiled(x), np.load(TESTDATA / "tiny_wide_logits_erf.npy")) < TIMM_TOLERANCE


def test_save_waits_for_a_writer_of_its_destination_and_refuses_a_foreign_one(wide, tmp_path):
    """`save` swaps into place under the destination's lock, as a compile does (artifact/place.py):
    while another writer holds it, nothing appears; afterwards the copy is complete."""
    import threading

    from mixer_compile.util.locking import exclusive

    compiled, _ = wide
    out = tmp_path / "copy"
    with exclusive(out):
        saver = threading.Thread(target=compiled.save, args=(out,))
        saver.start()
        saver.join(timeout=2)
        assert saver.is_alive() and not out.exists()
    saver.join(timeout=30)
    assert not saver.is_alive() and sorted(p.name for p in out.iterdir()) == sorted(
        [*compiled.metadata.files, "metadata.json"])
    assert mixer_compile.runtime.load(out).metadata.files == compiled.metadata.files
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(mixer_compile.errors.ArtifactError, match="exists and is not a mixer-compile artifact"):
        compiled.save(tmp_path / "foreign")
    assert not list(tmp_path.glob(".foreign.*"))  # nothing half-written left beside it


def test_save_refuses_an_artifact_rebuilt_since_it_was_loaded(tmp_path, tiny_spec):
    source = tmp_path / "served"
    old = mixer_compile.compile(tiny_spec, batch=2, seed=1, out_dir=source)
    mixer_compile.compile(tiny_spec.replace(num_classes=7), batch=2, seed=2, out_dir=source)
    with pytest.raises(ArtifactError, match=r"^artifact '.*served' changed on disk since it was loaded \(model.so, "
                                            r"weights.params\); load it again to save what is there now$"):
        old.save(tmp_path / "copy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["served"]
