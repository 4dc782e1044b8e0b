"""Before any change: does the model fit each model node? (issue: sizing and preflight)

The need is computed exactly from the model file and clawbot.json by `clawbot.common.sizing` (weights + KV cache for
context_window x parallel_slots + compute buffers), the same computation `clawbot preflight` and the
hugepages role use. The node's side is read over the already open SSH connection: MemAvailable (plus what the
running clawbot services hold, so a re-run does not count the model against itself), the cgroup limit, and
free disk where the model goes. Nothing is installed or changed on the node for this.
"""

from __future__ import annotations

from clawbot.common import preflight
from clawbot.common import sizing

MEMORY_PROBE = (
    "cat /proc/meminfo; "
    "echo ClawbotHeld: $(ps -u clawbot -o rss= 2>/dev/null | awk '{s+=$1} END {print s+0}') kB; "
    "echo CgroupLimit: $(cat /sys/fs/cgroup/memory.max 2>/dev/null || echo max); "
    "echo DiskFree: $(df -B1 --output=avail \"$(d={dir}; while [ ! -d \"$d\" ]; do d=$(dirname \"$d\"); done; echo $d)\" "
    "| tail -1)"
)


def parse_probe(text: str) -> preflight.NodeFacts:
    values: dict[str, int] = {}
    cgroup_limit = None
    disk_free = None
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if not parts:
            continue
        if key == "CgroupLimit":
            cgroup_limit = int(parts[0]) if parts[0].isdigit() else None
        elif key == "DiskFree":
            disk_free = int(parts[0]) if parts[0].isdigit() else None
        elif parts[0].isdigit():
            values[key] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    total = values.get("MemTotal", 0)
    available = values.get("MemAvailable", 0) + values.get("ClawbotHeld", 0)
    source = "MemAvailable + memory held by the running clawbot services"
    if cgroup_limit is not None and cgroup_limit < available:
        available, source = cgroup_limit, "cgroup memory.max"
    return preflight.NodeFacts(memory_total=total, memory_available=min(available, total) if total else available,
                               memory_source=source, cgroup_limit=cgroup_limit,
                               hugepages_total=values.get("HugePages_Total", 0),
                               hugepages_free=values.get("HugePages_Free", 0), disk_free=disk_free)


def check_node(run_shell, model_info: sizing.ModelInfo, config: dict) -> preflight.PreflightReport:
    """Preflight one model node from facts read over SSH; errors in report.findings stop the rollout."""
    import os

    import shlex

    directory = shlex.quote(os.path.dirname(config["model_server"]["model_path"]))
    ok, output = run_shell(MEMORY_PROBE.replace("{dir}", directory))
    node = parse_probe(output)
    return preflight.check_config(model_info, config, node)
