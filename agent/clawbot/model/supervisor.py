"""Model-server supervisor: start llama-server (or llama_cpp.server) on loopback, prove it can generate,
restart it with exponential backoff when it dies, and report what really happened to its memory.

Why a supervisor inside the agent and not only systemd: the gateway needs the model's state (loading,
ready, restarting, failed) with a reason and the last log lines to answer /readyz and /status truthfully,
and a model server that answers /health can still fail to generate — readiness here is a real 1-token
completion. systemd still restarts the agent itself.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import hashlib
import json
import logging
import os
import secrets
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx

from clawbot.common import preflight, sizing
from clawbot.model import rpc, staging
from clawbot.model.engines import Engine, Paths, engine_for
from clawbot.model.engines.build import find_llama_server
from clawbot.model.runplan import Decision, RunPlan, node_accelerator, uses_nvidia_gpus

log = logging.getLogger("clawbot.model.supervisor")

GGUF_MAGIC = b"GGUF"
LOG_LINES_KEPT = 50
STOP_GRACE_S = 10.0
PROBE_INTERVAL_S = 0.2
# Backoff goes back to its first delay once a server has stayed ready this long.
STABLE_AFTER_S = 60.0
# model_server.crash_loop_after: while given up on a crash loop, how often the run loop looks whether a reload
# (SIGHUP: a new config object, even with the same settings) or a config change asks it to try again
CRASH_LOOP_POLL_S = 0.5
# model_server.split: how often the model server's sessions to its RPC workers are checked while it runs, and how
# often a worker that does not answer is asked again before a start
RPC_WATCH_S = 1.0
RPC_WAIT_S = 2.0


class ModelFileError(Exception):
    """The model file is missing, not a GGUF, or not the file the config names by hash."""


# --------------------------------------------------------------------------- model file checks


def _sha256_cache_path(state_dir: Path) -> Path:
    return state_dir / "sha256-cache.json"


def file_sha256(path: Path, state_dir: Path | None = None) -> str:
    """SHA-256 of a file, cached by (device, inode, size, mtime_ns): restarts must not re-hash gigabytes."""
    st = path.stat()
    key = f"{path.resolve()}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
    cache: dict = {}
    if state_dir is not None:
        try:
            cache = json.loads(_sha256_cache_path(state_dir).read_text())
        except (OSError, ValueError):
            cache = {}
        if isinstance(cache.get(key), str):
            return cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    value = digest.hexdigest()
    if state_dir is not None:
        # keep only entries for this path (a replaced file must not leave stale hashes behind forever)
        prefix = f"{path.resolve()}:"
        cache = {k: v for k, v in cache.items() if not k.startswith(prefix)}
        cache[key] = value
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            tmp = _sha256_cache_path(state_dir).with_suffix(".tmp")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, _sha256_cache_path(state_dir))
        except OSError as exc:
            log.warning("cannot write sha256 cache in %s: %s", state_dir, exc)
    return value


def check_model_file(path: str, sha256: str = "", state_dir: Path | None = None) -> None:
    """Raise ModelFileError unless `path` is a readable GGUF (and has the configured hash)."""
    p = Path(path)
    if not p.exists():
        raise ModelFileError(f"model file {path} does not exist")
    if not p.is_file():
        raise ModelFileError(f"model path {path} is not a regular file")
    try:
        with open(p, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise ModelFileError(f"model file {path} cannot be read: {exc.strerror or exc}") from None
    if magic != GGUF_MAGIC:
        raise ModelFileError(f"model file {path} is not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    if sha256:
        actual = file_sha256(p, state_dir)
        if actual != sha256:
            raise ModelFileError(f"model file {path} has sha256 {actual}, but model_server.model_sha256 is {sha256}")


def file_identity(path: str) -> tuple | None:
    """(device, inode, size, mtime_ns): tells a replaced file from the one a server loaded without hashing it."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


# --------------------------------------------------------------------------- memory evidence


