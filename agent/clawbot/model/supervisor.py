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
import resource
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

log = logging.getLogger("clawbot.model.supervisor")

GGUF_MAGIC = b"GGUF"
LOG_LINES_KEPT = 50
STOP_GRACE_S = 10.0
PROBE_INTERVAL_S = 0.2
# Backoff goes back to its first delay once a server has stayed ready this long.
STABLE_AFTER_S = 60.0
CAP_IPC_LOCK = 14
# llama.cpp / ggml type ids for llama_cpp.server's type_k/type_v (ggml.h enum ggml_type).
GGML_TYPE_IDS = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30}


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


# --------------------------------------------------------------------------- memory evidence


def _capabilities_effective() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def can_mlock(n_bytes: int) -> bool:
    """Whether pinning n_bytes would be allowed: CAP_IPC_LOCK, or a RLIMIT_MEMLOCK that large."""
    if _capabilities_effective() & (1 << CAP_IPC_LOCK):
        return True
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return soft == resource.RLIM_INFINITY or soft >= n_bytes


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
    from clawbot.model import staging

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
    meminfo = staging.meminfo_hugepages()
    page_kib = meminfo.get("Hugepagesize", 2048) or 2048
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
        "meminfo": meminfo,
    }


# --------------------------------------------------------------------------- command lines


def resolve_load_mode(mode: str, model_bytes: int) -> str:
    """The schema's `auto`: mmap+mlock when mlock is allowed for the whole model, else mmap."""
    if mode == "auto":
        return "mmap+mlock" if can_mlock(model_bytes) else "mmap"
    return mode


def staging_wanted(server: dict, model_path: str) -> tuple[bool, str]:
    """The schema's `model_server.hugepages`: whether to stage the weights into huge pages, and why (not).

    `auto` stages unless every layer is offloaded to a GPU (then the weights are read once into VRAM and
    host-side huge pages buy nothing)."""
    setting = server["hugepages"]
    if setting == "stage":
        return True, "model_server.hugepages is stage"
    if setting in ("off", "reserve"):
        return False, f"model_server.hugepages is {setting}: the model server maps the on-disk file"
    if server["accelerator"] in ("cpu", "auto") or server["gpu_layers"] == 0:
        return True, "model_server.hugepages is auto on a CPU node"
    if server["gpu_layers"] < 0:
        return False, "model_server.hugepages is auto and every layer is offloaded to the GPU"
    try:
        from clawbot.common import sizing

        n_layer = sizing.read_model_info(Path(model_path)).n_layer
    except Exception:  # noqa: BLE001 - unknown layer count: partial offload, stage the CPU share
        n_layer = 1 << 30
    if server["gpu_layers"] >= n_layer:
        return False, "model_server.hugepages is auto and every layer is offloaded to the GPU"
    return True, "model_server.hugepages is auto and some layers stay on the CPU"


def resolve_threads(threads: int) -> int:
    """0 means: every core this process may use but one, which the gateway keeps.

    Measured on 2 cores: llama.cpp with -t 2 next to a busy gateway made 11-20 tok/s, with -t 1 108-123 tok/s
    (its threads spin-wait for each other, so one preempted thread stalls all of them)."""
    if threads > 0:
        return threads
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


API_KEY_FILE = "model-server.key"


GPU_UBATCH = 1024


def offloads(server: dict, accelerator: str) -> bool:
    """Whether layers run on an accelerator (`auto` already resolved; `auto` here counts as CPU)."""
    return accelerator not in ("cpu", "auto") and server["gpu_layers"] != 0


def resolve_ubatch(server: dict, accelerator: str) -> int:
    """-ub, the tokens of a prompt evaluated in one pass: model_server.ubatch_size, or for 0 (auto) 1024
    on a GPU and llama.cpp's 512 on a CPU.

    Measured on an H100 (benchmarks/results/gpu.json): a 540-token chat prompt's first token took
    57.0 ms at -ub 1024 against 60.4 ms at 512 (one pass instead of two); a CPU gains nothing from
    it, and the compute buffer grows with it (sizing.compute_buffer_bytes counts that)."""
    if server["ubatch_size"]:
        return server["ubatch_size"]
    from clawbot.common import sizing

    return GPU_UBATCH if offloads(server, accelerator) else sizing.DEFAULT_UBATCH


@dataclass(frozen=True)
class SlotPlan:
    slots: int
    reason: str


