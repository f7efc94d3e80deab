"""The command line: subcommands, and every user error as one line with exit status 2."""

import json
import os
import re

import numpy as np
import pytest

from mixer_compile.backend.target import get_target
from mixer_compile.cli import main
from mixer_compile.errors import TargetError
from mixer_compile.model.params import random_weights
from mixer_compile.model.spec import PRESETS
from tests.helpers import TINY_TOML, cli, error_line


def run(*args):
    proc = cli(*args)
    return proc.returncode, proc.stdout, proc.stderr


def assert_one_line_error(capfd, args, message):
    """The CLI's `main` run here (a process costs ~2 s; test_compile_default_command_end_to_end and
    others run it in one), its stderr read at the file descriptor: LLVM's own lines count too."""
    capfd.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse's refusals
        code = exc.code
    err = capfd.readouterr().err
    assert message in error_line(code, err), err


def test_compile_default_command_end_to_end(tmp_path, tiny_toml):
    code, out, err = run("--spec", tiny_toml, "--batch", "2", "-o", tmp_path / "art")
    assert code == 0, err
    assert "compiled tiny (32x32, patch 8, batch 2, tanh GELU) for llvm" in out
    assert "validation ok: max |out-ref|/max|ref| =" in out
    for stage in ("target", "weights", "graph", "build", "validate", "write"):
        assert f"{stage} done in" in err
    assert "random init, seed 0" in err and "tokens_major:" in err
    assert (tmp_path / "art" / "model.so").is_file()
    # where the schedules came from: the databases that hold records for this CPU, or the defaults alone
    from mixer_compile.tune.database import has_records, shipped_db_dirs, user_db_dir

    host = get_target("llvm")
    used = [str(d) for d in (user_db_dir(host), *shipped_db_dirs(host)) if has_records(d)]
    assert (f"; records from {', '.join(used)}" if used else
            "; no tuning records for this target (`mixer-compile tune` refines the defaults)") in out


def test_specs_show_targets():
    code, out, _ = run("specs")
    assert code == 0 and "mixer_b16" in out and "59,880,472" in out and "25.20" in out
    code, out, _ = run("show", "--spec", "mixer_s32", "--after", "none")
    assert code == 0 and out.count("= transpose(") == 16
    code, out, _ = run("show", "--spec", "mixer_s32", "--form", "conv", "--after", "fuse_epilogues")
    assert code == 0 and "conv2d_transpose(" in out and "f32[8,1,7,7]" not in out and "f32[256,1,7,7]" in out
    code, out, _ = run("show", "--spec", "mixer_s32", "--form", "conv")  # as the host CPU's build lowers it
    assert code == 0 and "= conv2d" not in out and "// convs_as_gemms: " in out
    code, out, _ = run("targets")
    assert code == 0 and "llvm" in out and "znver4" in out


def test_a_closed_pipe_ends_quietly():
    """`mixer-compile show ... | head -1`: the reader goes away mid-output, no traceback. (H/14's
    conv form prints ~130 KB, twice a pipe's buffer: the writer is still writing when it closes.)"""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "mixer_compile.cli", "show", "--spec", "mixer_h14", "--form", "conv"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b"// token_mixing_as_conv: ")
    proc.stdout.close()  # as `head -1` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err


