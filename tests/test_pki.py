"""clawbot.common.pki: real certificates, real TLS handshakes over loopback, real files."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
import ssl
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID

from clawbot.common import pki

CLUSTER_DNS = "cluster.internal"
SERVER_NAME = "model-1.cluster.internal"
CLIENT_NAME = "chat-1.cluster.internal"
HANDSHAKE_TIMEOUT_S = 10


@dataclass
class Cluster:
    dir: Path
    ca_key: object
    ca_cert: x509.Certificate

    @property
    def ca_path(self) -> Path:
        return self.dir / "ca.pem"

    def write_leaf(self, name: str, key, cert) -> tuple[Path, Path]:
        cert_path, key_path = self.dir / f"{name}.pem", self.dir / f"{name}.key"
        pki.write_certificate(cert_path, cert)
        pki.write_private_key(key_path, key)
        return cert_path, key_path

    def leaf(self, name: str, usage: str, **kwargs) -> tuple[Path, Path]:
        key, cert = pki.issue_leaf(self.ca_key, self.ca_cert, name, usage=usage, **kwargs)
        return self.write_leaf(name, key, cert)


def make_cluster(directory: Path, **ca_kwargs) -> Cluster:
    directory.mkdir(parents=True, exist_ok=True)
    ca_kwargs.setdefault("permitted_dns", [CLUSTER_DNS])
    ca_kwargs.setdefault("permitted_ips", ["127.0.0.0/8", "10.77.0.0/24"])
    ca_key, ca_cert = pki.create_ca("clawbot test CA", **ca_kwargs)
    cluster = Cluster(directory, ca_key, ca_cert)
    pki.write_certificate(cluster.ca_path, ca_cert)
    return cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Cluster:
    return make_cluster(tmp_path / "cluster")


@pytest.fixture
def server_ctx(cluster: Cluster) -> ssl.SSLContext:
    cert, key = cluster.leaf("server", "server", dns_names=[SERVER_NAME], ip_addresses=["127.0.0.1"])
    return pki.server_ssl_context(cert, key, cluster.ca_path)


@dataclass
class Outcome:
    ok: bool
    error: str = ""
    peer_der: bytes | None = None
    data: bytes = b""


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
              server_hostname: str = SERVER_NAME) -> tuple[Outcome, Outcome]:
    """One TLS connection over loopback; returns what the server and the client each saw.

    The client reads after its handshake because in TLS 1.3 a server's rejection of the client
    certificate arrives only after the client considers the handshake done.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(HANDSHAKE_TIMEOUT_S)
    port = listener.getsockname()[1]
    server_outcome: list[Outcome] = []

    def serve() -> None:
        try:
            raw, _ = listener.accept()
        except OSError as exc:
            server_outcome.append(Outcome(False, f"accept: {exc}"))
            return
        raw.settimeout(HANDSHAKE_TIMEOUT_S)
        try:
            with server_ctx.wrap_socket(raw, server_side=True) as tls:
                peer = tls.getpeercert(binary_form=True)
                tls.sendall(b"ok")
                server_outcome.append(Outcome(True, peer_der=peer))
        except (ssl.SSLError, OSError) as exc:
            server_outcome.append(Outcome(False, str(exc)))
        finally:
            raw.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=HANDSHAKE_TIMEOUT_S) as raw:
            try:
                with client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                    peer = tls.getpeercert(binary_form=True)
                    data = tls.recv(16)
                    client_outcome = Outcome(data == b"ok", "" if data == b"ok" else f"got {data!r}", peer, data)
            except (ssl.SSLError, OSError) as exc:
                client_outcome = Outcome(False, str(exc))
    finally:
        thread.join(HANDSHAKE_TIMEOUT_S)
        listener.close()
    assert not thread.is_alive(), "server thread did not finish"
    return server_outcome[0], client_outcome


def client_ctx_for(cluster: Cluster, cert_key: tuple[Path, Path] | None) -> ssl.SSLContext:
    if cert_key is None:  # a client that presents no certificate at all
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(cluster.ca_path))
        return ctx
    return pki.client_ssl_context(*cert_key, cluster.ca_path)


# --------------------------------------------------------------------------- CA and leaf contents


