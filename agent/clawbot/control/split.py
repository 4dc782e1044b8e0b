"""One model across nodes, on the control machine: which model node uses which RPC workers, what each of them runs,
the clawbot.json the main node gets, and the checks before any host is touched (docs/split.md).

The inventory says who: hosts of the group `rpc_workers` lend their memory to one model node each
(`clawbot_rpc_main`, default: the inventory's only model node). clawbot.json's `model_server.split` says how
(ports, worker threads, the tensor cache); its `workers` list is what deploy fills in for each main node: the
workers in inventory order, each with the loopback port of its tunnel on the main node and the memory preflight
measured on it. Every other node gets the cluster's clawbot.json as it is.

Who talks to whom: the main node's llama-server -> 127.0.0.1:local_port+i (the main node's stunnel, client mode,
presenting the main node's client certificate, checking that the worker's server certificate names the worker)
-> worker:tunnel_port (the worker's stunnel, server mode: TLS 1.3, a client certificate from the cluster CA
required, and it must name the main node) -> 127.0.0.1:rpc_port (ggml-rpc-server, loopback only). Both ends use the
certificates every node already holds (clawbot.control.certificates): a worker's server certificate carries its
inventory name, the main node's client certificate carries the main node's.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

from clawbot.common import pki
from clawbot.common.config import Diagnostic
from clawbot.control.inventory import Vaulted, inventory_var

RPC_GROUP = "rpc_workers"
MODEL_GROUP = "model_nodes"


class SplitError(ValueError):
    """The inventory's split cannot work as written (deploy refuses before touching a host)."""


@dataclass(frozen=True)
class Tunnel:
    """The main node's end of the tunnel to one worker."""

    worker: str  # the worker's inventory name: its server certificate must carry it
    address: str  # where the worker's stunnel listens (its clawbot_address)
    remote_port: int  # model_server.split.tunnel_port
    local_port: int  # 127.0.0.1 port on the main node: llama-server's --rpc


@dataclass(frozen=True)
class WorkerRole:
    """What an RPC worker runs: ggml-rpc-server on loopback, and stunnel on its node address for the main node."""

    main: str  # the main node's inventory name: its client certificate must carry it
    address: str  # this worker's node address (stunnel's accept)
    rpc_port: int
    tunnel_port: int
    threads: int  # ggml-rpc-server -t (0: every core)
    cache: bool  # ggml-rpc-server -c


@dataclass(frozen=True)
class MainRole:
    """What a main model node runs for its split: one tunnel per worker (in layer order)."""

    tunnels: tuple[Tunnel, ...]


def _problem(host, key: str, message: str, hint: str = "") -> tuple:
    return (host.origins.get(key), f"/{key}", message, hint)


def topology_problems(inventory) -> list[tuple]:
    """(origin, pointer, message, hint) for every way the inventory's split cannot work (empty: none, or no split)."""
    models = {h.name: h for h in inventory.group(MODEL_GROUP)}
    problems = []
    for host in inventory.hosts.values():
        main = host.vars.get("clawbot_rpc_main")
        if isinstance(main, Vaulted):
            problems.append(_problem(host, "clawbot_rpc_main", f"{host.name}: clawbot_rpc_main cannot be vaulted"))
            continue
        in_group = RPC_GROUP in host.groups
        if main and not in_group:
            problems.append(_problem(host, "clawbot_rpc_main",
                                     f"{host.name}: clawbot_rpc_main is set but {host.name} is not in the group "
                                     f"{RPC_GROUP}", f"add {host.name} under all.children.{RPC_GROUP}.hosts, or drop "
                                                     "the variable"))
            continue
        if not in_group:
            continue
        if MODEL_GROUP in host.groups:
            problems.append(_problem(host, "clawbot_rpc_main",
                                     f"{host.name} is in both {MODEL_GROUP} and {RPC_GROUP}: an RPC worker lends all "
                                     "its memory to a model node and runs no model server of its own",
                                     f"remove {host.name} from one of the groups"))
            continue
        if not main:
            if len(models) != 1:
                problems.append(_problem(host, "clawbot_rpc_main",
                                         f"{host.name} is an RPC worker but names no model node (clawbot_rpc_main) and "
                                         f"the inventory has {len(models)} model nodes",
                                         f"set clawbot_rpc_main to one of: {', '.join(sorted(models)) or '(none)'}"))
            continue
        if main not in models:
            problems.append(_problem(host, "clawbot_rpc_main",
                                     f"{host.name}: clawbot_rpc_main '{main}' is not a host of {MODEL_GROUP}",
                                     f"model nodes: {', '.join(sorted(models)) or '(none)'}"))
    return problems


