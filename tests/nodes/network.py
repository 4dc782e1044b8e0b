"""The test subnet: a bridge with the host's address, one veth per node, and NAT for package installs."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from pathlib import Path

from .config import HarnessConfig, HarnessError

IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


def run(command: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run a host command, failing with its stderr in the message (what to fix is usually there)."""
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise HarnessError(f"{' '.join(command)} failed (exit {result.returncode}): {result.stderr.strip()}")
    return result


def link_exists(name: str) -> bool:
    return run(["ip", "link", "show", "dev", name], check=False).returncode == 0


def delete_link(name: str) -> None:
    """Delete a link; one that is gone already is fine (a veth goes with its peer when the peer's namespace ends,
    which can happen between the check and the delete)."""
    if link_exists(name):
        result = run(["ip", "link", "delete", "dev", name], check=False)
        if result.returncode != 0 and link_exists(name):
            raise HarnessError(f"ip link delete dev {name} failed (exit {result.returncode}): {result.stderr.strip()}")


def check_subnet_is_free(config: HarnessConfig) -> None:
    """Refuse a subnet that overlaps one this host already routes (it would hijack real traffic)."""
    routes = json.loads(run(["ip", "-j", "-4", "route", "show", "table", "all"]).stdout or "[]")
    for route in routes:
        destination = route.get("dst", "")
        if destination in ("", "default") or route.get("dev") == config.bridge_name:
            continue
        try:
            network = ipaddress.IPv4Network(destination, strict=False)
        except ValueError:
            continue
        if network.overlaps(config.subnet) and not network.is_loopback:
            raise HarnessError(
                f"test subnet {config.subnet} overlaps {destination} on {route.get('dev')}; "
                "pick another with CLAWBOT_TEST_SUBNET=10.231.N.0/24"
            )


def create_bridge(config: HarnessConfig) -> None:
    """The control side's leg on the test subnet: nodes reach the host (and through it, NAT) here."""
    run(["ip", "link", "add", "name", config.bridge_name, "type", "bridge"])
    run(["ip", "addr", "add", f"{config.gateway}/{config.subnet.prefixlen}", "dev", config.bridge_name])
    run(["ip", "link", "set", "dev", config.bridge_name, "up"])


def attach_node(config: HarnessConfig, veth: str, init_pid: int, address: ipaddress.IPv4Address) -> None:
    """Give the node (by the pid of its PID 1) an eth0 on the bridge with its own address and a default route."""
    run(["ip", "link", "add", "name", veth, "type", "veth", "peer", "name", "eth0", "netns", str(init_pid)])
    run(["ip", "link", "set", "dev", veth, "master", config.bridge_name, "up"])
    inside = ["nsenter", f"--target={init_pid}", "--net", "--"]
    run(inside + ["ip", "link", "set", "dev", "lo", "up"])
    run(inside + ["ip", "addr", "add", f"{address}/{config.subnet.prefixlen}", "dev", "eth0"])
    run(inside + ["ip", "link", "set", "dev", "eth0", "up"])
    run(inside + ["ip", "route", "add", "default", "via", str(config.gateway)])


def resolv_conf_for_nodes() -> str:
    """The host's resolver config; where that points at a loopback stub (systemd-resolved), the stub's
    upstream list instead, since a node's loopback is its own."""
    path = Path("/etc/resolv.conf")
    if not host_nameservers(path) or all(ipaddress.ip_address(s.split("%")[0]).is_loopback for s in host_nameservers(path)):
        upstream = Path("/run/systemd/resolve/resolv.conf")
        if upstream.is_file():
            return upstream.read_text()
        raise HarnessError("/etc/resolv.conf names only loopback resolvers, which nodes cannot reach")
    return path.read_text()


def host_nameservers(path: Path = Path("/etc/resolv.conf")) -> list[str]:
    return _nameservers_of(path.read_text())


def nat_ruleset(config: HarnessConfig) -> str:
    """Nodes may talk to each other and the host; outbound only DNS to the host's resolvers and
    HTTP(S) (package mirrors and registries), masqueraded; nothing from outside may open a connection in."""
    subnet = str(config.subnet)
    resolvers = [s for s in _nameservers_of(resolv_conf_for_nodes()) if ipaddress.ip_address(s).version == 4 and not ipaddress.ip_address(s).is_loopback]
    dns = ""
    if resolvers:
        dns = (
            f"    ip saddr {subnet} ip daddr {{ {', '.join(resolvers)} }} udp dport 53 accept\n"
            f"    ip saddr {subnet} ip daddr {{ {', '.join(resolvers)} }} tcp dport 53 accept\n"
        )
    return (
        f"table ip {config.nft_table} {{\n"
        "  chain forward {\n"
        "    type filter hook forward priority 0; policy accept;\n"
        f"    ip saddr {subnet} ip daddr {subnet} accept\n"
        f"    ip daddr {subnet} ct state established,related accept\n"
        f"    ip daddr {subnet} drop\n"
        f"{dns}"
        f"    ip saddr {subnet} tcp dport {{ 80, 443 }} accept\n"
        f"    ip saddr {subnet} drop\n"
        "  }\n"
        "  chain postrouting {\n"
        "    type nat hook postrouting priority 100; policy accept;\n"
        f"    ip saddr {subnet} ip daddr != {subnet} masquerade\n"
        "  }\n"
        "}\n"
    )


def nft_table_exists(table: str) -> bool:
    return run(["nft", "list", "table", "ip", table], check=False).returncode == 0


def install_nat(config: HarnessConfig) -> None:
    run(["nft", "-f", "-"], input=nat_ruleset(config))


def remove_nat(table: str) -> None:
    if nft_table_exists(table):
        run(["nft", "delete", "table", "ip", table])


def read_ip_forward() -> str:
    return IP_FORWARD.read_text().strip()


def write_ip_forward(value: str) -> None:
    IP_FORWARD.write_text(value + "\n")


def _nameservers_of(text: str) -> list[str]:
    return [parts[1] for parts in (line.split() for line in text.splitlines()) if len(parts) >= 2 and parts[0] == "nameserver"]