def resolve_parallel_slots(config: dict, model_path: str, accelerator: str, gpu_free_bytes: int | None = None,
                           host_free_bytes: int | None = None, weights_in_host_budget: bool = True) -> SlotPlan:
    """-np. model_server.parallel_slots when set; 0 (auto): model_gateway.max_concurrency slots (the gateway
    never sends more at once) when their KV cache fits the memory left after the weights, else the most
    that fit, at least 1. That memory is the GPU's when the whole model is offloaded (gpu_free_bytes),
    else the host's (host_free_bytes; weights_in_host_budget: False when they sit in staged huge pages,
    which MemAvailable no longer counts). Unknown memory or an unreadable model: max_concurrency."""
    server = config["model_server"]
    if server["parallel_slots"]:
        return SlotPlan(server["parallel_slots"], "model_server.parallel_slots")
    wanted = config["model_gateway"]["max_concurrency"]
    if server["engine"] != "llama-server":
        return SlotPlan(1, "auto: llama_cpp.server serves one request at a time")
    from clawbot.common import sizing

    try:
        info = sizing.read_model_info(model_path)
    except (OSError, ValueError) as exc:
        return SlotPlan(wanted, f"auto: model_gateway.max_concurrency (model not sized: {exc})")
    flash = flash_attention_flag(server["flash_attention"], accelerator) != "off"
    ubatch = resolve_ubatch(server, accelerator)

    def fit_for(n: int):
        return sizing.size_model(info, config["context_window"] * n, n, server["cache_type_k"], server["cache_type_v"],
                                 n_ubatch=ubatch, flash_attn=flash)

    full_offload = offloads(server, accelerator) and (server["gpu_layers"] < 0 or server["gpu_layers"] > info.n_layer)
    if full_offload and gpu_free_bytes is not None and \
            sizing.gpu_layers_that_fit(fit_for(1), gpu_free_bytes).n_gpu_layers > info.n_layer:
        for n in range(wanted, 0, -1):
            if sizing.gpu_layers_that_fit(fit_for(n), gpu_free_bytes).n_gpu_layers > info.n_layer:
                per_slot = fit_for(1).kv_bytes
                return SlotPlan(n, f"auto: {n} of max_concurrency {wanted} slots fit in the GPU's "
                                   f"{sizing.gib(gpu_free_bytes)} free ({sizing.gib(per_slot)} of KV cache each)")
    if host_free_bytes is None:
        return SlotPlan(wanted, "auto: model_gateway.max_concurrency (free memory unknown)")
    from clawbot.common import preflight

    # weights staged in huge pages are outside MemAvailable: they do not count against it
    budget = host_free_bytes + (0 if weights_in_host_budget else info.tensor_bytes)
    n = preflight.max_parallel_slots(info, preflight.settings_from_config(config), budget, limit=wanted,
                                     n_ubatch=ubatch)
    if n:
        return SlotPlan(n, f"auto: {n} of max_concurrency {wanted} slots fit in {sizing.gib(host_free_bytes)} "
                           f"of free memory ({sizing.gib(fit_for(1).kv_bytes)} of KV cache each)")
    return SlotPlan(1, f"auto: not even one slot of context_window {config['context_window']} fits in "
                       f"{sizing.gib(host_free_bytes)} of free memory; running 1 (preflight would have refused)")


