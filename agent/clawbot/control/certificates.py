"""The cluster CA and every node's certificates, kept on the control machine (the CA key never leaves it).

Everything lives in the state directory (`clawbot_state_dir`; keep it out of git or vault-encrypt it), under ca/:
ca.pem + ca.key (0600) the CA that signs (the file browsers and apps import); trust.pem what every node gets as
tls.ca_cert (that CA, plus the one being replaced while a rotation is under way); previous.pem/.key and
rotation.json only during a rotation; retired/ the CAs rotated out (kept, keys 0600).

Continuity: the CA is created once and never replaced silently. Its NameConstraints, chosen at creation
(`ca_subtrees`), permit the cluster domain (`clawbot_cluster_domain`), localhost and the other names the cluster
has then, and for each address the enclosing private block (10/8, 172.16/12, 192.168/16, 127/8, 100.64/10,
fc00::/7, ::1) or the address itself when it is public: a node or name added later under that domain or in those
blocks fits the same CA (same bytes), and only its own leaves are reissued. Anything outside makes deploy refuse
before touching a host (`CAError`, naming the host, the name, what the CA permits and `--rotate-ca`).

Rotation (`deploy.py --rotate-ca`) never leaves two nodes unable to talk; it takes three steps, each recorded in
rotation.json by `record_rollout` for the hosts a run fully succeeded on (--limit runs count for the hosts they
reach):
1. a new CA is created and the old one kept; every node gets trust.pem = new + old. Leaves stay from the old CA,
   which every node trusts whether or not it has the bundle yet.
2. once every inventory host holds the bundle, leaves are reissued from the new CA: every node trusts it now.
3. once every host holds leaves from the new CA, the old CA leaves trust.pem (moved to retired/).
Issuing step 1's bundle and step 2's leaves in one run would leave a node that the run did not reach (or reached
before a failure) trusting only the old CA while its peers present new leaves.

Leaves are reissued only when needed (missing, key mismatch, other CA, SANs changed, < 1/3 lifetime left), so a
re-run copies identical files and changes nothing. A server certificate carries the node's names plus localhost and
the loopback addresses (health checks on the node itself); a client certificate only the node's own names, because
the gateway serves a client by them (model_gateway.allowed_clients) and a shared "localhost" would match every node.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from clawbot.common import pki
from clawbot.control.state import CONTROL_NAME, MONITORING_NAME

LOCAL_NAMES = ("localhost",)
LOCAL_IPS = ("127.0.0.1", "::1")
# Where an address lies in one of these, a new CA permits the whole block, so nodes added later fit it.
PRIVATE_BLOCKS = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "100.64.0.0/10", "fc00::/7", "::1/128"))
ROTATE_COMMAND = "python deploy.py --rotate-ca"


class CAError(Exception):
    """The cluster CA cannot serve the inventory as it is: deploy refuses before touching a host."""


@dataclass
class NodeMaterial:
    """Paths on the control machine of one node's PEM files."""

    ca_cert: Path  # the trust bundle (trust.pem) nodes verify peers with
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    reissued: list[str]  # "<usage> certificate: <reason>" for each leaf replaced this run
    signer: str = ""  # fingerprint of the CA that signed this node's leaves
    notes: list[str] = field(default_factory=list)  # names left out of the leaves for now (during a rotation)
    issued: list[str] = field(default_factory=list)  # usages issued for the first time (none was on this machine)

    def messages(self) -> list[str]:
        """What deploy says about this node's leaves, one line each: a first issue reads as the normal first step
        it is, a reissue gives its reason."""
        lines = []
        if self.issued == ["server", "client"]:
            lines.append("issued its server and client certificates (first run for this node)")
        elif self.issued:
            lines.append(f"issued its {self.issued[0]} certificate (none was on this machine yet)")
        lines += [f"reissued {line}" for line in self.reissued]
        return lines + self.notes


def _split(names: Iterable[str]) -> tuple[list[str], list[str]]:
    dns, ips = [], []
    for name in names:
        try:
            ips.append(str(ipaddress.ip_address(name)))
        except ValueError:
            dns.append(name)
    return list(dict.fromkeys(dns)), list(dict.fromkeys(ips))


def _under(name: str, subtree: str) -> bool:
    return name == subtree or name.endswith("." + subtree)


