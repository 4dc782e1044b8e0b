"""Chat nodes run the chat-role agent: the web UI, the chat API, accounts and conversations in SQLite.

Beyond what the agent role installs (venv, clawbot.json, certificates) a chat node gets two secrets from the
control machine: the first admin's argon2id hash (auth.bootstrap_admin_file) and, with SSO, the OIDC client
secret (auth.oidc.client_secret_file), both 0600 and owned by the agent's user. Its web assets ship inside the
agent wheel and its database is created by the agent under /var/lib/clawbot on first start. This role installs
those files and keeps the service running.

It also creates the knowledge directory (chat.knowledge_base.directory, default /var/lib/clawbot/knowledge),
owned by the agent's user, so the `knowledge_base` fallback works from the first rollout, and installs the
starter documents (roles/files/knowledge/, rendered with this deployment's chat URL, admin account and
fallbacks) into its `clawbot/` sub-folder. Deploy writes only those files: documents added with `clawbot kb add`
or copied there by hand are never overwritten or removed.
"""

from __future__ import annotations

import io
import ipaddress
import json
import os
from pathlib import Path
from string import Template

from pyinfra.api import deploy
from pyinfra.operations import files

from clawbot.chat.kb import STARTER_FOLDER
from roles.content import SECRET, file_copied
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
    for source, dest in secret_files:  # --diff says only that a secret differs (roles.content.file_copied)
        ops.append(file_copied(name=f"Ensure {dest} is installed", src=source, dest=dest, note=SECRET, user=user,
                               group=user, mode="600"))
    return ops


def ensure_chat_service(prefix: str, user: str, manager: str, changed: list, reloaded: list | None = None):
    """The clawbot-chat service, restarted when the agent, a secret or a certificate changed, reloaded (SIGHUP:
    conversations streaming meanwhile go on) when clawbot.json changed.

    + prefix: where the agent's venv lives (clawbot_prefix)
    + user: the agent's system user (clawbot_user)
    + manager: systemd or supervisor (service_manager already resolved)
    + changed: operations whose change means the agent must restart
    + reloaded: operations whose change the running agent takes with SIGHUP (clawbot.json)
    """
    service = Service(name="clawbot-chat", description="clawbot agent (chat role)", command=agent_command(prefix, "chat"),
                      user=user, environment=agent_environment(prefix))
    ensure_service(service, manager, changed=changed, reloaded=reloaded)


STARTER_DOCUMENTS = Path(__file__).resolve().parent / "files" / "knowledge"


def starter_facts(config: dict, host_name: str, hosts_entries, admin_name: str | None) -> dict[str, str]:
    """The values the starter documents are rendered with, for one chat node.

    + config: the checked clawbot.json (defaults filled in) the node gets
    + host_name: the chat node's inventory name
    + hosts_entries: the plan's (address, names) pairs (clawbot.control.planning.hosts_entries)
    + admin_name: the first admin's account name (clawbot_admin_user), None when unknown
    """
    port = config["chat"]["port"]
    address = next((a for a, names in hosts_entries if host_name in names), host_name)
    try:
        loopback = ipaddress.ip_address(address).is_loopback
    except ValueError:
        loopback = False
    if loopback:  # the default inventory: this machine, reached as localhost (as deploy prints it)
        chat_url, other_urls = f"https://localhost:{port}/", ""
    else:
        chat_url = f"https://{host_name}:{port}/"
        other_urls = "" if address == host_name else f" By address it is https://{address}:{port}/."
    sso = bool(config["auth"]["oidc"]["enabled"])
    admin = f"`{admin_name}`" if admin_name else "the administrator account deploy created"
    described = {"knowledge_base": "its knowledge base: it quotes the passages of its documents that match your "
                                   "question, with their source, and writes no new text",
                 "web_search": "a web search: it lists the results it found, with their links"}
    strategies = list(config["fallback_strategies"])
    if not strategies:
        behaviour = "the reply says so: no fallback is configured here, so nothing else answers."
    elif len(strategies) == 1:
        behaviour = f"the chat answers from {described[strategies[0]]}."
    else:
        behaviour = ("the chat tries, in this order, " + "; then ".join(described[s] for s in strategies) + ".")
    return {
        "chat_url": chat_url,
        "other_urls": other_urls,
        "api_url": f"{chat_url}v1",
        "sso_option": ', or with "Sign in with SSO" on the login page' if sso else "",
        "sso_accounts": (" With single sign-on, your first SSO sign-in creates your account." if sso else ""),
        "admin_contact": f"the first administrator account of this deployment is {admin}, held by whoever set it up",
        "admin_contact_sentence": (f"Whoever set up this deployment holds its first administrator account, {admin}; "
                                   "administrators may have made more administrators since."),
        "fallback_behaviour": behaviour,
    }


def starter_documents(facts: dict[str, str]) -> dict[str, str]:
    """{file name: Markdown} of the starter documents (roles/files/knowledge/*.md), rendered with `facts`.

    + facts: starter_facts(...) for the node; a placeholder without a value fails here, not on the node
    """
    documents = {}
    for path in sorted(STARTER_DOCUMENTS.glob("*.md")):
        try:
            documents[path.name] = Template(path.read_text(encoding="utf-8")).substitute(facts)
        except KeyError as exc:
            raise ValueError(f"{path}: placeholder ${exc.args[0]} has no value (starter_facts gives "
                             f"{', '.join(sorted(facts))})") from None
        except ValueError as exc:  # a lone `$`: write `$$` for a dollar sign
            raise ValueError(f"{path}: {exc} (write $$ for a dollar sign)") from None
    return documents


def knowledge_base_plan(plan) -> tuple[str, dict[str, str]]:
    """(knowledge directory, starter documents) for a chat node's plan (clawbot.control.planning.NodePlan).

    + plan: the node's plan; its config_file is the node's clawbot.json here on the control machine, its
      chat_files the first admin's file (whose name the documents quote)
    """
    from clawbot.common.config import load_config

    config = load_config(plan.config_file)
    admin_name = None
    for source, dest in plan.chat_files:
        if dest == config["auth"]["bootstrap_admin_file"]:
            admin_name = json.loads(Path(source).read_text(encoding="utf-8")).get("name")
    facts = starter_facts(config, plan.name, plan.hosts_entries, admin_name)
    return config["chat"]["knowledge_base"]["directory"], starter_documents(facts)


@deploy("Ensure the chat node's knowledge directory and starter documents are installed")
def ensure_knowledge_base(directory: str, documents: dict, user: str):
    """The knowledge directory, owned by the agent's user, with the starter documents in its clawbot/ sub-folder.

    Only the directories themselves (not what is in them) and the starter files are managed: every other file
    there is the users' and is never rewritten or removed. The running agent rescans the directory, so nothing
    restarts when a document changes.

    + directory: chat.knowledge_base.directory
    + documents: {file name: text} from starter_documents
    + user: the agent's system user (owns the directory; `clawbot kb` switches to it)
    """
    starter = f"{directory.rstrip('/')}/{STARTER_FOLDER}"
    files.directory(name=f"Ensure {directory} exists", path=directory, user=user, group=user, mode="750")
    files.directory(name=f"Ensure {starter} exists", path=starter, user=user, group=user, mode="750")
    for name, text in sorted(documents.items()):
        files.put(name=f"Ensure the starter document {starter}/{name} is installed", src=io.StringIO(text),
                  dest=f"{starter}/{name}", user=user, group=user, mode="640")
