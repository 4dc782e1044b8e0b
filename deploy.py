#!/usr/bin/env python3
"""The one-command rollout: python deploy.py [-i DIR] [--check] [--diff] [--limit HOST|GROUP] [--vault-password-file F]
[--rotate-ca]

1. Read the Ansible-format inventory (ansible-core) and clawbot.json; refuse with file:line:col before any
   host is touched if either is invalid.
2. Prepare on this (control) machine: the cluster CA and each node's certificates (a name the CA does not permit
   is refused here, with the --rotate-ca flag to use), the clawbot.json nodes get (allowed_clients filled in), the
   agent wheelhouse, the model file, the engine binary.
3. Converge every node with pyinfra, roles in order: hosts -> hugepages -> pki -> agent -> model -> chat.
4. Print a summary per host (changed / unchanged / failed), the chat URL and where the CA certificate is.

A second run with nothing drifted changes nothing; a run killed mid-way converges when re-run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:  # `roles` is imported from this source tree (it is not part of the wheel)
    sys.path.insert(0, str(ROOT))

from clawbot.common.config import check_file  # noqa: E402
from clawbot.control import planning  # noqa: E402
from clawbot.control.inventory import InventoryError, check_inventory, load_inventory  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="deploy.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", "--inventory", default=str(ROOT / "inventory"), help="inventory directory or file")
    parser.add_argument("--check", action="store_true", help="change nothing; list what would change")
    parser.add_argument("--diff", action="store_true",
                        help="show the unified diff of every managed file and block that would change (secrets and "
                             "binaries: one line saying they differ), under the operation that changes it")
    parser.add_argument("--limit", action="append", default=[], metavar="HOST|GROUP",
                        help="only these hosts or groups (repeatable)")
    parser.add_argument("--vault-password-file",
                        help="file holding the Ansible vault password (default: $ANSIBLE_VAULT_PASSWORD_FILE)")
    parser.add_argument("--json", metavar="FILE", help="also write the plan/results as JSON to FILE")
    parser.add_argument("--rotate-ca", action="store_true",
                        help="replace the cluster CA: nodes trust the old and the new one side by side until every "
                             "node holds certificates from the new one (three runs; deploy says what each did)")
    args = parser.parse_args(argv)
    if args.rotate_ca and args.check:
        parser.error("--rotate-ca creates a new CA: run it without --check")
    return args


_STARTED = time.monotonic()


def say(message: str) -> None:
    print(f"clawbot [{time.monotonic() - _STARTED:5.1f}s]: {message}", flush=True)


# --- step 1: read and refuse -------------------------------------------------------------------------


def fail(message: str, code: int = 1) -> SystemExit:
    print(f"deploy.py: {message}", file=sys.stderr)
    return SystemExit(code)


def read_inputs(args):
    """Inventory + clawbot.json, both checked; exits 1 with positioned errors before touching a host."""
    try:
        inventory = load_inventory(args.inventory, args.vault_password_file)
        inventory_result, facts = check_inventory(args.inventory, inventory=inventory)
    except InventoryError as exc:
        raise fail(str(exc), 2)
    base = planning.inventory_base(args.inventory)
    try:
        config_path = planning.config_path(inventory, base)
    except ValueError as exc:
        raise fail(f"{exc} (one clawbot.json configures the whole cluster)")
    try:
        config_result = check_file(str(config_path), facts)
    except OSError as exc:
        raise fail(str(exc), 2)
    for d in inventory_result.diagnostics + config_result.diagnostics:
        print(d.text(), file=sys.stderr)
    if not (inventory_result.ok and config_result.ok):
        raise fail("refusing to roll out: fix the errors above (no host was touched)")
    return inventory, config_result.config, config_path, base


def selected_hosts(inventory, limits):
    if not limits:
        return list(inventory.hosts.values())
    unknown = [l for l in limits if l not in inventory.hosts and not inventory.group(l)]
    if unknown:
        raise fail(f"--limit names no host or group: {', '.join(unknown)}", 2)
    return [h for h in inventory.hosts.values() if h.name in limits or set(h.groups) & set(limits)]


# --- step 2: control-side preparation ------------------------------------------------------------------


def prepare(hosts, base: Path, cache: Path, config: dict) -> planning.Prepared:
    """The model file (or the inventory's source model quantized once, within config's quality_gate), the engine
    (or the inventory's files) and the sdist GPU nodes build from."""
    from clawbot.control import builds, split

    model_hosts = [h for h in hosts if planning.MODEL_GROUP in h.groups]
    # model_server.split: RPC workers get ggml-rpc-server from the portable CPU build (beside its llama-server)
    try:
        rpc_engine = split.rpc_server_binary(builds.engine_binary(log=say)) \
            if any(split.RPC_GROUP in h.groups for h in hosts) else None
    except split.SplitError as exc:
        raise fail(str(exc))
    if not model_hosts:
        return planning.Prepared(rpc_engine=rpc_engine)
    try:
        model_file = planning.control_file(model_hosts, "clawbot_model_file", base)
        source = builds.model_source(model_hosts, base)  # clawbot_model_source + clawbot_model_quant
        engine = planning.control_file(model_hosts, "clawbot_engine_file", base)
        llama_wheel = planning.control_file(model_hosts, "clawbot_llama_cpp_python_wheel", base)
    except ValueError as exc:
        raise fail(str(exc))
    if source is not None:
        model_file = builds.quantized_model(*source, cache, config["quality_gate"], log=say)
    model_file = model_file or builds.demo_model(cache, log=say)
    given, sdist = engine is not None, None
    if engine is None:
        engine = builds.engine_binary(log=say)
        sdist = builds.engine_sdist(log=say)  # GPU nodes build their own engine from it
    return planning.Prepared(model_file, engine, given, sdist, llama_wheel, rpc_engine)


def issue_certificates(inventory, hosts, state_dir: Path, rotate: bool):
    """The cluster CA (created once; refused, before any host is touched, when it does not permit the inventory's
    names) and each selected node's leaves, plus the control machine's own client certificate for `clawbot status`
    and Prometheus's for `clawbot monitoring`."""
    from clawbot.control import certificates
    from clawbot.control.state import CONTROL_NAME, MONITORING_NAME

    try:
        domain = planning.cluster_var(inventory.hosts.values(), "clawbot_cluster_domain")
        ca = certificates.cluster_ca(state_dir, {h.name: h.names for h in inventory.hosts.values()}, domain,
                                     rotate=rotate, log=say)
    except (ValueError, certificates.CAError) as exc:
        raise fail(f"{exc}\n(no host was touched)")
    for name in (CONTROL_NAME, MONITORING_NAME):
        certificates.ensure_node_material(ca, name, [name])
    materials = {}
    for h in hosts:
        materials[h.name] = certificates.ensure_node_material(ca, h.name, h.names)
        for line in materials[h.name].messages():
            say(f"{h.name}: {line}")
    return ca, materials


# --- step 3: converge with pyinfra ---------------------------------------------------------------------


def report(started: float, summary: dict, hosts, config: dict, state_dir: Path) -> None:
    say(f"done in {time.monotonic() - started:.1f} s")
    for name, row in summary.items():
        status = "FAILED" if row["host_failed"] or row["failed"] else "ok"
        manager = row["service_manager"]
        note = f", services via {manager}" if manager == "supervisor" else ""
        total = row["changed"] + row["unchanged"] + row["failed"]  # the same on every run of one inventory
        say(f"  {name}: {status}: {total} operations: {row['changed']} changed, {row['unchanged']} unchanged, "
            f"{row['failed']} failed{note}")
        if manager == "supervisor":
            say(f"  {name}: systemd is not PID 1 there, so the agents run under Debian's supervisor")
    chat_hosts = [h for h in hosts if planning.CHAT_GROUP in h.groups]
    for h in chat_hosts:
        url, hint = planning.chat_url(h, config["chat"]["port"])
        say(f"chat: {url}")
        if hint:
            say(f"  {hint}")
    if chat_hosts:
        admin = planning.cluster_var(chat_hosts, "clawbot_admin_user", "chat nodes")
        say(f"sign in as {admin} with the inventory's clawbot_admin_password; add people with "
            f"`clawbot users -i INVENTORY add NAME` or on the admin page")
    say(f"browsers must trust the cluster CA: {state_dir / 'ca' / 'ca.pem'}")


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    inventory, config, config_path, base = read_inputs(args)
    hosts = selected_hosts(inventory, args.limit)
    say(f"inventory {inventory.source}: {len(inventory.hosts)} host(s), config {config_path} is valid")

    from clawbot.common import sizing
    from clawbot.control import accounts, certificates, nodeconfig, rollout
    from clawbot.control.state import cache_directory, state_directory
    from clawbot.model.engines import engine_for

    state_dir = state_directory(planning.cluster_var(inventory.hosts.values(), "clawbot_state_dir"), base)
    cache = cache_directory()
    try:
        chat_files = accounts.chat_files(hosts, config, state_dir)
    except accounts.AccessError as exc:
        raise fail(f"{exc} (no host was touched)")
    ca, materials = issue_certificates(inventory, hosts, state_dir, args.rotate_ca)
    prepared = prepare(hosts, base, cache, config)
    info = sizing.read_model_info(prepared.model_file) if prepared.model_file is not None else None
    if info is not None:
        say(f"model {prepared.model_file.name}: {info.file_bytes / 2**20:.0f} MiB, {info.n_layer} layers")
    node_config = nodeconfig.render(config_path, inventory, state_dir)  # allowed_clients filled in
    from clawbot.control import split

    try:
        main_configs = split.render_main_configs(node_config, inventory, config, state_dir)  # a split's main nodes
    except split.SplitError as exc:
        raise fail(f"{exc} (no host was touched)")
    plans = planning.plan_nodes(inventory, hosts, config, node_config, prepared, materials, chat_files, main_configs)

    from pyinfra.api import Config, State
    from pyinfra.api.connect import connect_all
    from pyinfra.api.exceptions import PyinfraError
    from pyinfra.api.operations import run_ops
    from pyinfra_cli.prints import build_plan_json, build_results_json  # patches gevent: import before connecting

    from roles.site import converge

    logging.basicConfig(level=logging.INFO, format="  %(message)s")
    logging.getLogger("pyinfra").addFilter(rollout.PyinfraNotices())
    logging.getLogger("paramiko").setLevel(logging.WARNING)  # one "Opened sftp connection" line per upload
    state = State(inventory=rollout.pyinfra_inventory(hosts, plans), config=Config(DIFF=args.diff),
                  check_for_changes=args.check or args.diff)
    say(f"connecting to {len(hosts)} host(s)")
    try:
        connect_all(state)
    except PyinfraError as exc:
        raise fail(f"cannot connect: {exc} (see the SSH errors above); nothing was changed")
    unreachable = [h.data.clawbot_name for h in state.inventory if h not in state.activated_hosts]
    if unreachable:
        print(f"deploy.py: cannot connect to {', '.join(unreachable)}", file=sys.stderr)
    rollout.prepare_wheelhouses(state, cache, planning.offline_for(hosts), log=say,
                                llama_engine=engine_for(config["model_server"]["engine"]).IN_AGENT_VENV,
                                llama_wheel=prepared.llama_wheel)
    if info is not None and not rollout.preflight_model_nodes(state, info, config, log=say):
        return 1
    # --diff: pyinfra prints each file's diff while it works out the operations (add_deploy); they are collected
    # per operation and printed under it, once, before anything changes.
    diffs = rollout.DiffCollector() if args.diff else None
    pyinfra_logger = logging.getLogger("pyinfra")
    if diffs is not None:
        pyinfra_logger.addFilter(diffs)
    try:
        rollout.add_deploy(state, converge)
    finally:
        if diffs is not None:
            pyinfra_logger.removeFilter(diffs)
    if args.check or args.diff:
        plan = build_plan_json(state)
        would = [op for op in plan if op["hosts_with_change"]]
        if args.check:
            say(f"--check: {len(would)} operation(s) would change something; nothing was changed")
        else:
            say(f"--diff: {len(would)} operation(s) will change something:")
        for line in rollout.describe_plan(plan, diffs, "would" if args.check else "will"):
            print(line, flush=True)
        if args.check:
            if args.json:
                Path(args.json).write_text(json.dumps({"plan": rollout.plan_with_diffs(plan, diffs)}, indent=2,
                                                      default=str))
            return 0
        state.config.DIFF = False  # shown above; running the operations would print every diff again
    try:
        run_ops(state)
    except PyinfraError as exc:
        say(f"rollout failed: {exc}")
    summary = rollout.summarise(state)
    for name, items in rollout.verify_after_run(state, log=say).items():
        summary.setdefault(name, {})["unhealthy"] = items
    succeeded = [name for name, row in summary.items()
                 if not (row.get("host_failed") or row.get("failed") or row.get("unhealthy"))]
    certificates.record_rollout(ca, materials, succeeded, log=say)  # how far a CA rotation got
    report(started, summary, hosts, config, state_dir)
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "results": build_results_json(state)}, indent=2,
                                              default=str))
    failed = any(row.get("host_failed") or row.get("failed") or row.get("unhealthy") for row in summary.values()) \
        or unreachable
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