def llama_server_command(binary: str, config: dict, model_path: str, api_key_file: str | None = None, *,
                         accelerator: str | None = None, gpu_free_bytes: int | None = None,
                         slots: int | None = None) -> list[str]:
    """llama-server's argv for this config. Every setting explicit, so `ps` shows the whole picture.

    -c is context_window x parallel_slots with -no-kvu: this llama.cpp gives each slot n_ctx/np cells
    when the KV cache is not unified, which is the schema's promise (each slot gets context_window).
    accelerator: what the binary was built for, `auto` already resolved (default: the config's, where
    `auto` counts as CPU); gpu_free_bytes: free memory of the GPU it runs on, for gpu_layers -1.
    """
    server = config["model_server"]
    accelerator = accelerator or server["accelerator"]
    if slots is None:
        slots = resolve_parallel_slots(config, model_path, accelerator, gpu_free_bytes).slots
    try:
        size = Path(model_path).stat().st_size
    except OSError:
        size = 0
    ubatch = resolve_ubatch(server, accelerator)
    cmd = [
        binary,
        "-m", model_path,
        "--host", "127.0.0.1",
        "--port", str(server["port"]),
        "-c", str(config["context_window"] * slots),
        "-np", str(slots),
        "-no-kvu",
        "-t", str(resolve_threads(server["threads"])),
        "-ngl", gpu_layers_flag(config, model_path, accelerator, gpu_free_bytes, slots),
        "-b", str(max(2048, ubatch)),
        "-ub", str(ubatch),
        "-fit", "off",
        "-fa", flash_attention_flag(server["flash_attention"], accelerator),
        "-ctk", server["cache_type_k"],
        "-ctv", server["cache_type_v"],
        "-lm", resolve_load_mode(server["load_mode"], size),
        "--alias", server["model_name"],
        "--metrics",
        "--no-slots",
        "--no-ui",
        "-cram", "0",
        "--log-colors", "off",
    ]
    if server["chat_template"]:
        # llama-server's Jinja engine (on by default) would take a built-in name such as "gemma" as a literal
        # template and drop every message; built-in names need the legacy engine.
        jinja = "{" in server["chat_template"]
        cmd += ["--jinja" if jinja else "--no-jinja", "--chat-template", server["chat_template"]]
    if api_key_file:
        cmd += ["--api-key-file", api_key_file]
    return cmd + list(server["extra_args"])


def resolve_accelerator(accelerator: str, gpus) -> str:
    """`auto` → cuda when nvidia-smi lists a GPU (preflight.query_gpus), else cpu; others as they are."""
    if accelerator != "auto":
        return accelerator
    return "cuda" if gpus else "cpu"


def gpu_layers_flag(config: dict, model_path: str, accelerator: str, gpu_free_bytes: int | None = None,
                    slots: int | None = None) -> str:
    """llama-server's -ngl. gpu_layers -1 means "as many as fit": 0 on CPU; on a GPU `all` when the whole
    model (weights, output head, KV cache of every slot, compute buffer) fits in gpu_free_bytes, else the
    most layers that fit (sizing.gpu_layers_that_fit; the rest run on the CPU). Unknown free memory or an
    unreadable model: `all` (preflight checks the fit before a rollout)."""
    server = config["model_server"]
    gpu_layers = server["gpu_layers"]
    if gpu_layers >= 0:
        return str(gpu_layers)
    if accelerator in ("cpu", "auto"):
        return "0"
    if gpu_free_bytes is None:
        return "all"
    from clawbot.common import sizing

    try:
        info = sizing.read_model_info(model_path)
    except (OSError, ValueError) as exc:
        log.warning("cannot size %s for GPU offload (%s): offloading all layers", model_path, exc)
        return "all"
    if slots is None:
        slots = resolve_parallel_slots(config, model_path, accelerator, gpu_free_bytes).slots
    fit = sizing.size_model(info, config["context_window"] * slots, slots, server["cache_type_k"],
                            server["cache_type_v"], n_ubatch=resolve_ubatch(server, accelerator),
                            flash_attn=flash_attention_flag(server["flash_attention"], accelerator) == "on")
    split = sizing.gpu_layers_that_fit(fit, gpu_free_bytes)
    return "all" if split.n_gpu_layers > info.n_layer else str(split.n_gpu_layers)


def flash_attention_flag(flash_attention: str, accelerator: str) -> str:
    """-fa: `auto` is on for CUDA (measured on an H100: faster prefill and a smaller KV working set, see
    benchmarks/results/gpu.json); elsewhere llama.cpp decides per backend."""
    if flash_attention == "auto" and accelerator == "cuda":
        return "on"
    return flash_attention


def llama_cpp_python_settings(config: dict, model_path: str, api_key: str | None = None) -> dict:
    """llama_cpp.server's config file. interrupt_requests is off: by default a new request cuts the
    running stream, which the gateway's queue already prevents but must never rely on."""
    server = config["model_server"]
    try:
        size = Path(model_path).stat().st_size
    except OSError:
        size = 0
    mode = resolve_load_mode(server["load_mode"], size)
    model = {
        "model": model_path,
        "model_alias": server["model_name"],
        "n_ctx": config["context_window"],
        "n_threads": resolve_threads(server["threads"]),
        "n_threads_batch": resolve_threads(server["threads"]),
        "n_gpu_layers": server["gpu_layers"] if server["accelerator"] != "cpu" else 0,
        "use_mmap": mode in ("mmap", "mmap+mlock"),
        "use_mlock": mode in ("mlock", "mmap+mlock"),
        "flash_attn": server["flash_attention"] == "on",
        "type_k": GGML_TYPE_IDS[server["cache_type_k"]],
        "type_v": GGML_TYPE_IDS[server["cache_type_v"]],
        "verbose": True,
    }
    if server["chat_template"]:
        model["chat_format"] = server["chat_template"]
    settings = {"host": "127.0.0.1", "port": server["port"], "interrupt_requests": False, "models": [model]}
    if api_key:
        settings["api_key"] = api_key
    return settings


