"""One model across nodes with the real parts on loopback: ggml-rpc-server (built from the pinned sources) on
127.0.0.1, Debian's stunnel4 twice (the worker's server end, the main node's client end) with certificates from a
test CA, and llama-server with --rpc through the tunnel, started from the run plan's own command line.

It generates; its load log puts weights and KV cache on the RPC device, in the amounts the split sized; only the main
node's client certificate gets an RPC session (another CA's, a chat node's, a server certificate, none: the
worker's stunnel refuses the handshake and ggml-rpc-server never sees a connection); and the model agent names a
worker that went away, waits for it, and restarts cleanly, the worker's lost session visible in /status.

The stunnel configurations and the ggml-rpc-server command are roles/rpc.py's, so this runs what deploy installs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from clawbot.common import pki, sizing
from clawbot.common.config import check_bytes
from clawbot.control.split import MainRole, Tunnel, WorkerRole
from clawbot.model import rpc
from clawbot.model.engines import Paths, build, llama_server
from clawbot.model.runplan import HostFacts, RunPlan
from roles import rpc as rpc_role
from tests.fixtures_agent import llama_server_binary, pki_files  # noqa: F401  (fixtures)
from tests.fixtures_agent import free_port, start_agent, wait_for
from tests.fixtures_models import write_model_file

pytestmark = pytest.mark.slow

MAIN, WORKER, CHAT = "model-1.clawbot.test", "model-2.clawbot.test", "chat.clawbot.test"
STUNNEL = shutil.which("stunnel4") or rpc_role.STUNNEL


class Proc:
    """A process of this test in its own process group, its output in a file; stopped by its group id."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict | None = None):
        self.name, self.log_path = name, log
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True, env={**os.environ, **(env or {})})

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)


def listening(port: int, timeout: float = 30) -> None:
    def up():
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", port)) == 0
    wait_for(up, timeout, 0.1, f"something listening on 127.0.0.1:{port}")


def listeners(port: int) -> set[str]:
    """The local addresses of listening TCP sockets on `port` (this machine's /proc/net/tcp, like `ss -ltn`)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(hex_port, 16) == port:
                found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1]) if len(address) == 8
                          else address)
    return found


@dataclasses.dataclass
class Pki:
    dir: Path
    ca: Path
    files: dict  # name -> (cert, key)

    def tls(self, cert: str) -> dict:
        c, k = self.files[cert]
        return {"ca_cert": str(self.ca), "server_cert": str(c), "server_key": str(k), "client_cert": str(c),
                "client_key": str(k)}


@pytest.fixture(scope="module")
def split_pki(tmp_path_factory) -> Pki:
    """The cluster CA and the certificates deploy gives these nodes, plus the ones that must be refused."""
    root = tmp_path_factory.mktemp("split-pki")
    permitted = dict(permitted_dns=["clawbot.test", "localhost"], permitted_ips=["127.0.0.0/8"])
    ca_key, ca_cert = pki.create_ca("split test CA", **permitted)
    pki.write_certificate(root / "ca.pem", ca_cert)
    other_key, other_cert = pki.create_ca("another CA", **permitted)
    issued = {
        "worker-server": pki.issue_server_cert(ca_key, ca_cert, "model-2", dns_names=[WORKER, "localhost"],
                                               ip_addresses=["127.0.0.1"]),
        "main-client": pki.issue_client_cert(ca_key, ca_cert, "model-1", dns_names=[MAIN]),
        "chat-client": pki.issue_client_cert(ca_key, ca_cert, "chat", dns_names=[CHAT]),
        "other-ca-main": pki.issue_client_cert(other_key, other_cert, "model-1", dns_names=[MAIN]),
        "main-server-only": pki.issue_server_cert(ca_key, ca_cert, "model-1", dns_names=[MAIN]),  # no clientAuth
    }
    files = {}
    for name, (key, cert) in issued.items():
        cert_path, key_path = root / f"{name}.pem", root / f"{name}.key"
        pki.write_certificate(cert_path, cert)
        pki.write_private_key(key_path, key)
        files[name] = (cert_path, key_path)
    return Pki(root, root / "ca.pem", files)


@dataclasses.dataclass
class WorkerNode:
    rpc: Proc
    tunnel: Proc
    role: WorkerRole
    conf: Path
    dir: Path

    def restart_rpc(self, binary: Path) -> None:
        self.rpc.stop()
        self.rpc = start_rpc_server(binary, self.role, self.dir)


def start_rpc_server(binary: Path, role: WorkerRole, directory: Path) -> Proc:
    """ggml-rpc-server exactly as the worker's unit runs it (roles.rpc.rpc_server_command, its environment)."""
    env = {**rpc_role.RPC_ENVIRONMENT, "LLAMA_CACHE": str(directory / "cache"), "HOME": str(directory)}
    proc = Proc("ggml-rpc-server", shlex.split(rpc_role.rpc_server_command(str(binary), role)),
                directory / f"rpc-{time.monotonic_ns()}.log", env)
    listening(role.rpc_port)
    return proc


