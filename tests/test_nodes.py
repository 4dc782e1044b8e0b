"""The two-node harness: real Debian nodes (systemd PID 1, sshd) reachable over a private test subnet.

These need root, debootstrap and namespaces; they fail (never skip) when that is missing, because
the end-to-end deploy tests depend on them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.nodes import Cluster, HarnessConfig, HarnessError, Node
from tests.nodes.aptsources import AptSource, _parse_deb822, _parse_one_line, debian_sources_for, debootstrap_mirror
from tests.nodes.config import shifted_subnet
from tests.nodes.fixtures import describe_timings, report_line

WARM_UP_BUDGET_S = 60
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.nodes
def test_each_node_runs_systemd_and_sshd(nodes: list[Node]):
    assert len(nodes) == 2
    for node in nodes:
        state = node.ssh("systemctl is-system-running --wait", check=False, timeout_s=120).stdout.strip()
        failed = node.ssh("systemctl list-units --failed --plain --no-legend --no-pager").stdout.strip()
        report_line(f"{node.name}: system {state}; failed units: {failed.replace(chr(10), ', ') if failed else 'none'}")
        assert state in ("running", "degraded"), f"{node.name} is {state!r}; failed units:\n{failed}"
        assert "ssh" not in failed, f"{node.name}: sshd failed:\n{failed}"
        assert node.ssh("systemctl is-active ssh.service").stdout.strip() == "active"
        assert node.ssh("cat /proc/1/comm").stdout.strip() == "systemd"


@pytest.mark.nodes
def test_nodes_start_within_budget_from_a_warm_cache(node_cluster: Cluster):
    """up_seconds counts from a ready rootfs (cache hit or fresh build) to every node answering ssh."""
    assert node_cluster.up_seconds <= WARM_UP_BUDGET_S


@pytest.mark.nodes
def test_nodes_have_distinct_hostnames(nodes: list[Node]):
    hostnames = [node.ssh("hostname").stdout.strip() for node in nodes]
    assert hostnames == [node.hostname for node in nodes]
    assert len(set(hostnames)) == len(nodes)


@pytest.mark.nodes
def test_node_reaches_other_node_sshd_over_test_network(nodes: list[Node]):
    node_a, node_b = nodes[:2]
    route = node_a.ssh(f"ip -o route get {node_b.address}").stdout
    assert "dev eth0" in route and " via " not in route, f"{node_b.address} is not on node A's test link: {route}"
    banner = node_a.ssh(
        "python3 -c 'import socket,sys; s = socket.create_connection((sys.argv[1], 22), timeout=5); "
        f"print(s.recv(64).decode().strip())' {node_b.address}"
    ).stdout
    assert banner.startswith("SSH-2.0-OpenSSH"), banner
    by_name = node_a.ssh(f"getent hosts {node_b.name}").stdout.split()
    assert by_name[:1] == [node_b.address]


@pytest.mark.nodes
def test_ssh_checks_host_keys_strictly(nodes: list[Node], tmp_path: Path):
    """The generated known_hosts is what makes ssh succeed: an empty one must be refused."""
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    command = [part.replace(str(nodes[0].known_hosts_file), str(empty)) for part in nodes[0].ssh_command("true")]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert refused.returncode == 255
    assert "Host key verification failed" in refused.stderr


@pytest.mark.nodes
def test_nodes_run_and_restart_new_systemd_units(nodes: list[Node]):
    """The rollout installs services and restarts them: a unit added now must start and restart."""
    node = nodes[-1]
    unit = "[Unit]\nDescription=harness probe\n[Service]\nExecStart=/bin/sleep infinity\n"
    node.ssh(f"printf '{unit}' > /etc/systemd/system/harness-probe.service && systemctl daemon-reload "
             "&& systemctl start harness-probe")
    try:
        first = node.ssh("systemctl show -p MainPID --value harness-probe").stdout.strip()
        node.ssh("systemctl restart harness-probe")
        second = node.ssh("systemctl show -p MainPID --value harness-probe").stdout.strip()
        assert node.ssh("systemctl is-active harness-probe").stdout.strip() == "active"
        assert first != second and int(second) > 0
    finally:
        node.ssh("systemctl stop harness-probe; rm -f /etc/systemd/system/harness-probe.service; systemctl daemon-reload")


@pytest.mark.nodes
def test_nodes_reach_the_apt_mirror(nodes: list[Node]):
    """The rollout apt-get installs on nodes: DNS and the mirror must be reachable through the host's NAT."""
    result = nodes[0].ssh("apt-get update -q 2>&1", check=False, timeout_s=300)
    assert result.returncode == 0 and "Err:" not in result.stdout, result.stdout[-2000:]


