"""The bad input sweep: every malformed input is refused with one line of our own error type.

Each case writes one malformed file (a spec, a checkpoint, a tuning database, a damaged
artifact) and feeds it to the command line or the runtime loader. The assertion is the same for
all: exit status 2 (or an ArtifactError from the loader), exactly one `error: ...` line that
names the problem, no traceback, and nothing left behind (the -o directory never appears, no
temporary or lock files; a damaged artifact is left as it was).

Spec cases run the CLI in a fresh process (they fail before TVM is imported, ~1 s each).
Checkpoint and tuning-database cases call `cli.main` in this process, which is the same code
path without paying TVM's import per case; anything but a MixerCompileError escapes `main`
and fails the test with its traceback. Artifact cases damage copies of one tiny artifact.
"""

from __future__ import annotations

import _ctypes
import hashlib
import json
import pickle
import re
import shutil
import struct
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from mixer_compile import runtime
from mixer_compile.backend.target import TargetInfo, get_target
from mixer_compile.cli import main
from mixer_compile.compiler import CompileOptions, compile_model
from mixer_compile.errors import ArtifactError
from mixer_compile.frontends.timm import to_state_dict
from mixer_compile.model.params import random_weights
from mixer_compile.util.progress import Progress
from tests.helpers import TINY, TINY_TOML, cli, edit_metadata, error_line


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))}


def run_cli_process(args: list[str], cwd: Path) -> str:
    proc = cli(*args, cwd=cwd, timeout=120)
    return error_line(proc.returncode, proc.stderr)