def test_user_errors_are_one_line(tmp_path, tiny_toml, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default -o, out/..., is made below the current directory
    assert_one_line_error(capfd, ["resize", "x"], "error: unknown command 'resize'; did you mean 'resize-weights'?")
    assert_one_line_error(capfd, ["frobnicate"], "error: unknown command 'frobnicate'; the commands are compile, specs,")
    assert_one_line_error(capfd, ["--spec", "mixer_b17"], "unknown preset 'mixer_b17'; did you mean 'mixer_b16'?")
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY_TOML.replace("image_size = 32", "image_size = 36"))
    assert_one_line_error(capfd, ["--spec", bad], "image size 36x36 is not divisible by patch size 8")
    typo = tmp_path / "typo.toml"
    typo.write_text(TINY_TOML + "num_block = 3\n")
    assert_one_line_error(capfd, ["--spec", typo], "unknown spec key 'num_block'; did you mean 'num_blocks'?")
    assert_one_line_error(capfd, ["--spec", tiny_toml, "--target", "sm90"], "unknown target 'sm90'; did you mean 'sm_90'? "
                                                                      "(known: ")
    assert_one_line_error(capfd, ["--spec", tiny_toml, "--weights", tmp_path / "none.npz"], "does not exist")
    wrong = random_weights(PRESETS["mixer_s32"].replace(
        image_size=(64, 64), hidden_dim=8, channels_mlp_dim=8, tokens_mlp_dim=4, num_blocks=1))
    np.savez(tmp_path / "wrong.npz", **wrong)
    assert_one_line_error(capfd, ["--spec", tiny_toml, "--weights", tmp_path / "wrong.npz", "-o", tmp_path / "out"],
                          "do not fit spec 'tiny'")
    assert not (tmp_path / "out").exists()
    assert_one_line_error(capfd, ["show", "--spec", "mixer_s32", "--form", "conv", "--after", "tokens_major"],
                          "pass 'tokens_major' is not in the conv pipeline")
    assert_one_line_error(capfd, ["--spec", tiny_toml, "-o", ""], "argument -o/--output: an empty path (an unset shell "
                                                           "variable?)")
    # what the file system refuses, for any path given: a name over its limit, a symbolic link loop
    assert_one_line_error(capfd, ["--spec", tmp_path / ("x" * 300 + ".toml")], ": File name too long; use a shorter path")
    long_name = tmp_path / "long.toml"  # the default -o, out/<name>-..., below a directory not made yet
    long_name.write_text(TINY_TOML.replace('name = "tiny"', f'name = "{"n" * 300}"'))
    assert_one_line_error(capfd, ["--spec", long_name], "bytes, over the file system's limit of 255; give a shorter -o (or "
                                                 "spec name)")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    assert_one_line_error(capfd, ["--spec", tiny_toml, "-o", tmp_path / "loop"], f"{tmp_path / 'loop'}: Too many levels of symbolic links; fix the symbolic link")
    no_cores = tmp_path / "mine.json"
    no_cores.write_text('{"target": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver3"}}')
    assert_one_line_error(capfd, ["--spec", tiny_toml, "--target", no_cores], "'num-cores' must be the number of cores")
    # a CPU name LLVM does not know would build for its generic CPU: refused, for a GPU target's host too
    gpu = tmp_path / "gpu.json"
    gpu.write_text('{"target": {"kind": "cuda", "arch": "sm_90", "host": {"kind": "llvm", "mcpu": "znver9"}}}')
    assert_one_line_error(capfd, ["--spec", tiny_toml, "--target", gpu], f"target file '{gpu}': LLVM knows no CPU 'znver9'")
    no_cores.write_text('{"target": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx52", '
                        '"num-cores": 2}}')
    with pytest.raises(TargetError, match="LLVM knows no CPU 'skylake-avx52' for x86_64-linux-gnu; did you mean "
                                          "'skylake-avx512'?"):
        get_target(str(no_cores))
    # what TVM itself refuses, or would guess, is refused in one line before the build
    for config, message in [({"kind": "cuda", "arch": "sm_90", "host": "banana"},
                             "is no target TVM can build: Target kind \"banana\" is not defined"),
                            ({"kind": "llvm", "num-cores": 2, "banana": 3}, "Unknown config option 'banana'"),
                            ({"kind": "cuda", "arch": "sm_9x"}, "'arch' must name an NVIDIA GPU architecture as "
                                                                "sm_XY (sm_80, sm_90, sm_90a...), got 'sm_9x'"),
                            ({"kind": "cuda"}, "names no GPU: give it an 'arch' (sm_80, sm_90...), or build with "
                                               "--target cuda for this machine's GPU"),
                            # LLVM would only log that it ignores the feature, and build without it
                            ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver3", "num-cores": 2,
                              "mattr": ["+avx2", "+avx9"]}, "LLVM knows no CPU feature 'avx9' for x86_64-linux-gnu; "
                                                            "did you mean 'avx'?")]:
        no_cores.write_text(json.dumps({"target": config}))
        with pytest.raises(TargetError, match=re.escape(message)):
            get_target(str(no_cores))
    # and from the command line, that one line only: not LLVM's own "(ignoring feature)" before it
    proc = cli("--spec", tiny_toml, "--target", no_cores, "-o", tmp_path / "never")
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "LLVM knows no CPU feature 'avx9'" in proc.stderr and not (tmp_path / "never").exists()


def test_paths_expand_the_home_directory(tmp_path, tiny_toml):
    """`-o "~/m"` (quoted, so the shell left it) is the home's m, not a directory named '~'."""
    proc = cli("--spec", tiny_toml, "-o", "~/m", cwd=tmp_path, env={**os.environ, "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m" / "metadata.json").is_file() and not (tmp_path / "~").exists()