def ca_subtrees(domain: str, names: Iterable[str]) -> tuple[list[str], list[str]]:
    """What a new CA permits: (DNS subtrees, IP networks) for the cluster domain and the names it has now.

    DNS: the domain, then every other name (localhost included) not already below a listed one. IP: for each
    address (loopback included) the private block of PRIVATE_BLOCKS that holds it, else the address alone.
    """
    domain = domain.strip().lower().rstrip(".")
    dns, ips = _split([*names, *LOCAL_NAMES, *LOCAL_IPS])
    trees = [domain]
    for name in sorted({n.strip().lower().rstrip(".") for n in dns}, key=lambda n: (n.count("."), n)):
        if not any(_under(name, t) for t in trees):
            trees.append(name)
    networks = []
    for ip in ips:
        addr = ipaddress.ip_address(ip)
        block = next((b for b in PRIVATE_BLOCKS if b.version == addr.version and addr in b), None)
        network = block or ipaddress.ip_network(addr)
        if network not in networks:
            networks.append(network)
    networks.sort(key=lambda n: (n.version, n))
    return trees, [str(n) for n in networks]


def describe_permits(ca_cert) -> str:
    """The CA's NameConstraints in words, for refusals."""
    dns, ips = pki.permitted_subtrees(ca_cert)
    if not dns and not ips:
        return "any name (it has no NameConstraints)"
    return (f"DNS names equal to or under {', '.join(dns) or '(none)'} and addresses in "
            f"{', '.join(ips) or '(none)'}")


