"""Cluster PKI: one private CA, server and client leaves, reissue decisions and mTLS SSL contexts.

Shared by the deploy side (which holds the CA key and issues leaves) and the agent (which loads its
own key and certificate, verifies peers and reloads rotated certificates). Only `cryptography` and the
standard library: the agent must not pull the deploy side's dependencies.

Design choices, and why:
- EC keys (P-256 by default, P-384 on request): small, fast handshakes on consumer CPUs.
- The CA carries pathlen 0 and NameConstraints, so even a leaked CA key can only mint certificates
  for the cluster's own names and addresses, never for a public site.
- A leaf is either a server (EKU serverAuth) or a client (EKU clientAuth), never both: a stolen
  model-node certificate cannot be used to talk to another model node as a client.
- Certificates are reissued only when something is actually wrong (`reissue_decision`): regenerating
  every run would make each deploy report a change (files.put compares checksums).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Curve = Literal["P-256", "P-384"]
Usage = Literal["server", "client"]
IPLike = Union[str, ipaddress.IPv4Address, ipaddress.IPv6Address]
NetworkLike = Union[str, ipaddress.IPv4Network, ipaddress.IPv6Network, ipaddress.IPv4Address, ipaddress.IPv6Address]

DEFAULT_CA_DAYS = 3650
DEFAULT_LEAF_DAYS = 397  # the CA/Browser Forum's ceiling; short enough that rotation is exercised
RENEW_WHEN_LIFETIME_LEFT_BELOW = 1 / 3
# Backdate notBefore a little so a node whose clock is slightly behind the control machine accepts it.
CLOCK_SKEW = dt.timedelta(minutes=5)

_CURVES: dict[str, tuple[ec.EllipticCurve, hashes.HashAlgorithm]] = {
    "P-256": (ec.SECP256R1(), hashes.SHA256()),
    "P-384": (ec.SECP384R1(), hashes.SHA384()),
}
_USAGE_EKU = {"server": ExtendedKeyUsageOID.SERVER_AUTH, "client": ExtendedKeyUsageOID.CLIENT_AUTH}


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# --------------------------------------------------------------------------- keys and names


def generate_key(curve: Curve = "P-256") -> ec.EllipticCurvePrivateKey:
    if curve not in _CURVES:
        raise ValueError(f"unsupported curve {curve!r}; use one of {', '.join(_CURVES)}")
    return ec.generate_private_key(_CURVES[curve][0])


def _hash_for(key: ec.EllipticCurvePrivateKey) -> hashes.HashAlgorithm:
    """Match the digest to the curve's strength (P-384 signs with SHA-384), as verifiers expect."""
    return hashes.SHA384() if key.curve.key_size >= 384 else hashes.SHA256()


def _network(value: NetworkLike) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return value
    return ipaddress.ip_network(str(value), strict=True)


def _ip(value: IPLike) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return value if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)) else ipaddress.ip_address(value)


def _dns(name: str) -> str:
    name = name.strip().lower().rstrip(".")
    if not name or " " in name:
        raise ValueError(f"invalid DNS name {name!r}")
    return name


# --------------------------------------------------------------------------- CA and leaves


