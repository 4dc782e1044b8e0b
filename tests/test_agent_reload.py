"""A model agent of its own (its own certificate files and config): SIGHUP reloads, certificate rotation,
and schemathesis against the gateway's OpenAPI with the client certificate (4xx, never 5xx)."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import ssl
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from tests.fixtures_agent import (  # noqa: F401  (fixtures)
    llama_server_binary,
    models_dir,
    pki_files,
    start_agent,
    tiny_gguf,
    wait_for,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def own_agent(tmp_path_factory, pki_files, tiny_gguf, llama_server_binary):
    """An agent whose server certificate files are its own copies, so rotating them disturbs no one."""
    tmp = tmp_path_factory.mktemp("own-agent")
    tls_dir = tmp / "tls"
    tls_dir.mkdir()
    shutil.copy(pki_files.server_cert, tls_dir / "server.pem")
    shutil.copy(pki_files.server_key, tls_dir / "server.key")
    tls = {**pki_files.tls_config(), "server_cert": str(tls_dir / "server.pem"), "server_key": str(tls_dir / "server.key")}
    agent = start_agent(tmp, pki_files, tiny_gguf, tls=tls, model_gateway={"max_tokens": 16})
    agent.tls_dir = tls_dir
    try:
        agent.wait_ready()
        yield agent
    finally:
        agent.stop()


def served_serial(agent) -> int:
    """Serial of the certificate the gateway presents on a fresh connection."""
    from cryptography import x509

    ctx = ssl.create_default_context(cafile=str(agent.pki.ca))
    ctx.load_cert_chain(str(agent.pki.client_cert), str(agent.pki.client_key))
    with socket.create_connection(("127.0.0.1", agent.port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


def write_config(agent, config: dict | str) -> None:
    agent.config_path.write_text(config if isinstance(config, str) else json.dumps(config, indent=2))


def ask(agent, max_tokens: int) -> httpx.Response:
    with agent.client() as c:
        return c.post("/v1/completions", json={"prompt": "a", "max_tokens": max_tokens})


# --------------------------------------------------------------------------- SIGHUP


def test_sighup_with_invalid_config_keeps_the_running_one(own_agent):
    original = own_agent.config_path.read_text()
    pid = own_agent.status()["model"]["pid"]
    try:
        write_config(own_agent, original.replace('"max_tokens": 16', '"max_tokens": "many"'))
        own_agent.signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in own_agent.log(), 20, 0.1, "the refused reload to be logged")
        assert f"{own_agent.config_path}:" in own_agent.log().split("reload refused", 1)[1]  # file:line:col
        assert ask(own_agent, 16).status_code == 200 and ask(own_agent, 17).status_code == 400  # old limits
    finally:
        write_config(own_agent, original)
    assert own_agent.status()["model"]["pid"] == pid


def test_sighup_applies_gateway_limits_live_without_restarting_the_model(own_agent):
    original = json.loads(own_agent.config_path.read_text())
    pid = own_agent.status()["model"]["pid"]
    changed = json.loads(json.dumps(original))
    changed["model_gateway"]["max_tokens"] = 8
    try:
        write_config(own_agent, changed)
        own_agent.signal(signal.SIGHUP)
        wait_for(lambda: ask(own_agent, 9).status_code == 400, 20, 0.1, "the new max_tokens to apply")
        assert own_agent.status()["model"]["pid"] == pid  # model server untouched
    finally:
        write_config(own_agent, original)
        own_agent.signal(signal.SIGHUP)
        wait_for(lambda: ask(own_agent, 16).status_code == 200, 20, 0.1, "the original config to apply again")


def test_sighup_with_changed_model_settings_restarts_the_model(own_agent):
    original = json.loads(own_agent.config_path.read_text())
    pid = own_agent.status()["model"]["pid"]
    changed = json.loads(json.dumps(original))
    changed["context_window"] = 1024
    changed["model_server"]["load_mode"] = "mmap+mlock"
    try:
        write_config(own_agent, changed)
        own_agent.signal(signal.SIGHUP)
        wait_for(lambda: own_agent.status()["model"]["pid"] not in (None, pid) and own_agent.status()["model"]["state"] == "ready",
                 60, 0.1, "the model server to restart with the new context")
        model = own_agent.status()["model"]
        assert "2048" in model["command"]  # -c = 1024 x 2 slots
        # mlock is reported from /proc/PID/status (VmLck), not assumed: as root (CAP_IPC_LOCK) it takes effect
        from clawbot.common.preflight import memlock_limit

        size = Path(model["model_path"]).stat().st_size
        can_mlock = memlock_limit() >= size
        assert model["memory"]["mlock_effective"] is can_mlock
        if can_mlock:
            assert model["memory"]["vm_locked_kib"] >= 0.95 * size / 1024  # the tensor data (all but the header)
    finally:
        write_config(own_agent, original)
        own_agent.signal(signal.SIGHUP)
        wait_for(lambda: "4096" in own_agent.status()["model"]["command"] and own_agent.status()["model"]["state"] == "ready",
                 60, 0.1, "the original model settings to apply again")


# --------------------------------------------------------------------------- certificate rotation


def test_rotated_certificate_is_picked_up_and_a_bad_one_is_not(own_agent):
    first = served_serial(own_agent)
    new_cert, new_key = own_agent.pki.issue_server(own_agent.tls_dir / "next")
    shutil.copy(new_key, own_agent.tls_dir / "server.key.new")
    shutil.copy(new_cert, own_agent.tls_dir / "server.pem.new")
    # replace both files (rename is atomic per file; the watcher may see one before the other and retries)
    (own_agent.tls_dir / "server.key.new").rename(own_agent.tls_dir / "server.key")
    (own_agent.tls_dir / "server.pem.new").rename(own_agent.tls_dir / "server.pem")
    from cryptography import x509

    rotated = x509.load_pem_x509_certificate(new_cert.read_bytes()).serial_number
    assert rotated != first
    wait_for(lambda: served_serial(own_agent) == rotated, 20, 0.2, "the rotated certificate to be served")

    # now a broken certificate: the live one keeps working
    (own_agent.tls_dir / "server.pem").write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    wait_for(lambda: own_agent.status()["tls"]["last_error"], 20, 0.2, "the bad certificate to be refused")
    assert "keeping the old one" in own_agent.status()["tls"]["last_error"]
    assert served_serial(own_agent) == rotated
    assert ask(own_agent, 4).status_code == 200
    shutil.copy(new_cert, own_agent.tls_dir / "server.pem")  # restore a good file for later tests
    wait_for(lambda: not own_agent.status()["tls"]["last_error"], 20, 0.2, "the good certificate to load again")


# --------------------------------------------------------------------------- malformed requests


def test_hand_written_malformed_requests_get_4xx(own_agent):
    cases = [
        ("/v1/chat/completions", b"{not json"),
        ("/v1/chat/completions", b"[]"),
        ("/v1/chat/completions", json.dumps({"messages": []}).encode()),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "user"}]}).encode()),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode()),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": 5}]}).encode()),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}).encode()),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).encode()),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 3}).encode()),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}], "model": "gpt-9"}).encode()),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}], "grammar": "root ::= x"}).encode()),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}'),
        ("/v1/completions", json.dumps({"prompt": ""}).encode()),
        ("/v1/completions", json.dumps({"prompt": ["a", "b"]}).encode()),
        ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": 10**12}).encode()),
        ("/v1/tokenize", json.dumps({"content": "x", "messages": [{"role": "user", "content": "x"}]}).encode()),
        ("/v1/tokenize", b"null"),
        # valid shape, but longer than a slot's context: llama-server's own 400 is passed through
        ("/v1/completions", json.dumps({"prompt": "x" * 5000}).encode()),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x" * 5000}], "stream": True}).encode()),
    ]
    with own_agent.client() as c:
        for path, body in cases:
            r = c.post(path, content=body, headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text)
            assert r.json()["error"]["message"], (path, body)
        assert c.get("/v1/nothing").status_code == 404
        assert c.delete("/v1/models").status_code == 405


def test_schemathesis_never_gets_a_server_error(own_agent):
    """Property-based requests generated from the gateway's own OpenAPI document (valid and invalid)."""
    import requests
    import schemathesis
    from schemathesis.generation import GenerationMode

    with own_agent.client() as c:
        spec = c.get("/openapi.json").json()
    schema = schemathesis.openapi.from_dict(spec)
    tls = dict(verify=str(own_agent.pki.ca), cert=(str(own_agent.pki.client_cert), str(own_agent.pki.client_key)))
    session = requests.Session()
    failures, answered = [], []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case):
                response = case.call(base_url=own_agent.url, session=session, timeout=60, **tls)
                answered.append(response.status_code)
                if response.status_code >= 500:
                    failures.append((operation.label, mode.value, case.body, response.status_code, response.text[:300]))

            try:
                check()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE  # a GET without parameters has no invalid form
    assert len(answered) > 150 and 200 in answered and 400 in answered
    assert not failures, failures[:5]
    assert own_agent.get("/readyz").status_code == 200


def test_sighup_with_a_moved_listener_exits_for_the_service_manager_to_restart(tmp_path, pki_files, tiny_gguf):  # noqa: F811
    """Deploy reloads a model agent on a new clawbot.json; a listener can only move with a new process, so the
    agent exits with EX_TEMPFAIL (75), which systemd's Restart=on-failure and supervisor's autorestart restart."""
    from clawbot.agentmain import RESTART_EXIT
    from tests.fixtures_agent import free_port

    agent = start_agent(tmp_path, pki_files, tiny_gguf)
    try:
        agent.wait_ready()
        config = json.loads(agent.config_path.read_text())
        config["model_gateway"]["endpoint"] = f"https://localhost:{free_port()}"
        write_config(agent, config)
        agent.signal(signal.SIGHUP)
        wait_for(lambda: agent.proc.poll() is not None, 60, 0.1, "the agent to exit")
        assert agent.proc.returncode == RESTART_EXIT == 75
        assert "restarting the agent to move the listener" in agent.log()
    finally:
        agent.stop()
