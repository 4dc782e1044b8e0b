"""Deploy's side of accounts (clawbot.control.accounts): the first admin comes from the inventory, hashed here.

Real inventories read by ansible-core (vault included); the refusals go through deploy.py itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clawbot.chat.accounts import verify_secret
from clawbot.common.config import defaults
from clawbot.control.accounts import AccessError, chat_files
from clawbot.control.inventory import load_inventory

ROOT = Path(__file__).resolve().parents[1]
VAULT_PASSWORD = "test-vault-password"


def vaulted(value: str) -> str:
    from ansible.parsing.vault import VaultLib, VaultSecret

    text = VaultLib([("default", VaultSecret(VAULT_PASSWORD.encode()))]).encrypt(value).decode()
    return "!vault |\n" + "\n".join("  " + line for line in text.splitlines())


def inventory(tmp_path: Path, group_vars: str) -> Path:
    directory = tmp_path / "inventory"
    (directory / "group_vars").mkdir(parents=True, exist_ok=True)
    (directory / "hosts.yml").write_text(
        "all:\n  children:\n    chat_nodes:\n      hosts:\n        chat-a:\n          ansible_host: 10.1.0.2\n"
        "    model_nodes:\n      hosts:\n        model-a:\n          ansible_host: 10.1.0.3\n")
    (directory / "group_vars" / "all.yml").write_text(group_vars)
    (directory / ".clawbot").mkdir()
    (directory / ".clawbot" / "clawbot.json").write_text(json.dumps({"model_gateway": {"endpoint": "https://model-a:5000"}}))
    return directory


def test_admin_hash_is_made_once_and_kept_while_the_password_holds(tmp_path):
    directory = inventory(tmp_path, f"clawbot_admin_user: boss\nclawbot_admin_password: {vaulted('first-password')}\n")
    vault = tmp_path / "vault-pass"
    vault.write_text(VAULT_PASSWORD)
    hosts = list(load_inventory(str(directory), str(vault)).hosts.values())
    state = tmp_path / "state"
    state.mkdir()
    files = chat_files(hosts, defaults(), state)
    assert files == ((str(state / "chat" / "admin.json"), "/etc/clawbot/admin.json"),)
    admin = Path(files[0][0])
    data = json.loads(admin.read_text())
    assert data["name"] == "boss" and verify_secret(data["password_hash"], "first-password")
    assert "first-password" not in admin.read_text() and admin.stat().st_mode & 0o777 == 0o600
    before = admin.read_bytes()
    chat_files(hosts, defaults(), state)
    assert admin.read_bytes() == before  # same password: same bytes, so a re-run copies nothing
    (directory / "group_vars" / "all.yml").write_text(
        f"clawbot_admin_user: boss\nclawbot_admin_password: {vaulted('second-password')}\n")
    chat_files(list(load_inventory(str(directory), str(vault)).hosts.values()), defaults(), state)
    assert verify_secret(json.loads(admin.read_text())["password_hash"], "second-password")


def test_sso_secret_goes_to_the_configured_file_only_when_sso_is_on(tmp_path):
    directory = inventory(tmp_path, "clawbot_admin_password: admin-password\nclawbot_oidc_client_secret: s3cret\n")
    hosts = list(load_inventory(str(directory)).hosts.values())
    config = defaults()
    assert len(chat_files(hosts, config, tmp_path)) == 1
    config["auth"]["oidc"].update(enabled=True, issuer="https://idp.example", client_id="clawbot")
    files = chat_files(hosts, config, tmp_path)
    assert files[1] == (str(tmp_path / "chat" / "oidc-client-secret"), "/etc/clawbot/oidc-client-secret")
    assert Path(files[1][0]).read_text() == "s3cret"


@pytest.mark.parametrize("group_vars, expected", [
    ("clawbot_model_file: ''\n", "set clawbot_admin_password"),
    ("clawbot_admin_password: short\n", "at least 8"),
    (f"clawbot_admin_password: {vaulted('some-password')}\n", "pass --vault-password-file"),
])
def test_deploy_refuses_without_a_usable_admin_password(tmp_path, group_vars, expected):
    directory = inventory(tmp_path, group_vars)
    with pytest.raises(AccessError, match=expected.replace("-", "-")):
        chat_files(list(load_inventory(str(directory)).hosts.values()), defaults(), tmp_path)
    done = subprocess.run([sys.executable, str(ROOT / "deploy.py"), "-i", str(directory), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and expected in done.stderr + done.stdout, done.stdout + done.stderr
    assert "no host was touched" in done.stderr + done.stdout
    assert "some-password" not in done.stderr + done.stdout


def test_default_inventory_generates_its_admin_password_once(tmp_path):
    """The shipped inventory's clawbot_admin_password is Ansible's password lookup: made once, then reused."""
    import shutil

    copy = tmp_path / "inventory"
    shutil.copytree(ROOT / "inventory", copy, ignore=shutil.ignore_patterns("state"))
    first = list(load_inventory(str(copy)).hosts.values())[0].vars["clawbot_admin_password"]
    second = list(load_inventory(str(copy)).hosts.values())[0].vars["clawbot_admin_password"]
    stored = copy / ".clawbot" / "state" / "admin-password"
    assert len(first) >= 20 and first == second == stored.read_text().split()[0]
    assert stored.stat().st_mode & 0o777 == 0o600
