"""Fixtures for the chat node's tests: a real cluster PKI, the real agents as subprocesses, a search stub.

Import explicitly from a test module in tests/:
    from fixtures_chat import chat_pki, model_agent, ChatAgent, ...  # noqa: F401

Everything here is real: certificates from clawbot.common.pki, `clawbot agent --role model` (supervised
llama-server on a tiny random-weight GGUF behind the mTLS gateway), `clawbot agent --role chat`.
Processes are started by the fixture, stopped by their pid (SIGTERM, then SIGKILL after a deadline),
and every wait polls with a deadline.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from clawbot.common import pki

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
START_TIMEOUT_S = 120
ADMIN_NAME, ADMIN_PASSWORD = "admin", "admin-test-password"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clawbot_command() -> list[str]:
    """The installed console script when on PATH (what systemd runs), else the same CLI via -m."""
    exe = shutil.which("clawbot")
    return [exe] if exe else [sys.executable, "-m", "clawbot"]


# ---------------------------------------------------------------------------------------------- PKI


@dataclass
class ClusterPKI:
    dir: Path
    ca: Path
    chat_server: tuple[Path, Path]
    chat_client: tuple[Path, Path]
    model_server: tuple[Path, Path]
    chat_spki_sha256_b64: str  # for chromium's --ignore-certificate-errors-spki-list

    def chat_tls(self) -> dict:
        return {"ca_cert": str(self.ca), "server_cert": str(self.chat_server[0]), "server_key": str(self.chat_server[1]),
                "client_cert": str(self.chat_client[0]), "client_key": str(self.chat_client[1])}

    def model_tls(self) -> dict:
        # the model node's own client pair is unused by the gateway; point it at the chat client's files
        return {"ca_cert": str(self.ca), "server_cert": str(self.model_server[0]), "server_key": str(self.model_server[1]),
                "client_cert": str(self.chat_client[0]), "client_key": str(self.chat_client[1])}


def make_cluster_pki(directory: Path) -> ClusterPKI:
    """A cluster CA limited to localhost/127.0.0.0/8, a server + client pair for the chat node, a server pair for the model node."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = pki.create_ca("clawbot chat-test CA", permitted_dns=["localhost"], permitted_ips=["127.0.0.0/8"])
    ca_path = directory / "ca.pem"
    pki.write_certificate(ca_path, ca_cert)

    def leaf(name: str, issue) -> tuple[Path, Path, object]:
        key, cert = issue(ca_key, ca_cert, name, dns_names=["localhost"], ip_addresses=["127.0.0.1"])
        cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
        pki.write_certificate(cert_path, cert)
        pki.write_private_key(key_path, key)
        return cert_path, key_path, cert

    chat_cert, chat_key, chat_x509 = leaf("chat-server", pki.issue_server_cert)
    client_cert, client_key, _ = leaf("chat-client", pki.issue_client_cert)
    model_cert, model_key, _ = leaf("model-server", pki.issue_server_cert)
    spki = chat_x509.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return ClusterPKI(directory, ca_path, (chat_cert, chat_key), (client_cert, client_key), (model_cert, model_key),
                      base64.b64encode(hashlib.sha256(spki).digest()).decode())


@pytest.fixture(scope="session")
def chat_pki(tmp_path_factory) -> ClusterPKI:
    return make_cluster_pki(tmp_path_factory.mktemp("chat-pki"))


# ---------------------------------------------------------------------------------------------- processes