def create_ca(
    common_name: str,
    *,
    permitted_dns: Sequence[str],
    permitted_ips: Sequence[NetworkLike],
    curve: Curve = "P-256",
    days: int = DEFAULT_CA_DAYS,
    now: dt.datetime | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed cluster CA that can sign leaves only (pathlen 0) and only for the cluster's names.

    permitted_dns: DNS suffixes ("cluster.internal" permits it and every name below it).
    permitted_ips: networks or single addresses ("10.0.0.0/24", "127.0.0.1").
    A kind with nothing permitted is excluded entirely (no DNS SANs, or no IP SANs, can ever verify),
    because an absent permitted subtree would otherwise leave that kind unconstrained.
    """
    if not permitted_dns and not permitted_ips:
        raise ValueError("a cluster CA needs at least one permitted DNS name or IP network")
    key = generate_key(curve)
    now = now or _utcnow()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    permitted: list[x509.GeneralName] = [x509.DNSName(_dns(d)) for d in permitted_dns]
    permitted += [x509.IPAddress(_network(n)) for n in permitted_ips]
    excluded: list[x509.GeneralName] = []
    if not permitted_ips:
        excluded += [x509.IPAddress(ipaddress.ip_network("0.0.0.0/0")), x509.IPAddress(ipaddress.ip_network("::/0"))]
    if not permitted_dns:
        excluded.append(x509.DNSName(""))  # an empty DNS constraint matches every name (RFC 5280 4.2.1.10)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=excluded or None),
                       critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, _hash_for(key))
    )
    return key, cert


def permits(ca_cert: x509.Certificate, dns_names: Iterable[str] = (), ip_addresses: Iterable[IPLike] = ()) -> list[str]:
    """The SANs the CA's NameConstraints forbid (empty list: all permitted). Lets deploy fail early."""
    try:
        constraints = ca_cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return []
    permitted = constraints.permitted_subtrees or []
    excluded = constraints.excluded_subtrees or []

    def dns_in(name: str, subtrees: Iterable[x509.GeneralName]) -> bool:
        return any(
            isinstance(t, x509.DNSName) and (t.value == "" or name == t.value.lower() or name.endswith("." + t.value.lower().lstrip(".")))
            for t in subtrees
        )

    def ip_in(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, subtrees: Iterable[x509.GeneralName]) -> bool:
        return any(isinstance(t, x509.IPAddress) and t.value.version == addr.version and addr in t.value for t in subtrees)

    has_dns_subtree = any(isinstance(t, x509.DNSName) for t in permitted)
    has_ip_subtree = any(isinstance(t, x509.IPAddress) for t in permitted)
    refused = []
    for raw in dns_names:
        name = _dns(raw)
        if dns_in(name, excluded) or (has_dns_subtree and not dns_in(name, permitted)):
            refused.append(name)
    for raw in ip_addresses:
        addr = _ip(raw)
        if ip_in(addr, excluded) or (has_ip_subtree and not ip_in(addr, permitted)):
            refused.append(str(addr))
    return refused


def permitted_subtrees(ca_cert: x509.Certificate) -> tuple[list[str], list[str]]:
    """(DNS subtrees, IP networks) the CA's NameConstraints permit, as strings for messages; ([], []) when
    the CA has no NameConstraints (it permits everything)."""
    try:
        constraints = ca_cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return [], []
    subtrees = constraints.permitted_subtrees or []
    return ([t.value for t in subtrees if isinstance(t, x509.DNSName)],
            [str(t.value) for t in subtrees if isinstance(t, x509.IPAddress)])


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER, hex: names one CA across runs (its subject may repeat)."""
    return cert.fingerprint(hashes.SHA256()).hex()


def issue_leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    common_name: str,
    *,
    usage: Usage,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[IPLike] = (),
    days: int = DEFAULT_LEAF_DAYS,
    key: ec.EllipticCurvePrivateKey | None = None,
    curve: Curve = "P-256",
    now: dt.datetime | None = None,
    check_name_constraints: bool = True,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A server or client leaf with DNS + IP SANs; pass `key` to keep the node's existing key on renewal.

    Each name is listed once, in the order first given: DNS names compared as normalised (lower case, no trailing
    dot), addresses by value (a node's own 127.0.0.1 and the loopback one are one SAN).
    Refuses names the CA's NameConstraints forbid (the peer would reject the certificate anyway, and a
    clear error at deploy time beats a handshake failure on a node); check_name_constraints=False exists
    only so tests can make such a certificate.
    """
    if usage not in _USAGE_EKU:
        raise ValueError(f"usage must be 'server' or 'client', not {usage!r}")
    dns = list(dict.fromkeys(_dns(d) for d in dns_names))
    ips = list(dict.fromkeys(_ip(i) for i in ip_addresses))
    if not dns and not ips:
        raise ValueError("a leaf needs at least one DNS name or IP address (peers authorise on SANs)")
    if check_name_constraints:
        refused = permits(ca_cert, dns, ips)
        if refused:
            raise ValueError(f"the cluster CA does not permit {', '.join(refused)}; add them to its permitted names")
    key = key or generate_key(curve)
    now = now or _utcnow()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns] + [x509.IPAddress(i) for i in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([_USAGE_EKU[usage]]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, _hash_for(ca_key))
    )
    return key, cert


def issue_server_cert(ca_key, ca_cert, common_name: str, **kwargs) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    return issue_leaf(ca_key, ca_cert, common_name, usage="server", **kwargs)


def issue_client_cert(ca_key, ca_cert, common_name: str, **kwargs) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    return issue_leaf(ca_key, ca_cert, common_name, usage="client", **kwargs)


