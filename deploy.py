#!/usr/bin/env python3
"""The one-command rollout: python deploy.py [-i DIR] [--check] [--diff] [--limit HOST|GROUP] [--vault-password-file F]

1. Read the Ansible-format inventory (ansible-core) and clawbot.json; refuse with file:line:col before any
   host is touched if either is invalid.
2. Prepare on this (control) machine: the cluster CA and each node's certificates, the agent wheelhouse,
   the model file, the engine binary.
3. Converge every node with pyinfra, roles in order: hosts -> hugepages -> pki -> agent -> model -> chat.
4. Print a summary per host (changed / unchanged / failed), the chat URL and where the CA certificate is.

A second run with nothing drifted changes nothing; a run killed mid-way converges when re-run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from clawbot.config import check_file, gateway_host_port  # noqa: E402
from clawbot.inventory import InventoryError, check_inventory, load_inventory  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="deploy.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", "--inventory", default=str(ROOT / "inventory"), help="inventory directory or file")
    parser.add_argument("--check", action="store_true", help="change nothing; list what would change")
    parser.add_argument("--diff", action="store_true", help="show diffs of changed files")
    parser.add_argument("--limit", action="append", default=[], metavar="HOST|GROUP",
                        help="only these hosts or groups (repeatable)")
    parser.add_argument("--vault-password-file", help="file holding the Ansible vault password")
    parser.add_argument("--json", metavar="FILE", help="also write the plan/results as JSON to FILE")
    return parser.parse_args(argv)


_STARTED = time.monotonic()


def say(message: str) -> None:
    print(f"clawbot [{time.monotonic() - _STARTED:5.1f}s]: {message}", flush=True)


# --- step 1: read and refuse -------------------------------------------------------------------------


def read_inputs(args):
    """Inventory + clawbot.json, both checked; exits 1 with positioned errors before touching a host."""
    try:
        inventory = load_inventory(args.inventory, args.vault_password_file)
        inventory_result, facts = check_inventory(args.inventory, inventory=inventory)
    except InventoryError as exc:
        print(f"deploy.py: {exc}", file=sys.stderr)
        raise SystemExit(2)
    base = Path(args.inventory) if os.path.isdir(args.inventory) else Path(args.inventory).parent
    config_names = {h.vars.get("clawbot_config_file") or "clawbot.json" for h in inventory.hosts.values()}
    if len(config_names) > 1:
        print(f"deploy.py: clawbot_config_file differs between hosts ({', '.join(sorted(config_names))}); "
              "one clawbot.json configures the whole cluster: set it in group_vars/all", file=sys.stderr)
        raise SystemExit(1)
    config_path = (base / config_names.pop()).resolve()
    try:
        config_result = check_file(str(config_path), facts)
    except OSError as exc:
        print(f"deploy.py: {exc}", file=sys.stderr)
        raise SystemExit(2)
    diagnostics = inventory_result.diagnostics + config_result.diagnostics
    for d in diagnostics:
        print(d.text(), file=sys.stderr)
    if not (inventory_result.ok and config_result.ok):
        print("deploy.py: refusing to roll out: fix the errors above (no host was touched)", file=sys.stderr)
        raise SystemExit(1)
    return inventory, config_result.config, config_path, base


def selected_hosts(inventory, limits):
    if not limits:
        return list(inventory.hosts.values())
    chosen = [h for h in inventory.hosts.values() if h.name in limits or set(h.groups) & set(limits)]
    unknown = [l for l in limits if l not in inventory.hosts and not inventory.group(l)]
    if unknown:
        print(f"deploy.py: --limit names no host or group: {', '.join(unknown)}", file=sys.stderr)
        raise SystemExit(2)
    return chosen


# --- step 2: control-side preparation ------------------------------------------------------------------


def state_directory(inventory, base: Path) -> Path:
    values = {str(h.vars.get("clawbot_state_dir") or "") for h in inventory.hosts.values()}
    value = values.pop() if len(values) == 1 else ""
    if value:
        path = Path(os.path.expanduser(value))
        path = path if path.is_absolute() else base / path
    else:
        import hashlib

        cluster = hashlib.sha256(str(base.resolve()).encode()).hexdigest()[:10]
        path = Path(os.path.expanduser("~/.local/state/clawbot")) / f"{base.resolve().name}-{cluster}"
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def cache_directory() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    path = Path(base) / "clawbot" / "deploy"
    path.mkdir(parents=True, exist_ok=True)
    return path


def control_file(hosts, variable: str, base: Path) -> Path | None:
    """A file on this machine named by an inventory variable (one value for all these hosts); None if unset."""
    values = {str(h.vars.get(variable) or "") for h in hosts}
    if len(values) > 1:
        raise ValueError(f"{variable} differs between model nodes ({', '.join(sorted(values))}): set one value")
    value = values.pop() if values else ""
    if not value:
        return None
    path = Path(os.path.expanduser(value))
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise ValueError(f"{variable} {path}: no such file")
    return path


# --- step 3: converge with pyinfra ---------------------------------------------------------------------


def pyinfra_inventory(hosts, plans):
    from pyinfra.api import Inventory

    names = []
    for h in hosts:
        data = {"clawbot_plan": plans[h.name], "clawbot_name": h.name}
        for key, value in h.vars.items():
            if key.startswith("ssh_"):
                data[key] = value
        if h.vars.get("ansible_connection") == "local":
            names.append(("@local", data))
            continue
        data["ssh_hostname"] = str(h.vars.get("ansible_host") or h.name)
        if h.vars.get("ansible_port"):
            data["ssh_port"] = int(h.vars["ansible_port"])
        data["ssh_user"] = str(h.vars.get("ansible_user") or "root")
        if h.vars.get("ansible_ssh_private_key_file"):
            data["ssh_key"] = os.path.expanduser(str(h.vars["ansible_ssh_private_key_file"]))
        if data["ssh_user"] != "root":
            data["_sudo"] = True
        names.append((h.name, data))
    return Inventory((names, {}))


def converge():
    """The per-host deploy: roles in order, driven by the plan computed on the control machine."""
    from pyinfra import host

    from roles.agent import ensure_agent, ensure_service_user
    from roles.hosts import ensure_hosts_entries
    from roles.hugepages import ensure_hugepages, ensure_hugetlbfs_mount
    from roles.pki import install_node_certificates
    from roles.services import ensure_service, service_manager

    plan = host.data.clawbot_plan
    user, prefix, tls = plan["user"], plan["prefix"], plan["tls"]
    ensure_hosts_entries(plan["hosts_entries"])
    if plan["is_model"]:
        ensure_hugepages(plan["hugepages"], plan["thp"])
    ensure_service_user(user)
    if plan["is_model"] and plan["hugepages_mount"]:
        ensure_hugetlbfs_mount(plan["hugepages_mount"], user)  # after the user: its name is a mount option
    cert_ops = install_node_certificates(plan["material"], tls, user) + plan["material_changed"]
    wheelhouse, stamp = host.data.clawbot_wheelhouse
    agent_ops = ensure_agent(plan["config_file"], wheelhouse, stamp, user, prefix, plan["offline"])
    manager = service_manager(plan["service_manager"])
    host.data.clawbot_service_manager_used = manager
    command = f"{prefix}/venv/bin/clawbot agent --config /etc/clawbot/clawbot.json --role"
    environment = {"XDG_CACHE_HOME": f"{prefix}/cache", "HOME": "/var/lib/clawbot", "PYTHONUNBUFFERED": "1"}
    writable = ["/var/lib/clawbot", "/var/log/clawbot"]
    if plan["is_model"]:
        accelerator = node_accelerator(plan)
        model_ops = ensure_engine_and_model(plan, accelerator, prefix, user)
        model_environment = dict(environment)
        if plan["accelerator_override"]:  # clawbot_accelerator: the agent's own choice follows the inventory
            model_environment["CLAWBOT_ACCELERATOR"] = plan["accelerator_override"]
        ensure_service("clawbot-model", "clawbot agent (model role)", f"{command} model", user, writable + plan["model_writable"],
                       model_environment, manager, changed=agent_ops + model_ops + cert_ops, accelerator=accelerator)
    if plan["is_chat"]:
        ensure_service("clawbot-chat", "clawbot agent (chat role)", f"{command} chat", user, writable, environment,
                       manager, changed=agent_ops + cert_ops)


def node_accelerator(plan: dict) -> str:
    """clawbot_accelerator / model_server.accelerator with `auto` resolved on the node (nvidia-smi or not)."""
    from pyinfra import host
    from pyinfra.facts.server import Which

    from roles.model import resolve_node_accelerator

    return resolve_node_accelerator(plan["accelerator"], bool(host.get_fact(Which, command="nvidia-smi")))


def ensure_engine_and_model(plan: dict, accelerator: str, prefix: str, user: str) -> list:
    """The model file, and the engine for the node's accelerator: the control machine's portable CPU build (or
    the inventory's clawbot_engine_file) is copied; a GPU node without an engine file builds its own."""
    from clawbot import engine as engine_module
    from roles.model import ensure_engine_built_on_node, ensure_model

    engines = f"{prefix}/cache/clawbot/engine/{engine_module.LLAMA_CPP_PYTHON_VERSION}"
    built: list = []
    if accelerator != "cpu" and not plan["engine_file_given"]:
        built = ensure_engine_built_on_node(accelerator, Path(plan["sdist"]), prefix, plan["engine_name"], plan["offline"])
        engine, dest = None, ""
    elif accelerator != "cpu":
        engine, dest = Path(plan["engine"]), f"{engines}-{accelerator}-prebuilt/bin/{engine_module.SERVER_TARGET}"
    else:
        engine, dest = Path(plan["engine"]), f"{engines}-cpu-portable/bin/{engine_module.SERVER_TARGET}"
    return ensure_model(Path(plan["model_file"]), plan["model_path"], engine, dest, user) + built


def add_converge(state) -> None:
    """Add `converge` for every host, identifying operations by their call site as pyinfra's CLI does.

    pyinfra's API mode (add_deploy) numbers operations per host, so when chat and model nodes run different
    operation lists, operation k of one host is merged with operation k of another: plans and results would
    show one host's operation names for the other's changes."""
    import inspect

    import pyinfra
    from pyinfra.api.state import StateStage
    from pyinfra.context import ctx_host, ctx_state

    state.current_deploy_filename = inspect.currentframe().f_code.co_filename
    state.set_stage(StateStage.Prepare)
    pyinfra.is_cli = True
    try:
        with ctx_state.use(state):
            for pyinfra_host in state.inventory.get_active_hosts():
                with ctx_host.use(pyinfra_host):
                    converge()
    finally:
        pyinfra.is_cli = False


class _MaterialChanged:
    """Stands in an op list for 'this node's certificates were reissued on the control machine'."""

    def __init__(self, changed: bool):
        self.changed = changed

    def did_change(self) -> bool:
        return self.changed


def shell_on(pyinfra_host):
    """run_shell(command) -> (ok, stdout) on a connected host, for checks that are not operations."""
    from pyinfra.api import StringCommand

    def run_shell(command: str) -> tuple[bool, str]:
        ok, output = pyinfra_host.run_shell_command(StringCommand(command))
        return ok, "\n".join(output.stdout_lines)

    return run_shell


def prepare_wheelhouses(state, cache: Path, offline: bool, log=say, llama_engine: bool = False,
                        llama_wheel: Path | None = None) -> None:
    """One wheelhouse per Python version the nodes run (/usr/bin/python3): a node may run another release
    of Debian/Ubuntu than this machine, and binary wheels are built per Python version. llama_engine
    (model_server.engine llama-cpp-python): model nodes' wheelhouses also carry llama-cpp-python."""
    from roles import agent as agent_role

    houses: dict[tuple[str, bool], tuple[Path, str]] = {}
    for pyinfra_host in state.inventory.iter_activated_hosts():
        ok, output = shell_on(pyinfra_host)("/usr/bin/python3 -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])'")
        version = output.strip() if ok and output.strip() else "%d.%d" % sys.version_info[:2]
        key = (version, llama_engine and pyinfra_host.data.clawbot_plan["is_model"])
        if key not in houses:
            houses[key] = agent_role.build_wheelhouse(cache, version, offline, log=log, with_llama=key[1],
                                                      llama_wheel=llama_wheel)
        pyinfra_host.data.clawbot_wheelhouse = houses[key]  # host.data hands out copies: set, don't mutate


def preflight_model_nodes(state, model_info, config: dict, log=say) -> bool:
    """Before any change: the model must fit every model node (exact sizing vs what the node has)."""
    from clawbot import preflight
    from roles.preflight import check_node

    fits = True
    for pyinfra_host in state.inventory.iter_activated_hosts():
        if not pyinfra_host.data.clawbot_plan["is_model"]:
            continue
        report = check_node(shell_on(pyinfra_host), model_info, config)
        name = pyinfra_host.data.clawbot_name
        for finding in report.findings:
            if finding.level in ("error", "warning"):
                log(f"  preflight {name}: {finding.level}: {finding.message}")
        if any(f.level == "error" for f in report.findings):
            fits = False
        else:
            log(f"  preflight {name}: model fits ({preflight.sizing.gib(report.fit.total_bytes)} needed, "
                f"{preflight.sizing.gib(report.node.memory_available)} available)")
    if not fits:
        print("deploy.py: refusing to roll out: the model does not fit (numbers above); nothing was changed",
              file=sys.stderr)
    return fits


def verify_after_run(state, log=say) -> dict[str, list[str]]:
    """Checks that change nothing, so they are not operations: agents healthy, hugepages asked vs got."""
    from roles.hugepages import reserved_pages
    from roles.services import health_probe

    problems: dict[str, list[str]] = {}
    for pyinfra_host in state.inventory.iter_activated_hosts():
        if pyinfra_host in state.failed_hosts:
            continue
        plan = pyinfra_host.data.clawbot_plan
        name = pyinfra_host.data.clawbot_name
        run_shell = shell_on(pyinfra_host)

        if plan["is_model"] and plan["hugepages"] is not None:
            got = reserved_pages(run_shell)
            note = "" if got >= plan["hugepages"] else (
                " (fewer: not enough contiguous free memory; the boot-time setting in /etc/sysctl.d applies early "
                "at the next boot)")
            log(f"  {name}: hugepages asked {plan['hugepages']}, the kernel reserved {got}{note}")
        python = f"{plan['prefix']}/venv/bin/python"
        checks = []
        if plan["is_model"]:
            checks.append(("model (gateway /readyz: loaded and able to generate)", plan["model_health_url"]))
        if plan["is_chat"]:
            checks.append(("chat agent", plan["chat_health_url"]))
        for what, url in checks:
            ok, output = run_shell(health_probe(url, python, plan["tls"], deadline_s=plan["ready_deadline_s"]))
            if ok:
                log(f"  {name}: {what} healthy ({url})")
            else:
                problems.setdefault(name, []).append(f"{what}: {output.strip()[-400:]}")
                log(f"  {name}: {what} NOT healthy: {output.strip()[-400:]}")
    return problems


def summarise(state) -> dict:
    summary = {}
    for pyinfra_host in state.inventory.iter_activated_hosts():
        changed = unchanged = failed = 0
        for op_hash, op in state.ops[pyinfra_host].items():
            meta = op.operation_meta
            if not meta.did_succeed(_raise_if_not_complete=False):
                failed += 1
            elif meta.did_change():
                changed += 1
            else:
                unchanged += 1
        name = pyinfra_host.data.clawbot_name
        summary[name] = {"changed": changed, "unchanged": unchanged, "failed": failed,
                         "service_manager": getattr(pyinfra_host.data, "clawbot_service_manager_used", None),
                         "host_failed": pyinfra_host in state.failed_hosts}
    return summary


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    inventory, config, config_path, base = read_inputs(args)
    hosts = selected_hosts(inventory, args.limit)
    say(f"inventory {inventory.source}: {len(inventory.hosts)} host(s), config {config_path} is valid")

    # -- control machine: CA, certificates, wheelhouse, model, engine
    from roles import model as model_role
    from roles import pki as pki_role
    from clawbot import sizing

    state_dir = state_directory(inventory, base)
    cache = cache_directory()
    from clawbot.status import CONTROL_NAME

    every_name = sorted({n for h in inventory.hosts.values() for n in h.names} | {CONTROL_NAME})
    ca_key, ca_cert = pki_role.ensure_cluster_ca(state_dir, every_name, log=say)
    pki_role.ensure_node_material(state_dir, CONTROL_NAME, [CONTROL_NAME], ca_key, ca_cert)  # for `clawbot status`
    model_hosts = [h for h in hosts if "model_nodes" in h.groups]
    model_file = None
    engine_binary = None
    engine_file_given = False
    sdist = None
    llama_wheel = None
    if model_hosts:
        try:
            model_file = control_file(model_hosts, "clawbot_model_file", base)
            engine_binary = control_file(model_hosts, "clawbot_engine_file", base)
            llama_wheel = control_file(model_hosts, "clawbot_llama_cpp_python_wheel", base)
        except ValueError as exc:
            print(f"deploy.py: {exc}", file=sys.stderr)
            return 1
        model_file = model_file or model_role.demo_model(cache, log=say)
        engine_file_given = engine_binary is not None
        if engine_binary is None:
            engine_binary = model_role.engine_binary(log=say)
            sdist = model_role.engine_sdist(log=say)  # GPU nodes build their own engine from it
        info = sizing.read_model_info(model_file)
        say(f"model {model_file.name}: {info.file_bytes / 2**20:.0f} MiB, {info.n_layer} layers")
    offline = all(h.vars.get("clawbot_offline", True) is not False for h in hosts)

    gateway_host, gateway_port = gateway_host_port(config["model_gateway"]["endpoint"])
    hosts_entries = [(h.address, [n for n in h.names if n != h.address]) for h in inventory.hosts.values()
                     if h.vars.get("ansible_connection") != "local" or h.address != "127.0.0.1"]
    hosts_entries += [("127.0.0.1", [h.name]) for h in inventory.hosts.values()
                      if h.vars.get("ansible_connection") == "local" and h.address == "127.0.0.1"]
    plans = {}
    for h in hosts:
        material = pki_role.ensure_node_material(state_dir, h.name, h.names, ca_key, ca_cert)
        for line in material.reissued:
            say(f"{h.name}: issued {line}")
        is_model, is_chat = "model_nodes" in h.groups, "chat_nodes" in h.groups
        prefix = str(h.vars.get("clawbot_prefix") or "/opt/clawbot")
        pages = None
        staging = is_model and config["model_server"]["hugepages"] in ("auto", "stage")
        if is_model and config["model_server"]["hugepages"] != "off":
            setting = h.vars.get("clawbot_hugepages_count", "auto")
            pages = sizing.hugepages_for(model_file.stat().st_size) if setting in (None, "auto") else int(setting)
        plans[h.name] = {
            "user": str(h.vars.get("clawbot_user") or "clawbot"),
            "prefix": prefix,
            "tls": config["tls"],
            "hosts_entries": hosts_entries,
            "is_model": is_model,
            "is_chat": is_chat,
            "hugepages": pages,
            "thp": str(h.vars.get("clawbot_transparent_hugepages") or "madvise"),
            "material": material,
            "material_changed": [_MaterialChanged(bool(material.reissued))],
            "config_file": str(config_path),
            "offline": offline,
            "service_manager": str(h.vars.get("clawbot_service_manager") or "auto"),
            "model_file": str(model_file) if model_file else "",
            "model_path": config["model_server"]["model_path"],
            "hugepages_mount": config["model_server"]["hugepages_mount"] if staging else "",
            "model_writable": [config["model_server"]["hugepages_mount"]] if staging else [],
            "engine": str(engine_binary) if engine_binary else "",
            "engine_file_given": engine_file_given,
            "engine_name": config["model_server"]["engine"],
            "accelerator": str(h.vars.get("clawbot_accelerator") or config["model_server"]["accelerator"]),
            "accelerator_override": str(h.vars.get("clawbot_accelerator") or ""),
            "sdist": str(sdist) if sdist else "",
            "model_health_url": f"https://127.0.0.1:{gateway_port}/readyz",
            "chat_health_url": f"https://127.0.0.1:{config['chat']['port']}/healthz",
            "ready_deadline_s": min(900, config["model_server"]["startup_timeout_s"] + 30),
        }

    # -- converge
    from pyinfra.api import Config, State
    from pyinfra.api.connect import connect_all
    from pyinfra_cli.prints import build_plan_json, build_results_json  # patches gevent: import before connecting
    from pyinfra.api.operations import run_ops

    logging.basicConfig(level=logging.INFO, format="  %(message)s")
    state = State(inventory=pyinfra_inventory(hosts, plans), config=Config(DIFF=args.diff),
                  check_for_changes=args.check or args.diff)
    say(f"connecting to {len(hosts)} host(s)")
    from pyinfra.api.exceptions import PyinfraError

    try:
        connect_all(state)
    except PyinfraError as exc:
        print(f"deploy.py: cannot connect: {exc} (see the SSH errors above); nothing was changed", file=sys.stderr)
        return 1
    unreachable = [h.data.clawbot_name for h in state.inventory if h not in state.activated_hosts]
    if unreachable:
        print(f"deploy.py: cannot connect to {', '.join(unreachable)}", file=sys.stderr)
    prepare_wheelhouses(state, cache, offline, llama_engine=config["model_server"]["engine"] == "llama-cpp-python",
                        llama_wheel=llama_wheel)
    if model_file is not None and not preflight_model_nodes(state, sizing.read_model_info(model_file), config):
        return 1
    add_converge(state)
    if args.check:
        plan = build_plan_json(state)
        would = [op for op in plan if op["hosts_with_change"]]
        # Conditional operations (restarts) run only when an operation they watch changes.
        then = [op for op in plan if op["hosts_with_conditional_change"]] if would else []
        say(f"--check: {len(would)} operation(s) would change something; nothing was changed")
        for op in would:
            print(f"  would: {op['name']} on {', '.join(op['hosts_with_change'])}")
        for op in then:
            print(f"  then maybe: {op['name']} on {', '.join(op['hosts_with_conditional_change'])}")
        if args.json:
            Path(args.json).write_text(json.dumps({"plan": plan}, indent=2, default=str))
        return 0
    try:
        run_ops(state)
    except PyinfraError as exc:
        say(f"rollout failed: {exc}")
    summary = summarise(state)
    problems = verify_after_run(state)
    for name, items in problems.items():
        summary.setdefault(name, {})["unhealthy"] = items
    elapsed = time.monotonic() - started
    say(f"done in {elapsed:.1f} s")
    for name, row in summary.items():
        status = "FAILED" if row["host_failed"] or row["failed"] else "ok"
        manager = row["service_manager"]
        note = f", services via {manager}" if manager == "supervisor" else ""
        say(f"  {name}: {status}: {row['changed']} changed, {row['unchanged']} unchanged, {row['failed']} failed{note}")
        if manager == "supervisor":
            say(f"  {name}: systemd is not PID 1 there, so the agents run under Debian's supervisor")
    chat_hosts = [h for h in hosts if "chat_nodes" in h.groups]
    for h in chat_hosts:
        say(f"chat: https://{h.name if h.vars.get('ansible_connection') != 'local' else 'localhost'}:{config['chat']['port']}/")
    say(f"browsers must trust the cluster CA: {state_dir / 'ca' / 'ca.pem'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "results": build_results_json(state)}, indent=2,
                                              default=str))
    failed = any(row.get("host_failed") or row.get("failed") or row.get("unhealthy") for row in summary.values()) \
        or unreachable
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
