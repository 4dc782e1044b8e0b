"""pyinfra facts about a clawbot node, read over the rollout's SSH connection (deploy side only: this module
imports pyinfra, which nodes never install).

Each fact is a `pyinfra.api.FactBase`: `command(...)` is the shell the node runs, `process(lines)` turns its
output into a value, so the parsing is a pure function tested without a node. Use them as pyinfra's own:
`host.get_fact(NodeMemory, model_dir="/var/lib/clawbot/models")`. Every command here exits 0 whatever the
node lacks (a missing file or tool is a value, not a failed host).
"""

from __future__ import annotations

import hashlib
import re
import shlex
from pathlib import Path

from pyinfra.api import FactBase

from clawbot.common import preflight, sizing

# What clawbot.common.preflight.query_gpus asks nvidia-smi; its parse_gpus reads the answer.
GPU_QUERY = " ".join(preflight.GPU_QUERY)
GPU_PREFIX = "Gpu:"
THP_SYSFS = "/sys/kernel/mm/transparent_hugepage/enabled"


def count_cpu_list(text: str) -> int | None:
    """The number of CPUs in a kernel CPU list (`0-3,8,10-11` → 7), None when it is not one."""
    count = 0
    for part in text.strip().split(","):
        first, _, last = part.partition("-")
        if not first.isdigit() or not (last or first).isdigit():
            return None
        count += int(last or first) - int(first) + 1
    return count or None


class NodeMemory(FactBase):
    """What a model node has for the model, as clawbot.common.preflight.NodeFacts: memory, huge pages, free disk
    where the model goes, its NVIDIA GPUs (none without nvidia-smi) and the cores a process may run on (its CPU
    affinity, as preflight.usable_cores counts them on the node).

    The memory budget is MemAvailable plus what the user's running processes hold (on a re-run the model
    already loaded by the running service must not count against itself), capped by the cgroup's memory.max.

    + model_dir: the directory the model file goes to (its nearest existing parent is measured for free disk)
    + user: the agent's system user, whose processes' resident memory counts as available
    """

    def command(self, model_dir: str, user: str = "clawbot") -> str:
        directory = shlex.quote(model_dir)
        return "; ".join([
            "cat /proc/meminfo",
            f"echo ClawbotHeld: $(ps -u {shlex.quote(user)} -o rss= 2>/dev/null | awk '{{s+=$1}} END {{print s+0}}') kB",
            "echo CgroupLimit: $(cat /sys/fs/cgroup/memory.max 2>/dev/null || echo max)",
            "grep '^Cpus_allowed_list:' /proc/self/status",
            f'echo DiskFree: $(df -B1 --output=avail "$(d={directory}; while [ ! -d "$d" ]; do d=$(dirname "$d"); '
            'done; echo "$d")" | tail -1)',
            f"if command -v nvidia-smi >/dev/null 2>&1; then timeout 10 {GPU_QUERY} 2>/dev/null "
            f"| sed 's/^/{GPU_PREFIX} /'; fi",
            "true",
        ])

    def process(self, output: list[str]) -> preflight.NodeFacts:
        gpu_lines = [line[len(GPU_PREFIX):] for line in output if line.startswith(GPU_PREFIX)]
        # meminfo, ClawbotHeld (kB), CgroupLimit and DiskFree (bytes; "max" or empty: left out) parse alike
        values = preflight.parse_meminfo([line for line in output if not line.startswith(GPU_PREFIX)])
        cpus = next((line.split(":", 1)[1] for line in output if line.startswith("Cpus_allowed_list:")), None)
        cgroup_limit, disk_free = values.get("CgroupLimit"), values.get("DiskFree")
        total = values.get("MemTotal", 0)
        available = values.get("MemAvailable", 0) + values.get("ClawbotHeld", 0)
        source = "MemAvailable + memory held by the running clawbot services"
        if cgroup_limit is not None and cgroup_limit < available:
            available, source = cgroup_limit, "cgroup memory.max"
        return preflight.NodeFacts(
            memory_total=total, memory_available=min(available, total) if total else available,
            memory_source=source, cgroup_limit=cgroup_limit,
            hugepages_total=values.get("HugePages_Total", 0), hugepages_free=values.get("HugePages_Free", 0),
            hugepage_bytes=values.get("Hugepagesize", sizing.HUGEPAGE_BYTES), disk_free=disk_free,
            gpus=preflight.parse_gpus("\n".join(gpu_lines)),
            usable_cores=count_cpu_list(cpus) if cpus is not None else None)