def start_stunnel(conf_text: str, path: Path, port: int) -> Proc:
    path.write_text(conf_text)
    proc = Proc("stunnel", [STUNNEL, str(path)], path.with_suffix(".log"))
    listening(port)
    return proc


@pytest.fixture(scope="module")
def rpc_binary(llama_server_binary) -> Path:  # noqa: F811
    binary = build.find_tool(build.RPC_TARGET)
    assert binary is not None, "ggml-rpc-server is missing beside llama-server: rebuild with `clawbot build-engine`"
    return binary


@pytest.fixture(scope="module")
def worker(tmp_path_factory, split_pki, rpc_binary):
    """An RPC worker on loopback: ggml-rpc-server on 127.0.0.1, its stunnel (server mode) for the main node only."""
    directory = tmp_path_factory.mktemp("worker")
    role = WorkerRole(main=MAIN, address="127.0.0.1", rpc_port=free_port(), tunnel_port=free_port(), threads=1,
                      cache=False)
    rpc_proc = start_rpc_server(rpc_binary, role, directory)
    conf = directory / "stunnel.conf"
    tunnel = start_stunnel(rpc_role.worker_tunnel_config(role, split_pki.tls("worker-server")), conf,
                           role.tunnel_port)
    node = WorkerNode(rpc_proc, tunnel, role, conf, directory)
    yield node
    node.tunnel.stop()
    node.rpc.stop()


def main_tunnel(worker: WorkerNode, pki_: Pki, cert: str, directory: Path, port: int | None = None) -> tuple[Proc, int]:
    """The main node's end (stunnel, client mode) presenting `cert`."""
    port = port or free_port()
    role = MainRole((Tunnel(WORKER, "127.0.0.1", worker.role.tunnel_port, port),))
    conf = directory / f"main-{cert}-{port}.conf"
    return start_stunnel(rpc_role.main_tunnel_config(role, pki_.tls(cert)), conf, port), port


@pytest.fixture(scope="module")
def split_model(tmp_path_factory) -> Path:
    """A generated llama GGUF with 6 layers (a few MiB): enough layers to cut."""
    return write_model_file(tmp_path_factory.mktemp("split-model"), "tiny", "Q8_0", n_layer=6, n_embd=256, n_ff=1024)


def _split_config(model: Path, port: int, tunnel_port: int, memory_mib: int) -> dict:
    # -lv 4: llama.cpp's load log (buffer sizes per device), which its default verbosity leaves out
    result = check_bytes(json.dumps({
        "model_gateway": {"max_tokens": 64, "max_concurrency": 1}, "context_window": 512,
        "chat": {"summary": {"max_tokens": 64}},
        "model_server": {"model_path": str(model), "port": port, "threads": 1, "parallel_slots": 1,
                         "accelerator": "cpu", "load_mode": "mmap", "hugepages": "off", "extra_args": ["-lv", "4"],
                         "split": {"workers": [{"name": WORKER, "port": tunnel_port, "memory_mib": memory_mib}]}},
    }).encode(), "clawbot.json")
    assert result.ok, [d.text() for d in result.diagnostics]
    return result.config


BUFFER = re.compile(r"(RPC0\[127\.0\.0\.1:\d+\]|CPU_Mapped|CPU) (model|KV|compute) buffer size =\s*([\d.]+) MiB")


def buffers(log: str) -> dict[tuple[str, str], float]:
    """{(device, kind): MiB} from llama.cpp's load log ("RPC0[127.0.0.1:P] model buffer size = 1.23 MiB")."""
    out: dict[tuple[str, str], float] = {}
    for device, kind, mib in BUFFER.findall(log):
        key = ("RPC0" if device.startswith("RPC0") else device, kind)
        out[key] = out.get(key, 0.0) + float(mib)
    return out


