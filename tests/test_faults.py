"""Faults around the outputs: a full disk, no permission, two writers of one artifact or database.

Each failure must be one line naming the path and the problem, and leave nothing behind: no
half-written artifact, no temporary directory, no lock file. The real-disk cases mount a small
or read-only tmpfs where this process may (root); otherwise the permission case uses a
read-only directory, and the full-disk case is covered by the simulated one.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from mixer_compile import runtime
from mixer_compile.compiler import CompileOptions, compile_model
from mixer_compile.artifact.place import staged
from mixer_compile.errors import ArtifactError, MixerCompileError
from mixer_compile.model import reference
from mixer_compile.model.params import random_weights
from mixer_compile.util.atomic import write_bytes
from mixer_compile.util.locking import exclusive, lock_path
from mixer_compile.util.progress import Progress
from tests.helpers import FP32, cli, error_line, rel_error


@contextmanager
def tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A private tmpfs at `where` (e.g. 'size=64k' or 'ro'), or a skip where mounting is not allowed."""
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, timeout=30)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def test_full_disk_simulated_names_path_and_problem(tmp_path, tiny_spec, monkeypatch):
    real = pathlib.Path.write_text

    def full(self, *args, **kwargs):
        if self.name == "metadata.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    out = tmp_path / "art"
    with pytest.raises(ArtifactError) as err:
        compile_model(CompileOptions(spec=tiny_spec.replace(batch=1), out_dir=out), Progress(6, quiet=True))
    assert str(err.value) == f"cannot write artifact to '{out}': No space left on device"
    assert list(tmp_path.iterdir()) == []


def test_full_disk_for_real(tmp_path, tiny_toml):
    with tmpfs(tmp_path / "small", "size=64k") as small:
        proc = cli("--spec", "tiny.toml", "-o", small / "art", cwd=tmp_path)
        line = error_line(proc.returncode, proc.stderr)
        assert f"cannot write artifact to '{small / 'art'}'" in line and "No space left on device" in line
        assert list(small.iterdir()) == []


def test_a_full_disk_under_a_lock_leaves_no_lock_file(tmp_path):
    """The tuning database's or kernel cache's lock on a full file system: one error, and the
    empty lock file it could not write its holder into is gone."""
    with tmpfs(tmp_path / "small", "size=64k") as small:
        with open(small / "filler", "wb", buffering=0) as f, pytest.raises(OSError):
            while True:
                f.write(b"\0" * 4096)
        with pytest.raises(MixerCompileError, match=f"^cannot write lock file '{lock_path(small / 'db')}': No space "
                                                    "left on device; free some space there or write elsewhere$"):
            with exclusive(small / "db"):
                pass
        assert sorted(p.name for p in small.iterdir()) == ["filler"]


def test_a_mount_point_or_a_small_temporary_directory_is_refused_before_the_build(tmp_path, tiny_toml):
    """`docker run -v out:/out ... -o /out`: a mount point cannot be renamed onto, which failed
    after the whole build; a temporary directory too small for the build's objects exited 1
    without a word (LLVM's message went to the stderr we catch, in that same directory)."""
    with tmpfs(tmp_path / "mnt", "size=1m") as mnt:
        proc = cli("--spec", "tiny.toml", "-o", mnt, cwd=tmp_path)
        line = error_line(proc.returncode, proc.stderr)
        assert line == f"error: '{mnt}' is a mount point, which an artifact cannot be swapped onto; write it " \
                       f"into the mount, e.g. -o {mnt / 'model'}"
        proc = cli("--spec", "tiny.toml", "-o", "art", cwd=tmp_path, env={**os.environ, "TMPDIR": str(mnt)})
        line = error_line(proc.returncode, proc.stderr)
        assert line == f"error: the temporary directory '{mnt}' has 1 MB free; set TMPDIR to a directory " \
                       "with at least 64 MB free"
        assert list(mnt.iterdir()) == [] and not (tmp_path / "art").exists()


