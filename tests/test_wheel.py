"""The wheel is the product: built with `pip wheel`, installed somewhere that is not the source
tree and run from a directory outside the repository, it must find its target files and the
shipped tuning records (the package data mixer_compile.targets and mixer_compile.schedules,
kept at the repository's top level) and know its version."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
# left behind by builds, tests and tools: never part of a build's input
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                     ".pytest_cache", "out", ".whl", ".gpu")

# what the installed copy reports, run from outside the repository
_PROBE = """
import importlib.metadata, json
import mixer_compile
from mixer_compile.backend.target import TARGETS_DIR, get_target
from mixer_compile.tune.database import SCHEDULES_DIR, has_records, shipped_db_dirs

dirs = shipped_db_dirs(get_target("znver4"))
print(json.dumps({
    "file": mixer_compile.__file__,
    "version": mixer_compile.__version__,
    "dist": str(importlib.metadata.distribution("mixer-compile").locate_file("")),
    "targets_dir": str(TARGETS_DIR),
    "schedules_dir": str(SCHEDULES_DIR),
    "znver4_dbs": [str(d) for d in dirs],
    "znver4_has_records": [has_records(d) for d in dirs],
}))
"""


def _inside(path: str | Path, root: Path) -> bool:
    return Path(path).resolve().is_relative_to(root.resolve())


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _build_wheel(tmp_path: Path) -> Path:
    """`pip wheel . --no-deps` on a clean copy of the source tree: an in-tree build reuses
    build/lib, where modules deleted since the last build would still go into the wheel."""
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=_NOT_SOURCE, symlinks=True)
    cmd = [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-w", str(tmp_path / "dist")]
    try:  # the venv's setuptools builds the wheel itself from 70.1 on: no download needed
        if tuple(int(x) for x in version("setuptools").split(".")[:2]) >= (70, 1):
            cmd.append("--no-build-isolation")
    except Exception:
        pass
    _run(cmd, cwd=src)
    (wheel,) = (tmp_path / "dist").glob("mixer_compile-*.whl")
    return wheel


def test_version_is_pyprojects():
    import mixer_compile

    assert mixer_compile.__version__ == VERSION


def test_wheel_installs_and_runs_outside_the_repo(tmp_path):
    wheel = _build_wheel(tmp_path)
    assert wheel.name.startswith(f"mixer_compile-{VERSION}-")

    names = set(zipfile.ZipFile(wheel).namelist())
    want = {f"mixer_compile/targets/{p.name}" for p in (REPO / "targets").glob("*.json")}
    want |= {f"mixer_compile/schedules/{p.parent.name}/{p.name}" for p in (REPO / "schedules").glob("*/*.json")}
    assert any(n.startswith("mixer_compile/targets/") for n in want)
    assert any(n.startswith("mixer_compile/schedules/") for n in want)
    # every module too: the package list in pyproject.toml is explicit, and a subpackage missing
    # there still imports in an editable install
    want |= {p.relative_to(REPO).as_posix() for p in (REPO / "mixer_compile").rglob("*.py")
             if "__pycache__" not in p.parts}
    assert not want - names, f"missing from {wheel.name}: {sorted(want - names)}"
    assert not {"mixer_compile/targets.py", "mixer_compile/schedules.py"} & names
    assert {n.split("/")[0] for n in names} == {"mixer_compile", f"mixer_compile-{VERSION}.dist-info"}

    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(wheel)], cwd=tmp_path)

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert not _inside(run_dir, REPO)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH")}
    env.update(PYTHONPATH=str(site), MIXER_COMPILE_CACHE=str(tmp_path / "cache"))

    listed = _run([sys.executable, "-m", "mixer_compile.cli", "targets"], cwd=run_dir, env=env).stdout
    first_words = {line.split()[0] for line in listed.splitlines() if line.strip()}
    assert {"llvm", "znver4", "avx2", "cuda", "sm_80", "sm_90"} <= first_words, listed

    got = json.loads(_run([sys.executable, "-c", _PROBE], cwd=run_dir, env=env).stdout)
    assert _inside(got["file"], site) and not _inside(got["file"], REPO), got["file"]
    assert _inside(got["dist"], site), got["dist"]
    assert _inside(got["targets_dir"], site), got["targets_dir"]
    assert _inside(got["schedules_dir"], site), got["schedules_dir"]
    assert got["version"] == VERSION
    assert len(got["znver4_dbs"]) == 1 and _inside(got["znver4_dbs"][0], site), got["znver4_dbs"]
    assert Path(got["znver4_dbs"][0]).name == "znver4"
    assert got["znver4_has_records"] == [True]
