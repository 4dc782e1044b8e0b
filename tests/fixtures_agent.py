"""Shared fixtures for the model-node agent: a cluster CA and node certificates in a tmp dir, and real
agents (`clawbot agent --role model`) running llama-server on the tiny GGUF behind the mTLS gateway.

Import explicitly:  from tests.fixtures_agent import pki_files, model_agent, ...  (plus tiny_gguf from
tests.fixtures_models). Every process is started in its own process group and killed by that group;
every wait polls with a deadline.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from clawbot.model.engines import build as engine
from clawbot.common import pki
from tests.fixtures_models import models_dir, tiny_gguf  # noqa: F401  (re-exported for test modules)

CLIENT_NAME = "chat.clawbot.test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - polled conditions may fail until they hold
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}" + (f" (last error: {last_exc!r})" if last_exc else ""))


@dataclass
class PkiFiles:
    dir: Path
    ca_key: object
    ca_cert: object
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    # clients that must be refused
    other_ca_cert: Path
    other_ca_key: Path
    expired_cert: Path
    expired_key: Path
    server_only_cert: Path
    server_only_key: Path
    intruder_cert: Path  # CA-signed client, but its SAN is not in allowed_clients
    intruder_key: Path

    def tls_config(self) -> dict:
        return {"ca_cert": str(self.ca), "server_cert": str(self.server_cert), "server_key": str(self.server_key),
                "client_cert": str(self.client_cert), "client_key": str(self.client_key)}

    def issue_server(self, directory: Path, **kwargs) -> tuple[Path, Path]:
        key, cert = pki.issue_server_cert(self.ca_key, self.ca_cert, "model.clawbot.test",
                                          dns_names=["localhost", "model.clawbot.test"], ip_addresses=["127.0.0.1"],
                                          **kwargs)
        return _write_pair(directory, "server", key, cert)


def _write_pair(directory: Path, name: str, key, cert) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    pki.write_private_key(key_path, key)
    pki.write_certificate(cert_path, cert)
    return cert_path, key_path


def make_pki(directory: Path) -> PkiFiles:
    permitted = dict(permitted_dns=["clawbot.test", "localhost"], permitted_ips=["127.0.0.0/8"])
    ca_key, ca_cert = pki.create_ca("clawbot test CA", **permitted)
    directory.mkdir(parents=True, exist_ok=True)
    pki.write_certificate(directory / "ca.pem", ca_cert)
    s_key, s_cert = pki.issue_server_cert(ca_key, ca_cert, "model.clawbot.test",
                                          dns_names=["localhost", "model.clawbot.test"], ip_addresses=["127.0.0.1"])
    server_cert, server_key = _write_pair(directory / "node", "server", s_key, s_cert)
    c_key, c_cert = pki.issue_client_cert(ca_key, ca_cert, "chat", dns_names=[CLIENT_NAME])
    client_cert, client_key = _write_pair(directory, "client", c_key, c_cert)
    o_ca_key, o_ca_cert = pki.create_ca("another CA", **permitted)
    o_key, o_cert = pki.issue_client_cert(o_ca_key, o_ca_cert, "chat", dns_names=[CLIENT_NAME])
    other_cert, other_key = _write_pair(directory, "other-ca-client", o_key, o_cert)
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=30)
    e_key, e_cert = pki.issue_client_cert(ca_key, ca_cert, "chat", dns_names=[CLIENT_NAME], days=2, now=past)
    expired_cert, expired_key = _write_pair(directory, "expired-client", e_key, e_cert)
    so_key, so_cert = pki.issue_server_cert(ca_key, ca_cert, "chat", dns_names=[CLIENT_NAME])
    server_only_cert, server_only_key = _write_pair(directory, "server-only", so_key, so_cert)
    i_key, i_cert = pki.issue_client_cert(ca_key, ca_cert, "intruder", dns_names=["intruder.clawbot.test"])
    intruder_cert, intruder_key = _write_pair(directory, "intruder", i_key, i_cert)
    return PkiFiles(directory, ca_key, ca_cert, directory / "ca.pem", server_cert, server_key, client_cert, client_key,
                    other_cert, other_key, expired_cert, expired_key, server_only_cert, server_only_key,
                    intruder_cert, intruder_key)


@pytest.fixture(scope="session")
def pki_files(tmp_path_factory) -> PkiFiles:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def llama_server_binary() -> Path:
    """The engine the agent runs; built (and cached) here when no earlier step built it."""
    return engine.find_llama_server("cpu") or engine.build_engine("cpu", native=False)


def agent_config(model_path: Path, tls: dict, *, gateway_port: int, model_port: int, **sections) -> dict:
    """A clawbot.json for a test agent: small limits, fast restarts; `sections` update each section."""
    config = {
        "model_gateway": {"endpoint": f"https://localhost:{gateway_port}", "bind_address": "127.0.0.1",
                          "max_tokens": 256, "temperature": 0.7, "max_concurrency": 2, "queue_length": 4,
                          "queue_timeout_s": 20, "request_timeout_s": 60,
                          "rate_limit": {"requests_per_second": 200, "burst": 200},
                          "allowed_clients": [CLIENT_NAME]},
        "context_window": 2048,
        "model_server": {"engine": "llama-server", "model_path": str(model_path), "model_name": "tiny",
                         "port": model_port, "threads": 1, "parallel_slots": 2, "accelerator": "cpu",
                         "load_mode": "mmap", "restart_backoff_s": [1, 4], "startup_timeout_s": 60,
                         # staging needs a hugetlbfs mount and kernel-global pages: only tests/test_hugepages.py
                         "hugepages": "off"},
        "chat": {"port": free_port()},
        "tls": tls,
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(config.get(section), dict):
            config[section] = {**config[section], **values}
        else:
            config[section] = values
    return config


class Agent:
    """A `clawbot agent --role model` subprocess in its own process group, with its stderr in a file."""

    def __init__(self, config_path: Path, state_dir: Path, pki_files: PkiFiles, cert_poll_s: float = 0.3):
        self.config_path = config_path
        self.config = json.loads(config_path.read_text())
        self.pki = pki_files
        self.log_path = state_dir / "agent.log"
        self.state_dir = state_dir
        self.cert_poll_s = cert_poll_s
        self.proc: subprocess.Popen | None = None
        self.port = int(self.config["model_gateway"]["endpoint"].rsplit(":", 1)[1])

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    def start(self) -> "Agent":
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "clawbot", "agent", "--role", "model", "--config", str(self.config_path),
             "--state-dir", str(self.state_dir), "--cert-poll-s", str(self.cert_poll_s)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, cert=None, key=None, timeout: float = 30.0) -> httpx.Client:
        cert = cert or self.pki.client_cert
        key = key or self.pki.client_key
        return httpx.Client(base_url=self.url, verify=_verify(self.pki.ca, cert, key), timeout=timeout)

    def get(self, path: str, **kwargs) -> httpx.Response:
        with self.client() as c:
            return c.get(path, **kwargs)

    def status(self) -> dict:
        return self.get("/status").json()

    def wait_ready(self, timeout: float = 90) -> dict:
        def ready():
            if self.proc and self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            return self.get("/readyz").status_code == 200
        try:
            wait_for(ready, timeout, 0.1, "the model agent to become ready")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- agent log ---\n{self.log()[-4000:]}") from None
        return self.status()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        """SIGTERM the agent (it stops its model server), then SIGKILL the whole group if anything is left."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # leftovers of the group (normally none)
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)


def _verify(ca: Path, cert: Path, key: Path):
    import ssl

    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(cert), str(key))
    return context


def start_agent(tmp: Path, pki_files: PkiFiles, model_path: Path, **sections) -> Agent:
    tmp.mkdir(parents=True, exist_ok=True)
    tls = sections.pop("tls", None) or pki_files.tls_config()
    config = agent_config(model_path, tls, gateway_port=free_port(), model_port=free_port(), **sections)
    path = tmp / "clawbot.json"
    path.write_text(json.dumps(config, indent=2))
    return Agent(path, tmp / "state", pki_files).start()


@pytest.fixture(scope="session")
def model_agent(tmp_path_factory, pki_files, tiny_gguf, llama_server_binary):  # noqa: F811
    """One running model agent shared by the session's read-mostly tests (max_concurrency 2, queue 4)."""
    agent = start_agent(tmp_path_factory.mktemp("agent"), pki_files, tiny_gguf,
                        model_gateway={"max_tokens": 1024})
    try:
        agent.wait_ready()
        yield agent
    finally:
        agent.stop()