def test_ca_is_a_constrained_leaf_only_ca(cluster: Cluster) -> None:
    ext = cluster.ca_cert.extensions
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ext.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    nc = ext.get_extension_for_class(x509.NameConstraints)
    assert nc.critical
    assert x509.DNSName(CLUSTER_DNS) in nc.value.permitted_subtrees
    assert x509.IPAddress(ipaddress.ip_network("10.77.0.0/24")) in nc.value.permitted_subtrees
    assert ext.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert isinstance(cluster.ca_cert.signature_hash_algorithm, hashes.SHA256)
    assert 3649 < pki.days_left(cluster.ca_cert) <= 3650


def test_p384_ca_signs_with_sha384_and_its_leaves_verify(tmp_path: Path) -> None:
    cluster = make_cluster(tmp_path, curve="P-384")
    assert cluster.ca_cert.public_key().curve.name == "secp384r1"
    assert isinstance(cluster.ca_cert.signature_hash_algorithm, hashes.SHA384)
    _, leaf = pki.issue_server_cert(cluster.ca_key, cluster.ca_cert, "m", dns_names=[SERVER_NAME])
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA384)
    verifier = verification.PolicyBuilder().store(verification.Store([cluster.ca_cert])) \
        .build_server_verifier(verification.DNSName(SERVER_NAME))
    assert verifier.verify(leaf, [])[-1] == cluster.ca_cert


