"""Staged model swap: a changed model (or model_server setting) is started beside the serving one, must load,
generate and pass the quality gate, and only then does the gateway send new requests to it; requests already
sent finish on the old server, which then stops. Users see no outage and never a model that failed the gate.

One decision per change (`plan_change`): nothing to do, a swap, or a restart as before (the old server is not
serving, the model is split over RPC workers, or both would not fit in memory at once: `fits_beside` says so and
how long the model will be down, from the last load). The gate (`run_gate`) is clawbot eval's: the smoke set
against the new server, and the distribution check of the new file against the file the old server loaded
(deploy keeps it as MODEL.previous when it puts a new file at model_path; `quality_gate.compare_on_swap: false`
for a model of another family). A rejected model leaves the old one serving; the verdict is kept in the state
directory (swap.json), so an agent restarted later serves the kept model again instead of the rejected one, and
a reload (deploy's re-run) tries the swap again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from clawbot.common import preflight, sizing
from clawbot.model import rpc
from clawbot.model.runplan import uses_nvidia_gpus
from clawbot.model.supervisor import Supervisor, file_identity, model_mappings

log = logging.getLogger("clawbot.model.swap")

RECORD_FILE = "swap.json"
SECOND_DIR = "next"  # the state directory of the server started beside the one in the agent's state directory
PREVIOUS_SUFFIX = ".previous"  # deploy's name for the file the serving model was loaded from (a hard link)
ACTIVE_STATES = ("checking-fit", "loading", "gating", "switching", "draining")


def previous_path(model_path: str) -> str:
    return model_path + PREVIOUS_SUFFIX


@dataclass(frozen=True)
class Change:
    """What a reloaded config asks of the model server: `none`, `swap` or `restart`, and why."""

    mode: str
    reason: str
    model_changed: bool = False  # the file at model_path is not the one the serving server loaded


def plan_change(serving: Supervisor, new_config: dict) -> Change:
    old = serving.config
    new_server = new_config["model_server"]
    settings_same = (old["model_server"], old["context_window"]) == (new_server, new_config["context_window"])
    identity = file_identity(new_server["model_path"])
    model_changed = serving.model_file != new_server["model_path"] or (
        identity is not None and serving.identity is not None and identity != serving.identity)
    if settings_same and not model_changed:
        return Change("none", "model_server unchanged")
    what = "the model file changed" if model_changed else "model_server settings changed"
    if not serving.ready:
        return Change("restart", f"{what}; the model server is not serving ({serving.status.state}), so it "
                                 "restarts with the new settings", model_changed)
    if rpc.workers_of(old) or rpc.workers_of(new_config):
        return Change("restart", f"{what}; a model split over RPC workers restarts (each worker holds one copy)",
                      model_changed)
    return Change("swap", what, model_changed)


@dataclass(frozen=True)
class Fit:
    fits: bool
    reason: str


def reclaimable_bytes(serving: Supervisor) -> int:
    """Memory the serving model's file holds in the page cache: MemAvailable counts it as free, but the old
    server needs it until it stops (mlocked pages and huge pages are not counted there)."""
    if not serving.pid:
        return 0
    evidence = serving.evidence or {}
    if evidence.get("mlock_effective") or evidence.get("model_on_hugetlbfs"):
        return 0
    return sum(m.get("Rss", 0) for m in model_mappings(serving.pid, serving.serving_path or serving.model_file)) * 1024


def fits_beside(serving: Supervisor, new_config: dict) -> Fit:
    """Preflight of the new model on this node as it is now, the serving model still loaded."""
    server = new_config["model_server"]
    try:
        info = sizing.read_model_info(server["model_path"])
    except (OSError, ValueError) as exc:
        return Fit(True, f"cannot size {server['model_path']} ({exc}): starting it beside the serving model")
    node = preflight.read_node(server["model_path"], gpus=uses_nvidia_gpus(server["accelerator"]))
    held = reclaimable_bytes(serving)
    node = replace(node, memory_available=max(0, node.memory_available - held))
    report = preflight.check_config(info, new_config, node)
    fit = next((f.message for f in report.findings if f.code == "memory_fit"), "")
    beside = f" beside the serving model (its file holds {sizing.gib(held)} of page cache)" if held else \
        " beside the serving model"
    if report.fits:
        return Fit(True, f"fits{beside}: {fit}")
    errors = "; ".join(f.message for f in report.findings if f.level == "error")
    return Fit(False, f"does not fit{beside}: {errors}")


def free_port(preferred: int) -> int:
    """`preferred` when nothing listens on it on loopback, else a port the kernel picks."""
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return probe.getsockname()[1]
    raise OSError("no free loopback port for the second model server")


def reference_file(serving: Supervisor, new_path: str) -> str:
    """The file the serving model was loaded from, if it is still on disk under a name: model_path itself (not
    replaced) or deploy's MODEL.previous (a hard link to it). "" when neither is that file any more."""
    for path in (serving.model_file, previous_path(new_path), previous_path(serving.model_file)):
        if serving.identity is not None and file_identity(path) == serving.identity:
            return path
    return ""


