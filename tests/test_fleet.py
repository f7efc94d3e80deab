"""Tuning through TVM's RPC tracker on 127.0.0.1, and the faults a fleet brings.

A tracker and RPC servers are started as TVM ships them (`python -m tvm.exec.rpc_tracker`,
`python -m tvm.exec.rpc_server`), each in its own process group on a free port of 127.0.0.1,
and killed in `finally` blocks. Every wait is bounded. The servers log one `load_module`
line per candidate they measure: that is how a test knows a measurement went through RPC.

Every tuning process starts worker pools and a search (seconds on this 2-core machine, per
kernel too), so the runs are kept to the fewest kernels that still show the behaviour: the
kill and resume cases tune a single matmul through the API, and the command line is run on
the tiny spec only up to its first kernel.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from mixer_compile.backend.target import get_target
from mixer_compile.errors import TuningError
from mixer_compile.tune import fleet
from mixer_compile.tune.database import RECORDS, scan
from tests.helpers import cli, error_line

KEY = "mixer-test"
FAILED_SECS = 1e10  # MetaSchedule's run_secs for a candidate whose build or run failed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", *args], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """Kills the process and whatever it forked (its own process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _wait(condition, what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


@contextmanager
def rpc_fleet(logs: Path, servers: int = 2) -> Iterator[tuple[fleet.Fleet, list[subprocess.Popen]]]:
    """A tracker and `servers` RPC servers under KEY; yields the Fleet and the server processes."""
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    here = fleet.Fleet("127.0.0.1", port, KEY)
    procs = []
    try:
        procs.append(_start(["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port),
                             "--port-end", str(port + 1)], logs / "tracker.log"))
        for i in range(servers):
            server_port = free_port()
            procs.append(_start(["tvm.exec.rpc_server", "--tracker", here.address, "--key", KEY, "--host",
                                 "127.0.0.1", "--port", str(server_port), "--port-end", str(server_port + 1)],
                                logs / f"server{i}.log"))

        def all_registered() -> bool:
            try:
                return fleet.servers(here) == servers
            except TuningError:
                return False

        _wait(all_registered, f"{servers} RPC servers to register with the tracker")
        yield here, procs[1:]
    finally:
        for proc in procs:
            _stop(proc)


def measured_on(logs: Path) -> list[int]:
    """Candidates each server loaded for measurement, from its log."""
    return [p.read_text(errors="replace").count("load_module") for p in sorted(logs.glob("server*.log"))]


def records(db: Path) -> list[list[float]]:
    """run_secs of every record in the database, in file order."""
    return [json.loads(line)[1][1] for line in (db / RECORDS).read_text().splitlines() if line.strip()]


def matmul_module(n: int = 60):
    """One kernel: the smallest model that still goes through the whole tuning path (60 is
    no multiple of the vector width: MetaSchedule's generic space, which has candidates for
    any budget, rather than gemm_space's handful)."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((n, n), "float32"))
    w = relax.Var("w", relax.TensorType((n, n), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.matmul(x, w))
        bb.emit_func_output(y)
    return bb.get()


def one_error_line(*args: str, cwd: Path) -> str:
    proc = cli(*args, cwd=cwd, timeout=120)
    return error_line(proc.returncode, proc.stderr)


def test_tracker_check_names_the_problem(tmp_path):
    """Unreachable, not a tracker, no server of the key, and a good fleet: each by message."""
    port = free_port()
    with pytest.raises(TuningError, match=f"cannot reach the RPC tracker at 127.0.0.1:{port} "):
        fleet.servers(fleet.Fleet("127.0.0.1", port, KEY))
    with socket.socket() as listener:  # accepts and answers with the wrong magic number
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        impostor = fleet.Fleet("127.0.0.1", listener.getsockname()[1], KEY)
        answer = threading.Thread(target=lambda: listener.accept()[0].sendall(b"HTTP/1.0 400\r\n"), daemon=True)
        answer.start()
        with pytest.raises(TuningError, match=f"{impostor.address} is not a TVM RPC tracker"):
            fleet.servers(impostor)
    with rpc_fleet(tmp_path / "logs", servers=1) as (here, _):
        assert fleet.servers(here) == 1
        with pytest.raises(TuningError, match=f"the RPC tracker at {here.address} has no server with key "
                                              f"'other' \\(keys there: {KEY}\\); start one with"):
            fleet.servers(fleet.Fleet(here.host, here.port, "other"))


def test_bad_tracker_arguments_are_one_line_errors(tmp_path, tiny_toml):
    port = free_port()  # nothing listens there
    tune = ["tune", "--spec", "tiny.toml", "--trials", "1", "--db", "db"]
    line = one_error_line(*tune, "--rpc-tracker", f"127.0.0.1:{port}", "--rpc-key", KEY, cwd=tmp_path)
    assert f"cannot reach the RPC tracker at 127.0.0.1:{port}" in line and "tvm.exec.rpc_tracker" in line
    line = one_error_line(*tune, "--rpc-tracker", "127.0.0.1", "--rpc-key", KEY, cwd=tmp_path)
    assert "--rpc-tracker must be HOST:PORT (e.g. 127.0.0.1:9190), got '127.0.0.1'" in line
    line = one_error_line(*tune, "--rpc-tracker", f"127.0.0.1:{port}", cwd=tmp_path)
    assert "--rpc-tracker needs --rpc-key" in line
    line = one_error_line(*tune, "--rpc-key", KEY, cwd=tmp_path)
    assert "--rpc-key needs --rpc-tracker HOST:PORT" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.toml"]  # no database was started


def test_tune_through_the_fleet_survives_a_killed_server(tmp_path):
    """Two servers measure; one is killed right after it loads its first candidate of the search
    (the kernel's default schedule is measured before the search: tune/search.py). The run
    finishes on the other, every trial has a record, and the lost ones are failed records
    (run_secs 1e10), which the progress lines report."""
    from mixer_compile.backend.cpu import prepare
    from mixer_compile.tune.search import tune
    from mixer_compile.tune.tasks import extract_tasks

    target = get_target("llvm")
    tasks = extract_tasks(prepare(matmul_module(), target), target, 8)
    lines: list[str] = []
    with rpc_fleet(tmp_path / "logs") as (here, servers):
        victim = servers[0]
        killed = threading.Event()

        def kill_after_first_load():
            _wait(lambda: any(line.startswith("      task 1/1 ") for line in lines), "the search to start", 600)
            before = measured_on(tmp_path / "logs")[0]
            _wait(lambda: measured_on(tmp_path / "logs")[0] > before, "a candidate measured on server 0", 600)
            _stop(victim)
            killed.set()

        killer = threading.Thread(target=kill_after_first_load, daemon=True)
        killer.start()
        summary = tune(tasks, target, tmp_path / "db", say=lines.append, seed=0, runner=fleet.rpc_runner(here))
        assert killed.is_set(), "server 0 never measured anything: " + "\n".join(lines)
        survivors = measured_on(tmp_path / "logs")
    times = records(tmp_path / "db")
    failed = sum(1 for secs in times if secs[0] >= FAILED_SECS)
    assert summary.tuned_now == len(times) == 8
    assert failed < len(times), "no candidate was measured after the kill"
    assert survivors[1] >= len(times) - failed - survivors[0]  # the rest went to server 1
    reported = sum(int(m.group(1)) for m in map(re.compile(r"(\d+) of \d+ candidates failed").search, lines) if m)
    assert reported == failed, lines
    assert scan(tmp_path / "db").clean


def test_sigint_stops_cleanly_and_the_rerun_resumes_through_the_fleet(tmp_path, tiny_toml):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while the first kernel
    is tuned: the tuner records that kernel's batch, says so and exits 130. The re-run through
    the fleet counts those records as done and keeps them; two Ctrl-C end it at once. (Every
    kernel's default schedule is measured, and recorded as its first trial, before the search.)"""
    from mixer_compile.compose import model_tasks
    from mixer_compile.model.spec import load_spec

    tasks = model_tasks(load_spec(tiny_toml), get_target("llvm"), trials=2)  # what `tune` below tunes
    with rpc_fleet(tmp_path / "logs") as (here, _):
        args = [sys.executable, "-m", "mixer_compile.cli", "tune", "--spec", "tiny.toml", "--trials", "2",
                "--db", "db", "--rpc-tracker", here.address, "--rpc-key", KEY]

        def run_until(pattern: str, interrupts: int) -> tuple[int, str]:
            err_path = tmp_path / f"stderr-{interrupts}.txt"
            with open(err_path, "w") as err:  # SIGINT's default action, as in a terminal, whatever ours is
                proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err,
                                        start_new_session=True,
                                        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
            try:
                _wait(lambda: re.search(pattern, err_path.read_text()), f"'{pattern}' from the tuner", 300)
                for _ in range(interrupts):
                    os.killpg(proc.pid, signal.SIGINT)
                    time.sleep(1)
                proc.wait(timeout=300)
            finally:
                _stop(proc)
            return proc.returncode, err_path.read_text()

        code, err = run_until(r"task 1/\d+ ", interrupts=1)
        assert code == 130 and "Traceback" not in err, err
        assert "interrupted (SIGINT): stopping once the trials in flight are recorded" in err
        assert "interrupted: every measured record is kept; run the same command again to resume" in err
        first = (tmp_path / "db" / RECORDS).read_text()
        # every kernel's default, then the first kernel's batch (its budget less the default), nothing after it
        assert len(records(tmp_path / "db")) == len(tasks) + tasks[0].trials - 1
        assert all(secs[0] < FAILED_SECS for secs in records(tmp_path / "db")), "Ctrl-C failed a candidate"
        assert sum(measured_on(tmp_path / "logs")) >= 2

        done = 1 + sum(t.trials <= 1 for t in tasks[1:])  # the first kernel, and those a default fills
        code, err = run_until(rf"{len(tasks)} kernels, {done} already tuned", interrupts=2)
        assert code in (130, -signal.SIGINT), err  # the second Ctrl-C ends it at once
        # a builder worker still importing TVM when Ctrl-C reaches the process group may print its
        # own traceback (it dies before it can ignore SIGINT); the tuner itself must not
        assert "mixer_compile/" not in err, err
        assert (tmp_path / "db" / RECORDS).read_text().startswith(first)
        assert scan(tmp_path / "db").clean
