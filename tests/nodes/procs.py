"""Process, namespace, cgroup and mount bookkeeping that works by recorded ids, never by names."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from .config import HarnessError

NAMESPACE_KINDS = ("mnt", "pid", "net", "uts", "ipc", "cgroup")


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.1):
    """Poll `predicate` until it returns something truthy; raise HarnessError naming `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise HarnessError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def start_time(pid: int) -> int | None:
    """The kernel's start time of `pid` (clock ticks since boot): with the pid it names one process for good."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19])


def process_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat[stat.rindex(")") + 2:].split()[0]


def is_same_process_alive(pid: int | None, started: int | None) -> bool:
    """True while the process we recorded still exists (a zombie counts: it is still in the table)."""
    return bool(pid) and started is not None and start_time(pid) == started


def kill_recorded(pid: int | None, started: int | None, sig: int = signal.SIGKILL) -> bool:
    """Signal the recorded process only if pid and start time still match (pids get reused)."""
    if not is_same_process_alive(pid, started):
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def reap_if_child(pid: int) -> None:
    """Collect our own exited child so it does not linger as a zombie; other processes' are their parent's job."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def children_of(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def namespace_ids(pid: int) -> dict[str, str]:
    """The namespaces of `pid`, as the kernel names them (e.g. 'net:[4026532281]')."""
    ids = {}
    for kind in NAMESPACE_KINDS:
        try:
            ids[kind] = os.readlink(f"/proc/{pid}/ns/{kind}")
        except (FileNotFoundError, ProcessLookupError):
            pass
    return ids


def harness_cgroup_leaf(pid: int) -> str | None:
    """'clawbot-test/<instance>-<node>' if `pid` runs inside some harness node's cgroup, else None."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in text.splitlines():
        parts = line.split(":", 2)[2].strip("/").split("/")
        if "clawbot-test" in parts[:-1]:
            index = parts.index("clawbot-test")
            return f"clawbot-test/{parts[index + 1]}"
    return None


def processes_in_namespaces(ids: set[str], own_cgroup_leaves: set[str] = frozenset()) -> list[tuple[int, str]]:
    """Every live process that still sits in one of these namespaces.

    The kernel reuses a freed namespace's inode number at once, so a process inside *another* harness
    node's cgroup (a concurrent session's node, or a rerun's) that shows one of these ids is in a new
    namespace, not a leftover of ours; `own_cgroup_leaves` names the cgroups whose processes do count.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        leaf = harness_cgroup_leaf(int(entry.name))
        if leaf is not None and leaf not in own_cgroup_leaves:
            continue
        for kind in NAMESPACE_KINDS:
            try:
                if os.readlink(entry / "ns" / kind) in ids:
                    found.append((int(entry.name), kind))
                    break
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                break
    return found


def mounts_under(path: Path) -> list[str]:
    """Mount points in this (the host's) mount namespace at or below `path`, deepest first."""
    prefix = str(path.resolve()).rstrip("/")
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def cgroup_hierarchies() -> list[tuple[str, Path]]:
    """Every cgroup hierarchy this process belongs to, as (controllers, directory of our current group).

    controllers is e.g. 'memory', 'cpu,cpuacct', 'name=systemd', or '' for cgroup2. A node's systemd
    must get its own group in each of them: it mounts the v1 controllers it finds and would otherwise
    create its slices in the host's groups (shared by all nodes, left behind after teardown).
    """
    mounts_v1: dict[frozenset, Path] = {}
    mount_v2: Path | None = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fstype, _source, options = (right.split() + ["", ""])[:3]
        fields = left.split()
        if fields[3] != "/":
            continue  # a bind of a sub-group, not a hierarchy's root
        if fstype == "cgroup2" and mount_v2 is None:
            mount_v2 = Path(fields[4])
        elif fstype == "cgroup":
            known = {o for o in options.split(",") if not o.startswith(("rw", "ro", "relatime", "nosuid", "nodev", "noexec", "clone_children", "xattr", "release_agent"))}
            mounts_v1.setdefault(frozenset(known), Path(fields[4]))
    found = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _hid, controllers, current = line.split(":", 2)
        if controllers == "":
            if mount_v2 is not None:
                found.append(("", mount_v2 / current.lstrip("/")))
        else:
            mount = mounts_v1.get(frozenset(controllers.split(",")))
            if mount is not None:
                found.append((controllers, mount / current.lstrip("/")))
    if not any(c in ("", "name=systemd") for c, _ in found):
        raise HarnessError("no cgroup hierarchy for systemd found (neither cgroup2 nor cgroup v1 name=systemd is mounted)")
    return found


def cgroup_layout(hierarchies: list[tuple[str, Path]]) -> str:
    """How the node mounts /sys/fs/cgroup: 'unified' (v2 only), 'hybrid' (v1 name=systemd + v2) or 'legacy'."""
    names = {c for c, _ in hierarchies}
    if "name=systemd" not in names:
        return "unified"
    return "hybrid" if "" in names else "legacy"


def make_cgroup(base: Path, leaf: str, controllers: str) -> Path:
    """mkdir base/leaf; a v1 cpuset group is unusable until it has cpus and mems, so inherit them."""
    path = base
    for part in Path(leaf).parts:
        parent, path = path, path / part
        if path.is_dir():
            continue
        path.mkdir()
        if "cpuset" in controllers.split(","):
            for knob in ("cpuset.cpus", "cpuset.mems"):
                (path / knob).write_text((parent / knob).read_text())
    return path


def remove_cgroup_tree(path: Path) -> None:
    """rmdir a cgroup and the groups a node's systemd made below it, deepest first."""
    if not path.is_dir():
        return
    for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            sub.rmdir()
        except FileNotFoundError:
            pass
    path.rmdir()


def pids_in_cgroup_tree(path: Path) -> list[int]:
    """Pids in a cgroup and all groups below it (empty when it does not exist)."""
    pids: list[int] = []
    if path.is_dir():
        for procs_file in [path / "cgroup.procs", *path.rglob("cgroup.procs")]:
            with contextlib.suppress(FileNotFoundError):
                pids += [int(p) for p in procs_file.read_text().split()]
    return sorted(set(pids))
