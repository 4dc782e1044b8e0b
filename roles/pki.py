"""Every node holds its own server and client certificate from the cluster CA; the CA key stays on the
control machine (clawbot.control.certificates issues the leaves there; this role only copies them).

The CA lives on the control machine in the state directory (`clawbot_state_dir`, default
~/.local/state/clawbot/<cluster>; keep it out of git or vault-encrypt it). Its NameConstraints permit only
the cluster domain, the cluster's names and the nodes' address blocks, so even a leaked CA key cannot vouch for
anything else. Nodes get the trust bundle (the CA, plus the old one during a rotation) as tls.ca_cert. Leaves
are reissued only when needed (missing, key mismatch, other CA, SANs changed, < 1/3 lifetime left), so a
re-run copies identical files and changes nothing. Keys are 0600 and owned by the agent's user; --diff shows the
certificates' PEM diffs but says of a key only that it differs (roles.content.file_copied).
"""

from __future__ import annotations

import os

from pyinfra.api import deploy
from pyinfra.operations import files

from clawbot.control.certificates import NodeMaterial
from roles.content import SECRET, file_copied


@deploy("Ensure the node's certificates from the cluster CA are installed")
def install_node_certificates(material: NodeMaterial, tls: dict, user: str):
    """Copy CA certificate, server and client leaves to the paths named in clawbot.json's `tls` section.

    + material: this node's files on the control machine (clawbot.control.certificates.NodeMaterial; its
      ca_cert is the trust bundle)
    + tls: clawbot.json's `tls` section (ca_cert, server_cert, server_key, client_cert, client_key paths)
    + user: the agent's system user, which owns them (keys 0600)

    Returns the copy operations (a changed certificate means the agent restarts)."""
    ops = []
    directories = sorted({os.path.dirname(p) for p in tls.values()})
    for directory in directories:
        files.directory(name=f"Ensure {directory} exists", path=directory, user="root", group=user, mode="750")
    for source, dest, secret in (
        (material.ca_cert, tls["ca_cert"], False),
        (material.server_cert, tls["server_cert"], False),
        (material.server_key, tls["server_key"], True),
        (material.client_cert, tls["client_cert"], False),
        (material.client_key, tls["client_key"], True),
    ):
        name = f"Ensure {dest} is installed"
        if secret:
            ops.append(file_copied(name=name, src=str(source), dest=dest, note=SECRET, user=user, group=user,
                                   mode="600"))
        else:
            ops.append(files.put(name=name, src=str(source), dest=dest, user=user, group=user, mode="644"))
    return ops
