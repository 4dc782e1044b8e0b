"""Model nodes reserve the 2 MiB huge pages their weights need, persistently, and say what they got.

Settings (inventory variables, defaults in docs/inventory.md):
- `clawbot_hugepages_count`: `auto` (default) = `clawbot.common.sizing.hugepages_for(model file bytes)`, the same
  computation `clawbot preflight` uses: the model's bytes rounded up to 2 MiB pages plus headroom
  (max(4 pages, 1 %)). Only when clawbot.json's `model_server.hugepages` is `stage`, `reserve` or `auto`;
  `off` leaves the kernel's setting alone.
- `clawbot_transparent_hugepages`: THP policy (`madvise` default: only memory that asks for THP gets it, so
  the model server's anonymous buffers can, and unrelated services keep predictable latency).

Persistence: /etc/sysctl.d/60-clawbot-hugepages.conf, applied by systemd-sysctl early at boot, before the
services start and before memory fragments. On a long-running, fragmented machine the kernel may reserve
fewer pages than asked; the role reports how many it got (and the agent falls back to the on-disk model
with a warning). The earliest possible reservation is the kernel command line (`hugepages=N`), which this
role does not edit: boot loaders differ too much to change them unattended.

Staging mount (`ensure_hugetlbfs_mount`): the agent copies the weights into a hugetlbfs mount at
`model_server.hugepages_mount` (default /var/lib/clawbot/hugepages), but runs without capabilities and so
cannot mount; the rollout mounts it, owned by the agent's user (uid/gid, mode 0700, pagesize=2M), now and at
boot through /etc/fstab (systemd's fstab generator turns it into a .mount unit before the services start).
Not under /dev: the unit's PrivateDevices=yes gives the service its own /dev without it.
"""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy, operation
from pyinfra.facts.files import FileContents
from pyinfra.facts.server import Command
from pyinfra.operations import files, server

SYSCTL_FILE = "/etc/sysctl.d/60-clawbot-hugepages.conf"
THP_TMPFILES = "/etc/tmpfiles.d/60-clawbot-thp.conf"
THP_SYSFS = "/sys/kernel/mm/transparent_hugepage/enabled"
FSTAB = "/etc/fstab"


def fstab_line(path: str, user: str) -> str:
    return f"clawbot-hugepages {path} hugetlbfs uid={user},gid={user},mode=0700,pagesize=2M 0 0"

@operation()
def thp_policy(policy: str):
    """Set the transparent hugepage policy now, if the kernel's current one differs."""
    current = host.get_fact(FileContents, path=THP_SYSFS) or []
    text = " ".join(current)
    if f"[{policy}]" in text:
        host.noop(f"transparent hugepages already {policy}")
        return
    if not text:
        host.noop("transparent hugepages not supported by this kernel")
        return
    writable = host.get_fact(Command, command=f"test -w {THP_SYSFS} && echo yes || echo no")
    if writable != "yes":
        host.noop(f"transparent hugepages are {text} and /sys is read-only here (a container): "
                  f"the policy {policy} applies where the kernel's sysfs is writable, e.g. at the next boot")
        return
    yield f"echo {policy} > {THP_SYSFS}"


@operation()
def fstab_entry(path: str, line: str):
    """Exactly one /etc/fstab line for mount point `path` (replaced when it differs, left alone when equal)."""
    current = host.get_fact(FileContents, path=FSTAB) or []
    mine = [entry for entry in current if entry.split()[1:2] == [path] and not entry.lstrip().startswith("#")]
    if mine == [line]:
        host.noop(f"{FSTAB} already mounts hugetlbfs at {path}")
        return
    yield (f"touch {FSTAB} && awk -v mp={path} '$1 ~ /^#/ || $2 != mp' {FSTAB} > {FSTAB}.clawbot && "
           f"echo '{line}' >> {FSTAB}.clawbot && cat {FSTAB}.clawbot > {FSTAB} && rm -f {FSTAB}.clawbot")
    if host.get_fact(Command, command="test -d /run/systemd/system && echo yes || echo no") == "yes":
        yield "systemctl daemon-reload"  # systemd's fstab generator makes the .mount unit from it


@operation()
def hugetlbfs_mounted(path: str, user: str):
    """Mount hugetlbfs at `path` with the fstab options unless it is mounted (remount when the owner differs)."""
    mounts = host.get_fact(Command, command=f"awk -v mp={path} '$2 == mp {{print $3, $4}}' /proc/mounts") or ""
    fstype, _, options = mounts.strip().partition(" ")
    if fstype == "hugetlbfs":
        owner = host.get_fact(Command, command=f"stat -c %U:%G:%a {path}")
        if owner == f"{user}:{user}:700" and "pagesize=2M" in options:
            host.noop(f"hugetlbfs already mounted at {path} for {user}")
            return
        yield f"umount {path}"
    yield f"mkdir -p {path} && mount -T {FSTAB} {path}"


@deploy("Ensure the hugetlbfs staging mount for the model agent")
def ensure_hugetlbfs_mount(path: str, user: str):
    """Call after the agent's user exists (its name is in the mount options)."""
    fstab_entry(name=f"Ensure {FSTAB} mounts hugetlbfs at {path} for {user}", path=path, line=fstab_line(path, user))
    hugetlbfs_mounted(name=f"Ensure hugetlbfs is mounted at {path}", path=path, user=user)


@deploy("Ensure huge pages are reserved for the model")
def ensure_hugepages(pages: int | None, thp: str = "madvise"):
    if pages is not None:
        server.sysctl(
            name=f"Ensure vm.nr_hugepages is {pages} now and at boot",
            key="vm.nr_hugepages",
            value=pages,
            persist=True,
            persist_file=SYSCTL_FILE,
        )
    files.put(
        name=f"Ensure transparent hugepages policy {thp} is applied at boot",
        src=_text(f"w {THP_SYSFS} - - - - {thp}\n"),
        dest=THP_TMPFILES,
        mode="644",
    )
    thp_policy(name=f"Ensure transparent hugepages policy is {thp}", policy=thp)


def _text(content: str):
    from io import BytesIO

    return BytesIO(content.encode())
