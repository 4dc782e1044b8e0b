"""The clawbot.json nodes get: the cluster's file with what deploy decides filled in, rendered into the state
directory (<state>/clawbot.json) so the roles copy a file whose bytes change only when its content does.

Deploy fills in two things. An empty `model_gateway.upstreams` becomes every host of the model_nodes group at the
endpoint's port (inventory order), so the chat node routes over all replicas (clawbot.chat.upstreams); the
inventory names resolve on the chat node through the hosts block deploy writes and are in each gateway's server
certificate. An empty `model_gateway.allowed_clients` becomes the inventory names of the chat_nodes
group plus the control machine's certificate name (`clawbot status` reads the gateway's /status with it; the
control machine holds the CA key, so admitting it grants nothing it could not mint) and Prometheus's
(`clawbot monitoring`: it scrapes /metrics; whoever holds that key may also use the API). Each chat node's client
certificate carries its inventory name (clawbot.control.certificates), so chat nodes are served and every other
certificate of the cluster CA, the model nodes' own included, gets 403. A list the user wrote is kept as it is.
"""

from __future__ import annotations

import json
from pathlib import Path

from clawbot.common import pki
from clawbot.common.config import defaults, gateway_host_port
from clawbot.control.planning import CHAT_GROUP, MODEL_GROUP
from clawbot.control.state import CONTROL_NAME, MONITORING_NAME

NODE_CONFIG = "clawbot.json"


def gateway_clients(inventory, configured: list[str]) -> list[str]:
    """model_gateway.allowed_clients as nodes get it: the user's list when set, else the chat nodes' inventory
    names (inventory order), the control machine's and Prometheus's."""
    if configured:
        return list(configured)
    return list(dict.fromkeys([h.name for h in inventory.group(CHAT_GROUP)] + [CONTROL_NAME, MONITORING_NAME]))


def gateway_upstreams(inventory, endpoint: str, configured: list[str]) -> list[str]:
    """model_gateway.upstreams as chat nodes get it: the user's list when set, else every model node at the
    endpoint's port."""
    if configured:
        return list(configured)
    _, port = gateway_host_port(endpoint)
    return [f"https://{h.name}:{port}" for h in inventory.group(MODEL_GROUP)]


def render(config_path: Path, inventory, state_dir: Path) -> Path:
    """Write <state>/clawbot.json from the (already checked) cluster file; rewritten only when its bytes change."""
    config = json.loads(Path(config_path).read_text(encoding="utf-8"))
    gateway = config.setdefault("model_gateway", {})
    gateway["allowed_clients"] = gateway_clients(inventory, gateway.get("allowed_clients") or [])
    gateway["upstreams"] = gateway_upstreams(inventory, gateway.get("endpoint") or defaults()["model_gateway"]["endpoint"],
                                             gateway.get("upstreams") or [])
    data = (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    out = state_dir / NODE_CONFIG
    if not out.exists() or out.read_bytes() != data:
        pki.atomic_write(out, data, 0o600)
    return out
