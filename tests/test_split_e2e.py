"""End to end, the split acceptance of issue 14 on three harness nodes: node1 chat, node2 the main model node,
node3 its RPC worker (inventory group rpc_workers, clawbot_rpc_main: node2).

A generated model whose memory need exceeds one node's declared clawbot_memory_mib but fits the two: `clawbot
validate --inventory` accepts the split and refuses the main node alone with the bytes; deploy rolls it out; the
chat node answers from the model; the worker holds its share (its plan in /status, ggml-rpc-server's memory);
`ss -ltn` on the worker shows ggml-rpc-server on 127.0.0.1 only and the tunnel on the node address; a chat node's
certificate and one from another CA get no RPC session; a worker restart is named, waited for and visible in
/status; a re-run changes nothing.

Its own three-node cluster (instance `<harness instance>s<slot>`, beyond the subnets the session and lifecycle
clusters use), so it can run beside the two-node session tests.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from clawbot.common import pki, sizing
from tests.fixtures_agent import wait_for
from tests.fixtures_models import write_model_file
from tests.nodes.fixtures import own_cluster
from tests.test_deploy_e2e import (ADMIN_PASSWORD, VAULT_PASSWORD, changed_ops, config_file, deploy, ssh, state_dir,
                                   vaulted)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.nodes, pytest.mark.slow]

RPC_PORT, TUNNEL_PORT, LOCAL_PORT = 50052, 50053, 50060  # model_server.split's defaults
CONTEXT, MAX_TOKENS = 512, 32
CONFIG = {
    "model_gateway": {"endpoint": "https://MODEL:5000", "max_tokens": MAX_TOKENS, "max_concurrency": 1,
                      "rate_limit": {"requests_per_second": 5, "burst": 4}},
    "context_window": CONTEXT,
    "fallback_strategies": [],
    # hugepages off: vm.nr_hugepages is kernel-wide here, and another harness cluster may be using it
    "model_server": {"parallel_slots": 1, "model_name": "split-test", "threads": 1, "hugepages": "off"},
    "chat": {"summary": {"max_tokens": 32}},
}


@pytest.fixture(scope="module")
def split_nodes():
    """Three fresh nodes of their own instance, torn down (and checked for leftovers) at the end."""
    yield from own_cluster(3, "s", 8)


def need_bytes(model: Path) -> int:
    """What the model needs on one node at this config's context and slots (clawbot's own sizing)."""
    return sizing.size_model(sizing.read_model_info(model), CONTEXT, 1, flash_attn=True).total_bytes


@pytest.fixture(scope="module")
def split_model(tmp_path_factory) -> Path:
    """~140 MB of random weights in 8 layers (Q8_0): the weights, not the buffers, decide the split."""
    return write_model_file(tmp_path_factory.mktemp("split-e2e-model"), "tiny", "Q8_0", n_layer=8, n_embd=1024,
                            n_head=8, n_head_kv=4, n_ff=4096, n_vocab=512)


def write_inventory(inventory: Path, nodes, model: Path, memory_mib: int, with_worker: bool = True) -> None:
    """The harness's hosts.yml with node3 moved from model_nodes into rpc_workers (lending to node2), each node's
    memory declared, and the model file named."""
    chat, main, worker = nodes
    hosts = yaml.safe_load((chat.inventory_dir / "hosts.yml").read_text())  # the harness's: node2, node3 model nodes
    children = hosts["all"]["children"]
    model_hosts = children["model_nodes"]["hosts"]
    worker_vars = model_hosts.pop(worker.name)
    model_hosts[main.name].update({"clawbot_memory_mib": memory_mib, "clawbot_model_file": str(model)})
    if with_worker:
        children["rpc_workers"] = {"hosts": {worker.name: {**worker_vars, "clawbot_memory_mib": memory_mib,
                                                           "clawbot_rpc_main": main.name}}}
    (inventory / "hosts.yml").write_text(yaml.safe_dump(hosts, sort_keys=False))


@pytest.fixture(scope="module")
def split_inventory(split_nodes, split_model, tmp_path_factory, monkeypatch_module):
    chat, main, worker = split_nodes
    inventory = tmp_path_factory.mktemp("split-inventory")
    shutil.copytree(split_nodes[0].inventory_dir, inventory, dirs_exist_ok=True)
    memory_mib = math.ceil(need_bytes(split_model) * 0.75 / sizing.MIB)  # under one node's need, two hold it
    write_inventory(inventory, split_nodes, split_model, memory_mib)
    config = json.loads(json.dumps(CONFIG))
    config["model_gateway"]["endpoint"] = f"https://{main.address}:5000"
    config_file(inventory).parent.mkdir()
    config_file(inventory).write_text(json.dumps(config, indent=2))
    (inventory / "group_vars").mkdir(exist_ok=True)
    (inventory / "group_vars" / "all.yml").write_text(
        f"clawbot_state_dir: {state_dir(inventory)}\nclawbot_admin_password: {vaulted(ADMIN_PASSWORD)}\n")
    vault_file = tmp_path_factory.mktemp("split-vault") / "vault-pass"
    vault_file.write_text(VAULT_PASSWORD + "\n")
    vault_file.chmod(0o600)
    monkeypatch_module.setenv("ANSIBLE_VAULT_PASSWORD_FILE", str(vault_file))
    return inventory, memory_mib


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def validate(inventory: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clawbot", "validate", "--inventory", str(inventory),
                           str(config_file(inventory))], capture_output=True, text=True, timeout=120)


def test_validate_accepts_the_split_and_refuses_the_main_node_alone(split_inventory, split_nodes, split_model,
                                                                    tmp_path):
    inventory, memory_mib = split_inventory
    assert need_bytes(split_model) > memory_mib * sizing.MIB  # one node cannot hold it...
    accepted = validate(inventory)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr  # ...two can
    alone = tmp_path / "alone"
    shutil.copytree(inventory, alone)
    write_inventory(alone, split_nodes, split_model, memory_mib, with_worker=False)
    refused = validate(alone)
    assert refused.returncode == 1, refused.stdout
    assert f"{split_nodes[1].name}: model needs" in refused.stdout
    assert f"only {sizing.gib(memory_mib * sizing.MIB)} is available" in refused.stdout


@pytest.fixture(scope="module")
def rolled_out(split_inventory, split_nodes):
    inventory, _ = split_inventory
    proc, result = deploy(inventory)
    assert proc.returncode == 0, "the split rollout failed"
    return {"stdout": proc.stdout, "result": result}


def model_status(inventory: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "clawbot", "status", "-i", str(inventory), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return next(row for row in json.loads(proc.stdout) if row["role"] == "model")["body"]["model"]


def test_the_worker_serves_rpc_on_loopback_only_and_the_tunnel_on_its_address(rolled_out, split_nodes):
    chat, main, worker = split_nodes
    assert f"preflight {worker.name}: RPC worker of {main.name}" in rolled_out["stdout"]
    assert f"preflight {main.name}: the split fits" in rolled_out["stdout"]
    listening = {line.split()[3] for line in ssh(worker, "ss -ltnH").splitlines() if line.strip()}
    rpc = {a for a in listening if a.rsplit(":", 1)[1] == str(RPC_PORT)}
    tunnel = {a for a in listening if a.rsplit(":", 1)[1] == str(TUNNEL_PORT)}
    assert rpc == {f"127.0.0.1:{RPC_PORT}"}, listening
    assert tunnel == {f"{worker.address}:{TUNNEL_PORT}"}, listening
    assert ssh(worker, "systemctl is-active clawbot-rpc clawbot-rpc-tunnel").split() == ["active", "active"]
    assert ssh(worker, "systemctl is-active clawbot-model || true").strip() != "active"  # no agent on a worker
    assert ssh(worker, "ps -o user= -C ggml-rpc-server").split() == ["clawbot-rpc"]  # not the keys' owner
    assert ssh(main, "systemctl is-active clawbot-rpc-tunnel clawbot-model").split() == ["active", "active"]
    main_listening = {line.split()[3] for line in ssh(main, "ss -ltnH").splitlines() if line.strip()}
    assert f"127.0.0.1:{LOCAL_PORT}" in main_listening
    assert not any(a.endswith(f":{RPC_PORT}") for a in main_listening)


def test_the_chat_node_answers_from_the_split_model(rolled_out, split_inventory, split_nodes):
    import httpx

    inventory, _ = split_inventory
    chat, main, worker = split_nodes
    ca = ssl.create_default_context(cafile=str(state_dir(inventory) / "ca" / "ca.pem"))
    with httpx.Client(base_url=f"https://{chat.address}:8443", verify=ca, timeout=300) as client:
        login = client.post("/api/login", json={"username": "admin", "password": ADMIN_PASSWORD})
        assert login.status_code == 200, login.text
        client.headers["X-CSRF-Token"] = login.json()["csrf_token"]
        conversation = client.post("/api/conversations", json={}).json()
        with client.stream("POST", f"/api/conversations/{conversation['id']}/messages",
                           json={"content": "Say hello."}) as stream:
            assert stream.status_code == 200
            body = "".join(stream.iter_text())
        assert "event: done" in body or '"done"' in body, body[-2000:]
        messages = client.get(f"/api/conversations/{conversation['id']}").json()["messages"]
    reply = messages[-1]
    assert reply["role"] == "assistant" and reply["source"] == "model", reply
    assert reply["status"] == "complete" and reply["content"] is not None, reply  # random weights: any text


def test_the_worker_holds_its_share_of_the_weights(rolled_out, split_inventory, split_nodes, split_model):
    inventory, _ = split_inventory
    chat, main, worker = split_nodes
    model = model_status(inventory)
    assert model["state"] == "ready"
    cut = model["plan"]["split"]["value"]
    names = [node["name"] for node in cut["nodes"]]
    assert names == ["this node", worker.name] and cut["fits"]  # the agent's own plan names itself "this node"
    share = cut["nodes"][1]
    assert share["n_layers"] > 0 and share["output"] and share["available_bytes"] > 0
    assert f"--rpc 127.0.0.1:{LOCAL_PORT}" in " ".join(model["command"])
    entry = model["rpc_workers"][0]
    assert (entry["name"], entry["state"], entry["sessions_lost"]) == (worker.name, "up", 0)
    installed = json.loads(ssh(main, "cat /etc/clawbot/clawbot.json"))["model_server"]["split"]["workers"]
    assert installed == [{"name": worker.name, "address": worker.address, "port": LOCAL_PORT,
                          "memory_mib": installed[0]["memory_mib"]}] and installed[0]["memory_mib"] > 0
    # the worker's ggml-rpc-server really holds its layers' weights (RSS, KiB)
    rss_kib = int(ssh(worker, "ps -o rss= -C ggml-rpc-server").split()[0])
    assert rss_kib * 1024 >= share["weights_bytes"] * 0.95, (rss_kib, share)
    assert "Accepted client connection" in ssh(worker, "journalctl -u clawbot-rpc --no-pager")


def _hello(address: str, context: ssl.SSLContext) -> str:
    raw = socket.create_connection((address, TUNNEL_PORT), timeout=10)
    try:
        sock = context.wrap_socket(raw, server_hostname=address)
        sock.sendall(bytes([0]) + (0).to_bytes(8, "little"))  # ggml's RPC HELLO
        return f"got {len(data)} bytes" if (data := sock.recv(64)) else "closed"
    except (ssl.SSLError, OSError) as exc:
        return f"refused: {exc}"
    finally:
        raw.close()


def test_a_chat_nodes_certificate_and_another_cas_get_no_rpc_session(rolled_out, split_inventory, split_nodes,
                                                                     tmp_path):
    inventory, _ = split_inventory
    chat, main, worker = split_nodes
    accepted = ssh(worker, "journalctl -u clawbot-rpc --no-pager | grep -c 'Accepted client connection' || true")
    nodes_dir = state_dir(inventory) / "nodes"
    other_key, other_cert = pki.create_ca("another CA", permitted_dns=[main.name], permitted_ips=["10.0.0.0/8"])
    key, cert = pki.issue_client_cert(other_key, other_cert, main.name, dns_names=[main.name])
    pki.write_private_key(tmp_path / "other.key", key)
    pki.write_certificate(tmp_path / "other.pem", cert)
    for cert_path, key_path in ((nodes_dir / chat.name / "client.pem", nodes_dir / chat.name / "client.key"),
                                (tmp_path / "other.pem", tmp_path / "other.key")):
        context = ssl.create_default_context(cafile=str(state_dir(inventory) / "ca" / "ca.pem"))
        context.check_hostname = False  # the worker is reached by address; its certificate is not the question
        context.load_cert_chain(str(cert_path), str(key_path))
        outcome = _hello(worker.address, context)
        assert outcome.startswith(("refused", "closed")), (cert_path, outcome)
    after = ssh(worker, "journalctl -u clawbot-rpc --no-pager | grep -c 'Accepted client connection' || true")
    assert after == accepted  # ggml-rpc-server never saw them
    refusals = ssh(worker, "journalctl -u clawbot-rpc-tunnel --no-pager")
    assert re.search(r"CERT: .*check failed|certificate verify failed|Rejected by CERT", refusals), refusals[-3000:]
    assert model_status(inventory)["state"] == "ready"  # the model's own session was not disturbed


def test_a_worker_restart_is_named_waited_for_and_visible_in_status(rolled_out, split_inventory, split_nodes):
    inventory, _ = split_inventory
    chat, main, worker = split_nodes
    before = model_status(inventory)
    ssh(worker, "systemctl stop clawbot-rpc")

    def waiting():
        model = model_status(inventory)
        return model if model["state"] != "ready" and worker.name in model["reason"] else None
    lost = wait_for(waiting, 90, 1.0, "the main node to name its lost worker")
    assert lost["rpc_workers"][0]["sessions_lost"] == 1
    ssh(worker, "systemctl start clawbot-rpc")

    def ready_again():
        model = model_status(inventory)
        return model if model["state"] == "ready" else None
    back = wait_for(ready_again, 300, 2.0, "the main node to restart cleanly once its worker is back")
    assert back["restarts"] == before["restarts"] + 1
    assert back["rpc_workers"][0]["state"] == "up" and back["rpc_workers"][0]["sessions"] == 2


def test_second_run_changes_nothing(rolled_out, split_inventory):
    inventory, _ = split_inventory
    started = time.monotonic()
    proc, result = deploy(inventory)
    assert proc.returncode == 0
    assert changed_ops(result) == [], changed_ops(result)
    print(f"split re-run with nothing drifted: {time.monotonic() - started:.1f} s")