def test_leaves_carry_one_eku_sans_and_authority_key_id(cluster: Cluster) -> None:
    _, server = pki.issue_server_cert(cluster.ca_key, cluster.ca_cert, "model-1",
                                      dns_names=[SERVER_NAME], ip_addresses=["10.77.0.5"])
    _, client = pki.issue_client_cert(cluster.ca_key, cluster.ca_cert, "chat-1", dns_names=[CLIENT_NAME])
    assert list(server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert list(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert pki.san_identities(server) == pki.PeerIdentity((SERVER_NAME,), (ipaddress.ip_address("10.77.0.5"),))
    aki = server.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = cluster.ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert 396 < pki.days_left(server) <= 397


def test_leaf_lifetime_is_configurable(cluster: Cluster) -> None:
    _, leaf = pki.issue_client_cert(cluster.ca_key, cluster.ca_cert, "c", dns_names=[CLIENT_NAME], days=30)
    assert 29.9 < pki.days_left(leaf) <= 30


def test_issuing_a_name_outside_the_constraints_is_refused_early(cluster: Cluster) -> None:
    with pytest.raises(ValueError, match="evil.example.com"):
        pki.issue_server_cert(cluster.ca_key, cluster.ca_cert, "x", dns_names=["evil.example.com"])
    with pytest.raises(ValueError, match="192.168.1.1"):
        pki.issue_server_cert(cluster.ca_key, cluster.ca_cert, "x", ip_addresses=["192.168.1.1"])
    with pytest.raises(ValueError, match="at least one"):
        pki.issue_server_cert(cluster.ca_key, cluster.ca_cert, "x")


# --------------------------------------------------------------------------- mutual TLS handshakes


def test_valid_client_is_accepted_and_identified_by_san(cluster: Cluster, server_ctx: ssl.SSLContext) -> None:
    client = client_ctx_for(cluster, cluster.leaf("client", "client", dns_names=[CLIENT_NAME]))
    server_seen, client_seen = handshake(server_ctx, client)
    assert server_seen.ok and client_seen.ok, (server_seen, client_seen)
    assert pki.peer_identities(server_seen.peer_der).dns_names == (CLIENT_NAME,)
    assert pki.authorize_peer(server_seen.peer_der, ["other.cluster.internal", CLIENT_NAME.upper()]) == CLIENT_NAME
    assert pki.authorize_peer(server_seen.peer_der, ["other.cluster.internal", "10.77.0.9"]) is None
    assert pki.peer_identities(client_seen.peer_der).ip_addresses == (ipaddress.ip_address("127.0.0.1"),)


def test_client_may_address_the_server_by_ip_san(cluster: Cluster, server_ctx: ssl.SSLContext) -> None:
    client = client_ctx_for(cluster, cluster.leaf("client", "client", dns_names=[CLIENT_NAME]))
    server_seen, client_seen = handshake(server_ctx, client, server_hostname="127.0.0.1")
    assert server_seen.ok and client_seen.ok, (server_seen, client_seen)


def test_client_without_certificate_is_rejected(cluster: Cluster, server_ctx: ssl.SSLContext) -> None:
    server_seen, client_seen = handshake(server_ctx, client_ctx_for(cluster, None))
    assert not server_seen.ok and not client_seen.ok
    assert "certificate" in server_seen.error.lower()


def test_client_from_another_ca_is_rejected(tmp_path: Path, cluster: Cluster, server_ctx: ssl.SSLContext) -> None:
    rogue = make_cluster(tmp_path / "rogue")
    rogue_client = rogue.leaf("client", "client", dns_names=[CLIENT_NAME])
    # The rogue client trusts the real CA so that only the server's judgement is tested.
    client = pki.client_ssl_context(*rogue_client, cluster.ca_path)
    server_seen, client_seen = handshake(server_ctx, client)
    assert not server_seen.ok and not client_seen.ok
    assert "certificate verify failed" in server_seen.error
    assert "unable to get local issuer certificate" in server_seen.error


def test_expired_client_is_rejected(cluster: Cluster, server_ctx: ssl.SSLContext) -> None:
    long_ago = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=400)
    client = client_ctx_for(cluster, cluster.leaf("client", "client", dns_names=[CLIENT_NAME], days=30, now=long_ago))
    server_seen, client_seen = handshake(server_ctx, client)
    assert not server_seen.ok and not client_seen.ok
    assert "certificate has expired" in server_seen.error


def test_server_only_certificate_is_rejected_as_client(cluster: Cluster, server_ctx: ssl.SSLContext) -> None:
    # A stolen model-node certificate must not let its holder act as a chat node.
    client = client_ctx_for(cluster, cluster.leaf("imposter", "server", dns_names=[CLIENT_NAME]))
    server_seen, client_seen = handshake(server_ctx, client)
    assert not server_seen.ok and not client_seen.ok
    assert "certificate purpose" in server_seen.error


def test_client_rejects_a_server_presenting_a_client_only_certificate(cluster: Cluster) -> None:
    wrong = cluster.leaf("wrong-server", "client", dns_names=[SERVER_NAME])
    server = pki.server_ssl_context(*wrong, cluster.ca_path)
    client = client_ctx_for(cluster, cluster.leaf("client", "client", dns_names=[CLIENT_NAME]))
    _, client_seen = handshake(server, client)
    assert not client_seen.ok
    assert "certificate purpose" in client_seen.error


# --------------------------------------------------------------------------- NameConstraints


def _out_of_bounds_server(cluster: Cluster, **sans) -> ssl.SSLContext:
    key, cert = pki.issue_server_cert(cluster.ca_key, cluster.ca_cert, "outsider",
                                      check_name_constraints=False, **sans)
    return pki.server_ssl_context(*cluster.write_leaf("outsider", key, cert), cluster.ca_path)


def test_name_constraints_reject_a_dns_name_outside_the_cluster(cluster: Cluster) -> None:
    server = _out_of_bounds_server(cluster, dns_names=["evil.example.com"])
    client = client_ctx_for(cluster, cluster.leaf("client", "client", dns_names=[CLIENT_NAME]))
    _, client_seen = handshake(server, client, server_hostname="evil.example.com")
    assert not client_seen.ok
    assert "permitted subtree violation" in client_seen.error


def test_name_constraints_reject_an_ip_outside_the_cluster_even_without_hostname_check(cluster: Cluster) -> None:
    server = _out_of_bounds_server(cluster, ip_addresses=["192.168.5.5"])
    client = pki.client_ssl_context(*cluster.leaf("client", "client", dns_names=[CLIENT_NAME]),
                                    cluster.ca_path, check_hostname=False)
    _, client_seen = handshake(server, client, server_hostname="192.168.5.5")
    assert not client_seen.ok
    assert "permitted subtree violation" in client_seen.error


def test_name_constraints_with_cryptography_verifier(cluster: Cluster) -> None:
    store = verification.Store([cluster.ca_cert])
    _, inside = pki.issue_server_cert(cluster.ca_key, cluster.ca_cert, "m", dns_names=[SERVER_NAME])
    _, outside = pki.issue_server_cert(cluster.ca_key, cluster.ca_cert, "e", dns_names=["evil.example.com"],
                                       check_name_constraints=False)
    ok = verification.PolicyBuilder().store(store).build_server_verifier(verification.DNSName(SERVER_NAME))
    assert ok.verify(inside, [])[-1] == cluster.ca_cert
    bad = verification.PolicyBuilder().store(store).build_server_verifier(verification.DNSName("evil.example.com"))
    with pytest.raises(verification.VerificationError, match="name constraint"):
        bad.verify(outside, [])


def test_ip_only_ca_excludes_every_dns_name(tmp_path: Path) -> None:
    cluster = make_cluster(tmp_path, permitted_dns=[], permitted_ips=["127.0.0.0/8"])
    assert pki.permits(cluster.ca_cert, ["anything.example"], ["127.0.0.1"]) == ["anything.example"]
    _, leaf = pki.issue_server_cert(cluster.ca_key, cluster.ca_cert, "x", dns_names=["anything.example"],
                                    check_name_constraints=False)
    verifier = verification.PolicyBuilder().store(verification.Store([cluster.ca_cert])) \
        .build_server_verifier(verification.DNSName("anything.example"))
    with pytest.raises(verification.VerificationError):
        verifier.verify(leaf, [])


# --------------------------------------------------------------------------- rotation on a live context


def test_failed_reload_keeps_the_live_context_working(cluster: Cluster) -> None:
    cert_path, key_path = cluster.leaf("server", "server", dns_names=[SERVER_NAME])
    live = pki.server_ssl_context(cert_path, key_path, cluster.ca_path)
    client = client_ctx_for(cluster, cluster.leaf("client", "client", dns_names=[CLIENT_NAME]))
    _, before = handshake(live, client)
    assert before.ok

    # A rotation gone wrong: a new certificate lands but the key beside it is another one.
    _, rotated = pki.issue_server_cert(cluster.ca_key, cluster.ca_cert, "model-1", dns_names=[SERVER_NAME])
    pki.write_certificate(cert_path, rotated)
    with pytest.raises(ssl.SSLError):
        pki.reload_cert_chain(live, cert_path, key_path)
    _, after_failure = handshake(live, client)
    assert after_failure.ok, after_failure
    assert after_failure.peer_der == before.peer_der  # still the old certificate

    # The fix lands (key rotated with it): the reload now swaps the new certificate in.
    new_key, new_cert = pki.issue_server_cert(cluster.ca_key, cluster.ca_cert, "model-1", dns_names=[SERVER_NAME])
    cluster.write_leaf("server", new_key, new_cert)
    pki.reload_cert_chain(live, cert_path, key_path)
    _, after_fix = handshake(live, client)
    assert after_fix.ok
    assert x509.load_der_x509_certificate(after_fix.peer_der).serial_number == new_cert.serial_number


def test_unguarded_failed_load_really_breaks_a_context(cluster: Cluster) -> None:
    """Why reload_cert_chain exists: the naive load on the live context leaves it unusable."""
    cert_path, key_path = cluster.leaf("server", "server", dns_names=[SERVER_NAME])
    live = pki.server_ssl_context(cert_path, key_path, cluster.ca_path)
    client = client_ctx_for(cluster, cluster.leaf("client", "client", dns_names=[CLIENT_NAME]))
    _, rotated = pki.issue_server_cert(cluster.ca_key, cluster.ca_cert, "model-1", dns_names=[SERVER_NAME])
    pki.write_certificate(cert_path, rotated)
    with pytest.raises(ssl.SSLError):
        live.load_cert_chain(str(cert_path), str(key_path))
    server_seen, client_seen = handshake(live, client)
    assert not (server_seen.ok and client_seen.ok)


# --------------------------------------------------------------------------- reissue decision


@pytest.fixture
def issued(cluster: Cluster) -> tuple[Path, Path]:
    return cluster.leaf("node", "server", dns_names=[SERVER_NAME], ip_addresses=["10.77.0.5"])


def decide(cluster: Cluster, paths: tuple[Path, Path], **overrides) -> tuple[bool, str]:
    kwargs = dict(usage="server", dns_names=[SERVER_NAME], ip_addresses=["10.77.0.5"])
    kwargs.update(overrides)
    return pki.reissue_decision(paths[0], paths[1], cluster.ca_cert, **kwargs)


def test_reissue_not_needed_for_a_good_certificate(cluster: Cluster, issued) -> None:
    needed, reason = decide(cluster, issued)
    assert not needed and "days left" in reason
    # Same SANs in another order and case are no change (deploys must stay idempotent).
    assert not decide(cluster, issued, dns_names=[SERVER_NAME.upper()], ip_addresses=["10.77.0.5"])[0]


def test_reissue_when_files_are_missing(cluster: Cluster, issued) -> None:
    cert_path, key_path = issued
    key_path.unlink()
    assert decide(cluster, issued) == (True, f"key {key_path} is missing")
    cert_path.unlink()
    assert decide(cluster, issued) == (True, f"certificate {cert_path} is missing")


def test_reissue_when_file_is_garbage(cluster: Cluster, issued) -> None:
    issued[0].write_text("not a certificate")
    needed, reason = decide(cluster, issued)
    assert needed and "unreadable" in reason


def test_reissue_when_key_does_not_match(cluster: Cluster, issued) -> None:
    pki.write_private_key(issued[1], pki.generate_key())
    assert decide(cluster, issued) == (True, "key does not match certificate")


def test_reissue_when_signed_by_another_ca(tmp_path: Path, cluster: Cluster, issued) -> None:
    rogue = make_cluster(tmp_path / "rogue")
    key, cert = pki.issue_server_cert(rogue.ca_key, rogue.ca_cert, "node",
                                      dns_names=[SERVER_NAME], ip_addresses=["10.77.0.5"])
    cluster.write_leaf("node", key, cert)
    needed, reason = decide(cluster, issued)
    assert needed and reason.startswith("signed by another CA")


def test_reissue_when_a_same_named_ca_was_regenerated(tmp_path: Path, cluster: Cluster, issued) -> None:
    # Same subject name, new key: only the signature check tells them apart.
    _, new_ca = pki.create_ca("clawbot test CA", permitted_dns=[CLUSTER_DNS], permitted_ips=["10.77.0.0/24"])
    needed, reason = pki.reissue_decision(*issued, new_ca, usage="server", dns_names=[SERVER_NAME],
                                          ip_addresses=["10.77.0.5"])
    assert needed and reason.startswith("signed by another CA")


def test_reissue_when_sans_changed(cluster: Cluster, issued) -> None:
    needed, reason = decide(cluster, issued, ip_addresses=["10.77.0.6"])
    assert needed and reason.startswith("SANs changed") and "IP:10.77.0.6" in reason
    needed, reason = decide(cluster, issued, dns_names=[SERVER_NAME, "model.cluster.internal"])
    assert needed and "DNS:model.cluster.internal" in reason


def test_reissue_when_eku_is_wrong(cluster: Cluster, issued) -> None:
    needed, reason = decide(cluster, issued, usage="client")
    assert needed and reason.startswith("wrong extended key usage") and "serverAuth" in reason


def test_reissue_when_expired(cluster: Cluster, issued) -> None:
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=400)
    needed, reason = decide(cluster, issued, now=later)
    assert needed and reason.startswith("expired on")


