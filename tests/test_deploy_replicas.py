"""End to end, three real nodes (one chat node, two model nodes): replicas behind the chat node.

`python deploy.py` fills the chat node's model_gateway.upstreams with both model nodes; 8 concurrent chats are
spread over both; stopping one model agent fails at most the requests it had in flight, every later message is
answered by the other with source `model`; started again, it rejoins without a deploy.
"""

from __future__ import annotations

import json
import shutil
import ssl
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.fixtures_agent import wait_for
from tests.test_deploy_e2e import ADMIN_PASSWORD, CONFIG, config_file, deploy, kernel_settings, ssh, state_dir  # noqa: F401

pytestmark = [pytest.mark.nodes, pytest.mark.slow]


@pytest.fixture(scope="module")
def replicas(three_nodes, kernel_settings, tmp_path_factory):  # noqa: F811
    inventory = tmp_path_factory.mktemp("replicas-inventory")
    shutil.copytree(three_nodes[0].inventory_dir, inventory, dirs_exist_ok=True)
    config = json.loads(json.dumps(CONFIG))
    config["model_gateway"]["endpoint"] = f"https://{three_nodes[1].name}:5000"
    config_file(inventory).parent.mkdir()
    config_file(inventory).write_text(json.dumps(config, indent=2))
    (inventory / "group_vars").mkdir(exist_ok=True)
    (inventory / "group_vars" / "all.yml").write_text(
        f"clawbot_state_dir: {state_dir(inventory)}\nclawbot_admin_password: {ADMIN_PASSWORD}\n")
    proc, _ = deploy(inventory)
    assert proc.returncode == 0, "rollout of one chat node and two model nodes failed"
    return inventory


def chat_client(nodes, inventory) -> httpx.Client:
    ca = ssl.create_default_context(cafile=str(state_dir(inventory) / "ca" / "ca.pem"))
    client = httpx.Client(base_url=f"https://{nodes[0].address}:8443", verify=ca, timeout=300)
    login = client.post("/api/login", json={"username": "admin", "password": ADMIN_PASSWORD})
    assert login.status_code == 200, login.text
    client.headers["X-CSRF-Token"] = login.json()["csrf_token"]
    return client


def reply(client: httpx.Client, conversation: str, text: str) -> dict:
    """The `done` message of one sent message (or {"status": "broken"} when the stream itself failed)."""
    try:
        with client.stream("POST", f"/api/conversations/{conversation}/messages", json={"content": text}) as r:
            assert r.status_code == 200
            done = None
            event = None
            for line in r.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event == "done":
                    done = json.loads(line[5:])["message"]
            return done or {"status": "broken"}
    except httpx.HTTPError as exc:
        return {"status": "broken", "error": str(exc)}


def upstreams(client: httpx.Client) -> dict[str, dict]:
    return {u["url"]: u for u in client.get("/api/status").json()["gateway"]["upstreams"]}


def test_replicas_spread_fail_over_and_rejoin(replicas, three_nodes):
    chat_node, first, second = three_nodes
    c = chat_client(three_nodes, replicas)
    try:
        urls = sorted(upstreams(c))
        assert urls == sorted(f"https://{n.name}:5000" for n in (first, second)), urls
        wait_for(lambda: all(u["state"] == "up" for u in upstreams(c).values()), 60, what="both model nodes up")

        conversations = [c.post("/api/conversations", json={}).json()["id"] for _ in range(8)]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda cid: reply(c, cid, "Name three primary colours."), conversations))
        assert [a.get("source") for a in answers] == ["model"] * 8, answers
        served = {url: u["served"] for url, u in upstreams(c).items()}
        assert all(n >= 1 for n in served.values()), served  # each model node served some

        # stop one model agent while requests run: at most those it had in flight fail
        victim = f"https://{first.name}:5000"
        with ThreadPoolExecutor(8) as pool:
            running = [pool.submit(reply, c, cid, "Tell me a long story about the sea.") for cid in conversations]
            wait_for(lambda: upstreams(c)[victim]["in_flight"] >= 1, 60, interval=0.2,
                     what="a request in flight at the model node to be stopped")
            slots = upstreams(c)[victim]["slots"]  # what can be in flight there at the moment of the stop
            ssh(first, "systemctl stop clawbot-model")
            during = [f.result() for f in running]
        failed = [a for a in during if a.get("source") != "model" or a.get("status") != "complete"]
        assert len(failed) <= slots, (slots, during)
        # what failed was cut mid-answer (kept, marked incomplete), never answered twice or sent to a fallback
        assert all(a.get("status") in ("incomplete", "broken") for a in failed), failed

        after = [reply(c, cid, "Are you still there?") for cid in conversations]
        assert [a.get("source") for a in after] == ["model"] * 8, after
        assert upstreams(c)[victim]["state"] in ("down", "circuit_open")

        # started again: it rejoins without a deploy
        ssh(first, "systemctl start clawbot-model")
        wait_for(lambda: upstreams(c)[victim]["state"] == "up", 180, interval=2, what="the stopped model node back")
        before = upstreams(c)[victim]["served"]
        fresh = [c.post("/api/conversations", json={}).json()["id"] for _ in range(6)]
        with ThreadPoolExecutor(6) as pool:
            assert all(a.get("source") == "model" for a in pool.map(lambda cid: reply(c, cid, "Hello."), fresh))
        assert upstreams(c)[victim]["served"] > before
    finally:
        c.close()
