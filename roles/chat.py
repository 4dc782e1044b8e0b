"""Chat nodes run the chat-role agent: the web UI, the chat API and conversations in SQLite.

The chat role needs nothing of its own on the node beyond what the agent role installs (venv, clawbot.json,
certificates): its web assets ship inside the agent wheel and its database is created by the agent under
/var/lib/clawbot on first start. This role installs and keeps the service running.
"""

from __future__ import annotations

from roles.services import Service, agent_command, agent_environment, ensure_service


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