class Agent:
    """One `clawbot agent` subprocess, owned by the test: started, watched and stopped by pid."""

    role = ""

    def __init__(self, config: dict, workdir: Path, pki_: ClusterPKI):
        self.config, self.workdir, self.pki = config, workdir, pki_
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / f"{self.role}.json"
        self.log_path = workdir / f"{self.role}.log"
        self.proc: subprocess.Popen | None = None
        self.write_config()

    def write_config(self) -> None:
        self.config_path.write_text(json.dumps(self.config, indent=2))

    def argv(self) -> list[str]:
        return clawbot_command() + ["agent", "--role", self.role, "--config", str(self.config_path)]

    def start(self) -> "Agent":
        assert self.proc is None or self.proc.poll() is not None, "already running"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                     start_new_session=True)
        log.close()
        return self

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def wait_until(self, check, what: str, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"{self.role} agent exited ({self.proc.returncode}) before {what}:\n{self.log_tail()}")
            try:
                if check():
                    return
            except (httpx.HTTPError, OSError) as exc:
                last = exc
            time.sleep(0.2)
        raise AssertionError(f"{self.role} agent: not {what} after {timeout_s} s (last error: {last}):\n{self.log_tail()}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL the agent itself (not its group): a crash, as the OOM killer would do it."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, timeout_s: float = 30) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            self._reap_group()
            return None if self.proc is None else self.proc.returncode
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._reap_group()
        return self.proc.returncode

    def _reap_group(self) -> None:
        """The agent ran in its own session (pgid == its pid): end what it may have left behind, by that id."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


class ChatAgent(Agent):
    role = "chat"
    admin = (ADMIN_NAME, ADMIN_PASSWORD)  # created at start from auth.bootstrap_admin_file (see chat_config)

    @property
    def url(self) -> str:
        return f"https://localhost:{self.config['chat']['port']}"

    def anonymous(self, **kwargs) -> httpx.Client:
        """A client of the web API that trusts the cluster CA only (as a browser with the CA installed), signed out."""
        return httpx.Client(base_url=self.url, verify=ssl.create_default_context(cafile=str(self.pki.ca)),
                            timeout=kwargs.pop("timeout", 60), **kwargs)

    def client(self, **kwargs) -> httpx.Client:
        """A client signed in as the admin (session cookie + CSRF header), as the web UI is after login."""
        return self.login(*self.admin, **kwargs)

    def login(self, name: str, password: str, **kwargs) -> httpx.Client:
        with self.anonymous() as first:
            response = first.post("/api/login", json={"username": name, "password": password})
            assert response.status_code == 200, response.text
            cookies = httpx.Cookies(first.cookies)
        c = self.anonymous(cookies=cookies, **kwargs)  # unopened, so `with agent.client() as c:` works
        c.headers["X-CSRF-Token"] = response.json()["csrf_token"]
        return c

    def users(self, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        """`clawbot users --config <this agent's config> ARGV`, as an admin runs it on the chat node."""
        return subprocess.run(clawbot_command() + ["users", "--config", str(self.config_path), *argv], input=stdin,
                              capture_output=True, text=True, timeout=60)

    def add_user(self, name: str, password: str, role: str = "user") -> None:
        done = self.users("add", name, "--role", role, "--password-stdin", stdin=password + "\n")
        assert done.returncode == 0, done.stderr

    def api_key(self, name: str, key_name: str = "test") -> str:
        done = self.users("--json", "add-key", name, "--key-name", key_name)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)["key"]

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> "ChatAgent":
        def up():
            with self.anonymous(timeout=5) as c:
                return c.get("/healthz").status_code == 200
        self.wait_until(up, "serving /healthz", timeout_s)
        return self


class ModelAgent(Agent):
    role = "model"

    def argv(self) -> list[str]:
        return super().argv() + ["--state-dir", str(self.workdir / "state")]

    @property
    def endpoint(self) -> str:
        return self.config["model_gateway"]["endpoint"]

    def client(self) -> httpx.Client:
        context = pki.client_ssl_context(self.pki.chat_client[0], self.pki.chat_client[1], self.pki.ca)
        return httpx.Client(base_url=self.endpoint, verify=context, timeout=60)

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> "ModelAgent":
        def ready():
            with self.client() as c:
                return c.get("/readyz").status_code == 200
        self.wait_until(ready, "ready (/readyz 200)", timeout_s)
        return self

    def count_tokens(self, messages: list[dict]) -> int:
        with self.client() as c:
            response = c.post("/v1/tokenize", json={"messages": messages})
            response.raise_for_status()
            return response.json()["count"]


def model_config(pki_: ClusterPKI, model_path: Path, *, context_window: int = 4096, max_tokens: int = 48) -> dict:
    """A model node on loopback: llama-server with the tiny GGUF, one thread, no huge pages."""
    return {
        "model_gateway": {"endpoint": f"https://localhost:{free_port()}", "bind_address": "127.0.0.1",
                          "max_tokens": max_tokens, "temperature": 0.7, "max_concurrency": 2,
                          "rate_limit": {"requests_per_second": 1000, "burst": 1000}},
        "context_window": context_window,
        "model_server": {"engine": "llama-server", "model_path": str(model_path), "port": free_port(),
                         "threads": 1, "gpu_layers": 0, "accelerator": "cpu", "load_mode": "mmap",
                         "parallel_slots": 2, "hugepages": "off"},
        "tls": pki_.model_tls(),
    }


_ADMIN_HASH: list[str] = []


def bootstrap_admin_file(workdir: Path) -> Path:
    """The file deploy writes on a chat node: the first admin's name and argon2id hash (one hash per test run)."""
    from clawbot.chat.accounts import hash_secret

    if not _ADMIN_HASH:
        _ADMIN_HASH.append(hash_secret(ADMIN_PASSWORD))
    path = workdir / "admin.json"
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"name": ADMIN_NAME, "password_hash": _ADMIN_HASH[0]}))
    path.chmod(0o600)
    return path


