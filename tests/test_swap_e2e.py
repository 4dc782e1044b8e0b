"""End to end, the staged swap of issue 15 on two harness nodes of their own (node1 chat, node2 model): while a
person chats through the chat node without pause, deploy changes the model file and its name; every message is
answered by a model (none fails, none is a fallback) and the new name is in the chat node's /v1/models once deploy
has returned. Then a model that fails the quality gate: deploy exits 1 naming the failed check with its numbers, the
old model answers throughout, and a re-run tries it again (and refuses it again).

Models: modelgen's tiny preset in F16 (random weights), its Q8_0 made by the vendored llama-quantize, and a
block-shuffled copy of that Q8_0 (random weights of the same shape). Random weights pass only the smoke set's
over-long refusal, so this clawbot.json sets `quality_gate.min_smoke_pass_rate: 0` and the distribution check
decides (tests/test_quality.py covers the smoke set; the demo model passes 7 of 12).
"""

from __future__ import annotations

import json
import shutil
import ssl
import threading

import httpx
import pytest
import yaml

from tests.fixtures_agent import llama_server_binary  # noqa: F401
from tests.fixtures_quality import swap_models
from tests.nodes.fixtures import own_cluster
from tests.test_deploy_e2e import ADMIN_PASSWORD, config_file, deploy, ssh, state_dir

pytestmark = [pytest.mark.nodes, pytest.mark.slow]

CONFIG = {
    "model_gateway": {"endpoint": "https://MODEL:5000", "max_tokens": 16, "max_concurrency": 2},
    "context_window": 1024,
    "fallback_strategies": ["knowledge_base"],
    # hugepages off: vm.nr_hugepages is kernel-wide here, and another harness cluster may be using it
    "model_server": {"parallel_slots": 2, "model_name": "tiny-f16", "threads": 1, "hugepages": "off"},
    "chat": {"summary": {"max_tokens": 16}},
    "quality_gate": {"min_smoke_pass_rate": 0.0},
    "auth": {"limits": {"requests_per_minute": 0}},  # one person without think time: no per-user limit
}


@pytest.fixture(scope="module")
def swap_nodes():
    yield from own_cluster(2, "w", 16)


@pytest.fixture(scope="module")
def models(tmp_path_factory, llama_server_binary):  # noqa: F811  (the engine build brings llama-quantize)
    return swap_models(tmp_path_factory.mktemp("swap-e2e-models"))


def set_model(inventory, nodes, model, name: str) -> None:
    """The harness's hosts.yml with node2 the only model node, serving `model`; clawbot.json naming it `name`."""
    chat, model_node = nodes
    hosts = yaml.safe_load((chat.inventory_dir / "hosts.yml").read_text())
    model_hosts = hosts["all"]["children"]["model_nodes"]["hosts"]
    for other in [n for n in model_hosts if n != model_node.name]:
        model_hosts.pop(other)
    model_hosts[model_node.name]["clawbot_model_file"] = str(model)
    (inventory / "hosts.yml").write_text(yaml.safe_dump(hosts, sort_keys=False))
    config = json.loads(json.dumps(CONFIG))
    config["model_gateway"]["endpoint"] = f"https://{model_node.address}:5000"
    config["model_server"]["model_name"] = name
    config_file(inventory).parent.mkdir(exist_ok=True)
    config_file(inventory).write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="module")
def rolled_out(swap_nodes, models, tmp_path_factory):
    inventory = tmp_path_factory.mktemp("swap-inventory")
    shutil.copytree(swap_nodes[0].inventory_dir, inventory, dirs_exist_ok=True)
    set_model(inventory, swap_nodes, models["f16"], "tiny-f16")
    (inventory / "group_vars").mkdir(exist_ok=True)
    (inventory / "group_vars" / "all.yml").write_text(
        f"clawbot_state_dir: {state_dir(inventory)}\nclawbot_admin_password: {ADMIN_PASSWORD}\n")
    proc, _ = deploy(inventory)
    assert proc.returncode == 0, "first rollout failed"
    return inventory


class Chatter:
    """One person sending chat messages through the chat node one after another; every `done` message kept."""

    def __init__(self, base: str, ca: ssl.SSLContext):
        self.client = httpx.Client(base_url=base, verify=ca, timeout=300)
        login = self.client.post("/api/login", json={"username": "admin", "password": ADMIN_PASSWORD})
        assert login.status_code == 200, login.text
        self.client.headers["X-CSRF-Token"] = login.json()["csrf_token"]
        self.answers: list[dict] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def models(self) -> list[str]:
        return [m["id"] for m in self.client.get("/v1/models").json()["data"]]

    def _run(self) -> None:
        conversation = None
        while not self._stop.is_set():
            try:
                if conversation is None or len(self.answers) % 5 == 0:
                    conversation = self.client.post("/api/conversations", json={}).json()["id"]
                done, event = None, None
                with self.client.stream("POST", f"/api/conversations/{conversation}/messages",
                                        json={"content": "Say something."}) as r:
                    if r.status_code != 200:
                        self.errors.append(f"HTTP {r.status_code}")
                        self._stop.wait(1)
                        continue
                    for line in r.iter_lines():
                        if line.startswith("event:"):
                            event = line[6:].strip()
                        elif line.startswith("data:") and event == "done":
                            done = json.loads(line[5:])["message"]
                self.answers.append(done or {"status": "broken"})
            except httpx.HTTPError as exc:
                self.errors.append(f"{exc.__class__.__name__}: {exc}")
                self._stop.wait(1)

    def failed(self) -> list[dict]:
        return [a for a in self.answers if a.get("status") != "complete" or a.get("source") != "model"]

    def __enter__(self) -> "Chatter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=300)
        self.client.close()


def test_deploy_swaps_the_model_while_people_chat_and_refuses_one_that_fails_the_gate(rolled_out, swap_nodes,
                                                                                       models):
    chat, model_node = swap_nodes
    ca = ssl.create_default_context(cafile=str(state_dir(rolled_out) / "ca" / "ca.pem"))
    with Chatter(f"https://{chat.address}:8443", ca) as person:
        assert person.models() == ["tiny-f16"]

        set_model(rolled_out, swap_nodes, models["q8"], "tiny-q8")
        proc, _ = deploy(rolled_out)
        assert proc.returncode == 0, "the swap to the re-quantized model failed"
        assert "model swap done" in proc.stdout
        assert person.models() == ["tiny-q8"]  # deploy returns once the new model serves
        previous = ssh(model_node, "ls /var/lib/clawbot/models/", check=False)
        assert ".previous" not in previous  # the old file goes once the new model serves

        set_model(rolled_out, swap_nodes, models["scrambled"], "tiny-broken")
        proc, _ = deploy(rolled_out)
        assert proc.returncode == 1
        out = proc.stdout + proc.stderr
        assert "quality gate failed" in out and "(quality_gate." in out, out[-3000:]
        assert person.models() == ["tiny-q8"]

        again, _ = deploy(rolled_out)  # a re-run tries the rejected model again
        assert again.returncode == 1 and "trying it again" in again.stdout
        assert "quality gate failed" in again.stdout + again.stderr
        assert person.models() == ["tiny-q8"]
    assert len(person.answers) >= 10, person.answers
    assert person.errors == [] and person.failed() == [], (person.errors, person.failed()[:3])
