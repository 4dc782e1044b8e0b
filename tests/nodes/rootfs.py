"""Build (once) and cache a minimal Debian root filesystem that looks like a fresh server install."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .aptsources import debootstrap_mirror, host_apt_sources
from .config import HarnessConfig, HarnessError

# Bump when the post-processing below changes, so caches built by an older recipe are not reused.
RECIPE_VERSION = 1
VARIANT = "minbase"

# Units a container has no use for (no ttys, no first-boot prompt) or that would make tests flaky
# (apt's daily timers take the dpkg lock in the middle of a rollout).
MASKED_UNITS = (
    "getty.target",
    "getty@.service",
    "serial-getty@.service",
    "console-getty.service",
    "container-getty@.service",
    "systemd-firstboot.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
)

SSHD_DROP_IN = """\
# Written by clawbot's test-node harness: one host key per node (generated at start), keys only.
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
"""


@dataclass(frozen=True)
class Rootfs:
    """A ready root filesystem in the cache; `build_seconds` is 0.0 when it came from the cache."""

    path: Path
    key: str
    built_now: bool
    build_seconds: float


def cache_key(config: HarnessConfig) -> str:
    """Hash of everything that decides the rootfs contents (the package list above all)."""
    recipe = {
        "suite": config.suite,
        "variant": VARIANT,
        "packages": sorted(config.packages),
        "masked": sorted(MASKED_UNITS),
        "sshd": SSHD_DROP_IN,
        "recipe": RECIPE_VERSION,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _exclusive_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_tree(path: Path) -> None:
    """rm -rf that never crosses into another file system (a stray mount must not be emptied)."""
    if path.exists() or path.is_symlink():
        subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], check=True)


def ensure_rootfs(config: HarnessConfig, log=print) -> Rootfs:
    """Return the cached rootfs for this package list, building it with debootstrap if missing."""
    key = cache_key(config)
    final = config.cache_dir / f"rootfs-{config.suite}-{key}"
    marker = final.with_name(final.name + ".ready")
    with _exclusive_lock(config.cache_dir / "build.lock"):
        if marker.is_file() and final.is_dir():
            return Rootfs(final, key, False, 0.0)
        if shutil.which("debootstrap") is None:
            raise HarnessError("debootstrap is not installed: apt-get install debootstrap (listed in .ci/apt-packages.txt)")
        mirror = debootstrap_mirror(config.suite, host_apt_sources())
        partial = final.with_name(final.name + ".partial")
        _remove_tree(partial)
        _remove_tree(final)
        debs = config.cache_dir / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        command = [
            # A private mount namespace: whatever debootstrap mounts in the target dies with it,
            # even when it is killed half-way.
            "unshare", "--mount", "--propagation", "private", "--",
            "debootstrap", f"--variant={VARIANT}", "--components=main", "--merged-usr",
            f"--include={','.join(sorted(config.packages))}", f"--cache-dir={debs}",
        ]
        if mirror.signed_by and Path(mirror.signed_by).is_file():
            command.append(f"--keyring={mirror.signed_by}")
        command += [config.suite, str(partial), mirror.uri]
        log(f"building Debian {config.suite} rootfs {key} from {mirror.uri} (cold cache: about a minute)")
        started = time.monotonic()
        build_log = final.with_name(final.name + ".debootstrap.log")
        with open(build_log, "w") as out:
            result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            tail = build_log.read_text(errors="replace")[-3000:]
            raise HarnessError(f"debootstrap failed (exit {result.returncode}); log {build_log}:\n{tail}")
        _prepare_for_nodes(partial)
        partial.rename(final)
        elapsed = time.monotonic() - started
        marker.write_text(json.dumps({
            "key": key, "suite": config.suite, "packages": sorted(config.packages),
            "mirror": mirror.uri, "build_seconds": round(elapsed, 1), "built_at": time.time(),
        }, indent=2) + "\n")
        log(f"rootfs {key} built in {elapsed:.1f} s at {final}")
        return Rootfs(final, key, True, elapsed)


def _prepare_for_nodes(root: Path) -> None:
    """Make the tree node-neutral: anything per node (host keys, machine id, hostname, apt
    sources, resolver) is removed here and written into each node's own layer at start."""
    for key_file in (root / "etc/ssh").glob("ssh_host_*"):
        key_file.unlink()
    (root / "etc/ssh/sshd_config.d").mkdir(exist_ok=True)
    (root / "etc/ssh/sshd_config.d/clawbot-test.conf").write_text(SSHD_DROP_IN)
    (root / "etc/machine-id").write_text("")
    dbus_id = root / "var/lib/dbus/machine-id"
    if dbus_id.exists() or dbus_id.is_symlink():
        dbus_id.unlink()
    (root / "etc/hostname").write_text("")
    for per_node in ("etc/apt/sources.list", "etc/resolv.conf"):
        path = root / per_node
        if path.exists() or path.is_symlink():
            path.unlink()
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True, exist_ok=True)
    for unit in MASKED_UNITS:
        link = unit_dir / unit
        if link.exists() or link.is_symlink():
            link.unlink()
        os.symlink("/dev/null", link)
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
