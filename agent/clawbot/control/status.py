"""`clawbot status [-i DIR] [--json]`: every node's agent, model, hugepages and certificate state.

Read from the agents themselves over mutual TLS, with the control machine's own client certificate that
deploy.py issues into the state directory (nodes/clawbot-control/). Certificates inside their renewal window (less
than a third of their lifetime left) are flagged: re-running deploy renews them. A refused connection is
explained (`explain`): a TLS alert names which certificate the node wanted and where it is in the state directory.
"""

from __future__ import annotations

import json
import ssl
import sys
from pathlib import Path


from clawbot.control.state import CONTROL_NAME


def add_arguments(parser) -> None:
    parser.add_argument("-i", "--inventory", default="inventory", help="inventory directory (default: inventory)")
    parser.add_argument("--vault-password-file")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per node (default 10)")


def _peer_certificate(address: str, port: int, ca: str, cert: str, key: str, timeout: float) -> dict:
    """Expiry and lifetime left of the certificate a node presents (its server certificate)."""
    import socket

    from cryptography import x509

    from clawbot.common import pki

    context = ssl.create_default_context(cafile=ca)
    context.load_cert_chain(cert, key)
    with socket.create_connection((address, port), timeout=timeout) as sock:
        with context.wrap_socket(sock, server_hostname=address) as tls:
            der = tls.getpeercert(binary_form=True)
    certificate = x509.load_der_x509_certificate(der)
    return {**pki.cert_summary(certificate), "lifetime_fraction_left": pki.lifetime_fraction_left(certificate)}


def node_status(host, role: str, config: dict, material: Path, timeout: float) -> dict:
    import httpx

    from clawbot.common.config import gateway_host_port
    from clawbot.control.certificates import trust_path

    control = material / "nodes" / CONTROL_NAME
    ca, cert, key = str(trust_path(material)), str(control / "client.pem"), str(control / "client.key")
    if role == "model":
        _, port = gateway_host_port(config["model_gateway"]["endpoint"])
        url = f"https://{host.address}:{port}/status"
    else:
        port = config["chat"]["port"]
        url = f"https://{host.address}:{port}/healthz"  # the rest of the chat API needs a user's login or key
    row = {"host": host.name, "role": role, "url": url}
    try:
        context = ssl.create_default_context(cafile=ca)
        context.load_cert_chain(cert, key)
        response = httpx.get(url, verify=context, timeout=timeout)
        row["http"] = response.status_code
        row["body"] = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
    except (httpx.HTTPError, ValueError, OSError) as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
    try:
        row["certificate"] = _peer_certificate(host.address, port, ca, cert, key, timeout)
    except (OSError, ssl.SSLError) as exc:
        row.setdefault("error", f"TLS: {exc}")
    hint = explain(row, host.address, ca, cert)
    if hint:
        row["hint"] = hint
    return row


def explain(row: dict, address: str, ca: str, cert: str) -> str:
    """A sentence for a refused connection: which certificate the node wanted, and where it is here.

    mTLS refusals arrive as TLS alerts (with TLS 1.3 on the first read, so curl shows "Empty reply from server"
    or "alert certificate required"); a gateway that knows the certificate but does not serve it answers 403."""
    host = row["host"]
    body = row.get("body") or {}
    if row.get("http") == 403 and (body.get("error") or {}).get("code") == "client_not_allowed":
        return (f"{host}'s gateway does not serve this machine's certificate ({cert}, DNS:{CONTROL_NAME}): "
                f"model_gateway.allowed_clients in clawbot.json does not name {CONTROL_NAME}. Leave the list empty "
                f"(deploy fills in the chat nodes and {CONTROL_NAME}) or add {CONTROL_NAME} to it, then re-run deploy.py.")
    text = row.get("error", "").lower()
    if not text:
        return ""
    if "certificate required" in text or "did not return a certificate" in text:
        return (f"{host} wants a client certificate from the cluster CA and got none: clawbot status presents {cert} "
                "(deploy.py issues it); check that it and its key are there and readable.")
    if "unknown ca" in text:
        return (f"{host} does not trust the CA that issued this machine's client certificate ({cert}): the node "
                f"checks it against its tls.ca_cert, which deploy.py copies from {ca}. Re-run deploy.py (a node that "
                "missed a step of a CA rotation gets the trust bundle then).")
    if "certificate expired" in text:
        return f"{host} refused an expired client certificate ({cert}): re-run deploy.py to renew it."
    if "bad certificate" in text or "unsupported certificate" in text:
        return (f"{host} refused this machine's client certificate ({cert}): it needs EKU clientAuth and names "
                "the cluster CA permits. Re-run deploy.py to reissue it.")
    if "certificate verify failed" in text:
        return (f"this machine does not trust {host}'s server certificate: it is checked against {ca} and must "
                f"name {address}. Re-run deploy.py so the node holds a certificate from the cluster CA.")
    if "connection refused" in text:
        return f"nothing listens at {row['url']}: is the agent running on {host} (systemctl status clawbot-{row['role']})?"
    return ""