def test_reissue_when_less_than_a_third_of_lifetime_left(cluster: Cluster, issued) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    assert not decide(cluster, issued, now=now + dt.timedelta(days=260))[0]  # ~35 % left
    needed, reason = decide(cluster, issued, now=now + dt.timedelta(days=270))  # ~32 % left
    assert needed and reason.startswith("less than 33% of its lifetime left")


def _leaf_with_sans(cluster: Cluster, sans: list[x509.GeneralName]) -> tuple[object, x509.Certificate]:
    """A server leaf as issue_leaf made them before it listed each name once (duplicates kept)."""
    key = pki.generate_key()
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "node")]))
            .issuer_name(cluster.ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=397))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(cluster.ca_key, hashes.SHA256()))
    return key, cert


def test_leaf_lists_each_name_once(cluster: Cluster) -> None:
    """The node's own address and the loopback one, or one name in two spellings, are one SAN each."""
    other = "model.cluster.internal"
    _, cert = pki.issue_server_cert(cluster.ca_key, cluster.ca_cert, "node",
                                    dns_names=[SERVER_NAME, other, SERVER_NAME.upper() + ".", other],
                                    ip_addresses=["127.0.0.1", "10.77.0.5", ipaddress.ip_address("127.0.0.1"),
                                                  "127.0.0.1"])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [SERVER_NAME, other]  # the order first given
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "10.77.0.5"]


