"""What each node should look like, decided once on the control machine: a typed NodePlan per host.

`plan_nodes` is pure: it reads the inventory (as loaded by clawbot.control.inventory), the checked
clawbot.json and what was prepared here (certificates, model file, engine) and returns one NodePlan per
host. The roles only apply a plan. Every inventory variable is read through `inventory_var`, whose defaults
(clawbot.control.inventory) are schemas/inventory.schema.json's own: the schema is the one place an
inventory default is written.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from clawbot.common import sizing
from clawbot.common.config import gateway_host_port
from clawbot.control import split as split_roles
from clawbot.control.certificates import NodeMaterial
from clawbot.control.inventory import inventory_defaults, inventory_var

CHAT_GROUP, MODEL_GROUP = "chat_nodes", "model_nodes"
READY_DEADLINE_CAP_S = 900


def cluster_var(hosts, name: str, what: str = "hosts"):
    """A variable that must have one value across `hosts` (e.g. clawbot_config_file); ValueError otherwise."""
    values = {str(inventory_var(h.vars, name)) for h in hosts}
    if len(values) > 1:
        raise ValueError(f"{name} differs between {what} ({', '.join(sorted(values))}): set one value in group_vars/all")
    return values.pop() if values else str(inventory_defaults().get(name, ""))


def inventory_base(inventory_path: str) -> Path:
    """The directory inventory-relative paths (clawbot_config_file, clawbot_state_dir) are relative to."""
    return Path(inventory_path) if os.path.isdir(inventory_path) else Path(inventory_path).parent


LEGACY_CONFIG_FILE = "clawbot.json"  # where clawbot.json sat before .clawbot/ (Ansible parses it there)


def config_path(inventory, base: Path) -> Path:
    """The cluster's clawbot.json: clawbot_config_file, relative to the inventory directory. Left unset, an
    inventory that still has clawbot.json beside hosts.yml (the old layout) keeps working; loading it already
    said to move it (clawbot.control.inventory.foreign_files)."""
    hosts = inventory.hosts.values()
    path = (base / cluster_var(hosts, "clawbot_config_file")).resolve()
    unset = not any(h.vars.get("clawbot_config_file") for h in hosts)
    if unset and not path.exists() and (base / LEGACY_CONFIG_FILE).is_file():
        return (base / LEGACY_CONFIG_FILE).resolve()
    return path


def control_file(hosts, variable: str, base: Path) -> Path | None:
    """A file on this machine named by an inventory variable (one value for all these hosts); None if unset."""
    value = cluster_var(hosts, variable, "model nodes")
    if not value:
        return None
    path = Path(os.path.expanduser(value))
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise ValueError(f"{variable} {path}: no such file")
    return path


def hosts_entries(inventory) -> list[tuple[str, list[str]]]:
    """The managed /etc/hosts block every node gets: each host's address and its other names. A host reached
    as `ansible_connection: local` on 127.0.0.1 gets its name on loopback only."""
    remote, local = [], []
    for h in inventory.hosts.values():
        if h.vars.get("ansible_connection") == "local" and h.address == "127.0.0.1":
            local.append(("127.0.0.1", [h.name]))
        else:
            remote.append((h.address, [n for n in h.names if n != h.address]))
    return remote + local


def name_resolves(name: str) -> bool:
    """Whether this machine resolves a host name (/etc/hosts, DNS, mDNS: whatever its resolver uses), as a browser
    here would."""
    try:
        return bool(socket.getaddrinfo(name, None))
    except (OSError, UnicodeError):  # socket.gaierror is an OSError; an over-long label is a UnicodeError
        return False


def chat_url(h, port: int, resolves=name_resolves) -> tuple[str, str]:
    """(URL, hint) deploy prints for a chat node: by inventory name when that name resolves on this machine, else
    by the address deploy reaches the node at (ansible_host, else clawbot_address), with a one-line hint saying how
    to make the name resolve (empty when the URL uses the name). The node's server certificate holds its name and
    its addresses (clawbot.control.certificates), so either URL opens once the cluster CA is trusted.

    + h: the chat node (clawbot.control.inventory.Host)
    + port: chat.port from clawbot.json
    + resolves: name -> bool (name_resolves; tests pass their own)
    """
    if h.vars.get("ansible_connection") == "local":  # this machine: localhost is in every server certificate
        return f"https://localhost:{port}/", ""
    if resolves(h.name):
        return f"https://{h.name}:{port}/", ""
    address = str(inventory_var(h.vars, "ansible_host") or h.address)
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        ip = None
    if ip is None:  # a DNS name deploy reached the node by (also in the certificate)
        return (f"https://{address}:{port}/", f"{h.name} does not resolve on this machine: give it a DNS record or "
                                              "an /etc/hosts line to open the chat by that name")
    url = f"https://[{ip}]:{port}/" if ip.version == 6 else f"https://{ip}:{port}/"
    return url, (f"{h.name} does not resolve on this machine; to open the chat by name, add `{ip} {h.name}` to "
                 "/etc/hosts")


@dataclass(frozen=True)
class Prepared:
    """What the control machine prepared for the model nodes (paths here)."""

    model_file: Path | None = None
    engine: Path | None = None  # the binary copied to CPU nodes (or the inventory's clawbot_engine_file)
    engine_file_given: bool = False
    sdist: Path | None = None  # the pinned llama-cpp-python sdist GPU nodes build from
    llama_wheel: Path | None = None  # clawbot_llama_cpp_python_wheel
    rpc_engine: Path | None = None  # ggml-rpc-server for RPC workers (model_server.split), beside the engine


@dataclass(frozen=True)
class NodePlan:
    """Everything the roles need to converge one node; built by `plan_nodes`, applied by roles/site.py."""

    name: str
    is_model: bool
    is_chat: bool
    user: str
    prefix: str
    service_manager: str
    offline: bool
    config_file: str  # the clawbot.json nodes get, on the control machine (clawbot.control.nodeconfig renders it)
    tls: dict
    material: NodeMaterial
    hosts_entries: tuple
    hugepages: int | None  # pages to reserve (model nodes with model_server.hugepages != off)
    thp: str
    hugepages_mount: str  # hugetlbfs mount to create ("" unless the weights are staged)
    model_file: str
    model_path: str
    engine: str
    engine_file_given: bool
    engine_name: str
    accelerator: str  # clawbot_accelerator or model_server.accelerator, `auto` resolved on the node
    accelerator_override: str  # clawbot_accelerator as set (handed to the agent)
    sdist: str
    model_health_url: str
    chat_health_url: str
    ready_deadline_s: int
    writable: tuple = field(default=())  # extra paths the model agent's unit may write
    chat_files: tuple = field(default=())  # (control file, node path): the first admin's hash, the SSO secret
    # model_server.split (clawbot.control.split): what an RPC worker runs, and a main model node's tunnels to its own
    rpc_worker: split_roles.WorkerRole | None = None
    rpc_main: split_roles.MainRole | None = None
    rpc_engine: str = ""  # ggml-rpc-server on the control machine, beside the engine (RPC workers only)

    @property
    def venv(self) -> str:
        return f"{self.prefix}/venv"


def offline_for(hosts) -> bool:
    """One wheelhouse kind per rollout: offline (every dependency pushed) unless a selected host sets
    clawbot_offline false (then that host's pip may reach its index, and so may every other's)."""
    return all(inventory_var(h.vars, "clawbot_offline") is not False for h in hosts)


def plan_nodes(inventory, hosts, config: dict, config_file: Path, prepared: Prepared,
               materials: dict[str, NodeMaterial], chat_files: tuple = (),
               config_files: dict[str, Path] | None = None) -> dict[str, NodePlan]:
    """One NodePlan per host in `hosts`, from the inventory, the checked config and what was prepared.
    config_files: a host's own clawbot.json where it differs from config_file (a split's main node)."""
    server = config["model_server"]
    rpc_workers, rpc_mains = split_roles.roles(inventory, config)
    config_files = config_files or {}
    _, gateway_port = gateway_host_port(config["model_gateway"]["endpoint"])
    staging = server["hugepages"] in ("auto", "stage")
    entries = tuple((address, tuple(names)) for address, names in hosts_entries(inventory))
    offline = offline_for(hosts)
    plans = {}
    for h in hosts:
        is_model, is_chat = MODEL_GROUP in h.groups, CHAT_GROUP in h.groups
        pages = None
        split_main = rpc_mains.get(h.name)
        if is_model and server["hugepages"] != "off":
            setting = inventory_var(h.vars, "clawbot_hugepages_count")
            if setting == "auto":  # a split's main node stages nothing (RunPlan: it holds only its share)
                pages = 0 if split_main else sizing.hugepages_for(prepared.model_file.stat().st_size)
            else:
                pages = int(setting)
        node_staging = staging and split_main is None
        override = str(inventory_var(h.vars, "clawbot_accelerator"))
        plans[h.name] = NodePlan(
            name=h.name,
            is_model=is_model,
            is_chat=is_chat,
            user=str(inventory_var(h.vars, "clawbot_user")),
            prefix=str(inventory_var(h.vars, "clawbot_prefix")),
            service_manager=str(inventory_var(h.vars, "clawbot_service_manager")),
            offline=offline,
            config_file=str(config_files.get(h.name, config_file)),
            tls=dict(config["tls"]),
            material=materials[h.name],
            hosts_entries=entries,
            hugepages=pages,
            thp=str(inventory_var(h.vars, "clawbot_transparent_hugepages")),
            hugepages_mount=server["hugepages_mount"] if is_model and node_staging else "",
            model_file=str(prepared.model_file) if prepared.model_file else "",
            model_path=server["model_path"],
            engine=str(prepared.engine) if prepared.engine else "",
            engine_file_given=prepared.engine_file_given,
            engine_name=server["engine"],
            # clawbot_accelerator's schema default is `auto`, so the config's setting applies only when unset
            accelerator=override or server["accelerator"],
            accelerator_override=override,
            sdist=str(prepared.sdist) if prepared.sdist else "",
            model_health_url=f"https://127.0.0.1:{gateway_port}/readyz",
            chat_health_url=f"https://127.0.0.1:{config['chat']['port']}/healthz",
            ready_deadline_s=min(READY_DEADLINE_CAP_S, server["startup_timeout_s"] + 30),
            writable=(server["hugepages_mount"],) if is_model and node_staging else (),
            chat_files=chat_files if is_chat else (),
            rpc_worker=rpc_workers.get(h.name),
            rpc_main=split_main,
            rpc_engine=str(prepared.rpc_engine) if prepared.rpc_engine and h.name in rpc_workers else "",
        )
    return plans
