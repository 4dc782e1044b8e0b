"""`clawbot preflight`: will this model run on this node, and with what settings?

Run on a node before (or instead of) a rollout. It sizes the model exactly from its GGUF header
(clawbot.common.sizing), reads what the node really has (memory, cgroup limit, huge pages, disk, GPU), runs two
short probes (memory bandwidth, model-file read speed) and checks the article's rules of thumb:

* error:   the exact need (weights + KV cache + compute buffers) exceeds available memory -> exit 1
* warning: memory < 1.2 × parameter count (the article's rule, in bytes at 8 bits per weight)
* warning: memory bandwidth < 60 GB/s (decode speed is bandwidth-bound)
* warning: storage read < 500 MB/s (load time)

The model is judged at the run plan (clawbot.model.runplan) the supervisor will start with on that node:
its slots, flash attention and ubatch. It recommends a huge-page count for staging, the largest context per
slot that fits, the slots that fit and, with an NVIDIA GPU, the layers to offload. `evaluate` is pure, so
deploy can run the same checks against facts read over SSH or a host's declared memory
(`clawbot validate --inventory`) without touching the host.

Context semantics follow clawbot.json: `context_window` is per conversation and every parallel slot gets
that many KV cells, so llama-server is started with ``-c context_window × parallel_slots``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from clawbot.common import sizing
from clawbot.common.sizing import MIB
from clawbot.model.runplan import HostFacts, RunPlan, counts_flash_attention

BANDWIDTH_MIN_GBPS = 60.0
STORAGE_MIN_MBPS = 500.0
PARAMS_RULE_FACTOR = 1.2
BANDWIDTH_PROBE_BYTES = 256 * MIB
BANDWIDTH_PROBE_SECONDS = 1.0
STORAGE_PROBE_BYTES = 512 * MIB
STORAGE_PROBE_SECONDS = 1.5
STORAGE_PROBE_MIN_BYTES = 32 * MIB  # below this a read-speed number says little: reported, not judged
UNLIMITED = 1 << 60  # cgroup "max" and RLIM_INFINITY: larger than any memory
CAP_IPC_LOCK = 14


# --- facts ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSettings:
    """The sizes the model server will run with: the run plan's (settings_from_plan), or given directly."""

    model_path: str
    context_window: int  # per slot
    parallel_slots: int
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attention: str = "auto"  # the -fa value: on|off|auto (RunPlan.flash_attention)
    n_ubatch: int = sizing.DEFAULT_UBATCH

    @property
    def n_ctx(self) -> int:
        """llama-server's -c: total KV cells for all slots."""
        return self.context_window * self.parallel_slots

    @property
    def flash_attn(self) -> bool:
        return counts_flash_attention(self.flash_attention)


@dataclass(frozen=True)
class GpuFacts:
    name: str
    memory_total: int
    memory_used: int

    @property
    def memory_free(self) -> int:
        return max(0, self.memory_total - self.memory_used)


@dataclass(frozen=True)
class NodeFacts:
    """What the node has. `memory_available` is the budget the model must fit in."""

    memory_total: int
    memory_available: int
    memory_source: str  # which limit decided memory_available
    cgroup_limit: int | None = None
    hugepages_total: int = 0
    hugepages_free: int = 0
    hugepage_bytes: int = sizing.HUGEPAGE_BYTES
    disk_free: int | None = None
    gpus: tuple[GpuFacts, ...] = ()
    usable_cores: int | None = None  # None: not read (the node counts them at start)
    memlock_limit: int | None = None  # None: not read; the agent's unit sets LimitMEMLOCK=infinity


@dataclass(frozen=True)
class ProbeResults:
    bandwidth_gbps: float | None = None
    bandwidth_seconds: float = 0.0
    storage_mbps: float | None = None
    storage_bytes_read: int = 0
    storage_seconds: float = 0.0


@dataclass(frozen=True)
class Finding:
    level: str  # "error" | "warning" | "info"
    code: str
    message: str


