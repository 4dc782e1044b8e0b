"""clawbot.control.facts, tested the way pyinfra tests its facts (tests/facts/<module>.<Fact>/*.json in pyinfra's
repository): a fixture gives the fact's arguments, the exact command, the node's output and the value the fact
must make of it. Then each command runs on this machine through `sh -c` (as pyinfra's @local connector would),
to catch quoting and tool mistakes a fixture cannot; and a real pyinfra host (@local) reads NodeMemory the way
clawbot.control.rollout.check_node does. No SSH, no network.

Fixtures: tests/fixtures/facts/<FactClass>/<case>.json with "kwargs", "command", "output" (stdout lines), and
"fact" (dataclasses as their asdict(), tuples as lists).
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from clawbot.common import preflight
from clawbot.control import facts

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "facts"
CASES = sorted(FIXTURES.glob("*/*.json"))
ROOT = Path(__file__).resolve().parents[1]


def as_json(value):
    return json.loads(json.dumps(dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value))


def run_here(fact: facts.FactBase, env: dict | None = None, **kwargs) -> list[str]:
    done = subprocess.run(["/bin/sh", "-c", fact.command(**kwargs)], capture_output=True, text=True, timeout=60,
                          env=env)
    assert done.returncode == 0, done.stderr  # every clawbot fact's command exits 0
    return done.stdout.splitlines()


@pytest.mark.parametrize("fixture", CASES, ids=[f"{p.parent.name}/{p.stem}" for p in CASES])
def test_fact_command_and_value_match_the_fixture(fixture):
    data = json.loads(fixture.read_text())
    fact = getattr(facts, fixture.parent.name)()
    assert fact.command(**data["kwargs"]) == data["command"]
    assert as_json(fact.process(data["output"])) == data["fact"]


def test_node_memory_on_this_machine_finds_disk_gpus_and_cores(tmp_path):
    """The probe as a node runs it: nvidia-smi (a stand-in here) is found on PATH, the model directory need
    not exist yet, and memory and cores agree with preflight's own local readers."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text('#!/bin/sh\n[ "$1" = --query-gpu=name,memory.total,memory.used ] || exit 2\n'
                   'echo "NVIDIA H200, 143771, 1024"\n')
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    fact = facts.NodeMemory()
    node = fact.process(run_here(fact, env=env, model_dir=str(tmp_path / "not" / "yet"), user="root"))
    meminfo = preflight.read_meminfo()
    assert node.memory_total == meminfo["MemTotal"] and node.hugepage_bytes == meminfo["Hugepagesize"]
    assert node.disk_free and node.disk_free > 0
    assert node.gpus == preflight.parse_gpus("NVIDIA H200, 143771, 1024")
    assert node.usable_cores == preflight.usable_cores()
    without = fact.process(run_here(fact, env={**os.environ, "PATH": "/usr/bin:/bin"}, model_dir="/"))
    assert without.gpus == ()


def test_hugepages_on_this_machine_is_meminfo():
    fact = facts.HugePages()
    pool = fact.process(run_here(fact))
    meminfo = preflight.read_meminfo()
    assert pool["HugePages_Total"] == meminfo["HugePages_Total"] and pool["Hugepagesize"] == meminfo["Hugepagesize"]


def test_transparent_hugepages_on_this_machine():
    fact = facts.TransparentHugepages()
    value = fact.process(run_here(fact))
    if not Path(facts.THP_SYSFS).exists():
        assert value is None
        return
    assert f"[{value['policy']}]" in Path(facts.THP_SYSFS).read_text()
    assert value["writable"] == os.access(facts.THP_SYSFS, os.W_OK)


def test_the_nodes_listing_digest_is_the_control_machines(tmp_path):
    """ensure_agent compares the node's DirectoryListingDigest with local_listing_digest: they must agree on
    the same files, ignore hidden files and subdirectories, and differ on a truncated wheel."""
    house = tmp_path / "wheelhouse"
    house.mkdir()
    (house / "clawbot-0.1.0-py3-none-any.whl").write_bytes(b"x" * 100)
    (house / "httpx-0.27.0-py3-none-any.whl").write_bytes(b"y" * 7)
    (house / ".complete").write_text("stamp")
    (house / "sub").mkdir()
    fact = facts.DirectoryListingDigest()
    assert fact.process(run_here(fact, path=str(house))) == facts.local_listing_digest(house)
    (house / "httpx-0.27.0-py3-none-any.whl").write_bytes(b"y" * 6)
    assert fact.process(run_here(fact, path=str(house))) == facts.local_listing_digest(house)
    assert fact.process(run_here(fact, path=str(tmp_path / "missing"))) is None


def test_real_path_and_supervisor_status_on_this_machine(tmp_path):
    (tmp_path / "python").symlink_to(tmp_path / "python3")
    (tmp_path / "python3").symlink_to(sys.executable)
    real = facts.RealPath()
    assert real.process(run_here(real, path=str(tmp_path / "python"))) == os.path.realpath(sys.executable)
    assert real.process(run_here(real, path=str(tmp_path / "missing"))) is None
    status = facts.SupervisorProgramStatus()  # no supervisor here: not running, whatever the shell says
    assert status.process(run_here(status, env={"PATH": str(tmp_path)}, program="clawbot-chat")) is None


_CHECK_NODE = r"""
import json, sys
from pyinfra.api import Config, Inventory, State
from pyinfra.api.connect import connect_all
from clawbot.control.facts import NodeMemory
state = State(inventory=Inventory((["@local"], {})), config=Config())
connect_all(state)
host = next(iter(state.inventory.iter_activated_hosts()))
node = host.get_fact(NodeMemory, model_dir=sys.argv[1], user="root")
print(json.dumps({"memory_total": node.memory_total, "disk_free": node.disk_free, "failed": len(state.failed_hosts)}))
"""


def test_node_memory_through_a_real_pyinfra_host(tmp_path):
    """host.get_fact with pyinfra's own machinery (@local): the arguments reach the command, nothing fails."""
    done = subprocess.run([sys.executable, "-c", _CHECK_NODE, str(tmp_path / "models")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["memory_total"] == preflight.read_meminfo()["MemTotal"]
    assert result["disk_free"] > 0 and result["failed"] == 0
