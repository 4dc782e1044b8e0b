"""Rollout time for two fresh nodes (warm control-machine caches) and for a re-run with nothing drifted.

Uses the test harness's two real Debian nodes (tests/nodes). Writes benchmarks/results/deploy.json.
Goal (issue 5): the no-change re-run of two nodes in <= 10 s.
Run as root: python benchmarks/bench_deploy.py [--reruns N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "deploy.json"

from tests.nodes.cluster import Cluster  # noqa: E402
from tests.nodes.config import HarnessConfig  # noqa: E402
from tests.test_deploy_e2e import CONFIG  # noqa: E402


def timed_deploy(inventory: Path) -> tuple[float, dict]:
    out = inventory / "result.json"
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "deploy.py"), "-i", str(inventory), "--json", str(out)],
                          capture_output=True, text=True, timeout=1800)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"deploy failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return elapsed, json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reruns", type=int, default=3)
    args = parser.parse_args()
    hugepages = Path("/proc/sys/vm/nr_hugepages").read_text()
    cluster = Cluster(HarnessConfig.from_env(), log=lambda m: print(f"[nodes] {m}", file=sys.stderr))
    try:
        cluster.up(2)
        with tempfile.TemporaryDirectory() as tmp:
            inventory = Path(tmp) / "inventory"
            shutil.copytree(cluster.nodes[0].inventory_dir, inventory)
            config = json.loads(json.dumps(CONFIG))
            config["model_gateway"]["endpoint"] = f"https://{cluster.nodes[1].address}:5000"
            (inventory / ".clawbot").mkdir()
            (inventory / ".clawbot" / "clawbot.json").write_text(json.dumps(config))
            (inventory / "group_vars").mkdir(exist_ok=True)
            (inventory / "group_vars" / "all.yml").write_text(f"clawbot_state_dir: {Path(tmp) / 'state'}\n")
            first, _ = timed_deploy(inventory)
            reruns, changes = [], []
            for _ in range(args.reruns):
                seconds, result = timed_deploy(inventory)
                reruns.append(seconds)
                changes.append(sum(row["changed"] for row in result["summary"].values()))
    finally:
        cluster.down()
        Path("/proc/sys/vm/nr_hugepages").write_text(hugepages)
    result = {
        "benchmark": "deploy.py on two harness nodes (systemd + sshd, same machine), warm control caches",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "first_rollout_s": round(first, 1),
        "no_change_rerun_s": [round(s, 1) for s in reruns],
        "no_change_rerun_median_s": round(statistics.median(reruns), 1),
        "changes_in_reruns": changes,
        "goal_rerun_s": 10,
        "met": statistics.median(reruns) <= 10 and not any(changes),
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