def _host_free_bytes() -> int | None:
    """MemAvailable or the cgroup's headroom, whichever is lower (preflight's rule); None when unknown."""
    try:
        from clawbot.common import preflight

        return preflight.available_memory()[0] or None
    except Exception:  # noqa: BLE001 - unknown: the caller falls back to max_concurrency
        return None


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

    def __init__(self, config: dict, state_dir: Path, *, find_engine=None):
        self.config = config
        self.state_dir = Path(state_dir)
        self.status = SupervisorStatus()
        self.logs: collections.deque[str] = collections.deque(maxlen=LOG_LINES_KEPT)
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.attempt = Attempt()
        self.evidence: dict = {}
        self.command: list[str] = []
        self.serving_path: str = ""  # the model file the server was pointed at: the staged copy or the disk file
        self.slot_plan: SlotPlan | None = None  # parallel slots the running server was given, and why
        self.staging: dict = {}
        self._mounted: str | None = None  # a hugetlbfs mount this agent made itself (root only)
        self._find_engine = find_engine
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._wake = asyncio.Event()
        self._ready_event = asyncio.Event()
        self.listeners: list = []  # callables(state) for metrics
        # The model server listens on loopback TCP: a per-run API key keeps other local users from
        # bypassing the gateway (and its mTLS, limits and validation). Only the agent knows it.
        self.api_key = secrets.token_urlsafe(32)

    # -- public ---------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.config['model_server']['port']}"

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    @property
    def engine(self) -> str:
        return self.config["model_server"]["engine"]

    @property
    def ready(self) -> bool:
        return self.status.state == "ready"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process and self.process.returncode is None else None

    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="model-supervisor")

    async def stop(self) -> None:
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
        self._set_state("stopped", "agent stopping")

    async def apply(self, config: dict) -> bool:
        """Take a new config; restart the model server only if what it was started with changed."""
        old = (self.config["model_server"], self.config["context_window"])
        self.config = config
        if old == (config["model_server"], config["context_window"]):
            return False
        log.info("model_server settings changed: restarting the model server")
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
        in_use = self.serving_path or server["model_path"]
        if self.ready and self.pid:
            self.evidence = memory_evidence(self.pid, in_use)
        return {
            "state": self.status.state,
            "reason": self.status.reason,
            "since": self.status.since,
            "engine": server["engine"],
            "model_path": server["model_path"],
            "model_file_in_use": in_use,
            "model_name": server["model_name"],
            "pid": self.pid,
            "restarts": self.restarts,
            "command": self.command,
            "parallel_slots": self.slot_plan.slots if self.slot_plan else None,
            "parallel_slots_reason": self.slot_plan.reason if self.slot_plan else None,
            "load_seconds": (self.attempt.ready_at - self.attempt.started_at) if self.attempt.ready_at else None,
            "memory": self.evidence,
            "hugepages": self._hugepages_report(in_use),
            "log_tail": list(self.logs),
        }

    # -- internals ------------------------------------------------------------------------------

    def _hugepages_report(self, in_use: str) -> dict:
        """Staging as it really is: the file in use, where it lives, its pages, mlock and the fallback reason."""
        from clawbot.model import staging

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

    def _prepare_weights(self) -> str:
        """Stage the model into huge pages when the config asks for it; on any failure serve the disk file.

        Runs in a thread (copying gigabytes must not block the gateway). Returns the path to serve."""
        from clawbot.model import staging

        server = self.config["model_server"]
        path, mount = server["model_path"], server["hugepages_mount"]
        wanted, why = staging_wanted(server, path)
        self.staging = {"setting": server["hugepages"], "wanted": wanted, "why": why, "mount": mount,
                        "staged": False, "fallback_reason": None}
        if not wanted:
            staging.release(self.state_dir)  # a copy from an earlier config gives its pages back
            return path
        try:
            if self._mounted is None and staging.ensure_mount(mount):
                self._mounted = mount
            record = staging.stage(path, mount, self.state_dir, file_sha256(Path(path), self.state_dir))
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
        from clawbot.model import staging

        try:
            staging.release(self.state_dir, self._mounted)
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

    def _build_command(self) -> list[str]:
        server = self.config["model_server"]
        model_path = self.serving_path or server["model_path"]
        if server["engine"] == "llama-server":
            binary, accelerator, gpu_free = self._find_binary(server["accelerator"])
            key_file = self.state_dir / API_KEY_FILE
            _write_private(key_file, self.api_key + "\n")
            self.slot_plan = resolve_parallel_slots(self.config, model_path, accelerator, gpu_free,
                                                    host_free_bytes=_host_free_bytes(),
                                                    weights_in_host_budget=model_path == server["model_path"])
            return llama_server_command(str(binary), self.config, model_path, str(key_file),
                                        accelerator=accelerator, gpu_free_bytes=gpu_free, slots=self.slot_plan.slots)
        self.slot_plan = SlotPlan(1, "llama_cpp.server serves one request at a time")
        settings_path = self.state_dir / "llama-cpp-python.json"
        _write_private(settings_path, json.dumps(llama_cpp_python_settings(self.config, model_path, self.api_key), indent=2))
        return [sys.executable, "-m", "llama_cpp.server", "--config_file", str(settings_path)]

    def _find_binary(self, configured: str) -> tuple[str, str, int | None]:
        """The engine for the configured accelerator (`auto`: CUDA where nvidia-smi sees a GPU), falling
        back to the CPU build; returns (binary, the accelerator it was built for, free GPU bytes)."""
        from clawbot.common.preflight import query_gpus

        gpus = query_gpus() if configured in ("auto", "cuda") else ()
        accelerator = resolve_accelerator(configured, gpus)
        finder = self._find_engine
        if finder is None:
            from clawbot.model.engines.build import find_llama_server as finder
        binary = finder(accelerator)
        if binary is None and accelerator != "cpu":
            log.warning("no %s build of llama-server: falling back to the CPU build", accelerator)
            binary, accelerator = finder("cpu"), "cpu"
        if binary is None:
            raise ModelFileError("no llama-server binary found: run `clawbot build-engine` on this node")
        gpu_free = max(g.memory_free for g in gpus) if gpus and accelerator == "cuda" else None
        return str(binary), accelerator, gpu_free

    async def _run(self) -> None:
        first, longest = self.config["model_server"]["restart_backoff_s"]
        self._backoff = None
        while not self._stopping:
            first, longest = self.config["model_server"]["restart_backoff_s"]
            try:
                failure = await self._one_attempt()
            except (OSError, ValueError) as exc:  # e.g. the engine binary vanished between check and exec
                self.logs.append(f"[clawbot] cannot start the model server: {exc}")
                failure = f"failed:cannot start the model server: {exc}"
            if self._stopping:
                break
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

    async def _one_attempt(self) -> str:
        """Start, wait for readiness, wait for exit. Returns why it ended."""
        server = self.config["model_server"]
        config_seen = self.config
        self.attempt = Attempt(started_at=time.monotonic())
        self.evidence = {}
        self.serving_path = ""
        self._set_state("loading", f"checking {server['model_path']}")
        try:
            await asyncio.to_thread(check_model_file, server["model_path"], server["model_sha256"], self.state_dir)
            self._set_state("loading", f"preparing {server['model_path']} (hugepages: {server['hugepages']})")
            self.serving_path = await asyncio.to_thread(self._prepare_weights)
            self.command = self._build_command()
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
                code = await proc.wait()
                self.attempt.exit_code = code
                if self.config is not config_seen and not self._stopping:
                    return "config-changed"
                return f"model server exited with {_describe_exit(code)}"
            if proc.returncode is None:
                await self._kill()
                return f"failed:{why}"
            if self.config is not config_seen and not self._stopping:
                return "config-changed"
            return f"model server exited during load with {_describe_exit(proc.returncode)}"
        finally:
            try:
                await asyncio.wait_for(reader, 5)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                reader.cancel()

    async def _wait_ready(self, proc: asyncio.subprocess.Process, timeout: float) -> tuple[bool, str]:
        """Loaded (health 200) and able to generate (a 1-token completion answers 200)."""
        deadline = time.monotonic() + timeout
        health = "/health" if self.engine == "llama-server" else "/v1/models"
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