def topology(inventory) -> dict[str, list]:
    """{main model node: its RPC workers (Host, in inventory order)}; SplitError when the inventory's split is
    wrong (topology_problems says how)."""
    problems = topology_problems(inventory)
    if problems:
        raise SplitError("; ".join(p[2] for p in problems))
    models = [h.name for h in inventory.group(MODEL_GROUP)]
    mains: dict[str, list] = {}
    for host in inventory.group(RPC_GROUP):
        main = host.vars.get("clawbot_rpc_main") or models[0]
        mains.setdefault(main, []).append(host)
    return mains


def roles(inventory, config: dict) -> tuple[dict[str, WorkerRole], dict[str, MainRole]]:
    """What each worker and each main node runs, by inventory name."""
    split = config["model_server"]["split"]
    workers, mains = {}, {}
    for main, hosts in topology(inventory).items():
        tunnels = []
        for index, host in enumerate(hosts):
            workers[host.name] = WorkerRole(main=main, address=host.address, rpc_port=split["rpc_port"],
                                            tunnel_port=split["tunnel_port"], threads=split["worker_threads"],
                                            cache=split["worker_cache"])
            tunnels.append(Tunnel(host.name, host.address, split["tunnel_port"], split["local_port"] + index))
        mains[main] = MainRole(tuple(tunnels))
    return workers, mains


# A remeasured worker keeps the memory its main node's clawbot.json already records unless the new figure differs
# by more than this: MemAvailable moves a little between runs, and a changed clawbot.json restarts the model server.
MEMORY_HYSTERESIS = 0.10


def worker_entries(role: MainRole, memory: dict[str, int | None], recorded: list[dict] | None = None) -> list[dict]:
    """model_server.split.workers for a main node: each worker's name, address, tunnel port here and memory (MiB,
    as preflight measured it; a worker not measured keeps what `recorded` says, else 0)."""
    before = {w.get("name"): int(w.get("memory_mib", 0)) for w in recorded or []}
    entries = []
    for t in role.tunnels:
        measured = memory.get(t.worker)
        old = before.get(t.worker, 0)
        mib = measured // (1 << 20) if measured else old
        if measured and old and abs(mib - old) <= old * MEMORY_HYSTERESIS:
            mib = old
        entries.append({"name": t.worker, "address": t.address, "port": t.local_port, "memory_mib": mib})
    return entries


def main_config_path(state_dir: Path, main: str) -> Path:
    return state_dir / "nodes" / main / "clawbot.json"


def _write_json(out: Path, config: dict) -> Path:
    data = (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    out.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(out.parent, 0o700)
    if not out.exists() or out.read_bytes() != data:
        pki.atomic_write(out, data, 0o600)
    return out


def render_main_config(cluster_file: Path, state_dir: Path, main: str, role: MainRole) -> Path:
    """<state>/nodes/<main>/clawbot.json: the nodes' clawbot.json (clawbot.control.nodeconfig.render's) with this
    main node's model_server.split.workers (the memory recorded by an earlier run kept until preflight measures it
    again: update_main_config); rewritten only when its bytes change."""
    config = json.loads(Path(cluster_file).read_text(encoding="utf-8"))
    out = main_config_path(state_dir, main)
    recorded = _recorded_workers(out)
    config.setdefault("model_server", {}).setdefault("split", {})["workers"] = worker_entries(role, {}, recorded)
    return _write_json(out, config)


def _recorded_workers(path: Path) -> list[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))["model_server"]["split"]["workers"]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def update_main_config(path: Path, role: MainRole, memory: dict[str, int | None]) -> dict:
    """After preflight measured the workers: their memory into the main node's clawbot.json (MEMORY_HYSTERESIS);
    returns model_server.split.workers as written."""
    config = json.loads(path.read_text(encoding="utf-8"))
    entries = worker_entries(role, memory, _recorded_workers(path))
    config.setdefault("model_server", {}).setdefault("split", {})["workers"] = entries
    _write_json(path, config)
    return entries


def render_main_configs(cluster_file: Path, inventory, config: dict, state_dir: Path) -> dict[str, Path]:
    """Every main node's clawbot.json (render_main_config), by name; {} without a split. SplitError when the cluster's
    clawbot.json lists workers itself: deploy would install no tunnels for them."""
    if config["model_server"]["split"]["workers"]:
        raise SplitError(f"{cluster_file}: model_server.split.workers is set, but deploy fills it in for each main "
                         f"model node from the inventory: put the workers in the group {RPC_GROUP} (with "
                         "clawbot_rpc_main) and leave model_server.split.workers out of the cluster's clawbot.json")
    _, mains = roles(inventory, config)
    return {main: render_main_config(cluster_file, state_dir, main, role) for main, role in mains.items()}