def test_llama_server_generates_through_the_tunnel_with_its_layers_on_the_worker(
        tmp_path, worker, split_pki, split_model, llama_server_binary):  # noqa: F811
    tunnel, local_port = main_tunnel(worker, split_pki, "main-client", tmp_path)
    try:
        probe = rpc.probe(str(llama_server_binary), rpc.Worker(WORKER, local_port), timeout_s=30)
        assert probe.ok and probe.memory_total and probe.memory_free, probe.detail
        # the run plan cuts the layers: the same memory on both sides, so each holds about half
        port = free_port()
        config = _split_config(split_model, port, local_port, memory_mib=64)
        info = sizing.read_model_info(split_model)
        facts = HostFacts(gpus=(), host_free_bytes=64 * sizing.MIB, usable_cores=2, memlock_limit=0)
        plan = RunPlan.resolve(config, facts, info)
        cut = plan.split.value
        assert cut is not None and cut.fits and 0 < cut.main.n_layers < info.n_layer, plan.split.reason
        argv = llama_server.command(plan, config, Paths(model=str(split_model), binary=str(llama_server_binary)))
        server = Proc("llama-server", argv, tmp_path / "llama-server.log", rpc.ENVIRONMENT)
        try:
            def healthy():
                assert server.alive(), server.log()[-3000:]
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
            wait_for(healthy, 120, 0.2, "llama-server with --rpc to load")
            answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=120,
                                json={"prompt": "Hello", "max_tokens": 8, "temperature": 0, "ignore_eos": True})
            assert answer.status_code == 200, answer.text
            assert answer.json()["usage"]["completion_tokens"] == 8
            log = server.log()
            found = buffers(log)
            # weights and KV cache on the worker's RPC device, as much as the split sized for it (MiB, rounded)
            worker_share = cut.workers[0]
            assert found[("RPC0", "model")] > 0 and found[("RPC0", "KV")] > 0, log[-4000:]
            assert abs(found[("RPC0", "model")] * sizing.MIB - worker_share.weights_bytes) < 0.02 * sizing.MIB + \
                0.01 * worker_share.weights_bytes, (found, worker_share)
            assert abs(found[("RPC0", "KV")] * sizing.MIB - worker_share.kv_bytes) < 0.02 * sizing.MIB, (found, cut)
            assert f"offloaded {cut.gpu_layers}/{info.n_layer + 1} layers to GPU" in log
            # the rest stays on this node: token embeddings and the first layers, mapped from the file
            assert abs(found[("CPU_Mapped", "model")] * sizing.MIB - cut.main.weights_bytes) < 0.02 * sizing.MIB + \
                0.01 * cut.main.weights_bytes, (found, cut.main)
            # the compute buffers sizing reserves cover what llama.cpp allocated on each side
            assert found[("RPC0", "compute")] * sizing.MIB <= worker_share.compute_bytes, (found, cut)
            assert "Accepted client connection" in worker.rpc.log()
            # ggml-rpc-server listens on loopback only; the tunnel is the only way in
            assert listeners(worker.role.rpc_port) == {"127.0.0.1"}
            # while the server is connected, its session to the worker is an established connection
            states = rpc.session_states(server.popen.pid, [local_port])
            assert "ESTABLISHED" in states[local_port], states
        finally:
            server.stop()
    finally:
        tunnel.stop()