class HugePages(FactBase):
    """The kernel's huge page pool from /proc/meminfo: `HugePages_Total`, `_Free`, `_Rsvd`, `_Surp` (pages) and
    `Hugepagesize` (bytes); keys the kernel does not report are missing."""

    default = dict

    def command(self) -> str:
        return "grep -E '^(HugePages_|Hugepagesize)' /proc/meminfo || true"

    def process(self, output: list[str]) -> dict[str, int]:
        return preflight.parse_meminfo(output)


class TransparentHugepages(FactBase):
    """The transparent hugepage policy: `{"policy": "madvise", "text": "always [madvise] never", "writable": bool}`,
    or None where the kernel has no THP. `writable` is false where /sys is read-only (a container): the policy
    cannot change now."""

    def command(self) -> str:
        return (f"if [ -r {THP_SYSFS} ]; then cat {THP_SYSFS}; "
                f"if [ -w {THP_SYSFS} ]; then echo writable; else echo read-only; fi; fi")

    def process(self, output: list[str]) -> dict | None:
        if not output or not output[0].strip():
            return None
        text = output[0].strip()
        selected = re.search(r"\[([^\]]+)\]", text)
        return {"policy": selected.group(1) if selected else None, "text": text,
                "writable": output[-1].strip() == "writable"}


class RealPath(FactBase):
    """The path with every symlink resolved (`readlink -e`), or None when it does not exist.

    + path: the path to resolve
    """

    def command(self, path: str) -> str:
        return f"readlink -e {shlex.quote(path)} 2>/dev/null || true"

    def process(self, output: list[str]) -> str | None:
        return output[0].strip() if output and output[0].strip() else None


def listing_digest(entries: list[tuple[str, int]]) -> str:
    """sha256 of `name size` lines sorted by name: what DirectoryListingDigest computes on the node."""
    listing = "".join(f"{name} {size}\n" for name, size in sorted(entries))
    return hashlib.sha256(listing.encode()).hexdigest()


def local_listing_digest(directory: Path) -> str:
    """DirectoryListingDigest of a directory on this machine (regular, non-hidden files at its top)."""
    return listing_digest([(p.name, p.stat().st_size) for p in directory.iterdir()
                           if p.is_file() and not p.name.startswith(".")])


class DirectoryListingDigest(FactBase):
    """One digest of a directory's regular, non-hidden files (names and sizes, not contents), or None when the
    directory is missing: comparing a wheelhouse of dozens of wheels costs one round trip instead of one each,
    and a missing, extra or truncated file still shows as a difference.

    + path: the directory
    """

    def command(self, path: str) -> str:
        return (f"cd {shlex.quote(path)} 2>/dev/null && find . -maxdepth 1 -type f ! -name '.*' -printf '%f %s\\n' "
                "| LC_ALL=C sort | sha256sum | cut -d' ' -f1 || true")

    def process(self, output: list[str]) -> str | None:
        return output[0].strip() if output and output[0].strip() else None


class SupervisorProgramStatus(FactBase):
    """The state supervisor reports for a program (`RUNNING`, `STOPPED`, `FATAL`, …), or None when supervisor
    is not running or does not know the program.

    + program: the supervisor program name
    """

    def command(self, program: str) -> str:
        return f"supervisorctl status {shlex.quote(program)} 2>&1 || true"

    def process(self, output: list[str]) -> str | None:
        for line in output:  # `NAME  RUNNING  pid 42, uptime 0:01:02`; errors read `NAME: ERROR (no such process)`
            parts = line.split()
            if len(parts) >= 2 and not parts[0].endswith(":") and parts[1].isalpha() and parts[1].isupper():
                return parts[1]
        return None
