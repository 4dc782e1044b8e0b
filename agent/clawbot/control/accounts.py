"""What chat nodes need from the inventory's secrets: the first admin's password hash and the SSO client secret.

The admin's password never leaves the control machine: deploy hashes it with argon2id into
<state>/chat/admin.json, and keeps that file (and so its bytes) as long as the password still verifies against
it, so a re-run copies nothing. The OIDC client secret must reach the chat node as it is (the node presents it
to the provider); it goes to <state>/chat/oidc-client-secret, 0600 like everything in the state directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from clawbot.chat.accounts import MIN_PASSWORD_CHARS, check_name, hash_secret, verify_secret
from clawbot.common import pki
from clawbot.control.inventory import VAULTED
from clawbot.control.planning import CHAT_GROUP, cluster_var


class AccessError(ValueError):
    """An inventory that cannot give chat nodes their admin or SSO secret; the message says what to set."""


def _secret(chat_hosts, name: str) -> str:
    values = {repr(h.vars.get(name)) for h in chat_hosts}
    if any(h.vars.get(name) is VAULTED for h in chat_hosts):
        raise AccessError(f"{name} is vault-encrypted: pass --vault-password-file so deploy can read it")
    if len(values) > 1:
        raise AccessError(f"{name} differs between chat nodes: set one value in group_vars/all (or group_vars/chat_nodes)")
    return str(cluster_var(chat_hosts, name, "chat nodes"))


def chat_files(hosts, config: dict, state_dir: Path) -> tuple[tuple[str, str], ...]:
    """(file on the control machine, path on the chat node) pairs for the chat nodes among `hosts`."""
    chat_hosts = [h for h in hosts if CHAT_GROUP in h.groups]
    if not chat_hosts:
        return ()
    directory = state_dir / "chat"
    directory.mkdir(exist_ok=True)
    os.chmod(directory, 0o700)
    name = str(cluster_var(chat_hosts, "clawbot_admin_user", "chat nodes"))
    try:
        check_name(name)
    except ValueError as exc:
        raise AccessError(f"clawbot_admin_user: {exc}") from None
    password = _secret(chat_hosts, "clawbot_admin_password")
    if not password:
        raise AccessError(
            "chat nodes need a first admin: set clawbot_admin_password in the inventory (group_vars/all), "
            "vault-encrypted: `ansible-vault encrypt_string --name clawbot_admin_password` and run deploy with "
            "--vault-password-file; refusing to create an admin without a password")
    if len(password) < MIN_PASSWORD_CHARS:
        raise AccessError(f"clawbot_admin_password has {len(password)} characters; an admin password needs at least "
                          f"{MIN_PASSWORD_CHARS}")
    admin_file = directory / "admin.json"
    try:
        current = json.loads(admin_file.read_text())
        keep = current.get("name") == name and verify_secret(current.get("password_hash"), password)
    except (OSError, ValueError, AttributeError):
        keep = False
    if not keep:
        pki.atomic_write(admin_file, json.dumps({"name": name, "password_hash": hash_secret(password)}).encode() + b"\n",
                         0o600)
    files = [(str(admin_file), config["auth"]["bootstrap_admin_file"])]
    secret = _secret(chat_hosts, "clawbot_oidc_client_secret")
    if config["auth"]["oidc"]["enabled"] and secret:
        secret_file = directory / "oidc-client-secret"
        if not secret_file.exists() or secret_file.read_text() != secret:
            pki.atomic_write(secret_file, secret.encode(), 0o600)
        files.append((str(secret_file), config["auth"]["oidc"]["client_secret_file"]))
    return tuple(files)
