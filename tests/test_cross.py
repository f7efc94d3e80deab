"""Builds for another CPU architecture: LLVM compiles for any, the link needs a toolchain for it.

TVM links with this machine's g++, which failed on aarch64 objects with an empty "Compilation
error" after the whole build; the cross compiler is now found ($CXX/$CC, else `<triple>-g++`
on PATH) before the build starts, or the build is refused naming what to install."""

from __future__ import annotations

import importlib.util
import json
import platform
import re
import shutil
import stat
import subprocess
import sys

import pytest

from mixer_compile import runtime
from mixer_compile.compiler import CompileOptions, compile_model
from mixer_compile.errors import ArtifactError, TargetError
from mixer_compile.util.progress import Progress
from tests.helpers import REPO

ARM = {"target": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-v1", "num-cores": 4}}
EM_AARCH64 = 183  # the ELF header's e_machine of an aarch64 object
pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="builds for aarch64 from an x86_64 machine")


@pytest.fixture
def arm_target(tmp_path):
    path = tmp_path / "graviton.json"
    path.write_text(json.dumps(ARM))
    return str(path)


def test_no_cross_compiler_is_refused_before_the_build(tmp_path, tiny_spec, arm_target, monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    progress = Progress(6, quiet=True)
    with pytest.raises(TargetError, match=r"^the graviton build is for aarch64 and this machine is x86_64; linking "
                                          r"it needs a C compiler for aarch64-linux-gnu: install one \(Debian/Ubuntu: "
                                          r"apt install g\+\+-aarch64-linux-gnu\) or set CXX to it$"):
        compile_model(CompileOptions(spec=tiny_spec, target=arm_target, out_dir=tmp_path / "art"), progress)
    assert "build" not in progress.timings and not (tmp_path / "art").exists()


def test_cxx_links_a_foreign_build(tmp_path, tiny_spec, arm_target, monkeypatch):
    """$CXX is the user's word for the compiler that links: it gets TVM's objects and writes the
    library (here a stand-in that records its command line)."""
    fake = tmp_path / "aarch64-cc"
    fake.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\nwhile [ "$1" != "-o" ]; do shift; done\n'
                    'echo stand-in > "$2"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("CXX", str(fake))
    result = compile_model(CompileOptions(spec=tiny_spec, target=arm_target, out_dir=tmp_path / "art"),
                           Progress(6, quiet=True))
    args = (tmp_path / "args").read_text().split()
    assert args[:2] == ["-shared", "-fPIC"] and any(a.endswith("lib0.o") for a in args), args
    assert (result.artifact / "model.so").read_text() == "stand-in\n"
    assert result.metadata.target["requires"]["cpu"]["arch"] == "aarch64"
    assert "aarch64" in result.validation.where and "run pending" in result.validation.where


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None,
                    reason="needs an aarch64 cross toolchain (apt install g++-aarch64-linux-gnu)")
def test_a_cross_toolchain_on_path_links_an_aarch64_library(tmp_path, tiny_spec, arm_target, monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.delenv("CC", raising=False)
    out = tmp_path / "art"
    compile_model(CompileOptions(spec=tiny_spec, target=arm_target, out_dir=out), Progress(6, quiet=True))
    header = (out / "model.so").read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == EM_AARCH64
    with pytest.raises(ArtifactError, match="was built for aarch64 CPUs and this machine is x86_64"):
        runtime.load(out)


def _check_aarch64():
    """scripts/check_aarch64.py as a module: where it keeps the aarch64 TVM runtime."""
    spec = importlib.util.spec_from_file_location("check_aarch64", REPO / "scripts" / "check_aarch64.py")
    module = sys.modules["check_aarch64"] = importlib.util.module_from_spec(spec)  # as an import would
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None or shutil.which("qemu-aarch64") is None,
                    reason="needs an aarch64 cross toolchain and qemu-user (apt install g++-aarch64-linux-gnu "
                           "qemu-user)")
def test_an_aarch64_build_of_a_timm_checkpoint_runs_under_qemu_as_timm_does():
    """The NEON build itself, run (emulated) by the C++ example against the aarch64 TVM runtime
    that scripts/check_aarch64.py keeps, gives timm's logits: what a compile for another
    architecture only validates as the same lowering built for this CPU."""
    check = _check_aarch64()
    if not (check.runtime_dir() / "tvm/lib/libtvm_runtime.so").is_file():
        pytest.skip(f"no aarch64 TVM runtime in {check.runtime_dir()}: run scripts/check_aarch64.py once")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "check_aarch64.py"), "--only", "timm"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^ok +timm checkpoint \(tiny_square.pth\) \(neoverse-v1\): max rel. error \S+, ",
                     proc.stdout, re.M), proc.stdout