def run_gate(candidate: Supervisor, reference: str, thresholds: dict, *, smoke_set=None, work_dir=None) -> dict:
    """clawbot eval's checks on the new server (runs in a thread): the smoke set, then the distribution against
    `reference` ("" skips it). Returns {"passed", "checks", "smoke", "distribution", "notes", "summary"}."""
    from clawbot.tools import evaluate

    notes: list[str] = []
    server = candidate.config["model_server"]
    smoke = evaluate.smoke(candidate.base_url, smoke_set, api_key=candidate.api_key, model=server["model_name"],
                           context=candidate.config["context_window"])
    distribution = None
    if not thresholds.get("compare_on_swap", True):
        notes.append("distribution check off (quality_gate.compare_on_swap: false)")
    elif not reference:
        notes.append("distribution check skipped: the serving model's file is no longer on disk (deploy keeps it "
                     f"as {Path(server['model_path']).name}{PREVIOUS_SUFFIX})")
    else:
        try:
            distribution = evaluate.distribution_check(candidate.model_file, reference, work_dir=work_dir)
        except evaluate.EvalError as exc:
            notes.append(f"distribution check could not run: {exc}")
    checks = evaluate.gate_checks(thresholds, smoke, distribution)
    passed = all(c.passed for c in checks)
    summary = evaluate.failed_summary(checks) if not passed else "; ".join(
        f"{c.name} {evaluate._fmt(c.threshold, c.value)}" for c in checks)
    return {"passed": passed, "checks": [asdict(c) for c in checks], "summary": summary, "notes": notes,
            "smoke": {"passed": smoke["passed"], "total": smoke["total"], "pass_rate": smoke["pass_rate"],
                      "failed": [r["id"] for r in smoke["results"] if not r["passed"]]},
            "distribution": asdict(distribution) if distribution is not None else None}


