"""What deploy fills into the clawbot.json nodes get (clawbot.control.nodeconfig): upstreams and allowed clients."""

from __future__ import annotations

import json

from clawbot.control import nodeconfig
from clawbot.control.inventory import load_inventory

HOSTS = """all:
  children:
    chat_nodes:
      hosts:
        chat-1: {ansible_host: 10.0.0.5}
    model_nodes:
      hosts:
        model-b: {ansible_host: 10.0.0.7}
        model-a: {ansible_host: 10.0.0.6}
"""


def write(tmp_path, config: dict):
    inventory_dir = tmp_path / "inventory"
    inventory_dir.mkdir(parents=True)
    (inventory_dir / "hosts.yml").write_text(HOSTS)
    config_path = tmp_path / "clawbot.json"
    config_path.write_text(json.dumps(config))
    state = tmp_path / "state"
    state.mkdir()
    return load_inventory(str(inventory_dir)), config_path, state


def test_every_model_node_becomes_an_upstream_at_the_endpoints_port(tmp_path):
    inventory, config_path, state = write(tmp_path, {"model_gateway": {"endpoint": "https://model-b:5443"}})
    rendered = json.loads(nodeconfig.render(config_path, inventory, state).read_text())
    assert rendered["model_gateway"]["upstreams"] == ["https://model-b:5443", "https://model-a:5443"]  # inventory order
    assert rendered["model_gateway"]["allowed_clients"][0] == "chat-1"


def test_upstreams_the_user_wrote_are_kept_and_a_missing_endpoint_takes_the_default_port(tmp_path):
    inventory, config_path, state = write(tmp_path, {"model_gateway": {"upstreams": ["https://10.0.0.6:5000"]}})
    rendered = json.loads(nodeconfig.render(config_path, inventory, state).read_text())
    assert rendered["model_gateway"]["upstreams"] == ["https://10.0.0.6:5000"]
    inventory, config_path, state = write(tmp_path / "second", {})
    rendered = json.loads(nodeconfig.render(config_path, inventory, state).read_text())
    assert rendered["model_gateway"]["upstreams"] == ["https://model-b:5000", "https://model-a:5000"]
