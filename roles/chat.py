"""Chat nodes run the chat-role agent: the web UI, the chat API, accounts and conversations in SQLite.

Beyond what the agent role installs (venv, clawbot.json, certificates) a chat node gets two secrets from the
control machine: the first admin's argon2id hash (auth.bootstrap_admin_file) and, with SSO, the OIDC client
secret (auth.oidc.client_secret_file), both 0600 and owned by the agent's user. Its web assets ship inside the
agent wheel and its database is created by the agent under /var/lib/clawbot on first start. This role installs
those files and keeps the service running.
"""

from __future__ import annotations

import os

from pyinfra.api import deploy
from pyinfra.operations import files

from roles.services import Service, agent_command, agent_environment, ensure_service


@deploy("Ensure the chat node's admin hash and SSO secret are installed")
def install_chat_secrets(secret_files: tuple, user: str):
    """Copy the files clawbot.control.accounts prepared to the paths clawbot.json names.

    + secret_files: (file on the control machine, path on the node) pairs
    + user: the agent's system user, the only one that may read them (0600)

    Returns the copy operations (a changed admin hash or secret means the chat agent restarts)."""
    ops = []
    for directory in sorted({os.path.dirname(dest) for _, dest in secret_files}):
        files.directory(name=f"Ensure {directory} exists", path=directory, user="root", group=user, mode="750")
    for source, dest in secret_files:
        ops.append(files.put(name=f"Ensure {dest} is installed", src=source, dest=dest, user=user, group=user,
                             mode="600"))
    return ops


def ensure_chat_service(prefix: str, user: str, manager: str, changed: list):
    """The clawbot-chat service, restarted when the agent, clawbot.json or a certificate changed.

    + prefix: where the agent's venv lives (clawbot_prefix)
    + user: the agent's system user (clawbot_user)
    + manager: systemd or supervisor (service_manager already resolved)
    + changed: operations whose change means the agent must restart
    """
    service = Service(name="clawbot-chat", description="clawbot agent (chat role)", command=agent_command(prefix, "chat"),
                      user=user, environment=agent_environment(prefix))
    ensure_service(service, manager, changed=changed)
