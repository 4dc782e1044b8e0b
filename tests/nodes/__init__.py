"""Two (N) real Debian test nodes on one machine: systemd as PID 1 and sshd in their own namespaces,
on a private bridged subnet, with an Ansible-format inventory so deploy.py targets them like real hosts.

See tests/README.md. By hand: `python -m tests.nodes up 2|status|shell node1|down`.
"""

from .cluster import Cluster, Node
from .config import HarnessConfig, HarnessError

__all__ = ["Cluster", "HarnessConfig", "HarnessError", "Node"]