def run_cli_here(args: list[str], cwd: Path, capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.chdir(cwd)
    capfd.readouterr()
    code = main(args)
    return error_line(code, capfd.readouterr().err)


def assert_nothing_left(tmp_path: Path, before: dict[str, int]) -> None:
    assert _snapshot(tmp_path) == before, "the failed run left files behind"


# --- spec files -----------------------------------------------------------------------------

def _tiny_with(**changes: str) -> str:
    lines = dict(line.split(" = ", 1) for line in TINY_TOML.splitlines())
    for key, value in changes.items():
        if value is None:
            lines.pop(key)
        else:
            lines[key] = value
    return "".join(f"{k} = {v}\n" for k, v in lines.items())


SPEC_CASES = [
    # (id, file name, contents, extra CLI args, expected fragment of the error line)
    ("type-str-for-int", "s.toml", _tiny_with(hidden_dim='"big"'), [], "'hidden_dim' must be an integer, got 'big'"),
    ("type-bool-for-int", "s.toml", _tiny_with(num_blocks="true"), [], "'num_blocks' must be an integer, got True"),
    ("type-float-for-int", "s.json", json.dumps({"base": "mixer_s16", "batch": 1.5}), [],
     "'batch' must be an integer, got 1.5"),
    ("type-inf-for-int", "s.json", '{"base": "mixer_s16", "hidden_dim": 1e400}', [],
     "'hidden_dim' must be an integer, got inf"),
    ("type-nan-eps", "s.json", '{"base": "mixer_s16", "layer_norm_eps": NaN}', [],
     "'layer_norm_eps' must be a number in (0, 1), got nan"),
    ("type-str-eps", "s.toml", _tiny_with(layer_norm_eps='"1e-6"'), [], "'layer_norm_eps' must be a number"),
    ("type-null-name", "s.json", '{"base": "mixer_s16", "name": null}', [], "'name' must be a non-empty string"),
    ("type-list-gelu", "s.json", '{"base": "mixer_s16", "gelu": ["tanh"]}', [], "'gelu' must be one of tanh, erf"),
    ("image-size-one-value", "s.toml", _tiny_with(image_size="[32]"), [], "'image_size' must be an integer or [height, width]"),
    ("image-size-three-values", "s.toml", _tiny_with(image_size="[32, 32, 32]"), [], "'image_size' must be an integer"),
    ("image-size-strings", "s.toml", _tiny_with(image_size='["a", "b"]'), [], "'image_size' must be an integer"),
    ("image-size-table", "s.toml", _tiny_with(image_size="{ h = 32 }"), [], "'image_size' must be an integer"),
    ("base-not-a-string", "s.toml", 'base = 3\n', [], "spec key 'base' must be a preset name (a string), got 3"),
    ("base-a-list", "s.json", '{"base": ["mixer_s16"]}', [], "spec key 'base' must be a preset name"),
    ("base-unknown", "s.toml", 'base = "mixer_x16"\n', [], "unknown preset 'mixer_x16'; did you mean"),
    ("missing-keys", "s.toml", _tiny_with(hidden_dim=None, num_blocks=None), [],
     "spec is missing required keys: hidden_dim, num_blocks"),
    ("empty-toml", "s.toml", "", [], "spec is missing required keys: image_size, patch_size"),
    ("unknown-key", "s.toml", TINY_TOML + "channel_mlp_dim = 4\n", [],
     "unknown spec key 'channel_mlp_dim'; did you mean 'channels_mlp_dim'"),
    ("absurd-image", "s.toml", _tiny_with(image_size="1099511627776"), [], "more than 4e9 is not a Mixer"),
    ("absurd-width", "s.json", json.dumps({"base": "mixer_b16", "channels_mlp_dim": 10**12}), [], "more than 4e9"),
    ("zero-patch", "s.toml", _tiny_with(patch_size="0"), [], "'patch_size' must be positive, got 0"),
    ("negative-classes", "s.toml", _tiny_with(num_classes="-10"), [], "'num_classes' must be positive"),
    ("patch-not-dividing", "s.toml", _tiny_with(patch_size="5"), [], "image size 32x32 is not divisible by patch size 5"),
    ("batch-zero-flag", "s.toml", TINY_TOML, ["--batch", "0"], "argument --batch: expected a batch size N >= 1"),
    ("batch-range-backwards", "s.toml", TINY_TOML, ["--batch", "8-2"], "with 1 <= MIN <= MAX (e.g. 8 or 1-16), got '8-2'"),
    ("negative-seed", "s.toml", TINY_TOML, ["--seed", "-1"], "argument --seed: expected an integer >= 0, got '-1'"),
    ("bad-toml", "s.toml", 'name = "tiny\n', [], "is not valid TOML"),
    ("bad-json-trailing-comma", "s.json", '{"base": "mixer_s16",}', [], "is not valid JSON"),
    ("empty-json", "s.json", "", [], "is not valid JSON"),
    ("json-not-an-object", "s.json", "[1, 2]", [], "must hold a table/object of spec fields"),
    ("binary-garbage", "s.toml", b"\xff\xfe\x00\x81garbage", [], "is not valid TOML: 'utf-8' codec can't decode"),
    ("nested-too-deep-json", "s.json", "[" * 100_000, [], "is nested too deeply to be a spec"),
    ("nested-too-deep-toml", "s.toml", "a = " + "[" * 100_000, [], "is nested too deeply to be a spec"),
    ("spec-is-a-directory", "s.toml", None, [], "spec file 's.toml' is not a file"),
    ("spec-yaml", "s.yaml", TINY_TOML, [], "spec file 's.yaml' must be a .toml or .json file (name it so)"),
]


@pytest.mark.parametrize("name, contents, extra, message", [pytest.param(*c[1:], id=c[0]) for c in SPEC_CASES])
def test_bad_spec_file(tmp_path, name, contents, extra, message):
    path = tmp_path / name
    if contents is None:
        path.mkdir()
    elif isinstance(contents, bytes):
        path.write_bytes(contents)
    else:
        path.write_text(contents)
    before = _snapshot(tmp_path)
    line = run_cli_process(["--spec", name, *extra, "-o", "out"], cwd=tmp_path)
    assert message in line
    assert_nothing_left(tmp_path, before)


@pytest.mark.parametrize("name, text", [("s.toml", TINY_TOML), ("s.json", json.dumps({"base": "mixer_s16"}))])
def test_spec_file_starting_with_a_bom_is_read(tmp_path, name, text):
    """Editors on Windows start UTF-8 files with a byte order mark: no syntax error at line 1, column 1."""
    from mixer_compile.model.spec import load_spec

    (tmp_path / "bom").mkdir()
    (tmp_path / "bom" / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
    (tmp_path / name).write_text(text)
    assert load_spec(tmp_path / "bom" / name) == load_spec(tmp_path / name)


# --- checkpoints --------------------------------------------------------------------------

def _state(key: str | None = None, edit: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """timm state dict of the tiny spec's random weights, with tensor `key` replaced by `edit` of it."""
    sd = to_state_dict(random_weights(TINY))
    if key is not None:
        sd[key] = edit(sd[key])
    return sd


def _torch_save(path: Path, sd: dict) -> None:
    torch.save({k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in sd.items()}, path)


def _npz_bytes(weights: dict[str, np.ndarray]) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **weights)
    return buf.getvalue()


def _safetensors(path: Path, sd: dict[str, np.ndarray]) -> None:
    save_file(sd, str(path))


def _corrupt_header(path: Path) -> None:
    _safetensors(path, _state())
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    path.write_bytes(data[:8] + b"{" + b"x" * (n - 1) + data[8 + n:])


def _header_past_end(path: Path) -> None:
    _safetensors(path, _state())
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["head.bias"]["data_offsets"] = [0, 10**9]
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])


