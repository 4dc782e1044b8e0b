"""Every node can resolve every other node by name, without DNS.

The article traced 80 % of its timeouts to DNS lookups and fixed them with /etc/hosts entries; this role
keeps one managed block in /etc/hosts with every node's names and address. Lines outside the block are
never touched; re-running replaces the block in place, so there are no duplicates.

Settings (inventory variables): `clawbot_address` (default: ansible_host), `clawbot_names` (extra names).
"""

from __future__ import annotations

from pyinfra.api import deploy

from roles.content import block_in_file

MARKER = "# {mark} clawbot managed nodes"


def hosts_block(nodes: list[tuple[str, list[str]]]) -> str:
    """The managed block's lines: `ADDRESS name alias...`, sorted for a stable file.

    + nodes: (address, names) of every node
    """
    lines = []
    for address, names in sorted(nodes):
        lines.append(f"{address} {' '.join(names)}")
    return "\n".join(lines)


@deploy("Ensure /etc/hosts names every clawbot node")
def ensure_hosts_entries(nodes: list[tuple[str, list[str]]]):
    """One managed block in /etc/hosts naming every node; lines outside it are never touched.

    + nodes: (address, names) of every node (clawbot_address, the host's name and clawbot_names)
    """
    # files.block, with --diff showing /etc/hosts' unified diff (roles.content.block_in_file)
    block_in_file(
        name="Ensure the clawbot block in /etc/hosts lists every node",
        path="/etc/hosts",
        content=hosts_block(nodes),
        marker=MARKER,
    )