# --------------------------------------------------------------------------- PEM and files


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_to_pem(key: ec.EllipticCurvePrivateKey, passphrase: bytes | None = None) -> bytes:
    """PKCS#8 PEM; a passphrase is for the CA key at rest, node keys stay plain (a service reads them)."""
    encryption = (serialization.BestAvailableEncryption(passphrase) if passphrase
                  else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def load_certificate(path: str | os.PathLike) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def load_certificates(path: str | os.PathLike) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle (a trust file during a CA rotation holds two)."""
    return x509.load_pem_x509_certificates(Path(path).read_bytes())


def load_private_key(path: str | os.PathLike, passphrase: bytes | None = None) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=passphrase)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: expected an EC private key, got {type(key).__name__}")
    return key


def atomic_write(path: str | os.PathLike, data: bytes, mode: int) -> None:
    """Write via a temp file in the same directory, then rename: readers see the old or the new file,
    never half of one, and a key is never readable by others even for a moment (mode set before data)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_private_key(path: str | os.PathLike, key: ec.EllipticCurvePrivateKey, passphrase: bytes | None = None) -> None:
    atomic_write(path, key_to_pem(key, passphrase), 0o600)


def write_certificate(path: str | os.PathLike, cert: x509.Certificate | Sequence[x509.Certificate]) -> None:
    certs = [cert] if isinstance(cert, x509.Certificate) else list(cert)
    atomic_write(path, b"".join(cert_to_pem(c) for c in certs), 0o644)


# --------------------------------------------------------------------------- status and reissue


def days_left(cert: x509.Certificate, now: dt.datetime | None = None) -> float:
    """Days until notAfter (negative once expired), for `clawbot status`."""
    return (cert.not_valid_after_utc - (now or _utcnow())).total_seconds() / 86400


def lifetime_fraction_left(cert: x509.Certificate, now: dt.datetime | None = None) -> float:
    total = (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds()
    return (cert.not_valid_after_utc - (now or _utcnow())).total_seconds() / total if total > 0 else 0.0


def cert_summary(cert: x509.Certificate, now: dt.datetime | None = None) -> dict:
    """A JSON-ready description of a certificate for status reports."""
    sans = san_identities(cert)
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": format(cert.serial_number, "x"),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "days_left": round(days_left(cert, now), 1),
        "dns_names": list(sans.dns_names),
        "ip_addresses": [str(i) for i in sans.ip_addresses],
    }


def _public_bytes(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _eku(cert: x509.Certificate) -> set:
    try:
        return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return set()


def reissue_decision(
    cert_path: str | os.PathLike,
    key_path: str | os.PathLike,
    ca_cert: x509.Certificate,
    *,
    usage: Usage,
    dns_names: Iterable[str] = (),
    ip_addresses: Iterable[IPLike] = (),
    now: dt.datetime | None = None,
    renew_below: float = RENEW_WHEN_LIFETIME_LEFT_BELOW,
) -> tuple[bool, str]:
    """(needed, reason) for a node's leaf; reissue only on a real problem so deploys stay idempotent.

    Checked in order: missing files, unreadable files, key/cert mismatch, another CA, SANs changed, a SAN
    listed twice, wrong EKU, expired, less than `renew_below` of the lifetime left.
    """
    now = now or _utcnow()
    cert_path, key_path = Path(cert_path), Path(key_path)
    if not cert_path.exists():
        return True, f"certificate {cert_path} is missing"
    if not key_path.exists():
        return True, f"key {key_path} is missing"
    try:
        cert = load_certificate(cert_path)
    except ValueError as exc:
        return True, f"certificate {cert_path} is unreadable: {exc}"
    try:
        key = load_private_key(key_path)
    except (ValueError, TypeError) as exc:
        return True, f"key {key_path} is unreadable: {exc}"
    if _public_bytes(key.public_key()) != _public_bytes(cert.public_key()):
        return True, "key does not match certificate"
    try:
        cert.verify_directly_issued_by(ca_cert)
    except Exception:  # ValueError (issuer name), InvalidSignature, TypeError (key type)
        return True, f"signed by another CA (issuer {cert.issuer.rfc4514_string()})"
    have = san_identities(cert)
    want = PeerIdentity(
        dns_names=tuple(sorted({_dns(d) for d in dns_names})),
        ip_addresses=tuple(sorted({_ip(i) for i in ip_addresses}, key=lambda a: (a.version, a))),
    )
    if (set(have.dns_names), set(have.ip_addresses)) != (set(want.dns_names), set(want.ip_addresses)):
        return True, f"SANs changed: have {have.describe()}, want {want.describe()}"
    if len(set(have.dns_names)) < len(have.dns_names) or len(set(have.ip_addresses)) < len(have.ip_addresses):
        return True, f"a SAN is listed twice: {have.describe()}"  # issued before issue_leaf listed each once
    if _eku(cert) != {_USAGE_EKU[usage]}:
        names = sorted(getattr(o, "_name", o.dotted_string) for o in _eku(cert)) or ["none"]
        return True, f"wrong extended key usage for a {usage} certificate: {', '.join(names)}"
    if cert.not_valid_after_utc <= now:
        return True, f"expired on {cert.not_valid_after_utc.date().isoformat()}"
    fraction = lifetime_fraction_left(cert, now)
    if fraction < renew_below:
        return True, (f"less than {renew_below:.0%} of its lifetime left "
                      f"({days_left(cert, now):.0f} days, {fraction:.0%})")
    return False, f"valid until {cert.not_valid_after_utc.date().isoformat()} ({days_left(cert, now):.0f} days left)"


# --------------------------------------------------------------------------- SSL contexts


def server_ssl_context(cert_path: str | os.PathLike, key_path: str | os.PathLike,
                       ca_path: str | os.PathLike) -> ssl.SSLContext:
    """A server context that demands a client certificate from the cluster CA (mutual TLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(ca_path))
    ctx.load_cert_chain(str(cert_path), str(key_path))
    return ctx


def client_ssl_context(cert_path: str | os.PathLike, key_path: str | os.PathLike,
                       ca_path: str | os.PathLike, *, check_hostname: bool = True) -> ssl.SSLContext:
    """A client context that trusts only the cluster CA (not the system store) and presents our cert."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(ca_path))
    ctx.load_cert_chain(str(cert_path), str(key_path))
    return ctx


def reload_cert_chain(live: ssl.SSLContext, cert_path: str | os.PathLike, key_path: str | os.PathLike) -> None:
    """Swap a rotated certificate into a live context without ever breaking it.

    A failed load_cert_chain leaves the live context half-updated (new cert, old key) and every later
    handshake fails; so the exact bytes are first loaded into a scratch context, and only if that
    succeeds into the live one. The bytes are copied to a private temp dir first so the file cannot
    change between the two loads. Raises ssl.SSLError/OSError (live context untouched) on a bad pair.
    """
    cert_bytes = Path(cert_path).read_bytes()
    key_bytes = Path(key_path).read_bytes()
    with tempfile.TemporaryDirectory(prefix="clawbot-reload-") as tmp:
        snap_cert, snap_key = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        atomic_write(snap_cert, cert_bytes, 0o600)
        atomic_write(snap_key, key_bytes, 0o600)
        scratch = ssl.SSLContext(live.protocol)
        scratch.load_cert_chain(str(snap_cert), str(snap_key))
        live.load_cert_chain(str(snap_cert), str(snap_key))


# --------------------------------------------------------------------------- peer identity


@dataclass(frozen=True)
class PeerIdentity:
    """The SANs of a certificate: what authorisation compares with an allowlist (never the CN)."""

    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = ()

    def describe(self) -> str:
        items = [f"DNS:{d}" for d in self.dns_names] + [f"IP:{i}" for i in self.ip_addresses]
        return ", ".join(items) or "no SANs"


def san_identities(cert: x509.Certificate) -> PeerIdentity:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return PeerIdentity()
    return PeerIdentity(
        dns_names=tuple(sorted(n.lower() for n in san.get_values_for_type(x509.DNSName))),
        ip_addresses=tuple(sorted(san.get_values_for_type(x509.IPAddress), key=lambda a: (a.version, a))),
    )


def peer_identities(peer_der: bytes | None) -> PeerIdentity:
    """SANs of a peer certificate as given by `SSLSocket.getpeercert(binary_form=True)`.

    The binary form is used because the dict form is empty whenever verification was off, and
    because it is the same bytes an ASGI server can pass along from its transport.
    """
    if not peer_der:
        return PeerIdentity()
    return san_identities(x509.load_der_x509_certificate(peer_der))


def authorize_peer(peer_der: bytes | None, allowlist: Iterable[str]) -> str | None:
    """The first SAN of the peer that the allowlist names (DNS case-insensitive, IPs by value), or None."""
    allowed_dns: set[str] = set()
    allowed_ips: set = set()
    for entry in allowlist:
        try:
            allowed_ips.add(ipaddress.ip_address(entry))
        except ValueError:
            allowed_dns.add(_dns(entry))
    identity = peer_identities(peer_der)
    for name in identity.dns_names:
        if name in allowed_dns:
            return name
    for addr in identity.ip_addresses:
        if addr in allowed_ips:
            return str(addr)
    return None
