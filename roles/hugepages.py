"""Model nodes reserve the 2 MiB huge pages their weights need, persistently, and say what they got.

Settings (inventory variables, defaults in docs/inventory.md):
- `clawbot_hugepages_count`: `auto` (default) = `clawbot.common.sizing.hugepages_for(model file bytes)`, the same
  computation `clawbot preflight` uses: the model's bytes rounded up to 2 MiB pages plus headroom
  (max(4 pages, 1 %)). Only when clawbot.json's `model_server.hugepages` is `stage`, `reserve` or `auto`;
  `off` leaves the kernel's setting alone.
- `clawbot_transparent_hugepages`: THP policy (`madvise` default: only memory that asks for THP gets it, so
  the model server's anonymous buffers can, and unrelated services keep predictable latency).

Persistence: /etc/sysctl.d/60-clawbot-hugepages.conf, applied by systemd-sysctl early at boot, before the services
start and before memory fragments. The file is clawbot's alone and written whole (files.put, so --diff shows it and
a changed page count replaces the old line instead of adding one). On a long-running, fragmented machine the kernel
may reserve fewer pages than asked; the role reports how many it got (and the agent falls back to the on-disk model
with a warning). The earliest possible reservation is the kernel command line (`hugepages=N`), which this role does
not edit: boot loaders differ too much to change them unattended.

Staging mount (`ensure_hugetlbfs_mount`): the agent copies the weights into a hugetlbfs mount at
`model_server.hugepages_mount` (default /var/lib/clawbot/hugepages), but runs without capabilities and so cannot
mount; the rollout mounts it, owned by the agent's user (uid/gid, mode 0700, pagesize=2M), now and at boot through
/etc/fstab (systemd's fstab generator turns it into a .mount unit before the services start). Not under /dev: the
unit's PrivateDevices=yes gives the service its own /dev without it. The fstab line is pyinfra's stock `files.line`
(through roles.content.line_in_file, which adds --diff output for an appended line); the mount is
`hugetlbfs_mounted`, not the stock `server.mount`, because in pyinfra 3.10 server.mount (a) takes a path that is
not mounted as mounted when any mount has the same device, and every clawbot mount's device is `clawbot-hugepages`
(a changed `hugepages_mount` would never be mounted), and (b) changes options with `mount -o remount`, which
hugetlbfs ignores for uid/gid/mode (checked on this kernel): a changed owner would show as a change on every run
and never be fixed. hugetlbfs_mounted unmounts and mounts again.
"""

from __future__ import annotations

import re
from io import BytesIO

from pyinfra import host
from pyinfra.api import QuoteString, StringCommand, deploy, operation
from pyinfra.facts.files import Directory
from pyinfra.facts.server import Mounts
from pyinfra.operations import files, server, systemd

from clawbot.control.facts import THP_SYSFS, TransparentHugepages
from clawbot.model.staging import MOUNT_DEVICE, MOUNT_MODE, MOUNT_PAGESIZE
from roles.content import line_in_file

SYSCTL_FILE = "/etc/sysctl.d/60-clawbot-hugepages.conf"
THP_TMPFILES = "/etc/tmpfiles.d/60-clawbot-thp.conf"
FSTAB = "/etc/fstab"


def mount_options(user: str) -> str:
    """The hugetlbfs options, in fstab and on the command line: owned by a user and its group, 0700, 2 MiB pages.

    + user: the agent's system user
    """
    return f"uid={user},gid={user},mode={MOUNT_MODE},pagesize={MOUNT_PAGESIZE}"


def fstab_line(path: str, user: str) -> str:
    """The /etc/fstab line that mounts hugetlbfs for the agent at boot.

    + path: the mount point
    + user: the agent's system user
    """
    return f"{MOUNT_DEVICE} {path} hugetlbfs {mount_options(user)} 0 0"


def fstab_match(path: str) -> str:
    """An extended regex (grep -E, sed -E) for any uncommented /etc/fstab line with this mount point.

    + path: the mount point
    """
    escaped = re.sub(r"([][.*+?(){}|^$\\])", r"\\\1", path)
    return f"^[^#[:space:]]+[[:space:]]+{escaped}[[:space:]]"


def sysctl_settings(pages: int) -> str:
    """The boot-time sysctl file: the huge pages to reserve before services start and memory fragments.

    + pages: huge pages to reserve
    """
    return f"# Managed by clawbot deploy; edits are replaced on the next run.\nvm.nr_hugepages = {pages}\n"


