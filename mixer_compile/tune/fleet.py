"""Measuring tuning candidates on a fleet through TVM's own RPC tracker.

One machine is slow to tune a family of models; TVM already has the machinery for a
measurement fleet: a tracker (`python -m tvm.exec.rpc_tracker`) with which every device
registers an RPC server under a key (`python -m tvm.exec.rpc_server --tracker HOST:PORT
--key KEY`). MetaSchedule's RPCRunner asks the tracker for a free server of that key for
each candidate, so measurements spread over every server of the key, while the candidates
are still compiled here by parallel local builders.

The tracker is checked before any work: TVM's own client retries a dead address for a
minute and then raises a bare RuntimeError, which would be both slow and unhelpful. A
server that dies mid-run costs only the candidates it held: the runner reports them as
failed measurements (recorded as such, never retried as good), and the tracker hands the
remaining candidates to the servers still registered.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Any

from mixer_compile.errors import TuningError

CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Fleet:
    """A tracker address and the key its measuring servers registered under."""

    host: str
    port: int
    key: str
    session_timeout_s: int = 60  # per measurement: a candidate that hangs a server is abandoned

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def parse_tracker(text: str, key: str | None) -> Fleet:
    """`HOST:PORT` and a key, as given on the command line."""
    if not text:
        raise TuningError("--rpc-key needs --rpc-tracker HOST:PORT: the tracker the RPC servers registered with")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise TuningError(f"--rpc-tracker must be HOST:PORT (e.g. 127.0.0.1:9190), got '{text}'")
    if not key:
        raise TuningError("--rpc-tracker needs --rpc-key: the key the RPC servers registered under "
                          "(rpc_server --key KEY)")
    return Fleet(host, int(port), key)


def servers(fleet: Fleet) -> int:
    """How many servers of the fleet's key the tracker has; refuses an unreachable tracker, a
    port that is not a tracker, and a key no server registered under, each by name."""
    from tvm.rpc import base

    try:
        with socket.create_connection((fleet.host, fleet.port), timeout=CONNECT_TIMEOUT_S) as sock:
            sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            if struct.unpack("<i", base.recvall(sock, 4))[0] != base.RPC_TRACKER_MAGIC:
                raise TuningError(f"{fleet.address} is not a TVM RPC tracker; start one with "
                                  f"`python -m tvm.exec.rpc_tracker --host {fleet.host} --port {fleet.port}`")
            base.sendjson(sock, [base.TrackerCode.SUMMARY])
            summary = base.recvjson(sock)[1]
    except (OSError, RuntimeError, struct.error, ValueError, IndexError) as exc:
        raise TuningError(f"cannot reach the RPC tracker at {fleet.address} ({getattr(exc, 'strerror', None) or exc}); "
                          f"start it with `python -m tvm.exec.rpc_tracker --host {fleet.host} "
                          f"--port {fleet.port}` or fix --rpc-tracker") from None
    count = sum(1 for s in summary.get("server_info", []) if s.get("key") == f"server:{fleet.key}")
    if count == 0:
        keys = sorted({s.get("key", "").removeprefix("server:") for s in summary.get("server_info", [])})
        raise TuningError(f"the RPC tracker at {fleet.address} has no server with key '{fleet.key}' "
                          f"(keys there: {', '.join(keys) or 'none'}); start one with `python -m "
                          f"tvm.exec.rpc_server --tracker {fleet.address} --key {fleet.key}`")
    return count


def rpc_runner(fleet: Fleet) -> Any:
    """A MetaSchedule RPCRunner over the fleet, one measuring connection per server."""
    from tvm.s_tir.meta_schedule.runner import RPCConfig, RPCRunner

    from mixer_compile.util.interrupt import ignore_sigint

    count = servers(fleet)
    config = RPCConfig(tracker_host=fleet.host, tracker_port=fleet.port, tracker_key=fleet.key,
                       session_timeout_sec=fleet.session_timeout_s)
    return RPCRunner(rpc_config=config, max_workers=count, initializer=ignore_sigint)
