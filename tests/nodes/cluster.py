"""Bring a cluster of real Debian test nodes (systemd + sshd, own namespaces) up, down, and report on it."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from . import network, procs
from .aptsources import debian_sources_for, host_apt_sources, render_deb822
from .config import HarnessConfig, HarnessError, InstanceBusy
from .rootfs import Rootfs, ensure_rootfs

CONTAINER_NAME = "clawbot-test-node"  # the value of container= systemd sees: it runs in container mode
REQUIRED_TOOLS = ("unshare", "nsenter", "ip", "ssh", "ssh-keygen", "mount")

# Runs inside the node's fresh namespaces (still with the host's / visible), builds the node's root
# mount by mount, then pivots into it and execs systemd as PID 1. Every mount lives in the node's
# private mount namespace and vanishes with it.
LAUNCH_SCRIPT = r"""
set -eu
root=$1 lower=$2 upper=$3 work=$4 mode=$5 hostname=$6 cgroup_layout=$7 console=$8
mount --make-rprivate /
if [ "$mode" = overlay ]; then
  mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper,workdir=$work" "$root"
else
  mount --bind "$root" "$root"
fi
mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$root/sys"
cg="$root/sys/fs/cgroup"
case "$cgroup_layout" in
  unified)
    mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$cg" ;;
  hybrid|legacy)
    mount -t tmpfs -o mode=755,nosuid,nodev,noexec tmpfs "$cg"
    mkdir "$cg/systemd"
    mount -t cgroup -o none,name=systemd,nosuid,nodev,noexec cgroup "$cg/systemd"
    if [ "$cgroup_layout" = hybrid ]; then
      mkdir "$cg/unified"
      mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$cg/unified"
    fi ;;
esac
mount -t tmpfs -o mode=755,nosuid tmpfs "$root/dev"
for device in null zero full random urandom tty; do
  touch "$root/dev/$device"
  mount --bind "/dev/$device" "$root/dev/$device"
