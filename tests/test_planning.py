"""Node plans from the inventory: every inventory default the code uses is the schema's own."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from clawbot.common import sizing
from clawbot.common.config import check_bytes
from clawbot.control import planning
from clawbot.control.certificates import NodeMaterial
from clawbot.common.config import load_schema
from clawbot.control.inventory import Host, Inventory, inventory_defaults, inventory_var

ROOT = Path(__file__).resolve().parents[1]
CODE = [ROOT / "deploy.py", *sorted((ROOT / "roles").glob("*.py")), *sorted((ROOT / "agent" / "clawbot").rglob("*.py"))]


def test_every_schema_default_is_the_default_the_code_uses():
    schema = load_schema("inventory.schema.json")["properties"]
    for name, spec in schema.items():
        if "default" in spec:
            assert inventory_var({}, name) == spec["default"], name
            assert inventory_var({name: None}, name) == spec["default"], name
    assert inventory_defaults()["clawbot_offline"] is True  # nodes need no PyPI unless told otherwise
    assert inventory_var({"clawbot_offline": False}, "clawbot_offline") is False  # false is a value, not "unset"


def _inventory_var_literal_defaults(path: Path) -> list[str]:
    """`vars.get("clawbot_x", default)` or `vars.get("clawbot_x") or <literal>`: a default written in code."""
    found = []
    tree = ast.parse(path.read_text(), str(path))
    names = set(load_schema("inventory.schema.json")["properties"])

    def is_var_get(node) -> str | None:
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "vars"
                and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value in names):
            return node.args[0].value
        return None

    for node in ast.walk(tree):
        name = is_var_get(node)
        if name and len(node.args) > 1:
            found.append(f"{path.name}:{node.lineno}: {name} defaults to {ast.unparse(node.args[1])}")
        if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or):
            for left, right in zip(node.values, node.values[1:]):
                name = is_var_get(left)
                if name and isinstance(right, (ast.Constant, ast.List, ast.Dict)):
                    found.append(f"{path.name}:{node.lineno}: {name} or {ast.unparse(right)}")
    return found


def test_no_inventory_default_is_written_in_code():
    found = [line for path in CODE for line in _inventory_var_literal_defaults(path)]
    assert not found, "read these through clawbot.control.inventory.inventory_var:\n" + "\n".join(found)


def test_the_scan_finds_a_code_default(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('a = h.vars.get("clawbot_user", "x")\nb = h.vars.get("clawbot_prefix") or "/opt"\n')
    assert len(_inventory_var_literal_defaults(sample)) == 2


def _material(tmp_path, name):
    return NodeMaterial(*(tmp_path / f"{name}.{k}" for k in ("ca", "sc", "sk", "cc", "ck")), reissued=[])


@pytest.fixture
def config():
    result = check_bytes(b'{"model_gateway": {"endpoint": "https://model-a:9443"}}', "clawbot.json")
    assert result.ok, [d.text() for d in result.diagnostics]
    return result.config


def test_plan_of_a_host_with_no_variables_is_the_schema_defaults(tmp_path, config):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + bytes(4 << 20))
    hosts = {"chat-a": Host("chat-a", ["chat_nodes"], {"ansible_host": "10.0.0.5"}),
             "model-a": Host("model-a", ["model_nodes"], {"ansible_host": "10.0.0.6", "clawbot_user": "llm"})}
    inventory = Inventory(str(tmp_path), hosts)
    plans = planning.plan_nodes(inventory, list(hosts.values()), config, tmp_path / "clawbot.json",
                                planning.Prepared(model_file=model, engine=tmp_path / "llama-server"),
                                {n: _material(tmp_path, n) for n in hosts})
    defaults = inventory_defaults()
    chat, model_plan = plans["chat-a"], plans["model-a"]
    assert (chat.user, chat.prefix, chat.service_manager, chat.thp) == (
        defaults["clawbot_user"], defaults["clawbot_prefix"], defaults["clawbot_service_manager"],
        defaults["clawbot_transparent_hugepages"])
    assert model_plan.user == "llm" and chat.offline is defaults["clawbot_offline"]
    assert (chat.is_chat, chat.is_model, model_plan.is_model) == (True, False, True)
    assert chat.hugepages is None and model_plan.hugepages == sizing.hugepages_for(model.stat().st_size)
    assert model_plan.accelerator == config["model_server"]["accelerator"] and model_plan.accelerator_override == ""
    assert ("10.0.0.6", ("model-a",)) in model_plan.hosts_entries
    assert model_plan.model_health_url == "https://127.0.0.1:9443/readyz"


def test_one_host_online_makes_the_rollout_online(tmp_path):
    a, b = Host("a", ["chat_nodes"], {}), Host("b", ["model_nodes"], {"clawbot_offline": False})
    assert planning.offline_for([a]) is True
    assert planning.offline_for([a, b]) is False


def test_a_cluster_wide_variable_must_agree(tmp_path):
    a = Host("a", ["chat_nodes"], {"clawbot_config_file": "one.json"})
    b = Host("b", ["model_nodes"], {"clawbot_config_file": "two.json"})
    with pytest.raises(ValueError, match="clawbot_config_file differs"):
        planning.config_path(Inventory(str(tmp_path), {"a": a, "b": b}), tmp_path)
    assert planning.config_path(Inventory(str(tmp_path), {"a": a}), tmp_path) == (tmp_path / "one.json").resolve()


def test_state_directory_defaults_to_one_per_inventory(tmp_path, monkeypatch):
    from clawbot.control.state import state_directory

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    one, two = tmp_path / "site-a" / "inventory", tmp_path / "site-b" / "inventory"
    one.mkdir(parents=True), two.mkdir(parents=True)
    a, b = state_directory("", one), state_directory("", two)
    assert a != b and a.parent == b.parent == tmp_path / "home" / ".local" / "state" / "clawbot"
    assert a.name.startswith("inventory-") and (a.stat().st_mode & 0o777) == 0o700
    assert state_directory("", one) == a  # the same inventory keeps its CA
    assert state_directory("ca-state", one) == one / "ca-state"  # relative to the inventory directory


def test_agent_wheel_digest_covers_the_package_not_the_egg_info(tmp_path, monkeypatch):
    from clawbot.control import builds

    (tmp_path / "agent" / "clawbot").mkdir(parents=True)
    (tmp_path / "agent" / "clawbot.egg-info").mkdir()
    (tmp_path / "schemas").mkdir()
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    (tmp_path / "agent" / "clawbot" / "x.py").write_text("a = 1\n")
    monkeypatch.setattr(builds, "SOURCE_ROOT", tmp_path)
    first = builds.source_digest()
    (tmp_path / "agent" / "clawbot.egg-info" / "PKG-INFO").write_text("Version: 0.1.0\n")
    assert builds.source_digest() == first
    (tmp_path / "agent" / "clawbot" / "x.py").write_text("a = 2\n")
    assert builds.source_digest() != first


def test_deploy_builds_refuse_without_a_source_tree(tmp_path, monkeypatch):
    from clawbot.control import builds

    monkeypatch.setattr(builds, "SOURCE_ROOT", tmp_path)
    with pytest.raises(SystemExit, match="not a clawbot source tree"):
        builds.source_digest()


def test_chat_url_by_name_where_it_resolves_else_by_address_with_a_hint():
    chat = Host("chat-node", ["chat_nodes"], {"ansible_host": "192.168.1.50"})
    asked = []

    def resolves(answer):
        return lambda name: asked.append(name) or answer

    assert planning.chat_url(chat, 8443, resolves(True)) == ("https://chat-node:8443/", "")
    assert planning.chat_url(chat, 8443, resolves(False)) == (
        "https://192.168.1.50:8443/",
        "chat-node does not resolve on this machine; to open the chat by name, add `192.168.1.50 chat-node` to "
        "/etc/hosts")
    assert asked == ["chat-node", "chat-node"]  # the inventory name is what is looked up
    # no ansible_host: clawbot_address; IPv6 goes in brackets, the /etc/hosts line without
    v6 = Host("chat-node", ["chat_nodes"], {"clawbot_address": "fd00::50"})
    assert planning.chat_url(v6, 443, resolves(False)) == (
        "https://[fd00::50]:443/",
        "chat-node does not resolve on this machine; to open the chat by name, add `fd00::50 chat-node` to /etc/hosts")
    # reached by a DNS name of its own: that name (it resolved: deploy connected with it)
    url, hint = planning.chat_url(Host("chat", ["chat_nodes"], {"ansible_host": "chat.lan"}), 8443, resolves(False))
    assert url == "https://chat.lan:8443/" and "chat does not resolve on this machine" in hint
    # this machine (ansible_connection: local): localhost, nothing looked up
    asked.clear()
    local = Host("clawbot-local", ["chat_nodes", "model_nodes"], {"ansible_connection": "local",
                                                                   "ansible_host": "127.0.0.1"})
    assert planning.chat_url(local, 8443, resolves(False)) == ("https://localhost:8443/", "")
    assert asked == []


def test_name_resolves_asks_this_machines_resolver():
    assert planning.name_resolves("localhost")
    assert not planning.name_resolves("clawbot-chat-node.invalid")  # RFC 6761: .invalid never resolves
    assert not planning.name_resolves("a" * 300)  # an over-long name is not an error, it does not resolve


def test_the_printed_chat_url_is_a_name_the_nodes_server_certificate_holds(tmp_path):
    """Either URL opens without a certificate warning once the CA is trusted: the server certificate deploy issues
    lists the inventory name and the address (clawbot.control.certificates)."""
    from clawbot.common import pki
    from clawbot.control import certificates

    chat = Host("chat-node", ["chat_nodes"], {"ansible_host": "192.168.1.50"})
    ca = certificates.cluster_ca(tmp_path, {chat.name: chat.names}, "clawbot.internal", log=lambda _: None)
    material = certificates.ensure_node_material(ca, chat.name, chat.names)
    sans = pki.san_identities(pki.load_certificate(material.server_cert))
    for answer in (True, False):
        url, _ = planning.chat_url(chat, 8443, lambda name: answer)
        host = url.split("//")[1].rsplit(":", 1)[0]
        assert host in sans.dns_names or host in [str(ip) for ip in sans.ip_addresses], (url, sans.describe())