@operation()
def thp_policy(policy: str):
    """Set the transparent hugepage policy now, if the kernel's current one differs.

    + policy: always, madvise or never (the kernel's choices in /sys/kernel/mm/transparent_hugepage/enabled)

    Where the kernel has no THP, or /sys is read-only (a container), this is a noop that says so.
    """
    current = host.get_fact(TransparentHugepages)
    if not current:
        host.noop("transparent hugepages not supported by this kernel")
        return
    if current["policy"] == policy:
        host.noop(f"transparent hugepages already {policy}")
        return
    if not current["writable"]:
        host.noop(f"transparent hugepages are {current['text']} and /sys is read-only here (a container): "
                  f"the policy {policy} applies where the kernel's sysfs is writable, e.g. at the next boot")
        return
    yield StringCommand("echo", policy, ">", THP_SYSFS)


@operation()
def hugetlbfs_mounted(path: str, user: str):
    """Mount hugetlbfs at a path for one user, unless it is mounted there with that owner, mode 0700 and 2 MiB pages.

    + path: the mount point (created when missing)
    + user: the owner of the mount's root, and its group (the agent's system user, which must exist)

    A hugetlbfs at `path` with another owner, mode or page size is unmounted and mounted again (hugetlbfs ignores
    those options on remount); another filesystem there is mounted over.
    """
    mount = host.get_fact(Mounts).get(path)
    if mount and mount["type"] == "hugetlbfs":
        root = host.get_fact(Directory, path=path) or {}
        owner = (root.get("user"), root.get("group"), root.get("mode"))  # pyinfra's modes are octal digits: 700
        if owner == (user, user, int(MOUNT_MODE)) and f"pagesize={MOUNT_PAGESIZE}" in mount["options"]:
            host.noop(f"hugetlbfs already mounted at {path} for {user}")
            return
        yield StringCommand("umount", QuoteString(path))
    yield StringCommand("mkdir", "-p", QuoteString(path))
    yield StringCommand("mount", "-t", "hugetlbfs", "-o", mount_options(user), MOUNT_DEVICE, QuoteString(path))


@deploy("Ensure the hugetlbfs staging mount for the model agent")
def ensure_hugetlbfs_mount(path: str, user: str, systemd_running: bool):
    """hugetlbfs at `path` owned by `user`, mounted now and at boot (the /etc/fstab line for that mount point;
    an existing line for it is replaced).

    + path: the mount point (clawbot.json's model_server.hugepages_mount)
    + user: the agent's system user; call after it exists (its name is in the mount options)
    + systemd_running: systemd is PID 1 here (roles.services.systemd_is_pid1): its units are reloaded on a change
    """
    fstab = line_in_file(
        name=f"Ensure {FSTAB} mounts hugetlbfs at {path} for {user}",
        path=FSTAB,
        line=fstab_match(path),
        replace=fstab_line(path, user),
        extended_regex=True,
    )
    if systemd_running:
        # systemd's fstab generator makes the .mount unit from the line
        systemd.daemon_reload(name="Reload systemd units (fstab changed)", _if=fstab.did_change)
    hugetlbfs_mounted(name=f"Ensure hugetlbfs is mounted at {path}", path=path, user=user)


@deploy("Ensure huge pages are reserved for the model")
def ensure_hugepages(pages: int | None, thp: str = "madvise"):
    """vm.nr_hugepages now and at boot, and the transparent hugepage policy now and at boot.

    + pages: huge pages to reserve (None: leave the kernel's setting alone, clawbot.json hugepages `off`)
    + thp: transparent hugepage policy (clawbot_transparent_hugepages)
    """
    if pages is not None:
        server.sysctl(name=f"Ensure vm.nr_hugepages is {pages} now", key="vm.nr_hugepages", value=pages)
        files.put(
            name=f"Ensure vm.nr_hugepages is {pages} at boot ({SYSCTL_FILE})",
            src=BytesIO(sysctl_settings(pages).encode()),
            dest=SYSCTL_FILE,
            mode="644",
        )
    files.put(
        name=f"Ensure transparent hugepages policy {thp} is applied at boot",
        src=BytesIO(f"w {THP_SYSFS} - - - - {thp}\n".encode()),
        dest=THP_TMPFILES,
        mode="644",
    )
    thp_policy(name=f"Ensure transparent hugepages policy is {thp}", policy=thp)
