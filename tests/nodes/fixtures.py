"""pytest fixtures for the test-node harness, exposed to every test through tests/conftest.py.

Session-scoped: the boot costs seconds, and an end-to-end deploy test reuses the same two nodes.
"""

from __future__ import annotations

import json
import os

import pytest

from .cluster import Cluster, Node
from .config import HarnessConfig, HarnessError, InstanceBusy, shifted_subnet

NODE_COUNT = 2
MAX_CONCURRENT_SESSIONS = 4
_report: list[str] = []


def _progress_writer(config: pytest.Config):
    """Harness progress (a cold rootfs build takes minutes) goes to pytest's terminal, past output capture."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")

    def write(message: str) -> None:
        if reporter is not None:
            reporter.write_line(f"[test nodes] {message}")

    return write


def _cluster(request: pytest.FixtureRequest, count: int, first_slot: int = 0):
    """Up `count` nodes on the first free instance slot from `first_slot`; yields the Cluster, tears it down."""
    base = HarnessConfig.from_env()
    failure = None
    for slot in range(first_slot, MAX_CONCURRENT_SESSIONS):
        config = HarnessConfig.from_env(instance=base.instance + (str(slot) if slot else ""),
                                        subnet=shifted_subnet(base.subnet, 2 * slot))
        cluster = Cluster(config, log=_progress_writer(request.config))
        try:
            cluster.up(count)
            break
        except InstanceBusy:
            continue
        except HarnessError as error:
            failure = f"test nodes could not start: {error}"
            try:
                cluster.down()
            except HarnessError as cleanup_error:
                failure += f"\n(cleanup after the failure also failed: {cleanup_error})"
            break
    else:
        failure = f"all {MAX_CONCURRENT_SESSIONS} harness instances are in use by other live sessions"
    if failure:
        pytest.fail(failure, pytrace=False)
    _report.append(describe_timings(cluster))
    yield cluster
    if os.environ.get("CLAWBOT_TEST_KEEP_NODES") == "1":  # for a look after the run; `down` by hand later
        _report.append("nodes kept up (CLAWBOT_TEST_KEEP_NODES=1): python -m tests.nodes shell node1 | down")
        return
    cluster.down()


def own_cluster(count: int, tag: str, first_block: int):
    """`count` fresh nodes of an instance of their own (`<harness instance><tag><slot>`, subnets from `first_block`
    blocks past the harness's, beyond those the session and lifecycle clusters use), for one test module that must
    not disturb the session's nodes; yields the nodes, tears them down (checked for leftovers) at the end."""
    base = HarnessConfig.from_env()
    cluster = None
    for slot in range(MAX_CONCURRENT_SESSIONS):
        config = HarnessConfig.from_env(instance=f"{base.instance}{tag}{slot}",
                                        subnet=shifted_subnet(base.subnet, first_block + 2 * slot))
        cluster = Cluster(config, log=lambda message: print(f"[{tag} nodes] {message}"))
        try:
            cluster.up(count)
            break
        except InstanceBusy:
            cluster = None
            continue
    if cluster is None:
        pytest.fail(f"every `{tag}` harness instance is in use by another live session", pytrace=False)
    yield cluster.nodes
    cluster.down()


@pytest.fixture(scope="session")
def node_cluster(request: pytest.FixtureRequest) -> Cluster:
    """Two running nodes (node1: chat_nodes, node2: model_nodes), torn down at session end; the teardown
    fails loudly if any process, namespace, mount, cgroup, link or rule of the harness survives.

    Concurrent sessions on one machine (several engineers, one box) each take their own instance slot:
    cbt on the configured subnet, cbt1 two subnets further, and so on.
    """
    yield from _cluster(request, NODE_COUNT)


@pytest.fixture(scope="module")
def three_nodes(request: pytest.FixtureRequest) -> list[Node]:
    """Three running nodes (node1: chat_nodes, node2 and node3: model_nodes) for one test module (replicas, a
    split model), on their own instance slot beside the session's two nodes; torn down after the module."""
    for cluster in _cluster(request, 3, first_slot=1):
        yield cluster.nodes


@pytest.fixture(scope="session")
def nodes(node_cluster: Cluster) -> list[Node]:
    """The running nodes: each has name, address, ssh_command()/ssh(), known_hosts_file and inventory_dir."""
    return node_cluster.nodes


def describe_timings(cluster: Cluster) -> str:
    """One line with the cold build time (from the cache's record when this run reused it) and the up time."""
    rootfs = cluster.rootfs
    if rootfs.built_now:
        build = f"built now in {rootfs.build_seconds:.1f} s (cold)"
    else:
        marker = rootfs.path.with_name(rootfs.path.name + ".ready")
        recorded = json.loads(marker.read_text()).get("build_seconds", "?")
        build = f"from cache (its cold build took {recorded} s)"
    return (f"{cluster.config.instance}: rootfs {rootfs.key} {build}; {len(cluster.nodes)} nodes up and "
            f"ssh-reachable in {cluster.up_seconds:.1f} s")


def report_line(line: str) -> None:
    """Add a line to the "test nodes" section pytest prints at the end (timings, failed units)."""
    _report.append(line)


def pytest_terminal_summary(terminalreporter) -> None:
    if _report:
        terminalreporter.section("test nodes")
        for line in _report:
            terminalreporter.write_line(line)