def test_an_output_name_near_the_file_system_limit_gets_short_temporaries(tmp_path, tiny_toml):
    """A 240-character name is valid; its staging directory and lock file, named after it with
    the host and PID, were not (255 bytes at most), and failed after the whole build."""
    name = "a" * 240
    proc = cli("--spec", "tiny.toml", "-o", name, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / name / "metadata.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "tiny.toml"])


def test_an_unwritable_kernel_cache_is_one_line(tmp_path, monkeypatch):
    from mixer_compile.backend import cutlass
    from mixer_compile.errors import TargetError

    with tmpfs(tmp_path / "ro", "ro") as ro:
        monkeypatch.setenv("MIXER_COMPILE_CACHE", str(ro))
        with pytest.raises(TargetError, match=f"^cannot write the kernel cache '{ro}/kernels': Read-only file "
                                              "system; set MIXER_COMPILE_CACHE to a writable directory$"):
            cutlass.compile_cached("int x;", ["g++", "-c", "SRC", "-o", "OBJ"], ".o", "a kernel")


def test_shipping_onto_a_full_disk_keeps_the_records_there(tmp_path):
    """TVM's database writer says nothing of a full disk: the truncated files replaced good
    shipped records, and the run said it shipped them all."""
    from mixer_compile.errors import TuningError
    from mixer_compile.tune import database

    source = database.SCHEDULES_DIR / "avx2"
    with tmpfs(tmp_path / "small", "size=64k") as small:
        (small / "avx2").mkdir()
        (small / "avx2" / "database_workload.json").write_text("")  # an existing (empty) set, kept as it was
        with pytest.raises(TuningError, match=r"^cannot ship records to '.*small/avx2': \d+ of \d+ records read back "
                                              r"whole \(a full disk\?\); the records there are unchanged$"):
            database.export_best(source, small / "avx2")
        assert sorted(p.name for p in (small / "avx2").iterdir()) == ["database_workload.json"]
        assert (small / "avx2" / "database_workload.json").read_text() == ""


def test_tuning_into_a_read_only_database_is_one_line(tmp_path, tiny_toml):
    with tmpfs(tmp_path / "ro", "ro") as ro:
        proc = cli("tune", "--spec", "tiny.toml", "--trials", "1", "--db", ro / "db", cwd=tmp_path)
        line = error_line(proc.returncode, proc.stderr)
        assert line.startswith(f"error: cannot write the tuning database '{ro / 'db'}': Read-only file system; "
                               "give --db a directory this user can write"), line


def test_an_artifact_on_a_noexec_mount_names_the_mount(tmp_path, tiny_spec, monkeypatch):
    """Hardened hosts mount /tmp noexec: the library's code cannot be mapped from there, which TVM
    reported as 'failed to map segment from shared object'. A CUDA build with TMPDIR there said
    only that it embedded no GPU code."""
    import shutil

    art = tmp_path / "art"
    compile_model(CompileOptions(spec=tiny_spec, out_dir=art), Progress(6, quiet=True))
    with tmpfs(tmp_path / "noexec", "noexec") as mnt:
        copy = shutil.copytree(art, mnt / "art")
        with pytest.raises(ArtifactError, match=r"^cannot load '.*/noexec/art/model.so': its file system is mounted "
                                                r"noexec, .* copy the artifact elsewhere"):
            runtime.load(copy)
        if shutil.which("nvcc"):  # a CUDA build loads what it writes to TMPDIR: TVM fell back to CUDA source
            monkeypatch.setattr(tempfile, "tempdir", str(mnt))
            with pytest.raises(MixerCompileError, match=f"^the temporary directory '{mnt}' is on a file system "
                                                        "mounted noexec, .* set TMPDIR to a directory that is not$"):
                compile_model(CompileOptions(spec=tiny_spec, target="sm_90"), Progress(5, quiet=True))


def test_no_permission_fails_before_the_build(tmp_path, tiny_toml):
    if os.geteuid() == 0:  # root ignores mode bits: a read-only file system refuses it too
        context = tmpfs(tmp_path / "ro", "ro")
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        context = nullcontext(tmp_path / "ro")
    with context as ro:
        proc = cli("--spec", "tiny.toml", "-o", ro / "sub" / "art", cwd=tmp_path)
        line = error_line(proc.returncode, proc.stderr)
        assert f"cannot write artifact to '{ro / 'sub' / 'art'}'" in line
        assert "Read-only file system" in line or "Permission denied" in line
        assert "done in" not in proc.stderr  # refused before any stage ran
        assert list(ro.iterdir()) == []


def test_lock_serialises_writers_and_leaves_no_file(tmp_path):
    target = tmp_path / "art"
    waiting, inside = threading.Event(), threading.Event()
    order = []

    def second_writer():
        with exclusive(target, say=lambda msg: waiting.set()):
            order.append("second")
            inside.set()

    with exclusive(target):
        assert lock_path(target).is_file()
        thread = threading.Thread(target=second_writer)
        thread.start()
        assert waiting.wait(60), "the second writer never reported that it waits"
        assert not inside.is_set()
        order.append("first")
    thread.join(60)
    assert order == ["first", "second"]
    assert list(tmp_path.iterdir()) == []  # the lock file went with its last holder


_KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from mixer_compile.artifact.place import staged
from mixer_compile.util.atomic import atomic_path
with staged(Path(sys.argv[1]), "x") as tmp, atomic_path(sys.argv[2]) as part:
    (tmp / "weights.npz").write_bytes(b"0" * 4096)
    part.write_bytes(b"half")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_sigkilled_writers_leftovers_go_with_the_next_write(tmp_path):
    """SIGKILL (the OOM killer, a CI timeout) skips every clean-up: the staging directory and the
    temporary file it leaves are removed by the next writer in that folder; a live process's and
    another host's temporaries stay."""
    art, npz = tmp_path / "art", tmp_path / "w.npz"
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(art), str(npz)], timeout=120)
    assert proc.returncode == -signal.SIGKILL
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2 and not art.exists() and not npz.exists(), left
    host, dead_pid = left[0].removeprefix(".art.").split("-")[:2]  # .art.HOST-PID-random
    live = tmp_path / f".art.{host}-{os.getpid()}-building"
    foreign = tmp_path / f".art.otherhost-{dead_pid}-building"
    live.mkdir()
    foreign.mkdir()
    with staged(art, "cannot write artifact to") as tmp:
        (tmp / "metadata.json").write_text("{}")
    write_bytes(npz, b"whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["art", "w.npz", live.name, foreign.name])
    assert npz.read_bytes() == b"whole"


_NO_HOME = """
import os, pathlib, tempfile
os.environ.pop("HOME", None)
os.environ.pop("XDG_CACHE_HOME", None)

def no_home(cls=None):
    raise RuntimeError("Could not determine home directory.")  # a uid without a passwd entry

pathlib.Path.home = classmethod(no_home)
import mixer_compile, tvm  # TVM works out ~/.cache on import
from mixer_compile.tune.database import cache_root
print(cache_root())
"""


def test_a_user_without_a_home_directory_gets_a_cache_in_the_temporary_directory():
    """A container's user with no passwd entry and no $HOME: TVM raised on import, before any
    of our code could say a word."""
    proc = subprocess.run([sys.executable, "-c", _NO_HOME], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == f"{tempfile.gettempdir()}/mixer-compile-cache-{os.getuid()}/mixer-compile"


def test_two_compiles_into_one_directory_give_one_good_artifact(tmp_path, tiny_toml, tiny_spec):
    """Two processes race to the same -o with different weights: the result is one complete
    artifact (library, weights and metadata from the same build), and nothing else."""
    procs = [subprocess.Popen([sys.executable, "-m", "mixer_compile.cli", "--spec", "tiny.toml", "--seed", str(seed),
                               "-o", "art"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (1, 2)]
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "tiny.toml"]
    meta = json.loads((tmp_path / "art" / "metadata.json").read_text())
    seed = meta["weights"]["seed"]
    assert seed in (1, 2)
    model = runtime.load(tmp_path / "art")  # checks every file against the metadata's hashes
    images = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    spec = tiny_spec.replace(batch=1, gelu="tanh")  # tiny.toml without --batch
    ref = reference.forward(spec, random_weights(spec, seed), images)
    assert rel_error(model(images), ref) < FP32


def test_second_tuner_waits_for_the_database_lock(tmp_path, tiny_toml):
    """A tuning run into a database another process is writing waits (and says so) before it
    reads or repairs a line of it: MetaSchedule records point at workloads by line number, so
    two appending writers would corrupt each other's records."""
    db = tmp_path / "db"
    err_path = tmp_path / "stderr.txt"
    with exclusive(db):
        with open(err_path, "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "mixer_compile.cli", "tune", "--spec", "tiny.toml",
                                     "--trials", "1", "--db", str(db)], cwd=tmp_path, stdout=subprocess.DEVNULL,
                                    stderr=err, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while "waiting for another mixer-compile process" not in err_path.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, err_path.read_text()
                time.sleep(0.5)
            assert str(lock_path(db)) in err_path.read_text()
            assert not db.exists()  # nothing read, created or repaired while the lock is held
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_ctrl_c_inside_tvm_is_interrupted_not_a_traceback(monkeypatch, capsys):
    """A Ctrl-C during a build raises KeyboardInterrupt inside TVM's C++, which hands it back as
    a TVM error of its own: the CLI still says `interrupted` and exits 130. An error with no
    Ctrl-C behind it is not hidden."""
    from mixer_compile import cli as cli_module

    def build_interrupted(args):
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            raise RuntimeError("TVM's error for the KeyboardInterrupt of a callback") from None

    monkeypatch.setattr(cli_module, "cmd_targets", build_interrupted)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert cli_module.main(["targets"]) == 130
    assert capsys.readouterr().err == "interrupted\n"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # left as main found them

    def build_terminated(args):  # SIGTERM (timeout, kill, CI) unwinds the same way: every `finally` runs
        try:
            signal.raise_signal(signal.SIGTERM)
        finally:
            cleaned.append(True)

    cleaned = []
    monkeypatch.setattr(cli_module, "cmd_targets", build_terminated)
    assert cli_module.main(["targets"]) == 128 + signal.SIGTERM and cleaned == [True]
    assert capsys.readouterr().err == "interrupted (SIGTERM)\n"

    def build_failed(args):
        raise RuntimeError("a real failure")

    monkeypatch.setattr(cli_module, "cmd_targets", build_failed)
    with pytest.raises(RuntimeError, match="a real failure"):
        cli_module.main(["targets"])


def test_ctrl_c_while_compile_tunes_keeps_the_records_and_builds_nothing(tmp_path, tiny_toml, monkeypatch, capsys):
    from mixer_compile import cli as cli_module
    from mixer_compile.tune import search

    def interrupted_tune(tasks, target, db_dir, say=print, **kwargs):
        return search.TuneSummary(tasks, 3, Path(db_dir), 1.0, True)

    monkeypatch.setattr(search, "tune", interrupted_tune)
    out = tmp_path / "art"
    code = cli_module.main(["--spec", str(tiny_toml), "--tune", "--trials", "2", "--db", str(tmp_path / "db"),
                            "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 130 and err.endswith("interrupted\n"), err
    assert not out.exists() and not list(tmp_path.glob(".art*"))