done
touch "$root/dev/console"
mount --bind "$console" "$root/dev/console"
mkdir -m 755 "$root/dev/pts"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5,nosuid,noexec devpts "$root/dev/pts"
ln -s pts/ptmx "$root/dev/ptmx"
mkdir -m 1777 "$root/dev/shm"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/dev/shm"
ln -s /proc/self/fd "$root/dev/fd"
ln -s /proc/self/fd/0 "$root/dev/stdin"
ln -s /proc/self/fd/1 "$root/dev/stdout"
ln -s /proc/self/fd/2 "$root/dev/stderr"
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs "$root/run"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/tmp"
hostname "$hostname"
mkdir -p "$root/.clawbot-oldroot"
cd "$root"
pivot_root . .clawbot-oldroot
umount -l /.clawbot-oldroot
rmdir /.clawbot-oldroot
exec env -i container=__CONTAINER__ PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin /lib/systemd/systemd
""".replace("__CONTAINER__", CONTAINER_NAME)

SSH_OPTIONS = (
    "-F", "/dev/null",  # the user's ~/.ssh/config must not change what the tests see
    "-o", "IdentitiesOnly=yes",
    "-o", "StrictHostKeyChecking=yes",
    "-o", "GlobalKnownHostsFile=/dev/null",
    "-o", "BatchMode=yes",
    "-o", "ConnectTimeout=5",
    "-o", "LogLevel=ERROR",
)


@dataclass(frozen=True)
class Node:
    """One running test node, addressed the way deploy.py addresses a real host."""

    name: str
    hostname: str
    address: str
    init_pid: int
    key_file: Path
    known_hosts_file: Path
    inventory_dir: Path
    console_log: Path

    def ssh_command(self, *remote: str) -> list[str]:
        """A real ssh client command line (generated key, strict known_hosts) for root@node; several
        remote words are quoted into one so they arrive as given."""
        return ["ssh", *SSH_OPTIONS, "-i", str(self.key_file), "-o", f"UserKnownHostsFile={self.known_hosts_file}",
                f"root@{self.address}", *([shlex.join(remote)] if len(remote) > 1 else remote)]

    def ssh(self, remote: str, timeout_s: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        """Run a shell command on the node over ssh; raise with its output when `check` and it fails."""
        result = subprocess.run(self.ssh_command(remote), capture_output=True, text=True, timeout=timeout_s)
        if check and result.returncode != 0:
            raise HarnessError(f"ssh {self.name} {remote!r}: exit {result.returncode}\n{result.stdout}{result.stderr}")
        return result

    def nsenter_command(self, *command: str) -> list[str]:
        """Enter the node through its namespaces rather than ssh: works when its sshd or network is broken."""
        return ["nsenter", f"--target={self.init_pid}", "--mount", "--uts", "--ipc", "--net", "--pid", "--cgroup",
                "--root", "--wd", "--", "env", "-i", "TERM=" + os.environ.get("TERM", "dumb"), "HOME=/root",
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", *(command or ("/bin/bash", "-l"))]


class Cluster:
    """N nodes of one harness instance. `up` first cleans whatever a crashed earlier run left (from
    the state file); `down` removes everything by the ids recorded there and checks nothing is left."""

    def __init__(self, config: HarnessConfig | None = None, log=print):
        self.config = config or HarnessConfig.from_env()
        self.log = log
        self.dir = self.config.instance_dir
        self.state_file = self.dir / "state.json"
        self.inventory_dir = self.dir / "inventory"
        self.key_file = self.dir / "ssh" / "id_ed25519"
        self.known_hosts_file = self.dir / "ssh" / "known_hosts"
        self.rootfs: Rootfs | None = None
        self.up_seconds: float | None = None
        self._launchers: dict[int, subprocess.Popen] = {}
        self._state: dict = {}
        self._owner = None  # open, flock'ed owner.lock while this object's nodes are up

    # -- public API ----------------------------------------------------------------------------------

    def up(self, count: int = 2) -> list[Node]:
        """Start `count` fresh nodes and return once each answers ssh; replaces any earlier cluster of this instance."""
        if count < 1:
            raise HarnessError("need at least one node")
        self._check_prerequisites()
        with self._locked():
            self._take_ownership()
            self._cleanup(self._load_state())
            self._remove_unrecorded_links()
            self.rootfs = ensure_rootfs(self.config, log=self.log)
            started = time.monotonic()
            network.check_subnet_is_free(self.config)
            self._state = {
                "instance": self.config.instance, "subnet": str(self.config.subnet), "started_at": time.time(),
                "rootfs": str(self.rootfs.path), "bridge": None, "nft_table": None, "ip_forward_set": False,
                "nodes": [],
            }
            self._save_state()
            self._ensure_ssh_key()
            self._state["bridge"] = self.config.bridge_name
            self._save_state()
            network.create_bridge(self.config)
            if self.config.nat:
                self._enable_nat()
            cgroup_hierarchies = procs.cgroup_hierarchies()
            for index in range(count):
                self._start_node(index, count, cgroup_hierarchies)
            self._write_known_hosts()
            self._write_inventory()
            nodes = self.nodes
            self._wait_for_ssh(nodes, deadline=started + self.config.boot_timeout_s)
            self.up_seconds = time.monotonic() - started
            self._state["up_seconds"] = round(self.up_seconds, 2)
            self._save_state()
            return nodes

    def down(self) -> None:
        """Stop every node and remove every link, rule, cgroup and layer; raise if anything survived."""
        with self._locked():
            self._take_ownership()
            snapshot = self._load_state()
            self._cleanup(snapshot)
            self._release_ownership()
            problems = self.leftovers(snapshot)
            if problems:
                raise HarnessError("teardown left things behind:\n  " + "\n  ".join(problems))

    @property
    def nodes(self) -> list[Node]:
        state = self._state or self._load_state()
        return [
            Node(
                name=entry["name"], hostname=entry["hostname"], address=entry["address"], init_pid=entry["init_pid"],
                key_file=self.key_file, known_hosts_file=self.known_hosts_file, inventory_dir=self.inventory_dir,
                console_log=Path(entry["node_dir"]) / "console.log",
            )
            for entry in state.get("nodes", [])
            if entry.get("init_pid")
        ]

    def snapshot(self) -> dict:
        """The recorded state (pids, namespaces, links, cgroups, mounts) — keep it to check a teardown."""
        return json.loads(json.dumps(self._state or self._load_state()))

    def leftovers(self, snapshot: dict) -> list[str]:
        """Everything recorded in `snapshot` that still exists on this host, described for a person."""
        problems = []
        namespaces: set[str] = set()
        for entry in snapshot.get("nodes", []):
            for role in ("launcher", "init"):
                pid, started = entry.get(f"{role}_pid"), entry.get(f"{role}_start")
                if procs.is_same_process_alive(pid, started):
                    problems.append(f"process {pid} ({entry['name']} {role}, state {procs.process_state(pid)})")
            namespaces.update(entry.get("namespaces", {}).values())
            if entry.get("veth") and network.link_exists(entry["veth"]):
                problems.append(f"link {entry['veth']}")
            for cgroup in entry.get("cgroups", []):
                if Path(cgroup).exists():
                    problems.append(f"cgroup {cgroup}")
            for point in procs.mounts_under(Path(entry["node_dir"])):
                problems.append(f"mount {point}")
        own_leaves = {self.config.cgroup_leaf(entry["name"]) for entry in snapshot.get("nodes", [])}
        for pid, kind in procs.processes_in_namespaces(namespaces, own_leaves):
            problems.append(f"process {pid} still in a node's {kind} namespace")
        if snapshot.get("bridge") and network.link_exists(snapshot["bridge"]):
            problems.append(f"link {snapshot['bridge']}")
        if snapshot.get("nft_table") and network.nft_table_exists(snapshot["nft_table"]):
            problems.append(f"nft table ip {snapshot['nft_table']}")
        return problems

    def status(self) -> list[dict]:
        """Per node: whether its PID 1 is the one we started and whether sshd answers."""
        rows = []
        for entry in self._load_state().get("nodes", []):
            alive = procs.is_same_process_alive(entry.get("init_pid"), entry.get("init_start"))
            rows.append({
                "name": entry["name"], "address": entry["address"], "init_pid": entry.get("init_pid"),
                "running": alive, "sshd": alive and _sshd_banner(entry["address"]),
            })
        return rows

    # -- node start ----------------------------------------------------------------------------------

    def _start_node(self, index: int, count: int, cgroup_hierarchies: list[tuple[str, Path]]) -> None:
        config = self.config
        name = config.node_name(index)
        node_dir = self.dir / "nodes" / name
        entry = {
            "name": name, "hostname": name, "address": str(config.node_address(index)), "node_dir": str(node_dir),
            "veth": None, "cgroups": [], "namespaces": {}, "launcher_pid": None, "init_pid": None,
        }
        self._state["nodes"].append(entry)
        self._save_state()
        _remove_tree(node_dir)
        node_dir.mkdir(parents=True)
        upper, work, root = node_dir / "upper", node_dir / "work", node_dir / "root"
        for path in (upper, work, root):
            path.mkdir()
        console = node_dir / "console.log"
        console.touch()
        if config.rootfs_mode == "copy":
            subprocess.run(["cp", "-a", "--reflink=auto", f"{self.rootfs.path}/.", str(root)], check=True)
            layer = root
        else:
            layer = upper
        self._write_node_files(layer, index, count)

        layout = procs.cgroup_layout(cgroup_hierarchies)
        entry["cgroups"] = [str(base / config.cgroup_leaf(name)) for _, base in cgroup_hierarchies]
        self._save_state()
        for cgroup in map(Path, entry["cgroups"]):
            self._evict_unrecorded(cgroup)
        cgroups = [procs.make_cgroup(base, config.cgroup_leaf(name), controllers) for controllers, base in cgroup_hierarchies]

        # Move into the node's own cgroups first: `unshare --cgroup` makes the current one the node's root.
        join_cgroups = "".join(f'echo $$ > {shlex.quote(str(c / "cgroup.procs"))}; ' for c in cgroups)
        command = [
            "/bin/sh", "-c", join_cgroups + 'exec "$@"', "clawbot-node-launcher",
            "unshare", "--fork", "--kill-child", "--pid", "--mount", "--uts", "--ipc", "--cgroup", "--net",
            "--propagation", "private", "--",
            "/bin/sh", "-c", LAUNCH_SCRIPT, "clawbot-node-init",
            str(root), str(self.rootfs.path), str(upper), str(work), config.rootfs_mode, name, layout, str(console),
        ]
        with open(console, "ab") as out:
            launcher = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)  # survives the CLI's exit and the tests' Ctrl-C
        self._launchers[launcher.pid] = launcher
        entry["launcher_pid"], entry["launcher_start"] = launcher.pid, procs.start_time(launcher.pid)
        entry["mounts"] = ["(inside the node's mount namespace) " + p for p in
                           (str(root), "proc", "sys", "sys/fs/cgroup", "dev", "dev/pts", "dev/shm", "run", "tmp")]
        self._save_state()

        def init_started():
            if launcher.poll() is not None:
                raise HarnessError(f"{name} exited during start (exit {launcher.returncode}); see {console}:\n"
                                   + console.read_text(errors="replace")[-2000:])
            children = procs.children_of(launcher.pid)
            return children[0] if children else None

        init_pid = procs.wait_until(init_started, 10, f"{name}'s PID 1 to appear")
        entry["init_pid"], entry["init_start"] = init_pid, procs.start_time(init_pid)
        entry["namespaces"] = procs.namespace_ids(init_pid)
        entry["veth"] = config.veth_name(index)
        self._save_state()
        network.attach_node(config, entry["veth"], init_pid, config.node_address(index))

    def _write_node_files(self, layer: Path, index: int, count: int) -> None:
        """Per-node files written into the node's own layer before it boots (the cached rootfs stays neutral)."""
        config = self.config
        lower = self.rootfs.path
        name = config.node_name(index)

        def write(rel: str, text: str, mode: int = 0o644) -> Path:
            _mkdirs_like(layer, lower, Path(rel).parent)
            path = layer / rel
            path.write_text(text)
            path.chmod(mode)
            return path

        write("etc/hostname", name + "\n")
        hosts = ["127.0.0.1\tlocalhost", f"127.0.1.1\t{name}", "::1\tlocalhost ip6-localhost ip6-loopback"]
        hosts += [f"{config.node_address(i)}\t{config.node_name(i)}" for i in range(count)]
        write("etc/hosts", "\n".join(hosts) + "\n")
        write("etc/machine-id", os.urandom(16).hex() + "\n", 0o444)
        write("etc/resolv.conf", network.resolv_conf_for_nodes())
        sources = debian_sources_for(config.suite, host_apt_sources())
        write("etc/apt/sources.list.d/debian.sources",
              render_deb822(sources, lambda keyring: (lower / keyring.lstrip("/")).is_file()))
        _mkdirs_like(layer, lower, Path("etc/ssh"))
        host_key = layer / "etc/ssh/ssh_host_ed25519_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{name}", "-f", str(host_key)],
                       check=True, stdin=subprocess.DEVNULL)
        _mkdirs_like(layer, lower, Path("root"))
        ssh_dir = layer / "root/.ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        write("root/.ssh/authorized_keys", Path(str(self.key_file) + ".pub").read_text(), 0o600)

    # -- ssh, inventory --------------------------------------------------------------------------------

    def _ensure_ssh_key(self) -> None:
        self.key_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.key_file.is_file():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "clawbot-test-control",
                            "-f", str(self.key_file)], check=True, stdin=subprocess.DEVNULL)

    def _write_known_hosts(self) -> None:
        lines = []
        for entry in self._state["nodes"]:
            public = (Path(entry["node_dir"]) / _layer_name(self.config) / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()
            lines.append(f"{entry['address']},{entry['name']} {public[0]} {public[1]}")
        self.known_hosts_file.write_text("\n".join(lines) + "\n")

    def _write_inventory(self) -> None:
        """Ansible-format inventory: first node is the chat node, the others model nodes (one node: both)."""
        entries = self._state["nodes"]
        groups = {"chat_nodes": entries[:1], "model_nodes": entries[1:] or entries[:1]}
        q = json.dumps  # a JSON string is a valid YAML scalar
        lines = [
            "# Written by tests/nodes (clawbot's test-node harness) at every `up`; edits are lost.",
            "all:",
            "  vars:",
            "    ansible_user: root",
            f"    ansible_ssh_private_key_file: {q(str(self.key_file))}",
            # pyinfra's own @ssh data names (not clawbot_*: the inventory schema rejects unknown clawbot_ vars).
            f"    ssh_known_hosts_file: {q(str(self.known_hosts_file))}",
            '    ssh_strict_host_key_checking: "yes"',
            f"    ansible_ssh_common_args: {q(f'-o UserKnownHostsFile={self.known_hosts_file} -o StrictHostKeyChecking=yes -o IdentitiesOnly=yes')}",
            "    ansible_python_interpreter: /usr/bin/python3",
            "  children:",
        ]
        for group, members in groups.items():
            lines += [f"    {group}:", "      hosts:"]
            for entry in members:
                lines += [f"        {entry['name']}:", f"          ansible_host: {entry['address']}"]
        self.inventory_dir.mkdir(parents=True, exist_ok=True)
        (self.inventory_dir / "hosts.yml").write_text("\n".join(lines) + "\n")

    def _wait_for_ssh(self, nodes: list[Node], deadline: float) -> None:
        for node in nodes:
            procs.wait_until(lambda: _sshd_banner(node.address), deadline - time.monotonic(),
                             f"sshd on {node.name} ({node.address}); console log {node.console_log}")

            def ssh_works():
                try:
                    return node.ssh("true", timeout_s=max(1.0, deadline - time.monotonic()), check=False).returncode == 0
                except subprocess.TimeoutExpired:
                    return False

            procs.wait_until(ssh_works, max(0.0, deadline - time.monotonic()), f"ssh login to {node.name}", 0.3)

    # -- NAT ---------------------------------------------------------------------------------------------

    def _enable_nat(self) -> None:
        original = self.config.state_dir / "ip_forward.orig"
        if not original.exists():
            original.write_text(network.read_ip_forward())
        self._state["ip_forward_set"] = True
        self._state["nft_table"] = self.config.nft_table
        self._save_state()
        network.write_ip_forward("1")
        network.install_nat(self.config)

    def _restore_ip_forward(self) -> None:
        """Put ip_forward back once no other harness instance still has nodes routed through it."""
        original = self.config.state_dir / "ip_forward.orig"
        others = [p for p in self.config.state_dir.glob("*/state.json") if p != self.state_file]
        if original.exists() and not others:
            network.write_ip_forward(original.read_text().strip())
            original.unlink()

    # -- teardown ------------------------------------------------------------------------------------------

    def _cleanup(self, state: dict) -> None:
        """Remove everything `state` records, in dependency order; tolerate parts already gone."""
        if not state:
            return
        entries = state.get("nodes", [])
        for entry in entries:
            procs.kill_recorded(entry.get("init_pid"), entry.get("init_start"))
        for entry in entries:
            self._stop_launcher(entry)
        for entry in entries:
            if entry.get("veth"):
                network.delete_link(entry["veth"])
            for cgroup in entry.get("cgroups", []):
                procs.wait_until(lambda: _try_remove_cgroup(Path(cgroup)), 10, f"cgroup {cgroup} to empty")
                with contextlib.suppress(OSError):  # the shared parent goes with the last node of any instance
                    Path(cgroup).parent.rmdir()
            node_dir = Path(entry["node_dir"])
            for point in procs.mounts_under(node_dir):  # only if something escaped the node's mount namespace
                network.run(["umount", "--lazy", point])
            for layer in ("upper", "work", "root"):
                _remove_tree(node_dir / layer)
        if state.get("bridge"):
            network.delete_link(state["bridge"])
        if state.get("nft_table"):
            network.remove_nat(state["nft_table"])
        self.state_file.unlink(missing_ok=True)
        if state.get("ip_forward_set"):
            self._restore_ip_forward()
        self._state = {}

    def _remove_unrecorded_links(self) -> None:
        """Links and the nft table carry this instance's names: remove them even if the state file was lost
        (processes are never looked up by name; without a record they are left alone)."""
        veth = re.compile(re.escape(self.config.instance) + r"-n\d+")
        links = json.loads(network.run(["ip", "-j", "link", "show"]).stdout or "[]")
        for link in links:
            name = link.get("ifname", "")
            if name == self.config.bridge_name or veth.fullmatch(name):
                network.delete_link(name)
        network.remove_nat(self.config.nft_table)

    def _evict_unrecorded(self, cgroup: Path) -> None:
        """A node of this name whose record was lost still sits in its cgroup: stop exactly the pids listed
        there (the harness's own per-node group, so nothing else can be in it) and remove the group."""
        stale = procs.pids_in_cgroup_tree(cgroup)
        if stale:
            self.log(f"stopping {len(stale)} unrecorded process(es) left in {cgroup}: {stale}")
            for pid in stale:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        procs.wait_until(lambda: _try_remove_cgroup(cgroup), 10, f"stale cgroup {cgroup} to empty")

    def _stop_launcher(self, entry: dict) -> None:
        pid, started = entry.get("launcher_pid"), entry.get("launcher_start")
        if not pid:
            return
        popen = self._launchers.pop(pid, None)

        def gone():
            if popen is not None:
                return popen.poll() is not None
            procs.reap_if_child(pid)
            return not procs.is_same_process_alive(pid, started)

        try:
            procs.wait_until(gone, 10, f"launcher {pid} of {entry['name']} to exit")
        except HarnessError:
            procs.kill_recorded(pid, started)  # --kill-child takes the node down with it
            procs.wait_until(gone, 10, f"launcher {pid} of {entry['name']} to exit after SIGKILL")

    # -- plumbing --------------------------------------------------------------------------------------------

    def _check_prerequisites(self) -> None:
        if os.geteuid() != 0:
            raise HarnessError("the node harness needs root (namespaces, mounts, links)")
        missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
        if missing:
            raise HarnessError(f"missing tools: {', '.join(missing)} (see .ci/apt-packages.txt)")
        if self.config.nat and shutil.which("nft") is None:
            raise HarnessError("nft is not installed (apt-get install nftables), or set CLAWBOT_TEST_NAT=0 "
                               "(then nodes cannot apt-get install)")

    def _take_ownership(self) -> None:
        """Hold owner.lock while our nodes are up, so a concurrent session or `up` by hand cannot replace
        them; the kernel drops the lock when the owner dies, and then its nodes count as leftovers."""
        if self._owner is not None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.dir / "owner.lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "?"
            handle.close()
            raise InstanceBusy(f"instance {self.config.instance!r} is in use by live process {owner} "
                               "(another test session?); use another --instance") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._owner = handle

    def _release_ownership(self) -> None:
        if self._owner is not None:
            fcntl.flock(self._owner, fcntl.LOCK_UN)
            self._owner.close()
            self._owner = None

    @contextlib.contextmanager
    def _locked(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _load_state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return {}

    def _save_state(self) -> None:
        """Write before acting: a crash at any point leaves a record of what to clean."""
        self.dir.mkdir(parents=True, exist_ok=True)
        scratch = self.state_file.with_suffix(".tmp")
        scratch.write_text(json.dumps(self._state, indent=2) + "\n")
        scratch.replace(self.state_file)


def _layer_name(config: HarnessConfig) -> str:
    return "root" if config.rootfs_mode == "copy" else "upper"


def _sshd_banner(address: str) -> bool:
    try:
        with socket.create_connection((address, 22), timeout=1) as sock:
            sock.settimeout(2)
            return sock.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def _try_remove_cgroup(path: Path) -> bool:
    try:
        procs.remove_cgroup_tree(path)
        return True
    except OSError:
        return False


def _mkdirs_like(layer: Path, lower: Path, rel: Path) -> None:
    """Create rel's directories in the node's layer with the lower tree's owner and mode: in an overlay
    the upper directory's attributes win, so /root must stay 0700, /etc 0755."""
    current_layer, current_lower = layer, lower
    for part in rel.parts:
        current_layer, current_lower = current_layer / part, current_lower / part
        if current_layer.is_dir():
            continue
        current_layer.mkdir()
        if current_lower.is_dir():
            info = current_lower.stat()
            os.chown(current_layer, info.st_uid, info.st_gid)
            current_layer.chmod(info.st_mode & 0o7777)


def _remove_tree(path: Path) -> None:
    if path.exists() or path.is_symlink():
        subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], check=True)