@pytest.mark.nodes
def test_inventory_targets_the_nodes(nodes: list[Node]):
    """Ansible itself must read the inventory: groups, addresses, key and known_hosts as deploy.py sees them."""
    from ansible.inventory.manager import InventoryManager
    from ansible.parsing.dataloader import DataLoader
    from ansible.vars.manager import VariableManager

    inventory_dir = nodes[0].inventory_dir
    loader = DataLoader()
    inventory = InventoryManager(loader=loader, sources=[str(inventory_dir)])
    variables = VariableManager(loader=loader, inventory=inventory)
    assert [h.name for h in inventory.groups["chat_nodes"].get_hosts()] == [nodes[0].name]
    assert [h.name for h in inventory.groups["model_nodes"].get_hosts()] == [nodes[1].name]
    for node in nodes:
        host_vars = json.loads(json.dumps(variables.get_vars(host=inventory.get_host(node.name)), default=str))
        assert host_vars["ansible_host"] == node.address
        assert host_vars["ansible_user"] == "root"
        assert Path(host_vars["ansible_ssh_private_key_file"]) == node.key_file
        assert Path(host_vars["ssh_known_hosts_file"]) == node.known_hosts_file
        assert node.address in node.known_hosts_file.read_text()


@pytest.mark.nodes
def test_crashed_run_is_cleaned_and_teardown_leaves_nothing(node_cluster: Cluster):
    """Kill a harness process half-way through `up`, start again, tear down: nothing of either run may remain.

    Runs its own cluster instance on the next subnet, beside the session's nodes, so both stay usable.
    """
    session = node_cluster.config
    next_subnet = shifted_subnet(session.subnet, 1)  # the session's slot leaves the next subnet free for this
    config = HarnessConfig.from_env(instance=session.instance + "l", subnet=next_subnet)
    environment = {**os.environ, "CLAWBOT_TEST_SUBNET": str(next_subnet)}
    crashed = subprocess.Popen([sys.executable, "-m", "tests.nodes", "--instance", config.instance, "up", "2"],
                               cwd=REPO_ROOT, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state_file = config.instance_dir / "state.json"

    def first_node_booting():
        try:
            entries = json.loads(state_file.read_text()).get("nodes", [])
        except (FileNotFoundError, json.JSONDecodeError):
            entries = []
        return bool(entries and entries[0].get("veth")) or crashed.poll() is not None

    deadline = time.monotonic() + 60
    while not first_node_booting():
        assert time.monotonic() < deadline, "the harness never started its first node"
        time.sleep(0.05)
    crashed.send_signal(signal.SIGKILL)
    crashed.wait(timeout=10)
    crashed_snapshot = json.loads(state_file.read_text())
    assert crashed_snapshot["nodes"][0]["init_pid"], "the crashed run should have left a running node behind"

    rerun = Cluster(config, log=lambda message: None)
    try:
        rerun.up(2)
        snapshot = rerun.snapshot()
        assert_gone(crashed_snapshot, names_reused=True, live_namespaces=namespaces_of(snapshot))
        report_line(describe_timings(rerun))
        assert rerun.up_seconds <= WARM_UP_BUDGET_S
        for node in rerun.nodes:
            assert node.ssh("hostname").stdout.strip() == node.name
    finally:
        rerun.down()
    assert_gone(snapshot)
    assert_gone(crashed_snapshot)
    assert not state_file.exists()


def in_another_harness_node(proc: Path, own_cgroups: set[str]) -> bool:
    """Freed namespace inode numbers are reused at once: a concurrent session's node may hold one of ours."""
    try:
        paths = [line.split(":", 2)[2] for line in (proc / "cgroup").read_text().splitlines()]
    except OSError:
        return False
    for path in paths:
        parts = path.strip("/").split("/")
        if "clawbot-test" in parts[:-1]:
            return parts[parts.index("clawbot-test") + 1] not in own_cgroups
    return False


def namespaces_of(snapshot: dict) -> set[str]:
    return {ns for entry in snapshot["nodes"] for ns in entry.get("namespaces", {}).values()}


def assert_gone(snapshot: dict, names_reused: bool = False, live_namespaces: frozenset[str] = frozenset()) -> None:
    """Checks, independent of the harness's own bookkeeping, that what `snapshot` records is gone.

    With `names_reused` (a rerun of the same instance is up) only ids are checked: processes by pid and
    start time, namespaces by inode; links and cgroups carry the same names again by design, and the
    kernel may hand a freed namespace inode to the rerun's nodes (`live_namespaces`).
    """
    namespaces = namespaces_of(snapshot) - set(live_namespaces)
    for entry in snapshot["nodes"]:
        for role in ("launcher", "init"):
            pid = entry.get(f"{role}_pid")
            if pid:
                stat = Path(f"/proc/{pid}/stat")
                alive = stat.exists() and int(stat.read_text().rsplit(")", 1)[1].split()[19]) == entry[f"{role}_start"]
                assert not alive, f"{entry['name']} {role} process {pid} survived"
        for cgroup in [] if names_reused else entry.get("cgroups", []):
            assert not Path(cgroup).exists(), f"cgroup {cgroup} survived"
        node_dir = entry["node_dir"]
        assert node_dir not in Path("/proc/self/mountinfo").read_text(), f"a mount under {node_dir} survived"
    own_cgroups = {Path(cgroup).name for entry in snapshot["nodes"] for cgroup in entry.get("cgroups", [])}
    in_use = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and not in_another_harness_node(proc, own_cgroups):
            for kind in ("mnt", "pid", "net", "uts", "ipc", "cgroup"):
                try:
                    in_use.add(os.readlink(proc / "ns" / kind))
                except OSError:
                    pass
    assert not (namespaces & in_use), f"namespaces still in use: {namespaces & in_use}"
    if not names_reused:
        links = {link["ifname"] for link in json.loads(subprocess.run(["ip", "-j", "link"], capture_output=True,
                                                                       text=True, check=True).stdout)}
        recorded = {snapshot.get("bridge")} | {entry.get("veth") for entry in snapshot["nodes"]}
        assert not (links & (recorded - {None})), f"links survived: {links & recorded}"
        tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout
        assert not snapshot.get("nft_table") or snapshot["nft_table"] not in tables


# The mirror comes from the machine's apt configuration; these need no root and run everywhere.

DEB822 = """\
Types: deb deb-src
# a comment inside the stanza
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main

Types: deb
Enabled: no
URIs: http://disabled.example/debian
Suites: bookworm
Components: main
"""


def test_deb822_sources_are_read_with_suites_components_and_keyring():
    sources = _parse_deb822(DEB822)
    assert sources == [
        AptSource("http://mirror.example/debian", ("bookworm", "bookworm-updates"), ("main", "contrib"),
                  "/usr/share/keyrings/debian-archive-keyring.gpg"),
        AptSource("http://mirror.example/debian-security", ("bookworm-security",), ("main",), None),
    ]
    assert debootstrap_mirror("bookworm", sources).uri == "http://mirror.example/debian"
    assert [s.suites for s in debian_sources_for("bookworm", sources)] == [("bookworm", "bookworm-updates"), ("bookworm-security",)]


def test_one_line_sources_skip_deb_src_and_keep_signed_by():
    text = """\
# deb http://commented.example/debian bookworm main
deb-src http://src.example/debian bookworm main
deb [arch=amd64 signed-by=/etc/apt/keyrings/k.gpg] http://one.example/debian bookworm main
deb http://two.example/debian bookworm-updates main  # trailing comment
"""
    assert _parse_one_line(text) == [
        AptSource("http://one.example/debian", ("bookworm",), ("main",), "/etc/apt/keyrings/k.gpg"),
        AptSource("http://two.example/debian", ("bookworm-updates",), ("main",), None),
    ]


def test_missing_mirror_for_the_suite_says_where_to_add_one():
    only_updates = [AptSource("http://x.example/debian", ("bookworm-updates",), ("main",))]
    with pytest.raises(HarnessError, match="sources.list.d"):
        debootstrap_mirror("bookworm", only_updates)
