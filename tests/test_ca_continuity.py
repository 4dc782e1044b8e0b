"""CA continuity and "the gateway serves only its chat nodes": clawbot.control.certificates, nodeconfig and the
status explanations, with real certificates, real TLS handshakes over loopback and a real model agent."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from clawbot.common import pki
from clawbot.common.config import check_bytes
from clawbot.control import certificates, nodeconfig, status
from clawbot.control.certificates import CAError, cluster_ca, ensure_node_material, record_rollout
from clawbot.control.inventory import Host, Inventory
from clawbot.control.state import CONTROL_NAME, MONITORING_NAME
from tests.fixtures_agent import Agent, agent_config, free_port, llama_server_binary, wait_for  # noqa: F401
from tests.fixtures_models import models_dir, tiny_gguf  # noqa: F401  (fixtures)
from tests.test_pki import handshake

ROOT = Path(__file__).resolve().parents[1]
DOMAIN = "clawbot.internal"
HOSTS = {"chat-node": ["chat-node", "192.168.1.50"], "model-node": ["model-node", "192.168.1.100"]}


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def issue_all(ca, hosts: dict[str, list[str]]) -> dict[str, certificates.NodeMaterial]:
    ensure_node_material(ca, CONTROL_NAME, [CONTROL_NAME])
    return {name: ensure_node_material(ca, name, names) for name, names in hosts.items()}


class Node:
    """What one node holds on disk: the files deploy copied to it at its last successful run."""

    def __init__(self, directory: Path):
        self.dir = directory

    def install(self, material: certificates.NodeMaterial) -> "Node":
        self.dir.mkdir(parents=True, exist_ok=True)
        for name in ("ca_cert", "server_cert", "server_key", "client_cert", "client_key"):
            shutil.copyfile(getattr(material, name), self.dir / name)
        return self

    def server(self) -> ssl.SSLContext:
        return pki.server_ssl_context(self.dir / "server_cert", self.dir / "server_key", self.dir / "ca_cert")

    def client(self) -> ssl.SSLContext:
        return pki.client_ssl_context(self.dir / "client_cert", self.dir / "client_key", self.dir / "ca_cert")


def talks(a: Node, a_name: str, b: Node, b_name: str) -> bool:
    """Both directions: a's client to b's server, and b's client to a's server."""
    server_seen, client_seen = handshake(b.server(), a.client(), server_hostname=b_name)
    back_server, back_client = handshake(a.server(), b.client(), server_hostname=a_name)
    return all(o.ok for o in (server_seen, client_seen, back_server, back_client))


def issued_by(path: Path, ca_cert) -> bool:
    try:
        pki.load_certificate(path).verify_directly_issued_by(ca_cert)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not issued by it"
        return False


# --------------------------------------------------------------------------- what a new CA permits


def test_a_new_ca_permits_the_domain_localhost_the_names_and_private_blocks():
    dns, ips = certificates.ca_subtrees(DOMAIN, [
        "chat-node", "192.168.1.50", "model-node", "gpu.clawbot.internal", "203.0.113.7", "fd00::5",
        "llm.lab.example", "a.llm.lab.example", "10.3.4.5", "100.64.1.2", "172.20.0.9"])
    assert dns == [DOMAIN, "chat-node", "localhost", "model-node", "llm.lab.example"]
    assert ips == ["10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                   "203.0.113.7/32", "::1/128", "fc00::/7"]


def test_client_certificates_carry_only_the_nodes_own_names(tmp_path):
    ca = cluster_ca(tmp_path, HOSTS, DOMAIN, log=lambda _: None)
    material = issue_all(ca, HOSTS)["model-node"]
    client = pki.san_identities(pki.load_certificate(material.client_cert))
    server = pki.san_identities(pki.load_certificate(material.server_cert))
    assert client.describe() == "DNS:model-node, IP:192.168.1.100"
    assert "DNS:localhost" in server.describe() and "IP:127.0.0.1" in server.describe() and "IP:::1" in server.describe()
    control = pki.san_identities(pki.load_certificate(tmp_path / "nodes" / CONTROL_NAME / "client.pem"))
    assert control.describe() == f"DNS:{CONTROL_NAME}"
    for key in (tmp_path / "ca" / "ca.key", material.server_key, material.client_key):
        assert key.stat().st_mode & 0o777 == 0o600


# --------------------------------------------------------------------------- continuity without rotation


def test_a_name_under_the_domain_or_an_address_in_the_block_keeps_the_ca_and_reissues_only_that_node(tmp_path):
    ca = cluster_ca(tmp_path, HOSTS, DOMAIN, log=lambda _: None)
    issue_all(ca, HOSTS)
    imported = tmp_path / "browser-imported-ca.pem"  # a browser or app imported the CA after the first deploy
    shutil.copyfile(tmp_path / "ca" / "ca.pem", imported)
    before = snapshot(tmp_path / "ca")
    chat_before = snapshot(tmp_path / "nodes" / "chat-node")

    # a new node named under the cluster domain, an address in the same private block, a name added to a node
    grown = {**HOSTS, "model-node": [*HOSTS["model-node"], "gpu.clawbot.internal"],
             "model-2.clawbot.internal": ["model-2.clawbot.internal", "192.168.7.9"]}
    ca = cluster_ca(tmp_path, grown, DOMAIN, log=lambda _: None)
    materials = issue_all(ca, grown)
    assert snapshot(tmp_path / "ca") == before  # same CA, same trust bundle, byte for byte
    assert materials["chat-node"].reissued == [] and snapshot(tmp_path / "nodes" / "chat-node") == chat_before
    assert [r.split(":")[0] for r in materials["model-node"].reissued] == ["server certificate", "client certificate"]
    assert all("SANs changed" in r for r in materials["model-node"].reissued)
    assert "DNS:gpu.clawbot.internal" in pki.san_identities(pki.load_certificate(materials["model-node"].server_cert)).describe()

    # The CA a client imported before still verifies the reissued and the new node's certificates, in real TLS.
    chat = Node(tmp_path / "on" / "chat").install(materials["chat-node"])
    for name, host in (("gpu.clawbot.internal", "model-node"), ("192.168.7.9", "model-2.clawbot.internal")):
        node = Node(tmp_path / "on" / host).install(materials[host])
        browser = ssl.create_default_context(cafile=str(imported))
        browser.load_cert_chain(chat.dir / "client_cert", chat.dir / "client_key")
        server_seen, client_seen = handshake(node.server(), browser, server_hostname=name)
        assert server_seen.ok and client_seen.ok, (server_seen.error, client_seen.error)


def test_a_name_outside_the_ca_is_refused_with_the_rotate_flag_and_nothing_is_written(tmp_path):
    ca = cluster_ca(tmp_path, HOSTS, DOMAIN, log=lambda _: None)
    issue_all(ca, HOSTS)
    before = snapshot(tmp_path)
    for host, extra in (("model-node", "llm.example.com"), ("model-node", "203.0.113.7"), ("model-2", "model-2")):
        grown = {**HOSTS, host: [*HOSTS.get(host, []), extra]}
        with pytest.raises(CAError) as refused:
            cluster_ca(tmp_path, grown, DOMAIN, log=lambda _: None)
        message = str(refused.value)
        assert f"host {host}: {extra}" in message
        if extra == "model-2":  # a new host with a bare name: the message shows the name that would fit
            assert f"e.g. model-2.{DOMAIN} for model-2" in message
        assert str(tmp_path / "ca" / "ca.pem") in message
        assert f"under {DOMAIN}, chat-node" in message and "192.168.0.0/16" in message and "127.0.0.0/8" in message
        assert "`python deploy.py --rotate-ca`" in message
        assert snapshot(tmp_path) == before


def test_deploy_refuses_a_name_outside_the_ca_before_connecting(tmp_path):
    inventory = tmp_path / "inventory"
    (inventory / "host_vars").mkdir(parents=True)
    (inventory / "hosts.yml").write_text(
        "all:\n  vars:\n    clawbot_state_dir: state\n    clawbot_admin_password: e2e-admin-password\n  children:\n"
        "    chat_nodes:\n      hosts:\n        chat-node:\n          ansible_host: 192.168.1.50\n"
        "    model_nodes:\n      hosts:\n        model-node:\n          ansible_host: 192.168.1.100\n")
    (inventory / "clawbot.json").write_text(json.dumps({"model_gateway": {"endpoint": "https://model-node:5000"}}))
    cluster_ca(inventory / "state", HOSTS, DOMAIN, log=lambda _: None)
    before = snapshot(inventory / "state" / "ca")
    (inventory / "host_vars" / "model-node.yml").write_text("clawbot_names: [llm.example.com]\n")
    proc = subprocess.run([sys.executable, str(ROOT / "deploy.py"), "-i", str(inventory)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "host model-node: llm.example.com" in proc.stderr and "python deploy.py --rotate-ca" in proc.stderr
    assert "no host was touched" in proc.stderr and "connecting" not in proc.stdout
    assert snapshot(inventory / "state" / "ca") == before and not (inventory / "state" / "nodes").exists()


# --------------------------------------------------------------------------- rotation


def test_rotation_trusts_old_and_new_side_by_side_and_no_step_leaves_nodes_unable_to_talk(tmp_path):
    log: list[str] = []
    ca = cluster_ca(tmp_path, HOSTS, DOMAIN, log=log.append)
    materials = issue_all(ca, HOSTS)
    old_ca, old_ca_bytes = ca.cert, (tmp_path / "ca" / "ca.pem").read_bytes()
    chat = Node(tmp_path / "on" / "chat").install(materials["chat-node"])
    model = Node(tmp_path / "on" / "model").install(materials["model-node"])
    assert talks(chat, "chat-node", model, "model-node")

    # --rotate-ca: a new CA, the old one kept; the bundle holds both; leaves stay from the old CA (step 1).
    ca = cluster_ca(tmp_path, HOSTS, DOMAIN, rotate=True, log=log.append)
    assert (tmp_path / "ca" / "previous.pem").read_bytes() == old_ca_bytes
    assert (tmp_path / "ca" / "ca.pem").read_bytes() != old_ca_bytes
    assert [pki.fingerprint(c) for c in pki.load_certificates(tmp_path / "ca" / "trust.pem")] == [
        pki.fingerprint(ca.cert), pki.fingerprint(old_ca)]
    for key in ("ca.key", "previous.key"):
        assert (tmp_path / "ca" / key).stat().st_mode & 0o777 == 0o600
    assert any("step 1 of 3" in line for line in log) and any("import the new" in line for line in log)
    materials = issue_all(ca, HOSTS)
    assert all(m.reissued == [] for m in materials.values())
    with pytest.raises(CAError, match="already under way"):
        cluster_ca(tmp_path, HOSTS, DOMAIN, rotate=True, log=log.append)

    # A --limit run reaches the chat node only: it holds the bundle, the model node still only the old CA.
    chat.install(materials["chat-node"])
    record_rollout(ca, materials, ["chat-node"], log=log.append)
    assert talks(chat, "chat-node", model, "model-node")
    ca = cluster_ca(tmp_path, HOSTS, DOMAIN, log=log.append)
    materials = issue_all(ca, HOSTS)
    assert all(m.reissued == [] for m in materials.values()), "a node without the bundle would refuse new leaves"
    model.install(materials["model-node"])
    record_rollout(ca, materials, ["model-node"], log=log.append)
    assert "step 2 of 3" in log[-1]

    # Step 2: every node holds the bundle, so leaves come from the new CA; a --limit run renews one node first.
    ca = cluster_ca(tmp_path, HOSTS, DOMAIN, log=log.append)
    materials = issue_all(ca, HOSTS)
    assert all("signed by another CA" in m.reissued[0] for m in materials.values())
    assert issued_by(materials["model-node"].server_cert, ca.cert)
    model.install(materials["model-node"])
    record_rollout(ca, materials, ["model-node"], log=log.append)
    assert talks(chat, "chat-node", model, "model-node")  # old-CA leaves and new-CA leaves, both trusted
    assert issued_by(chat.dir / "server_cert", old_ca) and issued_by(model.dir / "server_cert", ca.cert)
    ca = cluster_ca(tmp_path, HOSTS, DOMAIN, log=log.append)
    assert ca.previous is not None, "the chat node still holds an old-CA leaf"
    materials = issue_all(ca, HOSTS)
    chat.install(materials["chat-node"])
    record_rollout(ca, materials, ["chat-node"], log=log.append)
    assert talks(chat, "chat-node", model, "model-node")

    # Step 3: every node holds new leaves, so the next run drops the old CA from the bundle (and keeps it).
    ca = cluster_ca(tmp_path, HOSTS, DOMAIN, log=log.append)
    assert any("step 3 of 3" in line for line in log)
    assert [pki.fingerprint(c) for c in pki.load_certificates(tmp_path / "ca" / "trust.pem")] == [pki.fingerprint(ca.cert)]
    assert not (tmp_path / "ca" / "previous.pem").exists() and not (tmp_path / "ca" / "rotation.json").exists()
    kept = list((tmp_path / "ca" / "retired").glob("*.pem"))
    assert [p.read_bytes() for p in kept] == [old_ca_bytes]
    assert kept[0].with_suffix(".key").stat().st_mode & 0o777 == 0o600
    materials = issue_all(ca, HOSTS)
    assert all(m.reissued == [] for m in materials.values())
    chat.install(materials["chat-node"]), model.install(materials["model-node"])
    assert talks(chat, "chat-node", model, "model-node")
    # A client that still holds only the old CA no longer verifies the nodes: it must import the new ca.pem.
    old_only = ssl.create_default_context(cadata=old_ca_bytes.decode())
    _, client_seen = handshake(model.server(), old_only, server_hostname="model-node")
    assert not client_seen.ok and "certificate verify failed" in client_seen.error


def test_a_name_only_the_new_ca_permits_waits_for_step_2(tmp_path):
    ca = cluster_ca(tmp_path, HOSTS, "old.internal", log=lambda _: None)
    issue_all(ca, HOSTS)
    grown = {**HOSTS, "model-node": [*HOSTS["model-node"], "gpu.clawbot.internal"]}
    with pytest.raises(CAError):
        cluster_ca(tmp_path, grown, DOMAIN, log=lambda _: None)
    ca = cluster_ca(tmp_path, grown, DOMAIN, rotate=True, log=lambda _: None)
    material = ensure_node_material(ca, "model-node", grown["model-node"])
    assert material.notes and "gpu.clawbot.internal" in material.notes[0] and "step 2" in material.notes[0]
    assert "gpu.clawbot.internal" not in pki.san_identities(pki.load_certificate(material.server_cert)).describe()
    record_rollout(ca, {"chat-node": ensure_node_material(ca, "chat-node", HOSTS["chat-node"]), "model-node": material},
                   ["chat-node", "model-node"], log=lambda _: None)
    ca = cluster_ca(tmp_path, grown, DOMAIN, log=lambda _: None)
    material = ensure_node_material(ca, "model-node", grown["model-node"])
    assert "DNS:gpu.clawbot.internal" in pki.san_identities(pki.load_certificate(material.server_cert)).describe()


# --------------------------------------------------------------------------- the clawbot.json nodes get


def _inventory(tmp_path) -> Inventory:
    hosts = {"chat-a": Host("chat-a", ["chat_nodes"], {}), "chat-b": Host("chat-b", ["chat_nodes"], {}),
             "model-a": Host("model-a", ["model_nodes"], {})}
    return Inventory(str(tmp_path), hosts)


def test_rendered_config_fills_allowed_clients_with_the_chat_nodes_and_keeps_a_user_list(tmp_path):
    source = tmp_path / "clawbot.json"
    source.write_text('{"model_gateway": {"endpoint": "https://model-a:9443"}, "context_window": 4096}')
    state = tmp_path / "state"
    state.mkdir()
    out = nodeconfig.render(source, _inventory(tmp_path), state)
    rendered = json.loads(out.read_text())
    assert out == state / "clawbot.json"
    assert rendered["model_gateway"]["allowed_clients"] == ["chat-a", "chat-b", CONTROL_NAME, MONITORING_NAME]
    assert rendered["context_window"] == 4096
    assert check_bytes(out.read_bytes(), str(out)).ok
    first = out.read_bytes(), out.stat().st_mtime_ns
    assert nodeconfig.render(source, _inventory(tmp_path), state) == out
    assert (out.read_bytes(), out.stat().st_mtime_ns) == first  # a re-run rewrites nothing

    source.write_text('{"model_gateway": {"endpoint": "https://model-a:9443", "allowed_clients": ["10.0.0.9"]}}')
    out = nodeconfig.render(source, _inventory(tmp_path), state)
    assert json.loads(out.read_text())["model_gateway"]["allowed_clients"] == ["10.0.0.9"]


# --------------------------------------------------------------------------- a real gateway


@pytest.mark.slow
def test_gateway_serves_only_its_chat_nodes(tmp_path, tiny_gguf, llama_server_binary):  # noqa: F811
    """A real model agent with the certificates deploy issues: the chat node's certificate is served, the model
    node's own gets 403 with a JSON reason (but may call the probes), no certificate fails the handshake; with a
    user list without clawbot-control, `clawbot status` says why the gateway refuses it."""
    hosts = {"chat-node": ["chat-node"], "model-node": ["model-node"]}
    ca = cluster_ca(tmp_path / "state", hosts, DOMAIN, log=lambda _: None)
    materials = issue_all(ca, hosts)
    model = materials["model-node"]
    tls = {"ca_cert": str(model.ca_cert), "server_cert": str(model.server_cert), "server_key": str(model.server_key),
           "client_cert": str(model.client_cert), "client_key": str(model.client_key)}
    inventory = Inventory(str(tmp_path), {n: Host(n, [g], {"ansible_host": "127.0.0.1"}) for n, g in
                                          (("chat-node", "chat_nodes"), ("model-node", "model_nodes"))})
    source = tmp_path / "clawbot.json"
    source.write_text(json.dumps(agent_config(tiny_gguf, tls, gateway_port=free_port(), model_port=free_port(),
                                              model_gateway={"allowed_clients": []})))
    node_config = nodeconfig.render(source, inventory, tmp_path / "state")
    control = tmp_path / "state" / "nodes" / CONTROL_NAME
    trust = ca.trust_path

    def get(path, cert_dir=None, material=None):
        context = ssl.create_default_context(cafile=str(trust))
        if material is not None:
            context.load_cert_chain(material.client_cert, material.client_key)
        elif cert_dir is not None:
            context.load_cert_chain(cert_dir / "client.pem", cert_dir / "client.key")
        return httpx.get(agent.url + path, verify=context, timeout=30)

    agent = Agent(node_config, tmp_path / "agent-state", None).start()
    try:
        wait_for(lambda: get("/readyz", material=model).status_code == 200, 90, 0.2, "the model agent to be ready")
        assert get("/v1/models", material=materials["chat-node"]).status_code == 200
        refused = get("/v1/models", material=model)
        assert refused.status_code == 403 and refused.headers["content-type"] == "application/json"
        error = refused.json()["error"]
        assert error["code"] == "client_not_allowed" and "DNS:model-node" in error["message"]
        assert get("/status", material=model).status_code == 403
        assert get("/healthz", material=model).status_code == 200  # probes: any certificate of the cluster CA
        assert get("/status", cert_dir=control).status_code == 200  # clawbot status
        with pytest.raises(httpx.HTTPError):
            get("/healthz")  # no client certificate: refused in the TLS handshake
    finally:
        agent.stop()

    # A user-set list is kept as it is: then the control machine's certificate is refused, and status says why.
    config = json.loads(source.read_text())
    config["model_gateway"]["allowed_clients"] = ["chat-node"]
    source.write_text(json.dumps(config))
    node_config = nodeconfig.render(source, inventory, tmp_path / "state")
    agent = Agent(node_config, tmp_path / "agent-state-2", None).start()
    try:
        wait_for(lambda: get("/healthz", material=model).status_code == 200, 60, 0.2, "the gateway to listen")
        assert get("/v1/models", material=materials["chat-node"]).status_code == 200
        row = status.node_status(inventory.hosts["model-node"], "model", config, tmp_path / "state", timeout=10)
        assert row["http"] == 403
        assert "allowed_clients in clawbot.json does not name clawbot-control" in row["hint"]
    finally:
        agent.stop()


# --------------------------------------------------------------------------- clawbot status explains refusals


def _tls_node(tmp_path: Path, trust: Path, server: tuple[Path, Path]):
    """A TLS listener on loopback that demands a client certificate from `trust`, answering HTTP 200."""
    import socket
    import threading

    context = pki.server_ssl_context(server[0], server[1], trust)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(20)

    def serve():
        for _ in range(2):  # status connects twice: the request, then a look at the server certificate
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            try:
                with context.wrap_socket(raw, server_side=True) as tls:
                    tls.recv(4096)
                    tls.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
            except (ssl.SSLError, OSError):
                pass
            finally:
                raw.close()

    threading.Thread(target=serve, daemon=True).start()
    return listener


def test_status_explains_a_node_that_does_not_trust_this_machines_certificate(tmp_path):
    hosts = {"model-node": ["model-node", "127.0.0.1"]}
    ca = cluster_ca(tmp_path / "state", hosts, DOMAIN, log=lambda _: None)
    issue_all(ca, hosts)
    other = cluster_ca(tmp_path / "other", hosts, DOMAIN, log=lambda _: None)  # the node holds another cluster's CA
    node = ensure_node_material(other, "model-node", hosts["model-node"])
    host = Host("model-node", ["model_nodes"], {"ansible_host": "127.0.0.1"})

    listener = _tls_node(tmp_path, other.trust_path, (node.server_cert, node.server_key))
    config = {"model_gateway": {"endpoint": f"https://127.0.0.1:{listener.getsockname()[1]}"}}
    try:
        row = status.node_status(host, "model", config, tmp_path / "state", timeout=10)
    finally:
        listener.close()
    assert "certificate verify failed" in row["error"].lower()
    assert "does not trust model-node's server certificate" in row["hint"] and str(ca.trust_path) in row["hint"]

    # The node presents a certificate this machine trusts but trusts another CA for clients: "unknown ca".
    ours = ensure_node_material(ca, "model-node", hosts["model-node"])
    listener = _tls_node(tmp_path, other.trust_path, (ours.server_cert, ours.server_key))
    config = {"model_gateway": {"endpoint": f"https://127.0.0.1:{listener.getsockname()[1]}"}}
    try:
        row = status.node_status(host, "model", config, tmp_path / "state", timeout=10)
    finally:
        listener.close()
    assert "unknown ca" in row["error"].lower()
    assert "does not trust the CA that issued this machine's client certificate" in row["hint"]
    assert str(tmp_path / "state" / "nodes" / CONTROL_NAME / "client.pem") in row["hint"]


def test_status_explains_a_missing_client_certificate():
    row = {"host": "model-node", "role": "model", "url": "https://x:5000/status",
           "error": "ReadError: [SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required"}
    hint = status.explain(row, "x", "/state/ca/trust.pem", "/state/nodes/clawbot-control/client.pem")
    assert "wants a client certificate from the cluster CA" in hint and "/state/nodes/clawbot-control/client.pem" in hint


def test_an_old_state_directory_without_trust_pem_verifies_with_ca_pem(tmp_path):
    (tmp_path / "ca").mkdir()
    assert certificates.trust_path(tmp_path) == tmp_path / "ca" / "ca.pem"
