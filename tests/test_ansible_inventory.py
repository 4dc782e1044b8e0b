"""The inventory directory stays an Ansible inventory: Ansible's own tools, run as a user runs them (without the
ignore setting clawbot's loader gives itself), see exactly the groups, hosts and variables the user wrote. An
inventory laid out the old way (clawbot.json beside hosts.yml) keeps working, with a warning naming what to move."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clawbot.control import planning
from clawbot.control.inventory import check_inventory, load_inventory

ROOT = Path(__file__).resolve().parents[1]


def ansible_env() -> dict:
    """The environment of a user's shell: no ANSIBLE_* settings (clawbot's loader sets some in this process)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}


def written_groups(hosts_yml: Path) -> dict[str, set[str]]:
    """group -> hosts, as hosts.yml writes them (YAML inventory: all.children.GROUP.hosts, all.hosts)."""
    top = yaml.safe_load(hosts_yml.read_text())["all"]
    groups = {name: set((body or {}).get("hosts") or {}) for name, body in (top.get("children") or {}).items()}
    groups["all"] = set(top.get("hosts") or {}).union(*groups.values())
    return groups


def listed_groups(listing: dict) -> dict[str, set[str]]:
    groups = {name: set(body.get("hosts", [])) for name, body in listing.items() if name != "_meta"}
    groups["all"] = set(listing["_meta"]["hostvars"])
    if not groups.get("ungrouped"):
        groups.pop("ungrouped", None)  # Ansible always lists it; empty here means nothing stray
    return groups


@pytest.mark.parametrize("inventory", ["inventory", "docs/examples/two-node"])
def test_ansible_inventory_lists_exactly_what_hosts_yml_writes(inventory):
    proc = subprocess.run(["ansible-inventory", "-i", str(ROOT / inventory), "--list"], capture_output=True,
                          text=True, timeout=120, env=ansible_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "WARNING" not in proc.stderr, proc.stderr  # no file of the directory misread as an inventory source
    assert listed_groups(json.loads(proc.stdout)) == written_groups(ROOT / inventory / "hosts.yml")


def test_an_inventory_in_the_old_layout_keeps_working_and_says_what_to_move(tmp_path):
    inventory = tmp_path / "inv"
    (inventory / "state").mkdir(parents=True)
    (inventory / "hosts.yml").write_text("all:\n  children:\n    chat_nodes:\n      hosts:\n        a: {ansible_host: 10.1.1.1}\n"
                                         "    model_nodes:\n      hosts:\n        b: {ansible_host: 10.1.1.2}\n")
    (inventory / "clawbot.json").write_text('{"model_gateway": {"endpoint": "https://b:5000"}}')
    (inventory / "state" / "admin-password").write_text("Secret0123456789\n")
    loaded = load_inventory(str(inventory))
    assert set(loaded.hosts) == {"a", "b"}  # clawbot's own reading skips them, as before
    assert planning.config_path(loaded, inventory) == (inventory / "clawbot.json").resolve()
    result, _ = check_inventory(str(inventory), inventory=loaded)
    warnings = {d.file: d.message for d in result.diagnostics if d.severity == "warning"}
    assert result.ok and set(warnings) == {str(inventory / "clawbot.json"), str(inventory / "state")}
    assert f"move it to {inventory / '.clawbot' / 'clawbot.json'}" in warnings[str(inventory / "clawbot.json")]
    proc = subprocess.run([sys.executable, "-m", "clawbot", "validate", "--inventory", str(inventory),
                           str(inventory / "clawbot.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{inventory / 'state'}:1:1: warning:" in proc.stdout
    # The reason: Ansible itself reads both as inventory sources (the password becomes a host name).
    listing = subprocess.run(["ansible-inventory", "-i", str(inventory), "--list"], capture_output=True, text=True,
                             timeout=120, env=ansible_env())
    assert "Secret0123456789" in listing.stdout and "model_gateway" in listing.stdout
    # Moved under .clawbot/, the same inventory has no warning and the config is found at the new default.
    (inventory / ".clawbot").mkdir()
    (inventory / "clawbot.json").rename(inventory / ".clawbot" / "clawbot.json")
    (inventory / "state").rename(inventory / ".clawbot" / "state")
    loaded = load_inventory(str(inventory))
    assert loaded.notes == []
    assert planning.config_path(loaded, inventory) == (inventory / ".clawbot" / "clawbot.json").resolve()
