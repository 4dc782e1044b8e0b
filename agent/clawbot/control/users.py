"""`clawbot users -i INVENTORY …`: the account commands run on the inventory's chat nodes over SSH.

Each chat node keeps its own accounts (its own SQLite database), so a command runs on every chat node of the
inventory, or on those named with --limit. The node's own `clawbot users` does the work; a password travels
on the SSH channel's standard input, never on a command line.
"""

from __future__ import annotations

import shlex
import sys

from clawbot.common.config import NODE_CONFIG_PATH


def run_on_chat_nodes(args, argv: list[str], stdin: str | None) -> int:
    from pyinfra.api import Config, State, StringCommand
    from pyinfra.api.connect import connect_all
    from pyinfra.api.exceptions import PyinfraError

    from clawbot.control import rollout
    from clawbot.control.inventory import inventory_var, load_for_command
    from clawbot.control.planning import CHAT_GROUP

    inventory = load_for_command(args.inventory, args.vault_password_file, "clawbot users")
    hosts = [h for h in inventory.group(CHAT_GROUP) if not args.limit or h.name in args.limit]
    if not hosts:
        print(f"clawbot users: {args.inventory} has no chat node"
              + (f" named {', '.join(args.limit)}" if args.limit else ""), file=sys.stderr)
        return 2
    state = State(inventory=rollout.pyinfra_inventory(hosts), config=Config())
    try:
        connect_all(state)
    except PyinfraError as exc:
        print(f"clawbot users: cannot connect: {exc}", file=sys.stderr)
        return 1
    by_name = {h.name: h for h in hosts}
    failed = [h.name for h in hosts if h.name not in {p.data.clawbot_name for p in state.activated_hosts}]
    for pyinfra_host in state.activated_hosts:
        node = by_name[pyinfra_host.data.clawbot_name]
        clawbot = f"{inventory_var(node.vars, 'clawbot_prefix')}/venv/bin/clawbot"
        command = shlex.join([clawbot, "users", "--config", NODE_CONFIG_PATH, *argv])
        extra = {"_stdin": stdin} if stdin is not None else {}
        if pyinfra_host.data.get("_sudo"):
            extra["_sudo"] = True
        ok, output = pyinfra_host.run_shell_command(StringCommand(command), **extra)
        if len(hosts) > 1:
            print(f"== {node.name}")
        for line in output.stdout_lines:
            print(line)
        for line in output.stderr_lines:
            print(line, file=sys.stderr)
        if not ok:
            failed.append(node.name)
    if failed:
        print(f"clawbot users: failed on {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