@dataclass
class ClusterCA:
    """The cluster CA as this run uses it: who signs leaves, what nodes trust, how far a rotation got."""

    dir: Path
    key: object
    cert: object
    previous: tuple | None = None  # (key, cert) of the CA being replaced, during a rotation
    trusting: set = field(default_factory=set)  # hosts recorded holding trust.pem with both CAs
    renewed: set = field(default_factory=set)  # hosts recorded holding leaves from the new CA
    hosts: tuple = ()  # every inventory host: a rotation step waits for all of them

    @property
    def cert_path(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def trust_path(self) -> Path:
        return self.dir / "trust.pem"

    def waiting_for_trust(self) -> list[str]:
        return [h for h in self.hosts if h not in self.trusting] if self.previous else []

    def waiting_for_renewal(self) -> list[str]:
        return [h for h in self.hosts if h not in self.renewed] if self.previous else []

    def signer(self) -> tuple:
        """(key, cert) that signs leaves this run: the old CA while a host may not trust the new one yet."""
        if self.previous is not None and self.waiting_for_trust():
            return self.previous
        return self.key, self.cert

    def bundle(self) -> list:
        return [self.cert] + ([self.previous[1]] if self.previous else [])


def trust_path(state_dir: Path) -> Path:
    """The file to verify nodes with (trust.pem; ca.pem for a state directory from before trust.pem existed)."""
    path = state_dir / "ca" / "trust.pem"
    return path if path.exists() else state_dir / "ca" / "ca.pem"


def _load_pair(ca_dir: Path, stem: str) -> tuple | None:
    cert_path, key_path = ca_dir / f"{stem}.pem", ca_dir / f"{stem}.key"
    if not cert_path.exists() and not key_path.exists():
        return None
    if not (cert_path.exists() and key_path.exists()):
        missing = key_path if cert_path.exists() else cert_path
        raise CAError(f"{missing} is missing (its pair is there): restore it from your backup of the state directory; "
                      f"deploy does not replace a cluster CA on its own")
    return pki.load_private_key(key_path), pki.load_certificate(cert_path)


def _write_pair(ca_dir: Path, stem: str, pair: tuple) -> None:
    pki.write_private_key(ca_dir / f"{stem}.key", pair[0])
    pki.write_certificate(ca_dir / f"{stem}.pem", pair[1])


def _write_if_changed(path: Path, data: bytes, mode: int) -> None:
    if not path.exists() or path.read_bytes() != data:
        pki.atomic_write(path, data, mode)


def _new_ca(domain: str, names: list[str]) -> tuple:
    dns, ips = ca_subtrees(domain, names)
    # a name of its own per CA, so a trust bundle never holds two CAs with one subject
    name = f"clawbot cluster CA {dt.date.today().isoformat()} {secrets.token_hex(3)}"
    return pki.create_ca(name, permitted_dns=dns, permitted_ips=ips)


def _refused(ca_cert, hosts: dict[str, list[str]]) -> list[tuple[str, str]]:
    """(who, name) for every name or address the CA does not permit; loopback is checked once."""
    found = []
    for who, names in [*hosts.items(), ("every server certificate", [*LOCAL_NAMES, *LOCAL_IPS])]:
        dns, ips = _split(names)
        found += [(who, n) for n in pki.permits(ca_cert, dns, ips)]
    return found


def _refusal(ca: Path, ca_cert, refused: list[tuple[str, str]], domain: str, rotating: bool) -> str:
    lines = [f"the cluster CA {ca} does not permit these names (its NameConstraints, chosen when it was created):"]
    lines += [f"  host {who}: {name}" for who, name in refused]
    lines.append(f"It permits {describe_permits(ca_cert)}.")
    if rotating:
        lines.append("A CA rotation is under way: finish it first (re-run deploy.py until it reports the old CA "
                     f"dropped), then run `{ROTATE_COMMAND}` once more.")
    else:
        bare = next((n for _, n in refused if "." not in n and ":" not in n), None)
        example = f" (e.g. {bare}.{domain} for {bare})" if bare else ""
        lines.append(f"Use names under {domain} (clawbot_cluster_domain){example} and addresses in those ranges, or "
                     f"replace the CA with `{ROTATE_COMMAND}`: nodes then trust the old and the new CA side by side "
                     f"until every node holds certificates from the new one, and browsers and apps that imported {ca} "
                     "must import the new one.")
    return "\n".join(lines)


def cluster_ca(state_dir: Path, hosts: dict[str, list[str]], domain: str, *, rotate: bool = False,
               log=print) -> ClusterCA:
    """Load the cluster CA (create it the first time), check it permits every host's names, write trust.pem.

    + hosts: every inventory host's names (Host.names), not only the selected ones
    + domain: clawbot_cluster_domain, used when a CA is created
    + rotate: --rotate-ca: create a new CA and start a rotation (the old one stays trusted)

    Raises CAError before writing anything when a name is outside the CA's constraints, when --rotate-ca comes
    during a rotation, or when half of a CA pair is missing.
    """
    ca_dir = state_dir / "ca"
    every = {**hosts, CONTROL_NAME: [CONTROL_NAME], MONITORING_NAME: [MONITORING_NAME]}
    current = _load_pair(ca_dir, "ca")
    previous = _load_pair(ca_dir, "previous")
    progress_path = ca_dir / "rotation.json"
    progress = json.loads(progress_path.read_text()) if previous and progress_path.exists() else {}
    if rotate and previous is not None:
        raise CAError(f"--rotate-ca: a CA rotation is already under way ({progress_path}); re-run deploy.py without "
                      "--rotate-ca until it reports the old CA dropped")
    if current is not None and not rotate:
        refused = _refused(current[1], every)
        if refused:
            raise CAError(_refusal(ca_dir / "ca.pem", current[1], refused, domain, rotating=previous is not None))
    ca_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(ca_dir, 0o700)
    if current is None or rotate:
        new = _new_ca(domain, [n for names in every.values() for n in names])
        if current is not None:
            previous, progress = current, {"trusting": [], "renewed": []}
            _write_pair(ca_dir, "previous", previous)
            pki.atomic_write(progress_path, _progress_bytes(progress), 0o600)
        _write_pair(ca_dir, "ca", new)
        current = new
        log(f"created cluster CA {ca_dir / 'ca.pem'}: it permits {describe_permits(new[1])}")
        if previous is not None:
            log(f"--rotate-ca: the old CA is kept ({ca_dir / 'previous.pem'}) and stays trusted; browsers and apps "
                f"must import the new {ca_dir / 'ca.pem'}, next to the old one, before leaves are reissued from it "
                "(step 2)")
    ca = ClusterCA(ca_dir, current[0], current[1], previous, set(progress.get("trusting", [])),
                   set(progress.get("renewed", [])), tuple(hosts))
    if ca.previous is not None and not ca.waiting_for_renewal():
        _retire(ca, log)
    _write_if_changed(ca.trust_path, b"".join(pki.cert_to_pem(c) for c in ca.bundle()), 0o644)
    if ca.previous is not None:
        log(rotation_status(ca))
    return ca


def _progress_bytes(progress: dict) -> bytes:
    return (json.dumps({k: sorted(v) for k, v in progress.items()}, indent=2) + "\n").encode()


def _retire(ca: ClusterCA, log) -> None:
    """Step 3: every host holds leaves from the new CA, so the old one leaves the trust bundle (kept in retired/)."""
    retired = ca.dir / "retired"
    retired.mkdir(mode=0o700, exist_ok=True)
    stem = f"{dt.date.today().isoformat()}-{pki.fingerprint(ca.previous[1])[:12]}"
    for suffix in ("pem", "key"):
        os.replace(ca.dir / f"previous.{suffix}", retired / f"{stem}.{suffix}")
    (ca.dir / "rotation.json").unlink(missing_ok=True)
    ca.previous, ca.trusting, ca.renewed = None, set(), set()
    log(f"CA rotation step 3 of 3: every node holds certificates from the new CA, so the old CA is dropped from "
        f"{ca.trust_path} this run (kept in {retired / (stem + '.pem')})")


def rotation_status(ca: ClusterCA) -> str:
    """Where a rotation stands and what the next run does, in one sentence for deploy's output."""
    if waiting := ca.waiting_for_trust():
        return (f"CA rotation step 1 of 3: nodes get {ca.trust_path} (old and new CA); leaves stay from the old CA "
                f"until every node holds it. Not yet recorded holding it: {', '.join(waiting)}. Re-run deploy.py.")
    if waiting := ca.waiting_for_renewal():
        return (f"CA rotation step 2 of 3: every node trusts the new CA, so leaves are reissued from it. Still holding "
                f"old-CA leaves: {', '.join(waiting)}. The run after all of them hold new leaves drops the old CA.")
    return "CA rotation: every node holds new leaves; the next run drops the old CA from the trust bundle."


def ensure_node_material(ca: ClusterCA, node: str, names: list[str]) -> NodeMaterial:
    """Issue or keep this node's server and client leaves on the control machine.

    During rotation step 1 the old CA signs, and names it does not permit wait for step 2 (noted); a node none of
    whose names the old CA permits is new to the cluster and gets leaves from the new CA at once.
    """
    node_dir = ca.dir.parent / "nodes" / node
    node_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(node_dir, 0o700)
    signer_key, signer_cert = ca.signer()
    dns, ips = _split(names)
    notes = []
    if signer_cert is not ca.cert:
        deferred = pki.permits(signer_cert, dns, ips)
        kept_dns, kept_ips = [d for d in dns if d.lower() not in deferred], [i for i in ips if i not in deferred]
        if kept_dns or kept_ips:
            dns, ips = kept_dns, kept_ips
            if deferred:
                notes.append(f"{', '.join(deferred)} join its certificates at rotation step 2 (the old CA, which "
                             "signs until every node trusts the new one, does not permit them)")
        else:
            signer_key, signer_cert = ca.key, ca.cert
            notes.append("none of its names is permitted by the old CA: its certificates come from the new CA now")
    # pki.issue_leaf lists each name once (the node's own 127.0.0.1 and the loopback one are one SAN)
    leaves = {"server": (dns + [n for n in LOCAL_NAMES if n not in dns], ips + [i for i in LOCAL_IPS if i not in ips]),
              "client": (dns, ips)}
    reissued, issued = [], []
    for usage, (leaf_dns, leaf_ips) in leaves.items():
        cert_path, key_path = node_dir / f"{usage}.pem", node_dir / f"{usage}.key"
        first = not cert_path.exists() and not key_path.exists()
        needed, reason = pki.reissue_decision(cert_path, key_path, signer_cert, usage=usage, dns_names=leaf_dns,
                                              ip_addresses=leaf_ips)
        if not needed:
            continue
        issue = pki.issue_server_cert if usage == "server" else pki.issue_client_cert
        key, cert = issue(signer_key, signer_cert, node, dns_names=leaf_dns, ip_addresses=leaf_ips)
        pki.write_private_key(key_path, key)
        pki.write_certificate(cert_path, cert)
        if first:
            issued.append(usage)
        else:
            reissued.append(f"{usage} certificate: {reason}")
    return NodeMaterial(ca.trust_path, node_dir / "server.pem", node_dir / "server.key", node_dir / "client.pem",
                        node_dir / "client.key", reissued, pki.fingerprint(signer_cert), notes, issued)


def record_rollout(ca: ClusterCA, materials: dict[str, NodeMaterial], succeeded: Iterable[str], log=print) -> None:
    """After a run (not --check): the hosts it fully succeeded on now hold trust.pem and their leaves; a rotation
    moves on from what is recorded here. Nothing to record outside a rotation."""
    if ca.previous is None:
        return
    current = pki.fingerprint(ca.cert)
    for host in succeeded:
        ca.trusting.add(host)
        if materials[host].signer == current:
            ca.renewed.add(host)
    pki.atomic_write(ca.dir / "rotation.json", _progress_bytes({"trusting": ca.trusting, "renewed": ca.renewed}),
                     0o600)
    log(rotation_status(ca))