def _describe(row: dict) -> tuple[str, str, str, str]:
    body = row.get("body") or {}
    if "error" in row:
        return "unreachable", row["error"][:60], "", ""
    if row["role"] == "model":
        model = body.get("model") or {}
        state = f"{model.get('model_name', '?')}: {model.get('state', '?')}"
        pages = model.get("hugepages") or model.get("memory") or {}
        huge = json.dumps(pages)[:40] if pages else "-"
        return "up", state, huge, ""
    return "up", f"chat {body.get('status', '?')}", "-", ""


def run(args) -> int:
    from clawbot.common.config import check_file
    from clawbot.control import planning
    from clawbot.model.swap import ACTIVE_STATES
    from clawbot.control.inventory import load_for_command
    from clawbot.control.state import state_directory

    inventory = load_for_command(args.inventory, args.vault_password_file, "clawbot status")
    base = planning.inventory_base(args.inventory)
    try:
        result = check_file(str(planning.config_path(inventory, base)))
    except ValueError as exc:
        print(f"clawbot status: {exc}", file=sys.stderr)
        return 2
    if not result.ok:
        for d in result.diagnostics:
            print(d.text(), file=sys.stderr)
        return 1
    material = state_directory(planning.cluster_var(inventory.hosts.values(), "clawbot_state_dir"), base)
    if not (material / "nodes" / CONTROL_NAME / "client.pem").exists():
        print(f"clawbot status: no control certificate in {material}: run deploy.py first", file=sys.stderr)
        return 1
    rows = []
    for host in inventory.hosts.values():
        for role, group in (("model", "model_nodes"), ("chat", "chat_nodes")):
            if group in host.groups:
                rows.append(node_status(host, role, result.config, material, args.timeout))
    warnings = 0
    for row in rows:
        cert = row.get("certificate") or {}
        fraction = cert.get("lifetime_fraction_left")
        row["renewal_due"] = fraction is not None and fraction < 1 / 3
        warnings += bool(row["renewal_due"]) + ("error" in row or "hint" in row)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        print(f"{'host':<16} {'role':<6} {'agent':<12} {'model / state':<36} {'cert expires':<22} note")
        for row in rows:
            agent, state, _, _ = _describe(row)
            cert = row.get("certificate") or {}
            expires = str(cert.get("not_after", "?"))[:19]
            note = "renew: re-run deploy.py" if row["renewal_due"] else ""
            print(f"{row['host']:<16} {row['role']:<6} {agent:<12} {state:<36} {expires:<22} {note}")
        for row in rows:
            if row.get("hint"):
                print(f"{row['host']} ({row['role']}): {row['hint']}")
            swap = (row.get("body") or {}).get("swap") or {}
            if swap.get("state") in (*ACTIVE_STATES, "failed"):  # in progress, or the old model kept
                print(f"{row['host']} (model swap {swap['state']}): {swap.get('reason', '')}")
    return 1 if warnings else 0