def _rpc_hello_gets_nothing(port: int, context: ssl.SSLContext | None) -> str:
    """Open a TLS (or plain) connection to the worker's stunnel and send ggml's HELLO: what came of it."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock = context.wrap_socket(raw, server_hostname=WORKER) if context else raw
        sock.sendall(bytes([0]) + (0).to_bytes(8, "little"))  # RPC_CMD_HELLO, empty request
        data = sock.recv(64)
        return f"got {len(data)} bytes" if data else "closed"
    except (ssl.SSLError, ConnectionError, OSError) as exc:
        return f"refused: {type(exc).__name__}: {exc}"
    finally:
        raw.close()


# what the worker's stunnel says when it refuses each (OpenSSL's verification, stunnel's checkHost)
REFUSALS = {
    "other-ca-main": "CERT: Pre-verification error: unable to get local issuer certificate",  # another CA's, main's name
    "chat-client": "CERT: Subject checks failed",  # the cluster CA's, a chat node's name
    "main-server-only": "CERT: Pre-verification error: unsuitable certificate purpose",  # main's name, no clientAuth
    None: "peer did not return a certificate",
}


@pytest.mark.parametrize("cert", list(REFUSALS), ids=["another-CA", "chat-node", "server-certificate", "no-certificate"])
def test_only_the_main_nodes_certificate_gets_an_rpc_session(tmp_path, worker, split_pki, llama_server_binary,  # noqa: F811
                                                             cert):
    accepted_before = worker.rpc.log().count("Accepted client connection")
    tunnel_log_before = len(worker.tunnel.log())
    # the engine's own client through a main-node tunnel that presents the wrong certificate (or none)
    if cert is not None:
        tunnel, local_port = main_tunnel(worker, split_pki, cert, tmp_path)
        try:
            probe = rpc.probe(str(llama_server_binary), rpc.Worker(WORKER, local_port), timeout_s=30)
        finally:
            tunnel.stop()
        assert not probe.ok and "gives no RPC session" in probe.detail, probe.detail
    # a TLS client with that certificate, straight at the worker's tunnel port
    context = ssl.create_default_context(cafile=str(split_pki.ca))
    if cert is not None:
        context.load_cert_chain(*map(str, split_pki.files[cert]))
    outcome = _rpc_hello_gets_nothing(worker.role.tunnel_port, context)
    assert outcome.startswith(("refused", "closed")), outcome
    assert _rpc_hello_gets_nothing(worker.role.tunnel_port, None).startswith(("refused", "closed"))  # plain TCP
    # ggml-rpc-server never saw a connection: stunnel refused the handshake, and said why
    time.sleep(0.5)
    assert worker.rpc.log().count("Accepted client connection") == accepted_before
    said = worker.tunnel.log()[tunnel_log_before:]
    assert REFUSALS[cert] in said, said
    assert "wrong version number" in said  # the plain-TCP HELLO is not even TLS
    assert worker.tunnel.alive() and worker.rpc.alive()


def test_the_main_nodes_tunnel_checks_the_workers_name(tmp_path, worker, split_pki, llama_server_binary):  # noqa: F811
    """A tunnel expecting another worker's name gets no session from this one (its server certificate names
    model-2 only)."""
    port = free_port()
    role = MainRole((Tunnel("model-9.clawbot.test", "127.0.0.1", worker.role.tunnel_port, port),))
    tunnel = start_stunnel(rpc_role.main_tunnel_config(role, split_pki.tls("main-client")), tmp_path / "m9.conf", port)
    try:
        probe = rpc.probe(str(llama_server_binary), rpc.Worker("model-9.clawbot.test", port), timeout_s=30)
        assert not probe.ok and "gives no RPC session" in probe.detail, probe.detail
        assert "CERT: Subject checks failed" in tunnel.log() and "Rejected by CERT at depth=0: CN=model-2" in tunnel.log()
    finally:
        tunnel.stop()


def test_the_agent_names_a_lost_worker_waits_for_it_and_restarts_cleanly(
        tmp_path, worker, split_pki, split_model, pki_files, llama_server_binary, rpc_binary):  # noqa: F811
    tunnel, local_port = main_tunnel(worker, split_pki, "main-client", tmp_path)
    agent = start_agent(tmp_path / "agent", pki_files, split_model, context_window=512,
                        model_gateway={"max_tokens": 64, "max_concurrency": 1},
                        chat={"port": free_port(), "summary": {"max_tokens": 64}},
                        model_server={"parallel_slots": 1, "split": {
                            "workers": [{"name": WORKER, "port": local_port}], "probe_timeout_s": 20}})
    try:
        status = agent.wait_ready(timeout=180)
        model = status["model"]
        entry = model["rpc_workers"][0]
        assert (entry["name"], entry["state"], entry["sessions"], entry["sessions_lost"]) == (WORKER, "up", 1, 0)
        assert entry["memory_free_bytes"] > 0  # no measured memory_mib: what the worker reported sized the cut
        cut = model["plan"]["split"]["value"]
        assert cut["nodes"][1]["available_bytes"] == entry["memory_free_bytes"]
        assert f"--rpc 127.0.0.1:{local_port}" in " ".join(model["command"])
        restarts = model["restarts"]
        # the worker's ggml-rpc-server goes away: the agent says which worker, and is not ready
        worker.rpc.stop()

        def names_the_worker():
            s = agent.status()["model"]
            return s if s["state"] != "ready" and WORKER in s["reason"] else None
        gone = wait_for(names_the_worker, 60, 0.3, "the agent to name the lost worker")
        assert agent.get("/readyz").status_code == 503
        assert gone["rpc_workers"][0]["sessions_lost"] == 1 and gone["rpc_workers"][0]["last_lost_at"]

        def waits_for_it():
            s = agent.status()["model"]
            return s if s["reason"].startswith("waiting for RPC worker(s): " + WORKER) else None
        waiting = wait_for(waits_for_it, 60, 0.3, "the agent to wait for the worker")
        assert waiting["state"] == "restarting" and waiting["rpc_workers"][0]["state"] == "down"
        time.sleep(3)  # it waits: no start, no restart counted while the worker is away
        assert agent.status()["model"]["restarts"] == waiting["restarts"]
        # the worker comes back: a clean start, the restart visible in /status
        worker.restart_rpc(rpc_binary)
        back = agent.wait_ready(timeout=180)["model"]
        entry = back["rpc_workers"][0]
        assert back["restarts"] == restarts + 1 and (entry["state"], entry["sessions"], entry["sessions_lost"]) == (
            "up", 2, 1)
        assert entry["back_at"] and entry["last_lost"].startswith(f"the model server's session to RPC worker {WORKER}")
        with agent.client() as client:
            answer = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "model": "tiny"})
        assert answer.status_code == 200, answer.text
        assert any(WORKER in line for line in back["log_tail"])
    finally:
        agent.stop()
        tunnel.stop()
