"""The cluster CA and every node's certificates, kept on the control machine (the CA key never leaves it).

The CA lives in the state directory (`clawbot_state_dir`; keep it out of git or vault-encrypt it). Its
NameConstraints permit only the cluster's names and addresses, so even a leaked CA key cannot vouch for
anything else. Leaves are reissued only when needed (missing, key mismatch, other CA, SANs changed, < 1/3
lifetime left), so a re-run copies identical files and changes nothing.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from clawbot.common import pki


LOCAL_NAMES = ("localhost",)


LOCAL_IPS = ("127.0.0.1", "::1")


@dataclass
class NodeMaterial:
    """Paths on the control machine of one node's PEM files."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    reissued: list[str]


def _split(names: list[str]) -> tuple[list[str], list[str]]:
    dns, ips = [], []
    for name in names:
        try:
            ips.append(str(ipaddress.ip_address(name)))
        except ValueError:
            dns.append(name)
    return dns, ips


def ensure_cluster_ca(state_dir: Path, cluster_names: list[str], log=print) -> tuple:
    """Load the CA, or create it when missing or when its NameConstraints no longer cover the cluster."""
    ca_dir = state_dir / "ca"
    key_path, cert_path = ca_dir / "ca.key", ca_dir / "ca.pem"
    dns, ips = _split(list(cluster_names) + list(LOCAL_NAMES) + list(LOCAL_IPS))
    if cert_path.exists() and key_path.exists():
        ca_key, ca_cert = pki.load_private_key(key_path), pki.load_certificate(cert_path)
        problems = pki.permits(ca_cert, dns, ips)
        if not problems:
            return ca_key, ca_cert
        log(f"cluster CA does not cover {', '.join(problems)}: creating a new CA (every leaf is reissued)")
    ca_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(ca_dir, 0o700)
    ca_key, ca_cert = pki.create_ca("clawbot cluster CA", permitted_dns=dns, permitted_ips=ips)
    pki.write_private_key(key_path, ca_key)
    pki.write_certificate(cert_path, ca_cert)
    log(f"created cluster CA {cert_path}")
    return ca_key, ca_cert


def ensure_node_material(state_dir: Path, node: str, names: list[str], ca_key, ca_cert) -> NodeMaterial:
    """Issue or keep this node's server and client leaves on the control machine."""
    node_dir = state_dir / "nodes" / node
    node_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(node_dir, 0o700)
    dns, ips = _split(list(names) + list(LOCAL_NAMES) + list(LOCAL_IPS))
    reissued = []
    for usage in ("server", "client"):
        cert_path, key_path = node_dir / f"{usage}.pem", node_dir / f"{usage}.key"
        needed, reason = pki.reissue_decision(cert_path, key_path, ca_cert, usage=usage, dns_names=dns, ip_addresses=ips)
        if not needed:
            continue
        issue = pki.issue_server_cert if usage == "server" else pki.issue_client_cert
        key, cert = issue(ca_key, ca_cert, node, dns_names=dns, ip_addresses=ips)
        pki.write_private_key(key_path, key)
        pki.write_certificate(cert_path, cert)
        reissued.append(f"{usage} certificate: {reason}")
    return NodeMaterial(state_dir / "ca" / "ca.pem", node_dir / "server.pem", node_dir / "server.key",
                        node_dir / "client.pem", node_dir / "client.key", reissued)