def chat_config(pki_: ClusterPKI, workdir: Path, gateway_endpoint: str, *, context_window: int = 4096,
                max_tokens: int = 48, fallbacks: list[str] = (), kb_dir: Path | None = None,
                search_endpoint: str = "", summary: dict | None = None, request_timeout_s: float = 30,
                auth: dict | None = None) -> dict:
    """A chat node on loopback. Its admin (ChatAgent.admin) exists at start; tests get no per-user limit unless
    `auth` sets one."""
    return {
        "auth": {"bootstrap_admin_file": str(bootstrap_admin_file(workdir)),
                 "limits": {"requests_per_minute": 0, "tokens_per_day": 0}, **(auth or {})},
        "model_gateway": {"endpoint": gateway_endpoint, "max_tokens": max_tokens, "temperature": 0.7},
        "context_window": context_window,
        "fallback_strategies": list(fallbacks),
        "chat": {
            "bind_address": "127.0.0.1", "port": free_port(),
            "system_prompt": "You are a helpful assistant.",
            "database": str(workdir / "chat.sqlite3"),
            "request_timeout_s": request_timeout_s,
            "summary": summary or {"enabled": True, "keep_recent_messages": 4, "max_tokens": 64},
            "knowledge_base": {"directory": str(kb_dir or workdir / "kb"), "max_passages": 3},
            "web_search": {"endpoint": search_endpoint, "timeout_s": 5, "max_results": 3},
        },
        "tls": pki_.chat_tls(),
    }


@contextlib.contextmanager
def running(agent: Agent):
    """Start an agent, wait until it is ready, always stop it (by pid) afterwards."""
    agent.start()
    try:
        agent.wait_ready()
        yield agent
    finally:
        agent.stop()


# ---------------------------------------------------------------------------------------------- SSE


@dataclass
class Reply:
    events: list[tuple[str, dict]] = field(default_factory=list)

    def of(self, name: str) -> list[dict]:
        return [data for event, data in self.events if event == name]

    @property
    def text(self) -> str:
        return "".join(d["text"] for d in self.of("token"))

    @property
    def message(self) -> dict:
        done = self.of("done")
        assert done, f"the stream ended without a done event: {self.events}"
        return done[-1]["message"]


def parse_sse(body: str) -> Reply:
    reply = Reply()
    for block in body.split("\n\n"):
        event, data = "message", ""
        for line in block.splitlines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data += line[5:].strip()
        if data:
            reply.events.append((event, json.loads(data)))
    return reply


def send(client: httpx.Client, conversation_id: str, content: str) -> Reply:
    with client.stream("POST", f"/api/conversations/{conversation_id}/messages", json={"content": content}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return parse_sse(r.read().decode())


# ---------------------------------------------------------------------------------------------- search stub


class SearchStub:
    """Stands in for a real SearxNG instance: GET /search?q=..&format=json answers SearxNG's JSON shape.

    It is a local HTTP server (loopback only) so web_search is tested over a real socket; `queries`
    records what clawbot asked.
    """

    def __init__(self, results: list[dict]):
        self.results = results
        self.queries: list[dict] = []
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                stub.queries.append(query)
                if url.path != "/search" or query.get("format") != "json":
                    self.send_error(400, "format=json required")
                    return
                body = json.dumps({"query": query.get("q", ""), "results": stub.results}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/search"

    def __enter__(self) -> "SearchStub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