def load_record(state_dir: Path) -> dict | None:
    try:
        record = json.loads((Path(state_dir) / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "state" in record else None


def kept_model(state_dir: Path, config: dict) -> tuple[str, dict]:
    """At agent start: (the file to serve instead of model_path, the config to serve it with) when the last swap
    rejected the file that is there now and the model it kept is still on disk (MODEL.previous); else ("", config).
    The kept model keeps the name it served under."""
    record = load_record(state_dir) or {}
    path = config["model_server"]["model_path"]
    if record.get("state") != "failed" or not record.get("kept_identity"):
        return "", config
    if list(file_identity(path) or ()) != record.get("rejected_identity"):
        return "", config  # another file is there now: serve it (a reload gates the next change)
    kept = previous_path(path)
    if list(file_identity(kept) or ()) != record["kept_identity"]:
        return "", config
    log.warning("model_path %s holds the model the quality gate rejected (%s); serving the kept model %s, then "
                "trying the swap again", path, record.get("reason", ""), kept)
    name = (record.get("from") or {}).get("model_name") or config["model_server"]["model_name"]
    return kept, {**config, "model_server": {**config["model_server"], "model_name": name}}


async def _loaded(candidate: Supervisor, timeout_s: float) -> bool:
    """True once the new server is ready; False as soon as its first attempt fails (a swap does not retry a
    model that cannot load: the old one keeps serving) or timeout_s passed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if candidate.ready:
            return True
        if candidate.status.state in ("failed", "restarting"):
            return False
        await asyncio.sleep(0.1)
    return False


def _model(supervisor: Supervisor) -> dict:
    server = supervisor.config["model_server"]
    return {"model_name": server["model_name"], "model_file": supervisor.model_file, "port": supervisor.port}


class Swapper:
    """Carries out model changes for the agent (ModelNode.reload) and reports them (/status `swap`)."""

    def __init__(self, gateway, state_dir: Path, *, make_supervisor=Supervisor, gate=run_gate):
        self.gateway = gateway
        self.state_dir = Path(state_dir)
        self._make = make_supervisor
        self._gate = gate
        self.record: dict = load_record(self.state_dir) or {"state": "idle"}
        self._task: asyncio.Task | None = None
        self._candidate: Supervisor | None = None

    # -- a reloaded config ------------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    async def apply(self, new_config: dict) -> Change:
        """Take a reloaded config: swap, restart or nothing. A swap runs in the background."""
        await self.cancel()
        serving = self.gateway.supervisor
        change = plan_change(serving, new_config)
        if change.mode == "none":
            await serving.apply(new_config)  # a copy of the same settings: keeps the config object current
            return change
        if change.mode == "restart":
            self._set("restarting", change.reason, to={"model_name": new_config["model_server"]["model_name"],
                                                       "model_file": new_config["model_server"]["model_path"]})
            serving.model_file_override = None
            await serving.apply(new_config, force=change.model_changed)
            return change
        self._task = asyncio.create_task(self._swap(serving, new_config, change), name="model-swap")
        return change

    async def cancel(self) -> None:
        """A newer config while a swap runs: stop the server being started (the serving one stays)."""
        if self.busy:
            assert self._task is not None
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._candidate is not None:
            await self._candidate.stop()
            self._candidate = None

    def report(self) -> dict:
        return dict(self.record)

    def summary(self) -> dict:
        """State, reason and times: what /readyz shows (the whole record with the gate's numbers is in /status)."""
        return {k: v for k, v in self.record.items() if k in ("state", "reason", "since", "started_at",
                                                              "finished_at", "switched_at")}

    # -- the swap ---------------------------------------------------------------------------------------------

    async def _swap(self, serving: Supervisor, new_config: dict, change: Change) -> None:
        started = time.time()
        server = new_config["model_server"]
        to = {"model_name": server["model_name"], "model_file": server["model_path"]}
        base = {"started_at": started, "from": _model(serving), "to": to, "why": change.reason}
        try:
            self._set("checking-fit", "checking the new model fits beside the serving one", **base)
            fit = await asyncio.to_thread(fits_beside, serving, new_config)
            base["fit"] = fit.reason
            if not fit.fits:
                down = serving.attempt.ready_at - serving.attempt.started_at if serving.attempt.ready_at else None
                estimate = f"about {down:.0f} s (the last load took that long)" if down else "until the new one loads"
                self._set("restarting", f"the new model {fit.reason}: restarting instead; the model is down for "
                                        f"{estimate}", down_estimate_s=down, **base)
                log.warning("model swap: %s", self.record["reason"])
                serving.model_file_override = None
                await serving.apply(new_config, force=True)
                return
            # the second server: the other state directory (its own API key, staged copy, caches), a free port
            second_dir = self.state_dir if serving.state_dir != self.state_dir else self.state_dir / SECOND_DIR
            second_dir.mkdir(parents=True, exist_ok=True)
            port = await asyncio.to_thread(free_port, serving.port + 1 if serving.port == server["port"]
                                           else server["port"])
            candidate = self._make(new_config, second_dir, port=port if port != server["port"] else None)
            candidate.keep_staged = (serving.serving_path,)
            self._candidate = candidate
            to["port"] = candidate.port
            self._set("loading", f"starting the new model server on port {candidate.port} beside the serving one "
                                 f"({fit.reason})", **base)
            log.info("model swap: %s", self.record["reason"])
            candidate.start()
            ready = await _loaded(candidate, server["startup_timeout_s"] + 5)
            if not ready:
                reason = f"the new model server did not become ready: {candidate.status.state}: " \
                         f"{candidate.status.reason}"
                await self._reject(candidate, serving, reason, base, log_tail=list(candidate.logs)[-10:])
                return
            if change.model_changed:
                self._set("gating", "the new model answers; running the quality gate (smoke set, distribution)",
                          **base)
                reference = reference_file(serving, server["model_path"])
                verdict = await asyncio.to_thread(self._gate, candidate, reference, new_config["quality_gate"],
                                                  work_dir=str(self.state_dir))
                base.update(gate=verdict, reference=reference)
                if not verdict["passed"]:
                    await self._reject(candidate, serving, f"quality gate failed: {verdict['summary']}", base)
                    return
                passed = f"quality gate passed ({verdict['summary']})"
            else:  # the same model file under new settings: loading and generating is the check
                passed = "the same model file with new settings loads and generates"
            self._set("switching", f"{passed}; switching the gateway", **base)
            old, old_client = self.gateway.switch(candidate)
            self._candidate = None
            # the mount the old server made (root only) now holds the new server's copy: the new one owns it
            candidate._mounted, old._mounted = old._mounted, None
            old.keep_staged = (candidate.serving_path,)
            timeout = new_config["model_gateway"]["request_timeout_s"]
            self._set("draining", f"serving the new model; waiting for {self.gateway.unfinished[id(old)]} "
                                  "request(s) on the old one to finish", switched_at=time.time(), **base)
            finished = await self.gateway.drained(old, timeout)
            left = self.gateway.unfinished[id(old)]
            await old.stop(f"replaced by {server['model_name']} ({server['model_path']})")
            await old_client.aclose()
            note = "" if finished else f"; {left} request(s) were still running after request_timeout_s ({timeout:g} s)"
            self._set("done", f"swapped to {server['model_name']} ({server['model_path']}) in "
                              f"{time.time() - started:.1f} s{note}", finished_at=time.time(),
                      switched_at=self.record.get("switched_at"), **base)
            log.info("model swap: %s", self.record["reason"])
        except asyncio.CancelledError:
            self._set("cancelled", "a newer config arrived before the swap finished", **base)
            raise
        except Exception as exc:  # never leave the agent without its serving model
            log.exception("model swap failed")
            if self._candidate is not None:
                await self._reject(self._candidate, serving, f"the swap failed: {exc.__class__.__name__}: {exc}",
                                   base)
            else:
                self._set("failed", f"the swap failed: {exc.__class__.__name__}: {exc}", finished_at=time.time(),
                          **base)

    async def _reject(self, candidate: Supervisor, serving: Supervisor, reason: str, base: dict, **extra) -> None:
        """The new model failed: stop it, keep serving the old one, remember the verdict."""
        await candidate.stop("rejected: " + reason)
        self._candidate = None
        server = candidate.config["model_server"]
        kept = previous_path(server["model_path"])
        self._set("failed", f"{reason}; still serving {serving.config['model_server']['model_name']} "
                            f"({serving.model_file})", finished_at=time.time(),
                  rejected_identity=list(file_identity(server["model_path"]) or ()),
                  kept_identity=list(serving.identity or ()) if file_identity(kept) == serving.identity else None,
                  **base, **extra)
        log.error("model swap: %s", self.record["reason"])

    # -- the record -------------------------------------------------------------------------------------------

    def _set(self, state: str, reason: str, **fields) -> None:
        self.record = {"state": state, "reason": reason, "since": time.time(), **fields}
        if state not in ACTIVE_STATES:
            self._save()

    def _save(self) -> None:
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.state_dir / f".{RECORD_FILE}.{os.getpid()}"
            tmp.write_text(json.dumps(self.record, default=str))
            os.replace(tmp, self.state_dir / RECORD_FILE)
        except OSError as exc:
            log.warning("cannot write %s: %s", self.state_dir / RECORD_FILE, exc)