def test_reissue_when_a_san_is_listed_twice(cluster: Cluster) -> None:
    """A leaf issued before the dedupe (127.0.0.1 twice) is replaced once; its replacement is then kept."""
    key, cert = _leaf_with_sans(cluster, [x509.DNSName(SERVER_NAME), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                          x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    paths = cluster.write_leaf("node", key, cert)
    needed, reason = decide(cluster, paths, ip_addresses=["127.0.0.1"])
    assert needed and reason == f"a SAN is listed twice: DNS:{SERVER_NAME}, IP:127.0.0.1, IP:127.0.0.1"
    paths = cluster.leaf("node", "server", dns_names=[SERVER_NAME], ip_addresses=["127.0.0.1", "127.0.0.1"])
    assert not decide(cluster, paths, ip_addresses=["127.0.0.1"])[0]


def test_deploy_says_first_issue_reissue_and_nothing_in_one_line_each(tmp_path: Path) -> None:
    """clawbot.control.certificates as deploy.py reports it: a node's first leaves in one calm line, a reissue with
    its reason, an unchanged node not at all; the default inventory's server certificate holds 127.0.0.1 once."""
    from clawbot.control import certificates

    names = ["clawbot-local", "127.0.0.1"]  # inventory/hosts.yml: the host's name and its ansible_host
    ca = certificates.cluster_ca(tmp_path, {"clawbot-local": names}, "clawbot.internal", log=lambda _: None)
    first = certificates.ensure_node_material(ca, "clawbot-local", names)
    assert first.messages() == ["issued its server and client certificates (first run for this node)"]
    server = pki.load_certificate(first.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert [str(ip) for ip in server.value.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert server.value.get_values_for_type(x509.DNSName) == ["clawbot-local", "localhost"]
    assert certificates.ensure_node_material(ca, "clawbot-local", names).messages() == []
    first.client_cert.unlink()
    first.client_key.unlink()
    assert certificates.ensure_node_material(ca, "clawbot-local", names).messages() == [
        "issued its client certificate (none was on this machine yet)"]
    grown = certificates.ensure_node_material(ca, "clawbot-local", [*names, "chat.clawbot.internal"]).messages()
    assert [m.split(":")[0] for m in grown] == ["reissued server certificate", "reissued client certificate"]
    assert all("SANs changed" in m and "DNS:chat.clawbot.internal" in m for m in grown)


# --------------------------------------------------------------------------- files and status


def test_key_files_are_0600_and_written_atomically(tmp_path: Path) -> None:
    key_path = tmp_path / "node.key"
    key_path.write_text("old, world-readable")
    os.chmod(key_path, 0o644)
    key = pki.generate_key()
    pki.write_private_key(key_path, key)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert pki.load_private_key(key_path).private_numbers() == key.private_numbers()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.key"]  # no temp file left behind


def test_encrypted_key_round_trip(tmp_path: Path) -> None:
    key = pki.generate_key("P-384")
    pki.write_private_key(tmp_path / "ca.key", key, passphrase=b"s3cret")
    assert b"ENCRYPTED" in (tmp_path / "ca.key").read_bytes()
    assert pki.load_private_key(tmp_path / "ca.key", b"s3cret").private_numbers() == key.private_numbers()


def test_certificates_round_trip_and_summarise(cluster: Cluster, issued) -> None:
    cert = pki.load_certificate(issued[0])
    assert stat.S_IMODE(issued[0].stat().st_mode) == 0o644
    summary = pki.cert_summary(cert)
    assert summary["subject"] == "CN=node"
    assert summary["dns_names"] == [SERVER_NAME] and summary["ip_addresses"] == ["10.77.0.5"]
    assert 396 < summary["days_left"] <= 397
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=397 * 2 // 3)
    assert pki.lifetime_fraction_left(cert, later) == pytest.approx(1 / 3, abs=0.01)