def _truncated(write: Callable[[Path], None]) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        write(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return make


class _Payload:
    """Unpickling this runs `touch PWNED`: a checkpoint that must be refused, never loaded."""

    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def _deflate_damaged(path: Path) -> None:
    """A compressed .npz whose first member's deflate data is overwritten with garbage."""
    np.savez_compressed(path, **random_weights(TINY))
    data = bytearray(path.read_bytes())
    data[50:90] = b"\xff" * 40
    path.write_bytes(bytes(data))


def _npz_member(npy: bytes) -> Callable[[Path], None]:
    """An .npz of one member, x.npy, holding these bytes."""
    import zipfile

    def write(path: Path) -> None:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("x.npy", npy)
    return write


def _npy_header(shape: str) -> bytes:
    """A version 1.0 .npy header of float64s of this shape (written as is, valid or not)."""
    text = f"{{'descr': '<f8', 'fortran_order': False, 'shape': {shape}, }}".ljust(117) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode()


def _tensor_bytes_damaged(path: Path) -> None:
    """A torch.save zip with 8 bytes of its first tensor overwritten, its CRC-32 left as it was."""
    import zipfile

    _torch_save(path, _state())
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        offset = archive.getinfo(f"{path.stem}/data/0").header_offset
    name_len, extra_len = struct.unpack_from("<HH", data, offset + 26)  # the local header's, not the directory's
    start = offset + 30 + name_len + extra_len
    data[start:start + 8] = b"\x7f" * 8
    path.write_bytes(bytes(data))


def _with_nan(w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    w["MixerBlock_1/channel_mixing/Dense_0/kernel"][3, 4] = np.nan
    return w


WEIGHTS_CASES = [
    # (id, file name, writer, expected fragment of the error line)
    ("npz-truncated", "w.npz", _truncated(lambda p: p.write_bytes(_npz_bytes(random_weights(TINY)))),
     "is not a readable .npz archive"),
    ("npz-not-a-zip", "w.npz", lambda p: p.write_text("I am a text file, not a zip\n"), "is not a readable .npz archive"),
    ("npz-object-array", "w.npz", lambda p: np.savez(p, a=np.array([{"x": 1}], dtype=object)),
     "is not a readable .npz archive (Object arrays cannot be loaded when allow_pickle=False)"),
    ("npz-nan", "w.npz", lambda p: np.savez(p, **_with_nan(random_weights(TINY))),
     "'MixerBlock_1/channel_mixing/Dense_0/kernel' holds NaN"),
    ("npz-complex-dtype", "w.npz",
     lambda p: np.savez(p, **{**random_weights(TINY), "head/bias": np.zeros(10, np.complex64)}),
     "'head/bias' has dtype complex64; expected floating point"),
    ("npz-wrong-shape", "w.npz",
     lambda p: np.savez(p, **{**random_weights(TINY), "head/kernel": np.zeros((32, 11), np.float32)}),
     "wrong shape head/kernel (32, 11) (expected (32, 10))"),
    ("npz-empty-archive", "w.npz", lambda p: np.savez(p), "missing stem/kernel, stem/bias"),
    ("npz-compressed-damaged", "w.npz", _deflate_damaged,
     "is not a readable .npz archive (Bad compressed data for file 'stem/kernel.npy': Error -3 while decompressing"),
    ("npz-header-claims-huge", "w.npz", _npz_member(_npy_header(f"({10**12},)") + bytes(64)),
     "weights file 'w.npz' is damaged: its member 'x.npy' claims a float64 array of shape (1000000000000,) "
     "(8,000,000,000,000 bytes) but holds 64 bytes of data; save the weights again with np.savez"),
    ("npz-header-cut", "w.npz", _npz_member(_npy_header("(4,")), "weights file 'w.npz' is damaged: its member "
     "'x.npy' has no readable .npy header ("),
    ("pth-tensor-bytes-damaged", "w.pth", _tensor_bytes_damaged,
     "weights file 'w.pth' is damaged (Bad CRC-32 for file 'w/data/0'); download or save it again"),
    ("pth-truncated", "w.pth", _truncated(lambda p: _torch_save(p, _state())), "is not a readable torch checkpoint: truncated, or not written by torch.save ("),
    ("pth-empty-file", "w.pth", lambda p: p.write_bytes(b""), "is not a readable torch checkpoint: truncated, or not written by torch.save (EOFError)"),
    ("pth-pickle-payload", "w.pth", lambda p: torch.save({"stem.proj.weight": _Payload()}, p),
     "was refused: it pickles objects, not only tensors, and loading those would run code from the file"),
    ("pth-raw-pickle-payload", "w.pth", lambda p: p.write_bytes(pickle.dumps({"stem.proj.weight": _Payload()})),
     "was refused: it pickles objects, not only tensors"),
    ("pth-whole-model", "w.pth", lambda p: torch.save(torch.nn.Linear(2, 2), p),
     "(torch.nn.modules.linear.Linear), and loading those would run code from the file; save the state dict "
     "instead (torch.save(model.state_dict(), path)) or a .safetensors file"),
    ("pth-an-npz-inside", "w.pth", lambda p: p.write_bytes(_npz_bytes(random_weights(TINY))),
     "is not a readable torch checkpoint: truncated, or not written by torch.save (Expected hasRecord(\"version\") to be true, but got false.)"),
    ("pth-a-list", "w.pth", lambda p: torch.save([1, 2, 3], p), "does not hold a state dict of tensors"),
    ("pth-ints-not-tensors", "w.pth", lambda p: torch.save({k: 1 for k in _state()}, p),
     "does not hold a state dict of tensors"),
    ("pth-3d-dense", "w.pth", lambda p: _torch_save(p, _state("blocks.0.mlp_tokens.fc1.weight", lambda v: v[None])),
     "'blocks.0.mlp_tokens.fc1.weight' has shape (1, 16, 16); expected a 2-D matrix"),
    ("pth-flat-stem", "w.pth", lambda p: _torch_save(p, _state("stem.proj.weight", np.ravel)),
     "'stem.proj.weight' has shape (6144,); expected a 4-D conv kernel"),
    ("pth-transposed-dense", "w.pth",
     lambda p: _torch_save(p, _state("blocks.1.mlp_channels.fc1.weight", lambda v: np.ascontiguousarray(v.T))),
     "wrong shape MixerBlock_1/channel_mixing/Dense_0/kernel (128, 32) (expected (32, 128))"),
    ("pth-wrong-spec", "w.pth", lambda p: _torch_save(p, to_state_dict(random_weights(TINY.replace(hidden_dim=24)))),
     "do not fit spec 'tiny'"),
    ("safetensors-corrupt-header", "w.safetensors", _corrupt_header, "invalid JSON in header"),
    ("safetensors-huge-header-length", "w.safetensors", lambda p: p.write_bytes(struct.pack("<Q", 10**12) + b"{}"),
     "header too large"),
    ("safetensors-offsets-past-end", "w.safetensors", _header_past_end, "is not a readable safetensors file"),
    ("safetensors-truncated", "w.safetensors", _truncated(lambda p: _safetensors(p, _state())),
     "is not a readable safetensors file"),
    ("safetensors-inf", "w.safetensors",
     lambda p: _safetensors(p, _state("head.bias", lambda v: np.full_like(v, np.inf))), "'head/bias' holds NaN or infinite"),
    ("safetensors-int-dtype", "w.safetensors",
     lambda p: _safetensors(p, _state("norm.weight", lambda v: v.astype(np.int32))),
     "'pre_head_layer_norm/scale' has dtype int32"),
    ("weights-is-a-directory", "w.npz", lambda p: p.mkdir(), "weights file 'w.npz' is not a file"),
    ("weights-unknown-extension", "w.ckpt", lambda p: p.write_bytes(b"\0" * 16), "unknown extension '.ckpt'"),
]


@pytest.mark.parametrize("name, write, message", [pytest.param(*c[1:], id=c[0]) for c in WEIGHTS_CASES])
def test_bad_checkpoint(tmp_path, tiny_toml, capfd, monkeypatch, name, write, message):
    write(tmp_path / name)
    before = _snapshot(tmp_path)
    line = run_cli_here(["--spec", "tiny.toml", "--weights", name, "-o", "out"], tmp_path, capfd, monkeypatch)
    assert message in line
    assert not (tmp_path / "PWNED").exists(), "a pickle payload in a checkpoint was executed"
    assert_nothing_left(tmp_path, before)


@pytest.mark.parametrize("command", [[], ["resize-weights", "--image-size", "64"]])
@pytest.mark.parametrize("key, shape", [("stem/kernel", (0, 0, 3, 32)),
                                        ("MixerBlock_0/token_mixing/Dense_0/kernel", (0, 16))])
def test_empty_kernel_without_a_spec_is_named(tmp_path, capfd, monkeypatch, command, key, shape):
    """The spec read off the shapes: an empty kernel is named, not divided by (a patch of 0) nor
    reported as an image size the user never gave (0 tokens)."""
    np.savez(tmp_path / "w.npz", **{**random_weights(TINY), key: np.zeros(shape, np.float32)})
    before = _snapshot(tmp_path)
    line = run_cli_here([*command, "--weights", "w.npz", "-o", "out.npz"], tmp_path, capfd, monkeypatch)
    assert line == (f"error: cannot read a Mixer configuration off w: its '{key}' has shape {shape}, with no "
                    "elements; save the weights of a trained model")
    assert_nothing_left(tmp_path, before)


def test_pickle_payload_refused_in_a_fresh_process(tmp_path, tiny_toml):
    """The same refusal through a real process: the payload must not run before the error."""
    torch.save({"stem.proj.weight": _Payload(), "head.bias": torch.zeros(10)}, tmp_path / "w.pth")
    line = run_cli_process(["--spec", "tiny.toml", "--weights", "w.pth", "-o", "out"], cwd=tmp_path)
    assert "was refused: it pickles objects, not only tensors" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.toml", "w.pth"]


# --- target files -------------------------------------------------------------------------

TARGET_CASES = [
    # (id, file or directory to make, its "target" (bytes: the whole file; None: a directory), --target, the
    # whole error line)
    ("mtriple-unknown-arch", "t.json", {"kind": "llvm", "num-cores": 2, "mtriple": "x86-64-linux-gnu"}, "t.json",
     "error: target file 't.json': unknown mtriple 'x86-64-linux-gnu'; did you mean 'x86_64-linux-gnu'? "
     "(mixer-compile builds for x86_64-linux-gnu and aarch64-linux-gnu)"),
    ("host-mtriple-unknown-arch", "t.json",
     {"kind": "cuda", "arch": "sm_90", "host": {"kind": "llvm", "mtriple": "arm-linux-gnueabihf"}}, "t.json",
     "error: target file 't.json': unknown mtriple 'arm-linux-gnueabihf'; did you mean 'aarch64-linux-gnu'? "
     "(mixer-compile builds for x86_64-linux-gnu and aarch64-linux-gnu)"),
    ("target-file-missing", None, None, "nope.json", "error: target file 'nope.json' does not exist"),
    ("target-file-missing-upper-case", None, None, "nope.JSON", "error: target file 'nope.JSON' does not exist"),
    ("target-is-a-directory", "somedir", None, "somedir", "error: 'somedir' is a directory, not a target .json file"),
    ("target-empty", None, None, "", "error: an empty target name or path (an unset shell variable?)"),
    ("target-file-not-utf8", "bin.json", b"\x00\xff", "bin.json", "error: target file 'bin.json' is not valid JSON: "
     "'utf-8' codec can't decode byte 0xff in position 1: invalid start byte"),
    ("target-file-nested-too-deeply", "t.json", b'{"target": ' + b"[" * 100_000, "t.json",
     "error: target file 't.json' is nested too deeply to be a target"),
    ("mattr-entry-without-sign", "t.json",
     {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver3", "num-cores": 2, "mattr": ["+fma", "avx2"]},
     "t.json", "error: target file 't.json': 'mattr' entry 'avx2' lacks its '+' or '-': write \"+avx2\" to use the "
     "feature, \"-avx2\" not to"),
    # LLVM's comma-separated string is taken as the list; with "mcpu": "host" too, which adds to that list
    ("mattr-string-is-split-on-commas", "t.json",
     {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver3", "num-cores": 2, "mattr": "+avx2,+avx9"},
     "t.json", "error: target file 't.json': LLVM knows no CPU feature 'avx9' for x86_64-linux-gnu; did you mean "
     "'avx'? (give ones of `llc -mtriple=x86_64-linux-gnu -mattr=help`)"),
    ("mattr-string-with-mcpu-host", "t.json", {"kind": "llvm", "mcpu": "host", "num-cores": 2, "mattr": "avx2"},
     "t.json", "error: target file 't.json': 'mattr' entry 'avx2' lacks its '+' or '-': write \"+avx2\" to use the "
     "feature, \"-avx2\" not to"),
    ("mattr-not-a-list", "t.json", {"kind": "llvm", "num-cores": 2, "mattr": 5}, "t.json",
     "error: target file 't.json': 'mattr' must be a list of CPU features such as [\"+avx2\", \"-avx512f\"] (or "
     "LLVM's \"+avx2,-avx512f\"), got 5"),
    ("num-cores-missing", "t.json", {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver3"}, "t.json",
     "error: target file 't.json': 'num-cores' is missing; 'num-cores' must be the number of cores to run on (1 to "
     "1024, or \"host\" for this machine's)"),
    ("num-cores-missing-hides-no-bad-mcpu", "t.json", {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver9"},
     "t.json", "error: target file 't.json': LLVM knows no CPU 'znver9' for x86_64-linux-gnu; did you mean 'znver5'? "
     "(give one of `llc -mtriple=x86_64-linux-gnu -mcpu=help`, or \"host\" for this machine's)"),
    ("num-cores-too-many", "t.json",
     {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver3", "num-cores": 100_000}, "t.json",
     "error: target file 't.json': 'num-cores' must be the number of cores to run on (1 to 1024, or \"host\" for "
     "this machine's), got 100000"),
]


# an mtriple LLVM does not know crashed TVM's LLVM queries (SIGSEGV): those cases run in a fresh
# process, so that a crash fails them alone; the others run here (a process costs ~4 s)
CRASHED_A_PROCESS = {"mtriple-unknown-arch", "host-mtriple-unknown-arch"}


@pytest.mark.parametrize("case, name, config, target, message", [pytest.param(*c, id=c[0]) for c in TARGET_CASES])
def test_bad_target_file(tmp_path, tiny_toml, capfd, monkeypatch, case, name, config, target, message):
    if isinstance(config, bytes):
        (tmp_path / name).write_bytes(config)
    elif config is not None:
        (tmp_path / name).write_text(json.dumps({"target": config}))
    elif name is not None:
        (tmp_path / name).mkdir()
    before = _snapshot(tmp_path)
    args = ["--spec", "tiny.toml", "--target", target, "-o", "out"]
    line = (run_cli_process(args, cwd=tmp_path) if case in CRASHED_A_PROCESS
            else run_cli_here(args, tmp_path, capfd, monkeypatch))
    assert line == message
    assert_nothing_left(tmp_path, before)


def test_target_file_is_read_whatever_the_case_of_its_suffix_and_names_win_over_paths(tmp_path, monkeypatch):
    """t.JSON is a target file like t.json; a directory named like a target (the -o llvm of an
    earlier build) does not hide the target."""
    config = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3", "num-cores": 2}
    (tmp_path / "t.JSON").write_text(json.dumps({"target": config}))
    (tmp_path / "avx2").mkdir()
    monkeypatch.chdir(tmp_path)
    assert get_target("t.JSON") == TargetInfo("t", "", config)
    assert get_target("avx2").name == "avx2"


# --- artifacts ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_spec) -> Path:
    out = tmp_path_factory.mktemp("bad-input") / "art"
    compile_model(CompileOptions(spec=tiny_spec.replace(batch=1), seed=5, out_dir=out), Progress(6, quiet=True))
    return out


def _edit(change: Callable[[dict], object]) -> Callable[[Path], None]:
    return lambda art: edit_metadata(art, change)


def _replace_and_rehash(name: str, data: bytes) -> Callable[[Path], None]:
    """A file swapped for garbage with the metadata made to match: only the loader can tell."""
    def rehash(meta: dict) -> None:
        meta["files"][name] = hashlib.sha256(data).hexdigest()
        meta["file_sizes"][name] = len(data)

    def apply(art: Path) -> None:
        (art / name).write_bytes(data)
        edit_metadata(art, rehash)
    return apply


def _truncate(name: str) -> Callable[[Path], None]:
    def apply(art: Path) -> None:
        data = (art / name).read_bytes()
        (art / name).write_bytes(data[: len(data) // 3])
    return apply


ARTIFACT_CASES = [
    # (id, damage, expected fragment of the message)
    ("library-truncated", _truncate("model.so"), "model.so is truncated"),
    ("library-missing", lambda a: (a / "model.so").unlink(), "is incomplete: model.so is missing"),
    ("library-garbage-rehashed", _replace_and_rehash("model.so", b"\x7fELF" + b"\0" * 60), "cannot load"),
    # a real shared library, not TVM's (Python's own _ctypes), given the metadata's hashes
    ("library-foreign-rehashed", _replace_and_rehash("model.so", Path(_ctypes.__file__).read_bytes()),
     "model.so is no compiled model"),
    ("weights-garbage-rehashed", _replace_and_rehash("weights.params", b"not a param dict" * 4),
     "cannot load '"),
    ("metadata-truncated", lambda a: (a / "metadata.json").write_text((a / "metadata.json").read_text()[:200]),
     "metadata.json' is not valid JSON"),
    ("metadata-not-utf8", lambda a: (a / "metadata.json").write_bytes(b"\xff\xfe{}"), "is not valid JSON"),
    ("metadata-a-list", lambda a: (a / "metadata.json").write_text("[1]"), "has format version None"),
    ("format-version-2", _edit(lambda m: m.update(format_version=2)),
     "has metadata schema 2, newer than this mixer-compile reads (1); upgrade mixer-compile or rebuild the artifact"),
    ("format-version-0", _edit(lambda m: m.update(format_version=0)), "has format version 0; this mixer-compile reads version 1"),
    ("format-version-string", _edit(lambda m: m.update(format_version="1")), "has format version '1'"),
    ("metadata-no-input", _edit(lambda m: m.pop("input")), "field 'input' must be an object, got None"),
    ("metadata-files-a-list", _edit(lambda m: m.update(files=["model.so"])), "field 'files' must be an object"),
    ("metadata-sizes-strings", _edit(lambda m: m["file_sizes"].update({"model.so": "big"})), "field 'file_sizes'"),
    ("metadata-input-shape-edited", _edit(lambda m: m["input"].update(shape=[1, 3, 64, 64])),
     "input shape [1, 3, 64, 64] does not match the spec's [1, 3, 32, 32]"),
    ("metadata-output-shape-edited", _edit(lambda m: m["output"].update(shape=[1, 1000])),
     "output shape [1, 1000] does not match the spec's [1, 10]"),
    ("metadata-no-output", _edit(lambda m: m.pop("output")), "field 'output' must be an object, got None"),
    ("metadata-weights-unlisted", _edit(lambda m: m["files"].pop("weights.params")), "'files' lacks weights.params"),
    ("metadata-param-renamed", _edit(lambda m: m["params"].__setitem__(0, "stem.W")),
     "'main' takes parameters other than those metadata.json's 'params' lists"),
    ("metadata-cuda-without-arch", _edit(lambda m: m["target"].update(kind="cuda")),
     "a CUDA build without 'target.requires.gpu_arch'"),
    ("metadata-unknown-field", _edit(lambda m: m.update(signed_by="me")),
     "has fields this schema does not define (signed_by)"),
    ("metadata-required-field-missing", _edit(lambda m: m.pop("built_at")), "lacks the fields built_at"),
    ("metadata-tvm-version-number", _edit(lambda m: m.update(tvm_version=27)), "field 'tvm_version' must be a version"),
    ("metadata-tvm-version-word", _edit(lambda m: m.update(tvm_version="banana")), "field 'tvm_version' must be a version"),
    ("metadata-file-outside", _edit(lambda m: m["files"].update({"../payload": "0" * 64})),
     "field 'files' must be an object of SHA-256 strings of model.so and weights.params"),
    ("metadata-cpu-requirement-malformed", _edit(lambda m: m["target"].update(requires={"cpu": {}})),
     "field 'target.requires.cpu' must be an object with 'arch', 'mcpu' and a list of 'features'"),
    ("metadata-unknown-target-kind", _edit(lambda m: m["target"].update(kind="rocm")),
     "field 'target.kind' must be 'llvm' or 'cuda'"),
    ("metadata-unknown-input-dtype", _edit(lambda m: m["input"].update(dtype="banana")),
     "field 'input.dtype' must be 'float32', 'float16' or 'bfloat16'"),
    ("metadata-negative-size", _edit(lambda m: m["file_sizes"].update({"model.so": -1})),
     "field 'file_sizes' must be an object of byte counts"),
    ("metadata-params-reordered", _edit(lambda m: m["params"].reverse()),
     "'main' takes parameters in another order than metadata.json's 'params' lists"),
    ("metadata-of-another-build", _edit(lambda m: m["params"].pop()),  # one parameter fewer than the library takes
     "which metadata.json says takes"),
    ("metadata-missing", lambda a: (a / "metadata.json").unlink(), "is not an artifact: metadata.json is missing"),
]


@pytest.mark.parametrize("damage, message", [pytest.param(*c[1:], id=c[0]) for c in ARTIFACT_CASES])
def test_bad_artifact(artifact, tmp_path, damage, message):
    art = shutil.copytree(artifact, tmp_path / "art")
    damage(art)
    before = _snapshot(tmp_path)
    with pytest.raises(ArtifactError) as err:
        runtime.load(art)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert _snapshot(tmp_path) == before, "the loader changed the artifact"



# --- tuning databases ---------------------------------------------------------------------
# A damaged database is not fatal by design (issue 3): every bad line is skipped with a warning
# naming the file and the line, the good records are used, and a compile goes on. So these
# cases assert that outcome: exit 0, the warnings, no traceback, and the files left as they were
# (a compile only reads them; `tune` repairs a database it writes, keeping the original aside).

def _database(db: Path) -> None:
    """Two genuine records of one small workload (not one of the tiny model's kernels)."""
    import tvm
    from tvm import te
    from tvm.s_tir import meta_schedule as ms

    a, b = te.placeholder((16, 16), name="A"), te.placeholder((16, 16), name="B")
    k = te.reduce_axis((0, 16), name="k")
    c = te.compute((16, 16), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="C")
    mod = tvm.IRModule({"main": te.create_prim_func([a, b, c])})
    db.mkdir()
    database = ms.database.JSONDatabase(str(db / "database_workload.json"), str(db / "database_tuning_record.json"),
                                        allow_missing=True)
    workload = database.commit_workload(mod)
    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    for secs in (1e-3, 2e-3):
        database.commit_tuning_record(ms.database.TuningRecord(
            tvm.s_tir.Schedule(mod).trace, workload, [secs], target, ms.arg_info.ArgInfo.from_prim_func(mod["main"])))


def _damage(name: str, change: Callable[[str], str]) -> Callable[[Path], None]:
    def make(db: Path) -> None:
        _database(db)
        (db / name).write_text(change((db / name).read_text()))
    return make


DATABASE_CASES = [
    # (id, writer, warnings expected: (file, line) pairs)
    ("record-line-truncated", _damage("database_tuning_record.json", lambda t: t[: len(t) - 40]),
     [("database_tuning_record.json", 2)]),
    ("record-line-not-json", _damage("database_tuning_record.json", lambda t: "}{ not json\n" + t),
     [("database_tuning_record.json", 1)]),
    ("record-unknown-workload", _damage("database_tuning_record.json", lambda t: t.replace("[0,", "[7,", 1)),
     [("database_tuning_record.json", 1)]),
    ("records-file-binary", lambda db: (_database(db), (db / "database_tuning_record.json").write_bytes(b"\x00\xff" * 64)),
     [("database_tuning_record.json", 1)]),
    ("workload-file-not-json", _damage("database_workload.json", lambda t: "garbage\n"),
     [("database_workload.json", 1), ("database_tuning_record.json", 1), ("database_tuning_record.json", 2)]),
    ("both-files-empty", lambda db: (db.mkdir(), (db / "database_workload.json").write_text(""),
                                     (db / "database_tuning_record.json").write_text("")), []),
]


@pytest.mark.parametrize("write, expected", [pytest.param(*c[1:], id=c[0]) for c in DATABASE_CASES])
def test_bad_tuning_database_is_skipped_by_line(tmp_path, tiny_toml, capfd, monkeypatch, recwarn, write, expected):
    """In this process pytest records the warnings (the CLI prints each as `warning: ...`)."""
    write(tmp_path / "db")
    before = _snapshot(tmp_path / "db")
    monkeypatch.chdir(tmp_path)
    capfd.readouterr()
    code = main(["--spec", "tiny.toml", "--db", "db", "-o", "out"])
    err = capfd.readouterr().err
    assert code == 0 and "Traceback" not in err and "error:" not in err, err
    messages = [str(w.message) for w in recwarn]
    warned = [re.match(r"(?:\S*/)?db/(database_\w+\.json):(\d+): bad", m) for m in messages]
    assert [(m.group(1), int(m.group(2))) for m in warned if m] == expected, messages
    assert all("\n" not in m for m in messages)
    assert _snapshot(tmp_path / "db") == before, "a compile changed the database it reads"
    assert (tmp_path / "out" / "model.so").is_file()


def test_choose_form_with_a_form_is_one_line_error(tmp_path, tiny_toml):
    line = run_cli_process(["--spec", "tiny.toml", "--choose-form", "--form", "conv", "-o", "out"], cwd=tmp_path)
    assert line == ("error: --choose-form builds and times every form, so --form conv would be ignored; "
                    "give one of them")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.toml"]


@pytest.mark.parametrize("db", ["missing", "a-file"])
def test_compile_with_a_database_that_is_not_one_is_one_line_error(tmp_path, tiny_toml, db):
    (tmp_path / "a-file").write_text("I am a file\n")
    line = run_cli_process(["--spec", "tiny.toml", "--db", db, "-o", "out"], cwd=tmp_path)
    assert line == (f"error: tuning database '{db}' is not a directory; give the one `mixer-compile tune --db` "
                    "wrote, or add --tune to tune into it")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "tiny.toml"]


def test_tune_into_a_file_is_one_line_error(tmp_path, tiny_toml):
    (tmp_path / "db").write_text("I am a file\n")
    line = run_cli_process(["tune", "--spec", "tiny.toml", "--trials", "1", "--db", "db"], cwd=tmp_path)
    assert line == (f"error: cannot write the tuning database 'db': '{tmp_path / 'db'}' is not a directory; give "
                    "--db a directory this user can write (or set MIXER_COMPILE_CACHE)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db", "tiny.toml"]
    assert (tmp_path / "db").read_text() == "I am a file\n"


def test_tune_shipping_where_it_cannot_write_stops_before_tuning(tmp_path, tiny_toml):
    (tmp_path / "schedules").write_text("I am a file\n")
    line = run_cli_process(["tune", "--spec", "tiny.toml", "--target", "avx2", "--trials", "1", "--db", "db",
                            "--ship-to", "schedules/avx2"], cwd=tmp_path)
    assert re.fullmatch(r"error: cannot ship records to '\S*/schedules/avx2': '\S*/schedules' is not a directory; "
                        r"give --ship-to a directory this user can write", line), line
    line = run_cli_process(["tune", "--spec", "tiny.toml", "--trials", "1", "--db", "db", "--ship-to", "elsewhere"],
                           cwd=tmp_path)
    assert line.startswith("error: ship records for a named target (--target avx2, znver4, sm_90...): 'llvm' is "), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["schedules", "tiny.toml"]  # no database: nothing tuned


def test_a_batch_beyond_tvms_32_bit_indexing_is_refused_with_the_largest_that_builds():
    """TVM 0.27 fails deep in its pipeline on a tensor of 2^31 elements or more; such a batch is
    refused in one line before anything is built. Mixer-B/16's largest tensor per image is the
    channel-mixing hidden layer, 196 x 3072 (2^31 // 602112 = 3566 images), on a CPU (held as the
    batch's rows: passes/batch_as_rows.py); on a GPU
    the library GEMMs alone touch it, and the 196 x 768 activations (14266 images) bound it, with
    the image, of the same size, named: the first in graph order, whatever the hash seed."""
    from mixer_compile.backend.target import get_target
    from mixer_compile.compose import compose
    from mixer_compile.errors import MixerCompileError
    from mixer_compile.model.spec import load_spec

    b16 = load_spec("mixer_b16")
    with pytest.raises(MixerCompileError, match=r"^batch 3567 makes the 699132x3072 tensor b\d+\.ch\.gelu\.rows "
                                                r"\(2\.15e\+09 elements\), beyond the 2\^31 .* the largest batch is 3566"):
        compose(b16.replace(batch=3567), get_target("llvm"))
    compose(b16.replace(batch=3567), get_target("sm_90"), dtype="float16")  # within a GPU's bound: builds
    with pytest.raises(MixerCompileError, match=r"^batch 14267 makes the 14267x3x224x224 tensor image .* the largest "
                                                r"batch is 14266: run larger batches"):
        compose(b16.replace(batch=14267), get_target("sm_90"), dtype="float16")


def test_a_failed_gpu_build_says_tvms_error_not_the_ir_after_it():
    from mixer_compile.backend.cuda import _what_failed

    stderr = ("Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: Check failed: Literal value "
              "2227814400 exceeds range of int32\n\nError in pass: RewriteDataflowReshape\n" + "    T.evaluate(0)\n" * 200)
    assert _what_failed(stderr) == ("ValueError: Check failed: Literal value 2227814400 exceeds range of int32 / "
                                    "Error in pass: RewriteDataflowReshape")
    assert _what_failed("ld: one\ntwo") == "ld: one\ntwo"  # nothing it knows: the last lines
    # TVM's bare "RuntimeError:", the CUDA source, then nvcc's own line (an arch this nvcc dropped)
    stderr = ("RuntimeError: \n" + "extern \"C\" __global__ void k() {}\n" * 50
              + "\nCompilation error:\nnvcc fatal   : Unsupported gpu architecture 'compute_50'\n")
    assert _what_failed(stderr) == "nvcc fatal   : Unsupported gpu architecture 'compute_50'"
