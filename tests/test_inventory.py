"""Inventories are read with ansible-core: merged vars, vault values, positioned errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from clawbot.control.inventory import VAULTED, InventoryError, check_inventory, load_inventory
from tests.fixtures_models import models_dir, tiny_gguf  # noqa: F401  (fixtures)

VAULT_PASSWORD = "correct horse battery staple"


def encrypt(tmp_path, value: str) -> str:
    """A real `!vault` block made by ansible-vault, indented for a YAML mapping value."""
    password_file = tmp_path / "vault-pass"
    password_file.write_text(VAULT_PASSWORD + "\n")
    proc = subprocess.run(["ansible-vault", "encrypt_string", "--vault-password-file", str(password_file), value],
                          capture_output=True, text=True, check=True, timeout=120)
    return proc.stdout.strip()


@pytest.fixture
def inventory_dir(tmp_path):
    root = tmp_path / "inv"
    (root / "group_vars").mkdir(parents=True)
    (root / "host_vars").mkdir()
    (root / "hosts.yml").write_text(textwrap.dedent("""\
        all:
          children:
            chat_nodes:
              hosts:
                chat-a:
                  ansible_host: 10.9.0.10
            model_nodes:
              hosts:
                model-a:
                  ansible_host: 10.9.0.20
                  clawbot_memory_mib: 65536
        """))
    secret = encrypt(tmp_path, "s3cret-value")
    (root / "group_vars" / "all.yml").write_text(
        "clawbot_state_dir: " + secret + "\nclawbot_user: \"{{ 'claw' + 'bot' }}\"\n")
    (root / "host_vars" / "model-a.yml").write_text("clawbot_names: [llm.lab.internal]\n")
    (root / ".clawbot").mkdir()
    (root / ".clawbot" / "clawbot.json").write_text('{"model_gateway": {"endpoint": "https://10.9.0.20:5000"}}')
    return root


def test_merged_vars_and_templates(inventory_dir):
    inventory = load_inventory(str(inventory_dir))
    model = inventory.hosts["model-a"]
    assert model.groups == ["model_nodes"]
    assert model.vars["clawbot_memory_mib"] == 65536 and type(model.vars["clawbot_memory_mib"]) is int
    assert model.vars["clawbot_user"] == "clawbot"
    assert model.vars["clawbot_state_dir"] is VAULTED  # no password given: not decrypted
    assert set(model.names) >= {"model-a", "10.9.0.20", "llm.lab.internal"}
    assert [h.name for h in inventory.group("chat_nodes")] == ["chat-a"]


def test_vault_values_decrypt_with_password_file(inventory_dir, tmp_path):
    inventory = load_inventory(str(inventory_dir), vault_password_file=str(tmp_path / "vault-pass"))
    assert inventory.hosts["chat-a"].vars["clawbot_state_dir"] == "s3cret-value"


def test_vaulted_inventory_validates_without_password(inventory_dir):
    proc = subprocess.run([sys.executable, "-m", "clawbot", "validate", "--inventory", str(inventory_dir),
                           str(inventory_dir / ".clawbot" / "clawbot.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_unknown_and_mistyped_variables_are_positioned(inventory_dir):
    (inventory_dir / "host_vars" / "chat-a.yml").write_text("# chat node\nclawbot_adress: 10.9.0.11\nansible_port: ssh\n")
    result, _ = check_inventory(str(inventory_dir))
    found = [(d.file.rsplit("/", 1)[-1], d.line, d.col, d.message, d.hint) for d in result.diagnostics]
    assert found == [
        ("chat-a.yml", 2, 17, "unknown variable 'clawbot_adress'", "did you mean 'clawbot_address'?"),
        ("chat-a.yml", 3, 15, "ansible_port: 'ssh' is not of type 'integer'", ""),
    ]


def test_group_variable_error_reported_once(inventory_dir):
    with open(inventory_dir / "group_vars" / "all.yml", "a") as handle:
        handle.write("clawbot_offline: maybe\n")
    last_line = len((inventory_dir / "group_vars" / "all.yml").read_text().splitlines())
    result, _ = check_inventory(str(inventory_dir))
    assert [(d.line, d.col) for d in result.diagnostics] == [(last_line, 18)]


def test_missing_group_and_duplicate_address(tmp_path):
    root = tmp_path / "inv"
    root.mkdir()
    (root / "hosts.yml").write_text("all:\n  children:\n    chat_nodes:\n      hosts:\n        a: {ansible_host: 10.1.1.1}\n"
                                    "        b: {ansible_host: 10.1.1.1}\n")
    result, _ = check_inventory(str(root))
    messages = [d.message for d in result.diagnostics]
    assert "inventory has no hosts in group 'model_nodes'" in messages
    assert "hosts a and b have the same address 10.1.1.1" in messages


def test_endpoint_must_be_a_model_node(inventory_dir):
    (inventory_dir / ".clawbot" / "clawbot.json").write_text('{"model_gateway": {"endpoint": "https://10.9.0.10:5000"}}')
    proc = subprocess.run([sys.executable, "-m", "clawbot", "validate", "--inventory", str(inventory_dir),
                           str(inventory_dir / ".clawbot" / "clawbot.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert f"{inventory_dir / '.clawbot' / 'clawbot.json'}:1:32: error: /model_gateway/endpoint: endpoint host '10.9.0.10' is not" \
        in proc.stdout


def test_missing_inventory_is_a_usage_error(tmp_path):
    with pytest.raises(InventoryError):
        load_inventory(str(tmp_path / "nowhere"))
    proc = subprocess.run([sys.executable, "-m", "clawbot", "validate", "--inventory", str(tmp_path / "nowhere"),
                           str(tmp_path / "x.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no such inventory" in proc.stderr


def test_static_fit_against_declared_memory(inventory_dir, tiny_gguf):
    """`clawbot validate --inventory` sizes the model against clawbot_memory_mib before any host is reached."""
    import shutil

    shutil.copy(tiny_gguf, inventory_dir / "tiny.gguf")
    hosts = (inventory_dir / "hosts.yml").read_text()
    (inventory_dir / "hosts.yml").write_text(hosts.replace("clawbot_memory_mib: 65536", "clawbot_memory_mib: 1")
                                             + "  vars:\n    clawbot_model_file: tiny.gguf\n")
    argv = [sys.executable, "-m", "clawbot", "validate", "--inventory", str(inventory_dir), str(inventory_dir / ".clawbot" / "clawbot.json")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    [line] = [l for l in proc.stdout.splitlines() if "preflight" in l or "needs" in l]
    assert line.startswith(f"{inventory_dir / 'hosts.yml'}:11:31: error: /clawbot_memory_mib: model-a: model needs ")
    assert "but only 1.0 MiB is available" in line
    (inventory_dir / "hosts.yml").write_text(hosts + "  vars:\n    clawbot_model_file: tiny.gguf\n")
    assert subprocess.run(argv, capture_output=True, text=True, timeout=120).returncode == 0