@dataclass
class PreflightReport:
    settings: RunSettings
    fit: sizing.MemoryFit
    node: NodeFacts
    probes: ProbeResults
    findings: list[Finding] = field(default_factory=list)
    recommendations: dict[str, object] = field(default_factory=dict)
    plan: RunPlan | None = None  # the plan the settings come from (None: settings given directly)

    @property
    def fits(self) -> bool:
        return not any(f.level == "error" for f in self.findings)

    def to_json(self) -> dict:
        fit = self.fit
        info = fit.model
        return {
            "fits": self.fits,
            "model": {
                "path": info.path, "name": info.name, "architecture": info.architecture,
                "file_bytes": info.file_bytes, "n_params": info.n_params, "n_layer": info.n_layer,
                "n_embd": info.n_embd, "n_head": info.n_head, "n_head_kv": info.n_head_kv,
                "n_ctx_train": info.n_ctx_train, "n_vocab": info.n_vocab,
            },
            "settings": {**asdict(self.settings), "n_ctx": self.settings.n_ctx},
            "need": {
                "total_bytes": fit.total_bytes, "weights_bytes": fit.weights_bytes, "kv_bytes": fit.kv_bytes,
                "compute_bytes": fit.compute_bytes, "output_bytes": fit.output_bytes,
                "kv_cells": fit.kv.cells_total, "kv_cells_per_slot": fit.kv.cells_per_slot,
            },
            "node": {**asdict(self.node), "gpus": [asdict(g) for g in self.node.gpus]},
            "probes": asdict(self.probes),
            "findings": [asdict(f) for f in self.findings],
            "recommendations": self.recommendations,
            "plan": self.plan.to_json() if self.plan else None,
        }


# --- reading the node ----------------------------------------------------------------------------------
# The one node-local reader of /proc/meminfo, cgroup limits, GPU memory, cores and the memlock limit: `clawbot
# preflight`, the supervisor (read_node -> host_facts -> the run plan) and huge-page staging all read here
# (the engine build asks nvidia-smi for compute capabilities only: build.detect_cuda_arch).


def parse_meminfo(lines) -> dict[str, int]:
    """/proc/meminfo lines as bytes (`kB` values times 1024; HugePages_* stay counts); other lines are skipped.
    The one parser: this node's file (read_meminfo) and a node's read over SSH (control.facts.NodeMemory)."""
    values: dict[str, int] = {}
    for line in lines:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    return values


def read_meminfo(path: str = "/proc/meminfo") -> dict[str, int]:
    """/proc/meminfo as bytes (HugePages_* stay counts)."""
    with open(path) as handle:
        return parse_meminfo(handle)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return UNLIMITED
    try:
        return int(text)
    except ValueError:
        return None