def _status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def model_mappings(pid: int, model_path: str) -> list[dict]:
    """The /proc/PID/smaps entries that map the model file: size, rss, locked and kernel page size (KiB)."""
    targets = {str(Path(model_path)), str(Path(model_path).resolve())}
    out: list[dict] = []
    current: dict | None = None
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if "-" in parts[0] and not parts[0].endswith(":"):  # a mapping header: addr perms offset dev inode [path]
            path = line.split(None, 5)[5].strip() if len(parts) >= 6 else ""
            path = path.removesuffix(" (deleted)")
            current = {"range": parts[0], "perms": parts[1], "path": path} if path in targets else None
            if current is not None:
                out.append(current)
        elif current is not None and parts[0].endswith(":") and len(parts) >= 2 and parts[1].isdigit():
            name = parts[0][:-1]
            if name in ("Size", "Rss", "Locked", "KernelPageSize", "MMUPageSize", "Private_Hugetlb", "Shared_Hugetlb"):
                current[name] = int(parts[1])
    return out


def memory_evidence(pid: int | None, model_path: str) -> dict:
    """What /proc says about the running model server's memory: reported, never assumed.

    mlock took effect when VmLck covers the model file; hugepages took effect when the mapping of the
    model file has a 2048 kB (or larger) KernelPageSize. A file on hugetlbfs is pinned without mlock (the
    kernel never swaps or reclaims huge pages, and does not count them in VmLck), hence `weights_pinned`.
    """
    if not pid:
        return {"pid": None}
    on_hugetlbfs = staging.is_hugetlbfs(model_path)
    try:
        st = Path(model_path).stat()
        # hugetlbfs counts the pages a file holds in i_blocks: the pages this copy really occupies
        file_hugepage_kib = st.st_blocks * 512 // 1024 if on_hugetlbfs else 0
    except OSError:
        file_hugepage_kib = 0
    vmlck = _status_kib(pid, "VmLck")
    maps = model_mappings(pid, model_path)
    mapped_kib = sum(m.get("Size", 0) for m in maps)
    try:
        file_kib = Path(model_path).stat().st_size // 1024
    except OSError:
        file_kib = 0
    page_sizes = sorted({m.get("KernelPageSize", 0) for m in maps})
    hugepage_kib = sum(m.get("Size", 0) for m in maps if m.get("KernelPageSize", 0) >= 2048)
    locked_map_kib = sum(m.get("Locked", 0) for m in maps)
    mlock_effective = bool(vmlck and file_kib and vmlck >= file_kib * 0.95)
    hugepages_effective = bool(maps) and hugepage_kib >= mapped_kib * 0.95
    meminfo = preflight.read_meminfo()
    page_kib = meminfo.get("Hugepagesize", 0) // 1024 or 2048
    return {
        "pid": pid,
        "vm_locked_kib": vmlck,
        "vm_rss_kib": _status_kib(pid, "VmRSS"),
        "model_file_kib": file_kib,
        "model_mapped_kib": mapped_kib,
        "model_mapped": bool(maps),
        "model_locked_kib": locked_map_kib,
        "model_page_sizes_kib": page_sizes,
        # mlock is in effect if the process has locked at least the model's size (mmap+mlock locks the
        # mapping; `mlock` without mmap locks the anonymous copy, which smaps does not tie to the file).
        "mlock_effective": mlock_effective,
        "hugepages_effective": hugepages_effective,
        "hugepages_kib": hugepage_kib,
        "model_hugetlb_rss_kib": sum(m.get("Shared_Hugetlb", 0) + m.get("Private_Hugetlb", 0) for m in maps),
        "model_on_hugetlbfs": on_hugetlbfs,
        "model_hugepages_used": file_hugepage_kib // page_kib,
        "weights_pinned": mlock_effective or (hugepages_effective and on_hugetlbfs),
        "meminfo": {**{k: v for k, v in meminfo.items() if k.startswith("HugePages_")}, "Hugepagesize": page_kib},
    }


