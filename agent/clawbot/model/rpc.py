"""The main model node's side of a split (model_server.split): its RPC workers, each reached through the loopback
end of an mTLS tunnel (stunnel, set up by roles/rpc.py) at 127.0.0.1:PORT.

llama.cpp's RPC client has no reconnect: when a worker's ggml-rpc-server goes away, llama-server aborts at its next
use of that worker ("Remote RPC server crashed or returned malformed response", naming no worker). So the
supervisor asks two things here, neither of them a protocol of clawbot's own:

* `probe`: does a worker answer through its tunnel? `llama-server --rpc 127.0.0.1:PORT --list-devices` (the
  engine's own client: it connects, says HELLO, asks the worker's device and its memory, and exits), run before
  every start and after a model server died, so the agent names the worker it waits for.
* `session_states`: is each worker's session still up while the model server runs? The TCP connections the
  model server holds to the tunnel ports, read from /proc: when a worker (or its tunnel) goes away, its stunnel
  closes the loopback end and the model server's socket sits in CLOSE_WAIT until its next use. Reading /proc
  touches nothing: ggml-rpc-server serves one client at a time, so a probe while the model server is connected
  would only wait.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

# llama-server --list-devices: "  RPC0: 127.0.0.1:50060 (7936 MiB, 5120 MiB free)"
DEVICE_LINE = re.compile(r"^\s*RPC\d+: (\S+) \((\d+) MiB, (\d+) MiB free\)", re.MULTILINE)
# llama.cpp's own words (ggml-rpc.cpp's abort) when a worker cannot be reached: nothing listens on the port, or the
# connection closed before HELLO was answered (the far side of the tunnel gave no session)
ABORT_LINE = re.compile(r"ggml-rpc\.cpp:\d+: (.+)")
NOT_LISTENING = "Failed to connect to"
NO_SESSION = ("RPC handshake failed", "Remote RPC server crashed or returned malformed response")
# Linux's TCP states as /proc/net/tcp writes them (include/net/tcp_states.h)
TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1", "05": "FIN_WAIT2",
              "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING"}
# ggml-rpc-server may negotiate RDMA over the TCP connection and then bypass it: never past the tunnel
ENVIRONMENT = {"GGML_RPC_NO_RDMA": "1"}
# a probe that fails aborts llama-server: without this, ggml spends seconds attaching gdb for a backtrace
PROBE_ENVIRONMENT = {**ENVIRONMENT, "GGML_NO_BACKTRACE": "1"}


@dataclass(frozen=True)
class Worker:
    """One entry of model_server.split.workers."""

    name: str
    port: int  # this node's end of the tunnel to it
    address: str = ""  # where the tunnel reaches it (informative: stunnel's configuration decides)
    memory_mib: int = 0  # what deploy's preflight measured there; 0: what its server reports

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"


def workers_of(config: dict) -> list[Worker]:
    """The split's workers in layer order (empty: no split)."""
    return [Worker(w["name"], int(w["port"]), w.get("address", ""), int(w.get("memory_mib", 0)))
            for w in config["model_server"].get("split", {}).get("workers", [])]


@dataclass(frozen=True)
class Probe:
    """What one look at a worker through its tunnel found."""

    worker: Worker
    ok: bool
    detail: str  # what it reported, or why it did not answer
    memory_total: int | None = None  # bytes, as the worker's ggml-rpc-server reports its device
    memory_free: int | None = None
    seconds: float = 0.0

    def describe(self) -> str:
        return f"{self.worker.name} ({self.worker.endpoint}): {self.detail}"


def probe(binary: str, worker: Worker, timeout_s: float) -> Probe:
    """Ask the worker for its device through the tunnel with the engine's own RPC client (see the module doc)."""
    started = time.monotonic()
    try:
        done = subprocess.run([binary, "--rpc", worker.endpoint, "--list-devices"], capture_output=True, text=True,
                              timeout=timeout_s, env={**os.environ, **PROBE_ENVIRONMENT}, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return Probe(worker, False, f"no answer within {timeout_s:g} s (model_server.split.probe_timeout_s): the "
                                    "worker is unreachable, or its ggml-rpc-server is still serving another client",
                     seconds=time.monotonic() - started)
    except OSError as exc:
        return Probe(worker, False, f"cannot run {binary}: {exc}", seconds=time.monotonic() - started)
    seconds = time.monotonic() - started
    output = done.stdout + done.stderr
    match = DEVICE_LINE.search(output)
    if done.returncode == 0 and match:
        total, free = int(match.group(2)) << 20, int(match.group(3)) << 20
        return Probe(worker, True, f"its device reports {match.group(2)} MiB, {match.group(3)} MiB free", total, free,
                     seconds)
    aborted = ABORT_LINE.search(output)
    said = aborted.group(1).strip() if aborted else ""
    if NOT_LISTENING in said:
        why = (f"nothing listens on {worker.endpoint}: this node's end of the tunnel (clawbot-rpc-tunnel) is not "
               "running")
    elif said.startswith(NO_SESSION):
        why = (f"the tunnel to {worker.address or worker.name} gives no RPC session (llama.cpp: {said}): the worker "
               "is down or unreachable, its ggml-rpc-server (clawbot-rpc) or its stunnel is not running, or a "
               "certificate check failed (the journals of clawbot-rpc-tunnel here and there say which)")
    else:
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        why = f"no device listed ({(said or (lines[0] if lines else f'exit status {done.returncode}'))[:200]})"
    return Probe(worker, False, why, seconds=seconds)


def probe_all(binary: str, workers: list[Worker], timeout_s: float) -> list[Probe]:
    return [probe(binary, worker, timeout_s) for worker in workers]


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        entries = list(fd_dir.iterdir())
    except OSError:
        return inodes
    for entry in entries:
        try:
            target = os.readlink(entry)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def session_states(pid: int, ports: list[int]) -> dict[int, list[str]]:
    """{port: TCP states of the process's connections to 127.0.0.1:port} (an empty list: no connection)."""
    inodes = _socket_inodes(pid)
    states: dict[int, list[str]] = {port: [] for port in ports}
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[9] not in inodes:
                continue
            port = int(fields[2].rsplit(":", 1)[1], 16)
            if port in states:
                states[port].append(TCP_STATES.get(fields[3], fields[3]))
    return states


def lost_sessions(states: dict[int, list[str]], workers: list[Worker]) -> list[tuple[Worker, str]]:
    """The workers whose session the model server no longer has: no ESTABLISHED connection to its port."""
    lost = []
    for worker in workers:
        seen = states.get(worker.port, [])
        if "ESTABLISHED" not in seen:
            how = f"the connection is {', '.join(sorted(set(seen)))}" if seen else "no connection is left"
            lost.append((worker, how))
    return lost