def cgroup_memory(root: Path = Path("/sys/fs/cgroup"),
                  proc_cgroup: Path = Path("/proc/self/cgroup")) -> tuple[int | None, int | None]:
    """(limit, reclaim-adjusted usage) of this process's memory cgroup, v2 or v1; None where unlimited/unknown."""
    v2_path = v1_path = ""
    try:
        for line in proc_cgroup.read_text().splitlines():
            hierarchy, controllers, path = line.split(":", 2)
            if hierarchy == "0" and controllers == "":
                v2_path = path.lstrip("/")
            elif "memory" in controllers.split(","):
                v1_path = path.lstrip("/")
    except OSError:
        pass
    candidates = [
        (root / v2_path, "memory.max", "memory.current", "inactive_file"),
        (root, "memory.max", "memory.current", "inactive_file"),
        (root / "memory" / v1_path, "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
        (root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
    ]
    for directory, limit_name, usage_name, reclaimable_key in candidates:
        limit = _read_int(directory / limit_name)
        if limit is None:
            continue
        if limit >= UNLIMITED:
            return None, None
        usage = _read_int(directory / usage_name) or 0
        reclaimable = 0
        try:
            for line in (directory / "memory.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == reclaimable_key:
                    reclaimable = int(value)
        except (OSError, ValueError):
            pass
        return limit, max(0, usage - reclaimable)
    return None, None


# what parse_gpus reads; the same query runs here (query_gpus) and over SSH (control.facts.NodeMemory)
GPU_QUERY = ("nvidia-smi", "--query-gpu=name,memory.total,memory.used", "--format=csv,noheader,nounits")


def query_gpus(timeout_s: float = 3.0) -> tuple[GpuFacts, ...]:
    """NVIDIA GPUs via nvidia-smi (none when it is absent or fails)."""
    if not shutil.which("nvidia-smi"):
        return ()
    try:
        out = subprocess.run(
            list(GPU_QUERY),
            capture_output=True, text=True, timeout=timeout_s, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return parse_gpus(out)


def parse_gpus(out: str) -> tuple[GpuFacts, ...]:
    """The output of GPU_QUERY → GpuFacts."""
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            try:
                gpus.append(GpuFacts(parts[0], int(float(parts[1])) * MIB, int(float(parts[2])) * MIB))
            except ValueError:
                continue
    return tuple(gpus)


def _existing_parent(path: Path) -> Path:
    for candidate in [path, *path.parents]:
        if candidate.exists():
            return candidate
    return Path("/")


def available_memory(memory_limit: int | None, meminfo: dict[str, int]) -> tuple[int, str, int | None]:
    """(bytes, where that figure comes from, the cgroup limit): MemAvailable, the cgroup's headroom and
    memory_limit, the lowest wins."""
    available = meminfo.get("MemAvailable", meminfo.get("MemFree", 0))
    source = "MemAvailable"
    limit, usage = cgroup_memory()
    if limit is not None and limit - (usage or 0) < available:
        available, source = max(0, limit - (usage or 0)), "cgroup memory limit"
    if memory_limit is not None and memory_limit < available:
        available, source = memory_limit, "--memory-limit"
    return available, source, limit


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which systemd's CPUAffinity= narrows)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _capabilities_effective() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def memlock_limit() -> int:
    """Bytes this process may pin with mlock: UNLIMITED with CAP_IPC_LOCK or RLIMIT_MEMLOCK infinity."""
    if _capabilities_effective() & (1 << CAP_IPC_LOCK):
        return UNLIMITED
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return UNLIMITED if soft == resource.RLIM_INFINITY else soft


def read_node(model_path: str, memory_limit: int | None = None, gpus: bool = True) -> NodeFacts:
    """This node, read locally: the memory budget (MemAvailable, cgroup headroom, --memory-limit: the lowest
    wins), huge pages, disk, GPUs (gpus=False: not asked, none), usable cores and the memlock limit."""
    meminfo = read_meminfo()
    available, source, limit = available_memory(memory_limit, meminfo)
    disk = shutil.disk_usage(_existing_parent(Path(model_path)))
    return NodeFacts(
        memory_total=meminfo.get("MemTotal", 0), memory_available=available, memory_source=source,
        cgroup_limit=limit, hugepages_total=meminfo.get("HugePages_Total", 0),
        hugepages_free=meminfo.get("HugePages_Free", 0),
        hugepage_bytes=meminfo.get("Hugepagesize", sizing.HUGEPAGE_BYTES), disk_free=disk.free,
        gpus=query_gpus() if gpus else (), usable_cores=usable_cores(), memlock_limit=memlock_limit())


def host_facts(node: NodeFacts, engine_builds: frozenset[str] | None = None) -> HostFacts:
    """The run plan's view of a node, read locally (read_node) or over SSH (clawbot.control.facts.NodeMemory):
    the one conversion, so deploy and the supervisor plan from the same kind of facts."""
    return HostFacts(gpus=node.gpus, host_free_bytes=node.memory_available or None, usable_cores=node.usable_cores,
                     memlock_limit=UNLIMITED if node.memlock_limit is None else node.memlock_limit,
                     engine_builds=engine_builds)


# --- probes --------------------------------------------------------------------------------------------


def probe_memory_bandwidth(buffer_bytes: int = BANDWIDTH_PROBE_BYTES,
                           budget_s: float = BANDWIDTH_PROBE_SECONDS) -> tuple[float, float]:
    """Best numpy copy rate in GB/s (read + write bytes, as STREAM counts copy), within a time budget.

    First touch of fresh memory can be very slow on a VM (seconds for 512 MiB here), so both buffers are
    faulted in 16 MiB steps under a deadline and the copy uses what was ready (never less than 32 MiB,
    far beyond any last-level cache).
    """
    import numpy as np

    started = time.perf_counter()
    setup_deadline = started + budget_s * 0.6
    step = 16 * MIB // 8
    minimum = 32 * MIB // 8
    source = np.empty(buffer_bytes // 8, dtype=np.float64)
    target = np.empty_like(source)
    ready = 0
    while ready < len(source) and (ready < minimum or time.perf_counter() < setup_deadline):
        source[ready:ready + step] = 1.0
        target[ready:ready + step] = source[ready:ready + step]
        ready += step
    source, target = source[:ready], target[:ready]
    best = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - started + best > budget_s:
            break
    return 2 * source.nbytes / best / 1e9, time.perf_counter() - started


def probe_storage_read(path: str, max_bytes: int = STORAGE_PROBE_BYTES,
                       budget_s: float = STORAGE_PROBE_SECONDS, chunk_bytes: int = 4 * MIB) -> tuple[float, int, float]:
    """Sequential read rate of the model file in MB/s after asking the kernel to drop its cached pages.

    POSIX_FADV_DONTNEED drops clean, unmapped page-cache pages only; pages a running server has mapped,
    or pages not yet written back, stay cached and make the number optimistic.
    """
    started = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        buffer = bytearray(chunk_bytes)
        view = memoryview(buffer)
        total = 0
        t0 = time.perf_counter()
        while total < max_bytes and time.perf_counter() - t0 < budget_s:
            got = os.readv(fd, [view])
            if got <= 0:
                break
            total += got
        elapsed = time.perf_counter() - t0
        os.posix_fadvise(fd, 0, total, os.POSIX_FADV_DONTNEED)  # don't leave the probe's reads cached
    finally:
        os.close(fd)
    return total / max(elapsed, 1e-9) / 1e6, total, time.perf_counter() - started


def run_probes(model_path: str) -> ProbeResults:
    bandwidth, bandwidth_s = probe_memory_bandwidth()
    storage, read_bytes, storage_s = probe_storage_read(model_path)
    return ProbeResults(bandwidth_gbps=bandwidth, bandwidth_seconds=bandwidth_s, storage_mbps=storage,
                        storage_bytes_read=read_bytes, storage_seconds=storage_s)


# --- the checks (pure) ---------------------------------------------------------------------------------


def evaluate(info: sizing.ModelInfo, settings: RunSettings, node: NodeFacts,
             probes: ProbeResults | None = None, split: sizing.LayerSplit | None = None) -> PreflightReport:
    """All checks and recommendations from facts alone: no I/O, so deploy can use declared memory.

    + split: the run plan's cut of the model over this node and its RPC workers (model_server.split): each node
      must hold its share, and an error names the nodes that cannot, with the bytes"""
    probes = probes or ProbeResults()
    fit = sizing.size_model(info, settings.n_ctx, settings.parallel_slots, settings.cache_type_k,
                            settings.cache_type_v, n_ubatch=settings.n_ubatch, flash_attn=settings.flash_attn)
    report = PreflightReport(settings=settings, fit=fit, node=node, probes=probes)
    add = report.findings.append
    have = node.memory_available

    if split is None:
        verdict = sizing.check_fit(fit, have)
        add(Finding("info" if verdict.fits else "error", "memory_fit", verdict.message))
    else:
        _split_findings(split, fit, add)
        have = sum(share.available_bytes or 0 for share in split.shares)

    rule_bytes = int(info.n_params * PARAMS_RULE_FACTOR)
    if have < rule_bytes:
        add(Finding("warning", "memory_rule",
                    f"rule of thumb: memory >= {PARAMS_RULE_FACTOR} x parameters = {sizing.gib(rule_bytes)} "
                    f"for {info.n_params / 1e9:.2f} B parameters; {sizing.gib(have)} is available"))
    if probes.bandwidth_gbps is not None and probes.bandwidth_gbps < BANDWIDTH_MIN_GBPS:
        add(Finding("warning", "memory_bandwidth",
                    f"memory bandwidth {probes.bandwidth_gbps:.1f} GB/s is below {BANDWIDTH_MIN_GBPS:.0f} GB/s: "
                    "decode will be slow (each token reads every weight once)"))
    if probes.storage_mbps is not None:
        if probes.storage_bytes_read < STORAGE_PROBE_MIN_BYTES:
            add(Finding("info", "storage_speed",
                        f"model file read at {probes.storage_mbps:.0f} MB/s, but only "
                        f"{probes.storage_bytes_read / MIB:.0f} MiB could be read: too little to judge"))
        elif probes.storage_mbps < STORAGE_MIN_MBPS:
            add(Finding("warning", "storage_speed",
                        f"model file read at {probes.storage_mbps:.0f} MB/s, below {STORAGE_MIN_MBPS:.0f} MB/s: "
                        "loading and restarts will be slow"))
    if settings.context_window > info.n_ctx_train:
        add(Finding("warning", "context_over_training",
                    f"context_window {settings.context_window} exceeds the model's training context "
                    f"{info.n_ctx_train}: quality degrades past it"))
    if settings.cache_type_v not in ("f16", "f32", "bf16") and not settings.flash_attn:
        add(Finding("error", "quantized_v_needs_fa",
                    f"a quantized V cache ({settings.cache_type_v}) needs flash attention, but it is off"))
    if node.disk_free is not None and node.disk_free < info.file_bytes:
        add(Finding("warning", "disk_free",
                    f"only {sizing.gib(node.disk_free)} free on the model's filesystem: a second copy of "
                    f"the model ({sizing.gib(info.file_bytes)}) for an update will not fit"))

    if split is not None:
        report.recommendations = {"split": {share.name: f"{share.layers}{' + output head' if share.output else ''}"
                                            for share in split.shares},
                                  "gpu_layers": split.gpu_layers, "tensor_split": list(split.tensor_split),
                                  "llama_server_ctx": settings.n_ctx}
        return report

    # the largest context per slot that fits, at the configured slot count
    weights_kv_budget = have
    context_cap = sizing.max_context_per_slot(info, weights_kv_budget, settings.parallel_slots,
                                              settings.cache_type_k, settings.cache_type_v,
                                              n_ubatch=settings.n_ubatch, flash_attn=settings.flash_attn)
    recommendations: dict[str, object] = {
        "hugepages": fit.hugepages,
        "hugepages_sysctl": f"vm.nr_hugepages={fit.hugepages}",
        "context_window_max": context_cap,
        "parallel_slots_max": sizing.max_parallel_slots(info, settings.context_window, have, 16,
                                                        settings.cache_type_k, settings.cache_type_v,
                                                        n_ubatch=settings.n_ubatch, flash_attn=settings.flash_attn),
        "llama_server_ctx": settings.n_ctx,
    }
    if node.hugepages_total and node.hugepages_free < fit.hugepages - sizing.hugepages_headroom(fit.hugepages):
        add(Finding("info", "hugepages",
                    f"{node.hugepages_free} huge pages free, staging needs "
                    f"{fit.hugepages - sizing.hugepages_headroom(fit.hugepages)}: the server will use the disk file"))
    if node.gpus:
        gpu = max(node.gpus, key=lambda g: g.memory_free)
        split = sizing.gpu_layers_that_fit(fit, gpu.memory_free)
        recommendations["gpu_layers"] = split.n_gpu_layers
        recommendations["gpu_bytes"] = split.gpu_bytes
        recommendations["gpu"] = gpu.name
    report.recommendations = recommendations
    return report


def _split_findings(split: sizing.LayerSplit, fit: sizing.MemoryFit, add) -> None:
    """model_server.split: one finding per node with its share, and an error naming the nodes that cannot hold it."""
    unknown = [share.name for share in split.shares if share.available_bytes is None]
    if split.fits:
        add(Finding("info", "memory_fit", f"model needs {fit.describe()}, split over {len(split.shares)} nodes: "
                                          f"{split.describe()}"))
    else:
        add(Finding("error", "memory_fit", split.refusal()))
    if unknown:
        add(Finding("warning", "split_memory_unknown",
                    f"the memory of {', '.join(unknown)} is unknown: its share was not checked (deploy measures it; "
                    "model_server.split.workers[].memory_mib, or the agent asks the worker when it starts)"))


# --- output --------------------------------------------------------------------------------------------


def render_text(report: PreflightReport) -> str:
    fit, info, node, probes = report.fit, report.fit.model, report.node, report.probes
    s = report.settings
    rows = [
        ("model", f"{info.path} ({info.name}, {info.architecture}, {info.n_params / 1e9:.2f} B params, "
                  f"{info.n_layer} layers)"),
        ("settings", f"context {s.context_window}/slot x {s.parallel_slots} slots (-c {s.n_ctx}), "
                     f"cache {s.cache_type_k}/{s.cache_type_v}, flash attention {s.flash_attention}"),
        ("weights", sizing.gib(fit.weights_bytes)),
        ("KV cache", f"{sizing.gib(fit.kv_bytes)} ({fit.kv.cells_total} cells, {fit.kv.cells_per_slot}/slot)"),
        ("compute", sizing.gib(fit.compute_bytes + fit.output_bytes)),
        ("need", sizing.gib(fit.total_bytes)),
        ("have", f"{sizing.gib(node.memory_available)} ({node.memory_source}; total {sizing.gib(node.memory_total)})"),
        ("huge pages", f"{node.hugepages_free}/{node.hugepages_total} free x {node.hugepage_bytes // 1024} KiB"),
        ("disk free", sizing.gib(node.disk_free) if node.disk_free is not None else "unknown"),
    ]
    if probes.bandwidth_gbps is not None:
        rows.append(("bandwidth", f"{probes.bandwidth_gbps:.1f} GB/s (numpy copy)"))
    if probes.storage_mbps is not None:
        rows.append(("storage", f"{probes.storage_mbps:.0f} MB/s ({probes.storage_bytes_read / MIB:.0f} MiB read)"))
    for gpu in node.gpus:
        rows.append(("gpu", f"{gpu.name}: {sizing.gib(gpu.memory_free)} free of {sizing.gib(gpu.memory_total)}"))
    split = report.plan.split.value if report.plan else None
    for share in split.shares if split else ():
        rows.append(("split", share.describe()))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    lines.append("")
    for finding in report.findings:
        lines.append(f"{finding.level.upper():7s} {finding.message}")
    lines.append("")
    if report.plan:
        lines.append("run plan:")
        for name, decision in report.plan.to_json().items():
            value = decision["value"]
            if isinstance(value, dict) and "tensor_split" in value:  # the split: its rows are above
                value = f"-ngl {value['gpu_layers']} -ts {','.join(map(str, value['tensor_split']))}"
            lines.append(f"  {name} = {value} ({decision['reason']})")
        lines.append("")
    lines.append("recommended:")
    for key, value in report.recommendations.items():
        lines.append(f"  {key} = {value}")
    lines.append("")
    lines.append("RESULT: " + ("fits" if report.fits else "does NOT fit"))
    return "\n".join(lines)


# --- CLI -----------------------------------------------------------------------------------------------


def parse_bytes(text: str) -> int:
    """'8589934592', '8G', '512MiB', '1.5GiB' -> bytes (K/M/G/T are binary, as memory sizes are)."""
    units = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    cleaned = text.strip().lower().removesuffix("ib").removesuffix("b")
    number = cleaned.rstrip("kmgt")
    unit = cleaned[len(number):]
    try:
        return int(float(number) * units[unit])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 8589934592, 8G, 512MiB)") from None


def config_from(args: argparse.Namespace) -> dict:
    """clawbot.json (checked, defaults filled in; the schema's defaults without --config) overridden by flags."""
    from clawbot.common import config as config_module

    config = config_module.load_config(args.config) if args.config else config_module.defaults()
    if args.context is not None:
        config["context_window"] = args.context
    flags = {"parallel_slots": args.parallel, "model_path": args.model,
             "cache_type_k": args.cache_type_k or args.cache_type, "cache_type_v": args.cache_type_v or args.cache_type,
             "flash_attention": args.flash_attention}
    config["model_server"].update({k: v for k, v in flags.items() if v is not None})
    return config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="clawbot.json to read context_window and model_server settings from")
    parser.add_argument("--model", help="GGUF file (default: model_server.model_path)")
    parser.add_argument("--context", type=int, help="context window per slot, tokens (default: context_window)")
    parser.add_argument("--parallel", type=int, help="parallel slots (default: model_server.parallel_slots)")
    parser.add_argument("--cache-type", choices=sorted(sizing.CACHE_TYPES), help="K and V cache type")
    parser.add_argument("--cache-type-k", choices=sorted(sizing.CACHE_TYPES), help="K cache type")
    parser.add_argument("--cache-type-v", choices=sorted(sizing.CACHE_TYPES), help="V cache type")
    parser.add_argument("--flash-attention", choices=["auto", "on", "off"], help="as model_server.flash_attention")
    parser.add_argument("--memory-limit", type=parse_bytes, help="cap available memory at this many bytes (8G, 512MiB)")
    parser.add_argument("--no-probes", action="store_true", help="skip the bandwidth and storage probes")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if (args.context is not None and args.context < 1) or (args.parallel is not None and args.parallel < 1):
        print("clawbot preflight: --context and --parallel must be >= 1", file=sys.stderr)
        return 2
    try:
        config = config_from(args)
    except Exception as exc:  # a bad config: say why, exit 2 like `clawbot validate`
        print(f"clawbot preflight: cannot read config: {exc}", file=sys.stderr)
        return 2
    model_path = config["model_server"]["model_path"]
    if not os.path.isfile(model_path):
        print(f"clawbot preflight: model file not found: {model_path}", file=sys.stderr)
        return 2
    try:
        info = sizing.read_model_info(model_path)
    except (ValueError, OSError) as exc:
        print(f"clawbot preflight: cannot read {model_path}: {exc}", file=sys.stderr)
        return 2
    node = read_node(model_path, args.memory_limit)
    probes = ProbeResults() if args.no_probes else run_probes(model_path)
    report = check_config(info, config, node, probes)
    elapsed = time.perf_counter() - started
    if args.json:
        print(json.dumps({**report.to_json(), "elapsed_s": round(elapsed, 3)}, indent=2))
    else:
        print(render_text(report))
        print(f"(preflight took {elapsed:.2f} s)")
    if not report.fits:
        for finding in report.findings:
            if finding.level == "error":
                print(f"clawbot preflight: {finding.message}", file=sys.stderr)
        return 1
    return 0


def settings_from_plan(plan: RunPlan, config: dict) -> RunSettings:
    """The sizes a run plan gives the model server, for evaluate."""
    server = config["model_server"]
    return RunSettings(model_path=server["model_path"], context_window=config["context_window"],
                       parallel_slots=plan.slots.value, cache_type_k=server["cache_type_k"],
                       cache_type_v=server["cache_type_v"], flash_attention=plan.flash_attention.value,
                       n_ubatch=plan.ubatch.value)


def check_config(info: sizing.ModelInfo, config: dict, node: NodeFacts,
                 probes: ProbeResults | None = None, name: str = "this node") -> PreflightReport:
    """Preflight for a checked clawbot.json on a node described by `node` (deploy reads it over SSH): judged
    at the run plan the supervisor will start with on that node (with model_server.split: its share, and each RPC
    worker's at the memory its entry declares). `name` is how findings name the node."""
    plan = RunPlan.resolve(config, replace(host_facts(node), node_name=name), info)
    report = evaluate(info, settings_from_plan(plan, config), node, probes, split=plan.split.value)
    report.plan = plan
    report.findings.append(Finding("info", "parallel_slots", f"parallel_slots {plan.slots.value}: {plan.slots.reason}"))
    return report


def declared_fit(info: sizing.ModelInfo, config: dict, memory_mib: int, name: str = "this node",
                 workers: list[tuple[str, int]] | None = None) -> PreflightReport:
    """The static check `clawbot validate --inventory` runs: a host's declared memory instead of a probe.

    + workers: with a split, each RPC worker's (name, declared clawbot_memory_mib), in layer order"""
    memory = memory_mib * 1024 * 1024
    node = NodeFacts(memory_total=memory, memory_available=memory, memory_source="clawbot_memory_mib (declared)")
    if workers:
        config = copy.deepcopy(config)
        config["model_server"]["split"]["workers"] = [
            {"name": worker, "port": config["model_server"]["split"]["local_port"] + index, "memory_mib": mib}
            for index, (worker, mib) in enumerate(workers)]
    return check_config(info, config, node, name=name)