# --------------------------------------------------------------------------- files and processes


def _write_private(path: Path, text: str) -> None:
    """0600 from the first byte, replaced atomically (the key must never be readable by others)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """PR_SET_PDEATHSIG: if the agent is SIGKILLed, the model server does not linger holding the port."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)
    except OSError:
        pass


# --------------------------------------------------------------------------- supervisor


@dataclass
class Attempt:
    started_at: float = 0.0
    ready_at: float | None = None
    exit_code: int | None = None


@dataclass
class SupervisorStatus:
    state: str = "stopped"  # loading | ready | restarting | failed | stopped
    reason: str = ""
    since: float = field(default_factory=time.time)


class Supervisor:
    """Runs one model server and keeps it running. All methods run on the agent's event loop."""

    def __init__(self, config: dict, state_dir: Path, *, find_engine=None, port: int | None = None,
                 model_file: str | None = None):
        """+ port: listen here instead of model_server.port (a staged swap's second server beside the first)
        + model_file: serve this file instead of model_server.model_path (the model a rejected swap kept)"""
        self.config = config
        self.state_dir = Path(state_dir)
        self.port_override = port
        self.model_file_override = model_file
        self.identity: tuple | None = None  # (device, inode, size, mtime_ns) of the model file this server loaded
        self.keep_staged: tuple[str, ...] = ()  # staged copies another server serves (a swap): never released here
        self.status = SupervisorStatus()
        self.logs: collections.deque[str] = collections.deque(maxlen=LOG_LINES_KEPT)
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.attempt = Attempt()
        self.evidence: dict = {}
        self.command: list[str] = []
        self.serving_path: str = ""  # the model file the server was pointed at: the staged copy or the disk file
        self.plan: RunPlan | None = None  # how the running server was started, and why
        self.staging: dict = {}
        self._mounted: str | None = None  # a hugetlbfs mount this agent made itself (root only)
        self._find_engine = find_engine or find_llama_server  # accelerator -> a build of llama-server, or None
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._wake = asyncio.Event()
        self._ready_event = asyncio.Event()
        self.listeners: list = []  # callables(state) for metrics
        # The model server listens on loopback TCP: a per-run API key keeps other local users from
        # bypassing the gateway (and its mTLS, limits and validation). Only the agent knows it.
        self.api_key = secrets.token_urlsafe(32)
        # model_server.split: what the agent knows of each RPC worker (for /status), by name
        self.rpc_workers: dict[str, dict] = {}
        self._rpc_free: tuple[tuple[str, int], ...] = ()  # what the workers reported before this start
        self._rpc_lost: str = ""  # why the watcher stopped the model server (a worker's session ended)

    # -- public ---------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self.port_override or self.config["model_server"]["port"]

    @property
    def model_file(self) -> str:
        """The model file this supervisor serves: model_server.model_path unless it was given another one."""
        return self.model_file_override or self.config["model_server"]["model_path"]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def launch_config(self) -> dict:
        """The config the engine's command line is built from: the port and the model file this supervisor uses."""
        server = self.config["model_server"]
        if self.port == server["port"] and self.model_file == server["model_path"]:
            return self.config
        return {**self.config, "model_server": {**server, "port": self.port, "model_path": self.model_file}}

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    @property
    def engine(self) -> Engine:
        return engine_for(self.config["model_server"]["engine"])

    @property
    def ready(self) -> bool:
        return self.status.state == "ready"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process and self.process.returncode is None else None

    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="model-supervisor")

    async def stop(self, reason: str = "agent stopping") -> None:
        self._stopping = True
        self._wake.set()
        await self._kill()
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        await asyncio.to_thread(self._release_staging)
        self._set_state("stopped", reason)

    async def apply(self, config: dict, force: bool = False) -> bool:
        """Take a new config; restart the model server only if what it was started with changed (or `force`: the
        file at model_path was replaced under the same settings)."""
        old = (self.config["model_server"], self.config["context_window"])
        self.config = config
        if old == (config["model_server"], config["context_window"]) and not force:
            return False
        log.info("model_server settings changed: restarting the model server")
        self.model_file_override = None
        self.restarts_reset()
        await self._kill()  # the run loop sees the exit and starts the new command at once
        self._wake.set()
        return True

    def restarts_reset(self) -> None:
        self._backoff = None

    async def wait_ready(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._ready_event.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def snapshot(self) -> dict:
        """JSON-ready state for /status."""
        server = self.config["model_server"]
        in_use = self.serving_path or self.model_file
        if self.ready and self.pid:
            self.evidence = memory_evidence(self.pid, in_use)
        return {
            "state": self.status.state,
            "reason": self.status.reason,
            "since": self.status.since,
            "engine": server["engine"],
            "model_path": server["model_path"],
            "model_file": self.model_file,
            "model_file_in_use": in_use,
            "port": self.port,
            "model_name": server["model_name"],
            "pid": self.pid,
            "restarts": self.restarts,
            "command": self.command,
            "parallel_slots": self.plan.slots.value if self.plan else None,
            "parallel_slots_reason": self.plan.slots.reason if self.plan else None,
            "plan": self.plan.to_json() if self.plan else None,
            "load_seconds": (self.attempt.ready_at - self.attempt.started_at) if self.attempt.ready_at else None,
            "memory": self.evidence,
            "hugepages": self._hugepages_report(in_use),
            "log_tail": list(self.logs),
            "rpc_workers": [dict(entry) for entry in self.rpc_workers.values()],
        }

    # -- internals ------------------------------------------------------------------------------

    def _hugepages_report(self, in_use: str) -> dict:
        """Staging as it really is: the file in use, where it lives, its pages, mlock and the fallback reason."""
        ev = self.evidence
        return {
            **self.staging,
            "file_in_use": in_use,
            "on_hugetlbfs": staging.is_hugetlbfs(in_use),
            "hugepages_used": ev.get("model_hugepages_used"),
            "kernel_page_sizes_kib": ev.get("model_page_sizes_kib"),
            "hugepages_effective": ev.get("hugepages_effective"),
            "mlock_effective": ev.get("mlock_effective"),
            "weights_pinned": ev.get("weights_pinned"),
        }

    def _prepare_weights(self, staging_decision: Decision[bool]) -> str:
        """Stage the model into huge pages when the plan says so; on any failure serve the disk file.
        Returns the path to serve."""
        server = self.config["model_server"]
        path, mount = self.model_file, server["hugepages_mount"]
        self.staging = {"setting": server["hugepages"], "wanted": staging_decision.value, "why": staging_decision.reason,
                        "mount": mount, "staged": False, "fallback_reason": None}
        if not staging_decision.value:
            staging.release(self.state_dir, keep=self.keep_staged)  # a copy from an earlier config gives its pages back
            return path
        try:
            if self._mounted is None and staging.ensure_mount(mount):
                self._mounted = mount
            record = staging.stage(path, mount, self.state_dir, file_sha256(Path(path), self.state_dir),
                                   self.keep_staged)
        except (staging.StagingError, OSError) as exc:
            reason = str(exc)
            log.warning("hugepages: serving the on-disk file %s, staging failed: %s", path, reason)
            self.logs.append(f"[clawbot] WARNING: serving the on-disk model file, hugepages staging failed: {reason}")
            self.staging["fallback_reason"] = reason
            return path
        self.staging.update(staged=True, staged_path=record.path, pages=record.pages, page_kib=record.page_kib,
                            reused=record.reused, copy_seconds=record.copy_seconds, sha256=record.source_sha256)
        return record.path

    def _release_staging(self) -> None:
        """On stop: free the staged copy's pages and unmount what this agent mounted itself."""
        try:
            staging.release(self.state_dir, self._mounted, self.keep_staged)
        except OSError as exc:
            log.warning("cannot release the staged model: %s", exc)
        if self._mounted:
            staging.unmount(self._mounted)
            self._mounted = None

    def _set_state(self, state: str, reason: str = "") -> None:
        if state != self.status.state or reason != self.status.reason:
            log.info("model server %s%s", state, f": {reason}" if reason else "")
        self.status = SupervisorStatus(state, reason)
        if state == "ready":
            self._ready_event.set()
        else:
            self._ready_event.clear()
        for listener in self.listeners:
            try:
                listener(state)
            except Exception:  # metrics must never break supervision
                log.exception("state listener failed")

    def _prepare_start(self) -> list[str]:
        """The node's facts, the run plan, the weights (staged or not) and the engine's files: everything
        before the process starts. Returns its command line. Runs in a thread (nvidia-smi, copying gigabytes)."""
        server = self.config["model_server"]
        engine = self.engine
        node = preflight.read_node(self.model_file, gpus=uses_nvidia_gpus(server["accelerator"]))
        builds = engine.builds(self._find_engine, node_accelerator(server["accelerator"], node.gpus))
        facts = preflight.host_facts(node, engine_builds=None if builds is None else frozenset(builds))
        facts = replace(facts, rpc_free_bytes=self._rpc_free)
        try:
            info = sizing.read_model_info(self.model_file)
        except (OSError, ValueError) as exc:
            log.warning("cannot size %s (%s): the run plan falls back to max_concurrency and all layers",
                        self.model_file, exc)
            info = None
        plan = RunPlan.resolve(self.config, facts, info)
        binary = builds.get(plan.accelerator.value, "") if builds is not None else ""
        if builds is not None and not binary:
            raise ModelFileError(f"no {engine.NAME} binary found: run `clawbot build-engine` on this node")
        self.serving_path = self._prepare_weights(plan.staging)
        if self.serving_path != self.model_file:
            # staged weights sit in huge pages outside MemAvailable: a fact known only now
            plan = RunPlan.resolve(self.config, replace(facts, weights_staged=True), info)
        self.plan = plan
        log.info("run plan: %s", json.dumps(plan.to_json()))
        paths = Paths(model=self.serving_path, binary=binary, state_dir=self.state_dir)
        launch = self.launch_config()
        for path, text in engine.private_files(plan, launch, paths, self.api_key).items():
            _write_private(path, text)
        return engine.command(plan, launch, paths)

    async def _run(self) -> None:
        first, longest = self.config["model_server"]["restart_backoff_s"]
        self._backoff = None
        self.load_crashes = 0  # starts in a row that exited during load, none reaching ready in between
        while not self._stopping:
            first, longest = self.config["model_server"]["restart_backoff_s"]
            try:
                failure = await self._one_attempt()
            except (OSError, ValueError) as exc:  # e.g. the engine binary vanished between check and exec
                self.logs.append(f"[clawbot] cannot start the model server: {exc}")
                failure = f"failed:cannot start the model server: {exc}"
            if self._stopping:
                break
            if failure != "config-changed" and await self._crash_loop(failure):
                continue
            if self._backoff is None:
                delay = first
            else:
                delay = min(self._backoff * 2, longest)
            if self.attempt.ready_at and time.monotonic() - self.attempt.ready_at >= STABLE_AFTER_S:
                delay = first
            self._backoff = delay
            if failure == "config-changed":
                self._backoff = None
                continue
            self.restarts += 1
            state = "failed" if failure.startswith("failed:") else "restarting"
            reason = failure.removeprefix("failed:")
            self._set_state(state, f"{reason}; next start in {delay:g} s")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
                self._backoff = None  # woken by a config change: start at once, fresh backoff
            except asyncio.TimeoutError:
                pass

    async def _crash_loop(self, failure: str) -> bool:
        """Count a start that exited during load (`Attempt.exit_code` set, never ready); after
        model_server.crash_loop_after of them in a row, end in `failed` with a reason starting `crash loop:` (the
        exit's signal or code; /status keeps the log tail) and start nothing until the config changes or the agent
        reloads (SIGHUP). True when it gave up and was then asked to try again (the caller starts at once)."""
        if self.attempt.ready_at is not None:
            self.load_crashes = 0
            return False
        if self.attempt.exit_code is None:  # not an exit during load (a timeout, a missing model file, ...)
            return False
        self.load_crashes += 1
        limit = self.config["model_server"].get("crash_loop_after", 0)  # the schema fills it in; 0: never give up
        if not limit or self.load_crashes < limit:
            return False
        seen = self.config
        reason = (f"crash loop: {failure.removeprefix('failed:')}, {self.load_crashes} starts in a row (none reached "
                  "ready); not started again until the config changes or the agent reloads (SIGHUP); log_tail has "
                  "its last lines")
        self.logs.append(f"[clawbot] {reason}")
        log.error("model server %s", reason)
        self._set_state("failed", reason)
        while not self._stopping and self.config is seen:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), CRASH_LOOP_POLL_S)
            except asyncio.TimeoutError:
                pass
        if not self._stopping:
            log.info("model server: a reload after the crash loop, starting it again")
        self.load_crashes = 0
        self._backoff = None
        return True

    async def _one_attempt(self) -> str:
        """Start, wait for readiness, wait for exit. Returns why it ended."""
        server = self.config["model_server"]
        config_seen = self.config
        self.attempt = Attempt(started_at=time.monotonic())
        self.evidence = {}
        self.serving_path = ""
        self._rpc_lost = ""
        self._set_state("loading", f"checking {self.model_file}")
        try:
            # model_sha256 names model_path's content; a kept older model (model_file) was checked when it served
            sha256 = server["model_sha256"] if self.model_file == server["model_path"] else ""
            await asyncio.to_thread(check_model_file, self.model_file, sha256, self.state_dir)
            self.identity = file_identity(self.model_file)
            if rpc.workers_of(self.config):
                waited = await self._await_rpc_workers(config_seen)
                if waited:
                    return waited
            self._set_state("loading", f"preparing {self.model_file} (hugepages: {server['hugepages']})")
            self.command = await asyncio.to_thread(self._prepare_start)
        except ModelFileError as exc:
            self.logs.append(f"[clawbot] {exc}")
            return f"failed:{exc}"
        self._set_state("loading", f"starting {server['engine']}")
        self.logs.append(f"[clawbot] starting: {' '.join(self.command)}")
        self.process = await asyncio.create_subprocess_exec(
            *self.command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() kills the whole group
            preexec_fn=_die_with_parent,
            env={**os.environ, **rpc.ENVIRONMENT} if rpc.workers_of(self.config) else None,  # RPC stays in the tunnel
        )
        reader = asyncio.create_task(self._read_logs(self.process))
        proc = self.process
        try:
            ok, why = await self._wait_ready(proc, server["startup_timeout_s"])
            if ok:
                self.attempt.ready_at = time.monotonic()
                self.evidence = memory_evidence(proc.pid, self.serving_path)
                self._set_state("ready", f"{server['engine']} pid {proc.pid} loaded {self.serving_path} "
                                f"in {self.attempt.ready_at - self.attempt.started_at:.1f} s")
                watcher = asyncio.create_task(self._watch_rpc_sessions(proc)) if rpc.workers_of(config_seen) else None
                code = await proc.wait()
                if watcher is not None:
                    watcher.cancel()
                self.attempt.exit_code = code
                if self.config is not config_seen and not self._stopping:
                    return "config-changed"
                if self._rpc_lost:
                    lost, self._rpc_lost = self._rpc_lost, ""
                    return lost
                return f"model server exited with {_describe_exit(code)}{await self._rpc_after_exit(config_seen)}"
            if proc.returncode is None:
                await self._kill()
                return f"failed:{why}"
            if self.config is not config_seen and not self._stopping:
                return "config-changed"
            self.attempt.exit_code = proc.returncode  # an exit during load: _crash_loop counts it
            return (f"model server exited during load with {_describe_exit(proc.returncode)}"
                    f"{await self._rpc_after_exit(config_seen)}")
        finally:
            try:
                await asyncio.wait_for(reader, 5)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                reader.cancel()

    async def _wait_ready(self, proc: asyncio.subprocess.Process, timeout: float) -> tuple[bool, str]:
        """Loaded (health 200) and able to generate (a 1-token completion answers 200)."""
        deadline = time.monotonic() + timeout
        health = self.engine.HEALTH_PATH
        async with httpx.AsyncClient(base_url=self.base_url, timeout=10.0, headers=self.auth_headers) as client:
            loaded = False
            while time.monotonic() < deadline:
                if proc.returncode is not None or self._stopping:
                    return False, "exited"
                try:
                    if not loaded:
                        r = await client.get(health)
                        if r.status_code == 200:
                            loaded = True
                            self._set_state("loading", "model loaded; checking it can generate")
                    if loaded:
                        r = await client.post("/v1/completions", json={
                            "prompt": "Hello", "max_tokens": 1, "temperature": 0,
                            "model": self.config["model_server"]["model_name"]})
                        if r.status_code == 200:
                            return True, ""
                        self.logs.append(f"[clawbot] readiness completion answered {r.status_code}: {r.text[:200]}")
                except httpx.HTTPError:
                    pass
                try:
                    await asyncio.wait_for(asyncio.shield(proc.wait()), PROBE_INTERVAL_S)
                except asyncio.TimeoutError:
                    pass
        return False, f"not ready within startup_timeout_s ({timeout:g} s)"

    # -- model_server.split: the RPC workers ------------------------------------------------------------

    def _rpc_probe_binary(self) -> str:
        """The llama-server build that probes the workers (any build has the RPC client; the CPU one is found)."""
        server = self.config["model_server"]
        builds = self.engine.builds(self._find_engine, node_accelerator(server["accelerator"], ())) or {}
        return builds.get("cpu") or next(iter(builds.values()), "")

    def _rpc_probe(self, config: dict) -> list[rpc.Probe]:
        """Probe every worker through its tunnel (runs in a thread) and record what each answered."""
        binary = self._rpc_probe_binary()
        workers = rpc.workers_of(config)
        if not binary:
            return [rpc.Probe(w, False, "no llama-server build on this node to probe it with") for w in workers]
        probes = rpc.probe_all(binary, workers, config["model_server"]["split"]["probe_timeout_s"])
        now = time.time()
        for found in probes:
            entry = self._rpc_entry(found.worker)
            was = entry["state"]
            entry.update(state="up" if found.ok else "down", detail=found.detail, checked_at=now,
                         memory_total_bytes=found.memory_total, memory_free_bytes=found.memory_free)
            if found.ok and was in ("down", "lost"):
                entry["back_at"] = now
                log.info("RPC worker %s answers again: %s", found.worker.name, found.detail)
            elif not found.ok and was != "down":
                entry["down_since"] = now
                log.warning("RPC worker %s does not answer: %s", found.worker.name, found.detail)
        return probes

    def _rpc_entry(self, worker: rpc.Worker) -> dict:
        entry = self.rpc_workers.get(worker.name)
        if entry is None or entry["port"] != worker.port:
            entry = {"name": worker.name, "address": worker.address, "port": worker.port, "state": "unknown",
                     "detail": "", "sessions": 0, "sessions_lost": 0, "last_lost_at": None, "last_lost": "",
                     "session_since": None, "checked_at": None, "down_since": None, "back_at": None,
                     "memory_total_bytes": None, "memory_free_bytes": None}
            self.rpc_workers[worker.name] = entry
        return entry

    async def _await_rpc_workers(self, config_seen: dict) -> str:
        """Before a start: wait until every worker answers through its tunnel, saying which ones do not (no restart
        is counted while waiting). Returns why the attempt ends instead ("" once all answer)."""
        names = {w.name for w in rpc.workers_of(config_seen)}
        for stale in [n for n in self.rpc_workers if n not in names]:
            del self.rpc_workers[stale]
        said = ""
        while not self._stopping:
            probes = await asyncio.to_thread(self._rpc_probe, config_seen)
            down = [p for p in probes if not p.ok]
            if not down:
                self._rpc_free = tuple((p.worker.name, p.memory_free) for p in probes if p.memory_free is not None)
                return ""
            reason = "waiting for RPC worker(s): " + "; ".join(p.describe() for p in down)
            if reason != said:
                self.logs.append(f"[clawbot] {reason}")
                said = reason
            self._set_state("restarting", reason)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), RPC_WAIT_S)
            except asyncio.TimeoutError:
                pass
            if self.config is not config_seen:
                return "config-changed"
        return "stopping"

    async def _watch_rpc_sessions(self, proc: asyncio.subprocess.Process) -> None:
        """While the model server runs: when its session to a worker ends, say which worker and stop the server (it
        would abort at its next request); the run loop then waits for the worker and starts it cleanly."""
        workers = rpc.workers_of(self.config)
        now = time.time()
        for worker in workers:
            entry = self._rpc_entry(worker)
            entry.update(state="up", session_since=now, sessions=entry["sessions"] + 1)
        ports = [w.port for w in workers]
        while proc.returncode is None:
            await asyncio.sleep(RPC_WATCH_S)
            if proc.returncode is not None:
                return
            lost = rpc.lost_sessions(await asyncio.to_thread(rpc.session_states, proc.pid, ports), workers)
            if not lost:
                continue
            now = time.time()
            parts = []
            for worker, how in lost:
                entry = self._rpc_entry(worker)
                why = (f"the model server's session to RPC worker {worker.name} ({worker.endpoint}) ended ({how}): "
                       "its ggml-rpc-server, its stunnel or the network to it went away")
                entry.update(state="lost", sessions_lost=entry["sessions_lost"] + 1, last_lost_at=now, last_lost=why,
                             session_since=None)
                parts.append(why)
            self._rpc_lost = "; ".join(parts) + "; waiting for it, then a clean restart"
            self.logs.append(f"[clawbot] {self._rpc_lost}")
            log.warning("%s", self._rpc_lost)
            await self._kill()
            return

    async def _rpc_after_exit(self, config_seen: dict) -> str:
        """After the model server died on its own: which workers do not answer now (llama.cpp's abort names none)."""
        if not rpc.workers_of(config_seen) or self._stopping:
            return ""
        probes = await asyncio.to_thread(self._rpc_probe, config_seen)
        down = [p for p in probes if not p.ok]
        now = time.time()
        for found in down:
            entry = self._rpc_entry(found.worker)
            if entry.get("session_since"):
                entry.update(sessions_lost=entry["sessions_lost"] + 1, last_lost_at=now, session_since=None,
                             last_lost=f"the model server exited and RPC worker {found.worker.name} does not answer: "
                                       f"{found.detail}")
        if not down:
            return ""
        return "; RPC worker(s) not answering: " + "; ".join(p.describe() for p in down)

    async def _read_logs(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            try:
                line = await proc.stdout.readline()
            except (ValueError, asyncio.LimitOverrunError):
                continue  # an over-long line: drop it, keep reading
            if not line:
                break
            text = line.decode("utf-8", "replace").rstrip()
            if text:
                self.logs.append(text)

    async def _kill(self) -> None:
        """SIGTERM the process group, SIGKILL it after a grace period."""
        proc = self.process
        if proc is None or proc.returncode is not None:
            return
        for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                await asyncio.wait_for(proc.wait(), wait)
                return
            except asyncio.TimeoutError:
                continue


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit code"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"