def with_workers(config: dict, entries: list[dict]) -> dict:
    """The checked config as a main node gets it (for preflight on the control machine)."""
    config = copy.deepcopy(config)
    config["model_server"]["split"]["workers"] = entries
    return config


def rpc_user(user: str) -> str:
    """The system user ggml-rpc-server runs as on a worker: not the agent's user, which owns the TLS keys."""
    return f"{user}-rpc"


def measure_workers(state, log) -> dict[str, int]:
    """Deploy's preflight of the RPC workers it reaches: the memory each offers (NodeMemory: MemAvailable plus what
    its ggml-rpc-server already holds, capped by its cgroup), by name."""
    from pyinfra.api import DeployError

    from clawbot.common import sizing
    from clawbot.control.facts import NodeMemory

    memory = {}
    for pyinfra_host in state.inventory.iter_activated_hosts():
        plan = pyinfra_host.data.clawbot_plan
        if plan.rpc_worker is None:
            continue
        node = pyinfra_host.get_fact(NodeMemory, model_dir="/var/lib", user=rpc_user(plan.user))
        if node is None:
            raise DeployError(f"preflight: cannot read {NodeMemory.name} on {pyinfra_host.name}")
        memory[plan.name] = node.memory_available
        log(f"  preflight {plan.name}: RPC worker of {plan.rpc_worker.main}, offers "
            f"{sizing.gib(node.memory_available)} ({node.memory_source})")
    return memory


# --------------------------------------------------------------------------- clawbot validate --inventory


def topology_diagnostics(inventory, hosts_file: str) -> list[Diagnostic]:
    """The inventory's split problems as positioned errors (check_inventory adds them)."""
    out = []
    for origin, pointer, message, hint in topology_problems(inventory):
        file, line, col = origin or (hosts_file, 1, 1)
        out.append(Diagnostic(file, line, col, "error", pointer, message, hint, "inventory"))
    return out


def split_mains(inventory) -> set[str]:
    """The model nodes that have RPC workers (their fit is judged by declared_diagnostics)."""
    try:
        return set(topology(inventory))
    except SplitError:
        return set()


def declared_diagnostics(inventory, config: dict, inventory_dir: str) -> list[Diagnostic]:
    """Static preflight of each split: does each node's share fit the memory it declares (clawbot_memory_mib)?
    Judged where the main node and every worker declare memory and the model file is on this machine."""
    from clawbot.common import preflight, sizing

    if not config["model_server"].get("split") or not inventory.group(RPC_GROUP):
        return []
    try:
        mains = topology(inventory)
    except SplitError:
        return []  # check_inventory reports it
    base = inventory_dir if os.path.isdir(inventory_dir) else os.path.dirname(inventory_dir)
    out = []
    for main_name, workers in mains.items():
        main = inventory.hosts[main_name]
        declared = [inventory_var(h.vars, "clawbot_memory_mib") for h in (main, *workers)]
        model_file = main.vars.get("clawbot_model_file")
        if any(not isinstance(m, int) or m <= 0 for m in declared) or not isinstance(model_file, str) or not model_file:
            continue
        path = model_file if os.path.isabs(model_file) else os.path.join(base, model_file)
        if not os.path.isfile(path):
            continue  # the model is not on this machine (a CI checkout): nothing to size
        report = preflight.declared_fit(sizing.read_model_info(path), config, declared[0], name=main_name,
                                        workers=[(h.name, m) for h, m in zip(workers, declared[1:])])
        file, line, col = main.origins.get("clawbot_memory_mib", (inventory.source, 1, 1))
        for finding in report.findings:
            if finding.level == "error":
                out.append(Diagnostic(file, line, col, "error", "/clawbot_memory_mib",
                                      f"{main_name} with RPC workers {', '.join(h.name for h in workers)}: "
                                      f"{finding.message}", rule="preflight"))
    return out


def rpc_server_binary(engine: Path) -> Path:
    """ggml-rpc-server of the same build as `engine` (clawbot build-engine installs it beside llama-server)."""
    from clawbot.model.engines import build

    binary = Path(engine).with_name(build.RPC_TARGET)
    if not binary.is_file():
        raise SplitError(f"{binary}: no {build.RPC_TARGET} beside {engine}: the engine was built before the RPC "
                         "backend was part of the build; run `clawbot build-engine --portable` again")
    return binary
