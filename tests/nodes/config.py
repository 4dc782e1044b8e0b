"""Settings of one test-node cluster, read from the environment so CI and people can move it aside."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_SUBNET = "10.231.7.0/24"
DEFAULT_STATE_DIR = "/var/tmp/clawbot-test-nodes"
DEFAULT_CACHE_DIR = "/var/cache/clawbot-test"

# What a fresh Debian server install has, and nothing clawbot needs beyond it: the rollout must
# install everything else itself. Changing this list changes the cache key (a new rootfs is built).
ROOTFS_PACKAGES: tuple[str, ...] = (
    "ca-certificates",
    "dbus",
    "iproute2",
    "iputils-ping",
    "libpam-systemd",
    "netbase",
    "openssh-server",
    "procps",
    "python3",
    "sudo",
    "systemd",
    "systemd-sysv",
)


class HarnessError(RuntimeError):
    """The harness cannot do what was asked; the message says what to fix."""


class InstanceBusy(HarnessError):
    """Another live process (e.g. a concurrent test session) owns this instance's nodes."""


def shifted_subnet(subnet: ipaddress.IPv4Network, blocks: int) -> ipaddress.IPv4Network:
    """The subnet `blocks` sizes further on: 10.231.7.0/24 shifted by 2 is 10.231.9.0/24."""
    return ipaddress.IPv4Network((int(subnet.network_address) + blocks * subnet.num_addresses, subnet.prefixlen))


@dataclass(frozen=True)
class HarnessConfig:
    """Where one cluster keeps its state and which names and addresses it uses.

    `instance` prefixes every host-side name (bridge, veths, nft table, cgroups), so two clusters
    (the session one and a lifecycle test's) can run side by side without touching each other.
    """

    instance: str = "cbt"
    subnet: ipaddress.IPv4Network = field(default_factory=lambda: ipaddress.IPv4Network(DEFAULT_SUBNET))
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    cache_dir: Path = Path(DEFAULT_CACHE_DIR)
    suite: str = "bookworm"
    packages: tuple[str, ...] = ROOTFS_PACKAGES
    nat: bool = True
    rootfs_mode: str = "overlay"  # or "copy" (cp --reflink=auto) where overlayfs is unavailable
    boot_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if not (1 <= len(self.instance) <= 8 and self.instance.isalnum() and self.instance.islower()):
            raise HarnessError(f"instance {self.instance!r}: use 1-8 lowercase letters/digits (it prefixes link names)")
        if self.subnet.prefixlen > 27:
            raise HarnessError(f"subnet {self.subnet}: use /27 or larger")
        if self.rootfs_mode not in ("overlay", "copy"):
            raise HarnessError(f"rootfs_mode {self.rootfs_mode!r}: use 'overlay' or 'copy'")

    @classmethod
    def from_env(cls, **overrides) -> "HarnessConfig":
        """Defaults, then CLAWBOT_TEST_* variables, then explicit overrides."""
        env = os.environ
        values: dict = {}
        if "CLAWBOT_TEST_SUBNET" in env:
            values["subnet"] = ipaddress.IPv4Network(env["CLAWBOT_TEST_SUBNET"])
        if "CLAWBOT_TEST_NODES_DIR" in env:
            values["state_dir"] = Path(env["CLAWBOT_TEST_NODES_DIR"])
        if "CLAWBOT_TEST_CACHE" in env:
            values["cache_dir"] = Path(env["CLAWBOT_TEST_CACHE"])
        if "CLAWBOT_TEST_NAT" in env:
            values["nat"] = env["CLAWBOT_TEST_NAT"] not in ("0", "no", "false", "")
        if "CLAWBOT_TEST_ROOTFS_MODE" in env:
            values["rootfs_mode"] = env["CLAWBOT_TEST_ROOTFS_MODE"]
        values.update(overrides)
        if isinstance(values.get("subnet"), str):
            values["subnet"] = ipaddress.IPv4Network(values["subnet"])
        return cls(**values)

    # Names and addresses derived from the settings ------------------------------------------------

    @property
    def instance_dir(self) -> Path:
        """This cluster's state file, inventory, ssh key and node layers."""
        return self.state_dir / self.instance

    @property
    def bridge_name(self) -> str:
        return f"{self.instance}-br"

    @property
    def nft_table(self) -> str:
        return f"clawbot_test_{self.instance}"

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        """The host's address on the bridge: the control side and the nodes' default route."""
        return self.subnet.network_address + 1

    def node_name(self, index: int) -> str:
        return f"node{index + 1}"

    def node_address(self, index: int) -> ipaddress.IPv4Address:
        address = self.subnet.network_address + 11 + index
        if address not in self.subnet or address == self.subnet.broadcast_address:
            raise HarnessError(f"subnet {self.subnet} has no room for node {index + 1}")
        return address

    def veth_name(self, index: int) -> str:
        return f"{self.instance}-n{index + 1}"

    def cgroup_leaf(self, node_name: str) -> str:
        return f"clawbot-test/{self.instance}-{node_name}"
