"""The rollout's pyinfra plumbing on the control machine: the pyinfra inventory from the node plans, the
per-host deploy added by call site, wheelhouses per node Python, preflight over SSH, the checks after
the run (health, huge pages asked vs got) that change nothing and so are not operations, and what deploy prints
of pyinfra's own output (--diff's diffs per operation; pyinfra notices that say nothing about the rollout dropped).

deploy.py drives these steps; the per-host deploy itself (roles/site.py) is handed in, so this package never
imports the roles.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys

from clawbot.common import sizing
from clawbot.control import builds
from clawbot.control.inventory import inventory_var
from clawbot.control.planning import NodePlan


def pyinfra_inventory(hosts, plans: dict[str, NodePlan] | None = None):
    """pyinfra's Inventory: each host's SSH settings from its Ansible connection variables, and its plan."""
    from pyinfra.api import Inventory

    names = []
    for h in hosts:
        data = {"clawbot_name": h.name}
        if plans is not None:
            data["clawbot_plan"] = plans[h.name]
        for key, value in h.vars.items():
            if key.startswith("ssh_"):
                data[key] = value
        if h.vars.get("ansible_connection") == "local":
            names.append(("@local", data))
            continue
        data["ssh_hostname"] = str(h.vars.get("ansible_host") or h.name)
        if h.vars.get("ansible_port"):  # else pyinfra's own ssh_port (or 22)
            data["ssh_port"] = int(h.vars["ansible_port"])
        data["ssh_user"] = str(inventory_var(h.vars, "ansible_user"))
        if h.vars.get("ansible_ssh_private_key_file"):
            data["ssh_key"] = os.path.expanduser(str(h.vars["ansible_ssh_private_key_file"]))
        if data["ssh_user"] != "root":
            data["_sudo"] = True
        names.append((h.name, data))
    return Inventory((names, {}))


def add_deploy(state, converge) -> None:
    """Add `converge` for every host, identifying operations by their call site as pyinfra's CLI does.

    pyinfra's API mode (add_deploy) numbers operations per host, so when chat and model nodes run different
    operation lists, operation k of one host is merged with operation k of another: plans and results would
    show one host's operation names for the other's changes."""
    import pyinfra
    from pyinfra.api.state import StateStage
    from pyinfra.context import ctx_host, ctx_state

    state.current_deploy_filename = converge.__code__.co_filename
    state.set_stage(StateStage.Prepare)
    pyinfra.is_cli = True
    try:
        with ctx_state.use(state):
            for pyinfra_host in state.inventory.get_active_hosts():
                with ctx_host.use(pyinfra_host):
                    converge()
    finally:
        pyinfra.is_cli = False


# pyinfra 3.10 logs this warning on every files.block call (each host, when planning and again when running) and
# has no setting that turns it off; the managed /etc/hosts block (roles/hosts.py) is a files.block.
PYINFRA_NOTICES = frozenset({"The `files.block` operation is currently in beta!"})


class PyinfraNotices(logging.Filter):
    """Drops pyinfra's notices that say nothing about this rollout (PYINFRA_NOTICES, matched whole), nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() not in PYINFRA_NOTICES


class DiffCollector(logging.Filter):
    """What pyinfra's --diff prints while the operations work out their commands (unified diffs, `mode`/`chown`
    lines, roles.content's one-line notes for secrets and binaries), kept per (host, operation) instead of printed
    as it comes, so deploy can show each under the operation it belongs to: pyinfra prints no operation names while
    it plans, and its mode and owner lines name no file.

    Installed on pyinfra's logger while the deploy is added (add_deploy); records logged outside an operation, or
    above INFO (warnings), pass through.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lines: dict[tuple[str, str], list[str]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        from pyinfra.context import ctx_host

        pyinfra_host = ctx_host.get()
        op_hash = getattr(pyinfra_host, "current_op_hash", None)
        if op_hash is None or record.levelno != logging.INFO:
            return True
        message = record.getMessage()
        if message.startswith(pyinfra_host.print_prefix):  # host.log's "[name] ": the host is named per line below
            message = message[len(pyinfra_host.print_prefix):]
        self.lines.setdefault((pyinfra_host.name, op_hash), []).append(message.rstrip())
        return False

    def of(self, op_hash: str, host_name: str) -> list[str]:
        """The diff lines of one operation on one host, without the blank lines pyinfra ends each diff with."""
        lines = list(self.lines.get((host_name, op_hash), []))
        while lines and not lines[-1]:
            lines.pop()
        return lines


def describe_plan(plan: list[dict], diffs: DiffCollector | None, verb: str = "would") -> list[str]:
    """The lines deploy prints for a plan (pyinfra_cli.prints.build_plan_json): each operation that changes
    something, its hosts, and under it each host's diff (with --diff); then the conditional operations (restarts)
    that run only when an operation they watch changes.

    + plan: build_plan_json(state) after add_deploy
    + diffs: the DiffCollector that was installed while the deploy was added (None: no --diff)
    + verb: "would" (--check) or "will" (a run with --diff, printed before anything changes)
    """
    lines = []
    would = [op for op in plan if op["hosts_with_change"]]
    for op in would:
        lines.append(f"  {verb}: {op['name']} on {', '.join(op['hosts_with_change'])}")
        for host_name in op["hosts_with_change"]:
            diff = diffs.of(op["op_hash"], host_name) if diffs is not None else []
            if diff and not diff[0].startswith("Will "):  # mode/owner lines only: pyinfra gives them no heading
                lines.append(f"      {host_name}:")
            for line in diff:
                # pyinfra's headings ("Will create|modify|replace lines in PATH") name the host; the rest is indented
                lines.append(f"      {host_name}: {line}" if line.startswith("Will ") else f"        {line}")
    if would:
        lines += [f"  then maybe: {op['name']} on {', '.join(op['hosts_with_conditional_change'])}"
                  for op in plan if op["hosts_with_conditional_change"]]
    return lines


def plan_with_diffs(plan: list[dict], diffs: DiffCollector | None) -> list[dict]:
    """The plan for --json: each operation with its diff lines per host (`diff`, only with --diff)."""
    if diffs is None:
        return plan
    with_diff = []
    for op in plan:
        shown = {h: diffs.of(op["op_hash"], h) for h in op["hosts_with_change"]}
        with_diff.append({**op, "diff": {h: lines for h, lines in shown.items() if lines}})
    return with_diff


def shell_on(pyinfra_host):
    """run_shell(command) -> (ok, stdout) on a connected host, for checks that are not operations."""
    from pyinfra.api import StringCommand

    def run_shell(command: str) -> tuple[bool, str]:
        ok, output = pyinfra_host.run_shell_command(StringCommand(command))
        return ok, "\n".join(output.stdout_lines)

    return run_shell


def prepare_wheelhouses(state, cache, offline: bool, log, llama_engine: bool = False, llama_wheel=None) -> None:
    """One wheelhouse per Python version the nodes run (/usr/bin/python3): a node may run another release
    of Debian/Ubuntu than this machine, and binary wheels are built per Python version. llama_engine
    (model_server.engine llama-cpp-python): model nodes' wheelhouses also carry llama-cpp-python."""
    houses: dict = {}
    for pyinfra_host in state.inventory.iter_activated_hosts():
        ok, output = shell_on(pyinfra_host)("/usr/bin/python3 -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])'")
        version = output.strip() if ok and output.strip() else "%d.%d" % sys.version_info[:2]
        key = (version, llama_engine and pyinfra_host.data.clawbot_plan.is_model)
        if key not in houses:
            houses[key] = builds.build_wheelhouse(cache, version, offline, log=log, with_llama=key[1],
                                                  llama_wheel=llama_wheel)
        pyinfra_host.data.clawbot_wheelhouse = houses[key]  # host.data hands out copies: set, don't mutate


def check_node(pyinfra_host, model_info, config: dict):
    """Preflight one model node from its NodeMemory fact (memory, cgroup limit, free disk where the model goes,
    GPUs), read once over the open connection; errors in the report's findings stop the rollout.

    + pyinfra_host: the connected host; its plan (host.data.clawbot_plan) names the agent's user
    + model_info: the model's exact sizes (clawbot.common.sizing.read_model_info)
    + config: the checked clawbot.json (model_server.model_path says where the model goes)
    """
    from pyinfra.api import DeployError

    from clawbot.common import preflight
    from clawbot.control.facts import NodeMemory

    model_dir = os.path.dirname(config["model_server"]["model_path"])
    node = pyinfra_host.get_fact(NodeMemory, model_dir=model_dir, user=pyinfra_host.data.clawbot_plan.user)
    if node is None:  # the fact's command failed (pyinfra printed its output)
        raise DeployError(f"preflight: cannot read {NodeMemory.name} on {pyinfra_host.name}")
    return preflight.check_config(model_info, config, node, name=getattr(pyinfra_host.data, "clawbot_name", "this node"))


def preflight_model_nodes(state, model_info, config: dict, log) -> bool:
    """Before any change: the model must fit every model node (exact sizing vs what the node has). Each
    node's facts stay in host.data.clawbot_node for the converge (its GPUs decide the engine build)."""
    from pathlib import Path

    from clawbot.control import split

    fits = True
    worker_memory = split.measure_workers(state, log)  # model_server.split: what each RPC worker offers
    for pyinfra_host in state.inventory.iter_activated_hosts():
        plan = pyinfra_host.data.clawbot_plan
        if not plan.is_model:
            continue
        node_config = config
        if plan.rpc_main is not None:  # its clawbot.json gets the workers' measured memory, and is judged with it
            entries = split.update_main_config(Path(plan.config_file), plan.rpc_main, worker_memory)
            node_config = split.with_workers(config, entries)
        report = check_node(pyinfra_host, model_info, node_config)
        pyinfra_host.data.clawbot_node = report.node  # host.data hands out copies: set, don't mutate
        name = pyinfra_host.data.clawbot_name
        for finding in report.findings:
            if finding.level in ("error", "warning"):
                log(f"  preflight {name}: {finding.level}: {finding.message}")
        if any(f.level == "error" for f in report.findings):
            fits = False
        elif report.plan is not None and report.plan.split.value is not None:
            log(f"  preflight {name}: the split fits: {report.plan.split.value.describe()}")
        else:
            log(f"  preflight {name}: model fits ({sizing.gib(report.fit.total_bytes)} needed, "
                f"{sizing.gib(report.node.memory_available)} available)")
    if not fits:
        print("deploy.py: refusing to roll out: the model does not fit (numbers above); nothing was changed",
              file=sys.stderr)
    return fits


def health_probe(url: str, python: str, tls: dict, deadline_s: float) -> str:
    """A shell command, run on the node after the rollout, that polls an agent's health URL over mTLS.

    Not an operation: checking health changes nothing, so it must not count as a change."""
    script = (
        "import ssl,sys,time,urllib.request,urllib.error\n"
        f"ctx=ssl.create_default_context(cafile={tls['ca_cert']!r})\n"
        f"ctx.load_cert_chain({tls['client_cert']!r},{tls['client_key']!r})\n"
        f"end=time.monotonic()+{deadline_s}\nlast=''\n"
        "while time.monotonic()<end:\n"
        "    try:\n"
        f"        urllib.request.urlopen({url!r},context=ctx,timeout=5); print('healthy'); sys.exit(0)\n"
        "    except urllib.error.HTTPError as e: last=f'HTTP {e.code} {e.read()[:300]!r}'\n"
        "    except Exception as e: last=repr(e)\n"
        "    time.sleep(1)\n"
        f"print('not healthy after {deadline_s:.0f} s: '+last); sys.exit(1)\n"
    )
    return f"{python} -c {shlex.quote(script)}"


# how long deploy waits for a staged swap beyond the model's own load: the quality gate (smoke set, two
# llama-perplexity runs over the shipped text) on a large model on CPU takes minutes
SWAP_GATE_ALLOWANCE_S = 900


def swap_probe(url: str, python: str, tls: dict, deadline_s: float, after: float = 0.0) -> str:
    """A shell command, run on the node, that waits on the gateway's /readyz until the model swap there has settled
    (clawbot.model.swap) and prints {"swap": ..., "now": the node's clock}; exit 1 when the swap failed.

    + after: wait for a swap record at least this new (node clock): one started by a reload just sent"""
    from clawbot.model.swap import ACTIVE_STATES

    script = (
        "import json,os,ssl,sys,time,urllib.request,urllib.error\n"
        f"ctx=ssl.create_default_context(cafile={tls['ca_cert']!r})\n"
        f"ctx.load_cert_chain({tls['client_cert']!r},{tls['client_key']!r})\n"
        f"end=time.monotonic()+{deadline_s}\nswap={{'state':'unknown','reason':'no answer'}}\n"
        "while time.monotonic()<end:\n"
        "    try:\n"
        f"        body=json.load(urllib.request.urlopen({url!r},context=ctx,timeout=10))\n"
        "    except urllib.error.HTTPError as e: body=json.loads(e.read() or b'{}')\n"
        "    except Exception as e: body={'swap':{'state':'unknown','reason':repr(e)}}\n"
        "    swap=body.get('swap') or {'state':'idle'}\n"
        "    applied=body.get('applied') or {}\n"
        "    def ident(p):\n"
        "        try: st=os.stat(p); return [st.st_dev,st.st_ino,st.st_size,st.st_mtime_ns]\n"
        "        except OSError: return None\n"
        "    current=all(applied.get(k)==ident(applied.get(k+'_path','')) for k in ('config','model'))\n"
        f"    if current and swap.get('state') not in {tuple(ACTIVE_STATES) + ('unknown',)!r} and swap.get('since',0)>={after!r}: break\n"
        "    time.sleep(1)\n"
        "print(json.dumps({'swap':swap,'now':time.time()}))\n"
        "sys.exit(1 if swap.get('state') in ('failed','unknown','cancelled') else 0)\n"
    )
    return f"{python} -c {shlex.quote(script)}"


def _settle_swap(pyinfra_host, plan: NodePlan, run_shell, log) -> str:
    """After a healthy model agent: wait for its model swap; a swap that failed in an earlier run is tried again
    (a reload) once. Removes MODEL.previous once the new model serves. Returns the problem, or ""."""
    import json

    from clawbot.model.swap import PREVIOUS_SUFFIX

    name = plan.name
    python = f"{plan.venv}/bin/python"
    deadline = plan.ready_deadline_s + SWAP_GATE_ALLOWANCE_S

    def probe(after: float = 0.0) -> dict:
        ok, output = run_shell(swap_probe(plan.model_health_url, python, plan.tls, deadline, after))
        try:
            return json.loads(output.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return {"swap": {"state": "unknown", "reason": output.strip()[-400:]}, "now": 0.0}

    found = probe()
    swap = found["swap"]
    applied = getattr(pyinfra_host.data, "clawbot_model_applied", ()) or ()
    if swap.get("state") == "failed" and not any(op is not None and op.did_change() for op in applied):
        log(f"  {name}: the last model swap failed ({swap.get('reason', '')}); trying it again")
        manager = getattr(pyinfra_host.data, "clawbot_service_manager_used", "systemd")
        reload = "supervisorctl signal HUP clawbot-model" if manager == "supervisor" else \
            "systemctl reload clawbot-model.service"
        run_shell(reload)
        swap = probe(after=found.get("now", 0.0))["swap"]
    state = swap.get("state")
    if state == "failed" or state == "unknown" or state == "cancelled":
        log(f"  {name}: model swap NOT done, the old model still serves: {swap.get('reason', '')}")
        return f"model swap: {swap.get('reason', state)}"
    if state in ("done", "restarting"):
        log(f"  {name}: model swap {state}: {swap.get('reason', '')}")
    run_shell(f"rm -f {shlex.quote(plan.model_path + PREVIOUS_SUFFIX)}")  # the new model serves: the old file goes
    return ""


def reserved_pages(run_shell) -> int:
    """HugePages_Total as the kernel reports it now (deploy.py reads it after the run: asked vs got).

    The HugePages fact's command and parser, run through run_shell rather than host.get_fact: a check after
    the run must not mark the host failed when it cannot read the value (it reports 0 then)."""
    from clawbot.control.facts import HugePages

    fact = HugePages()
    ok, output = run_shell(fact.command())
    return fact.process(output.splitlines()).get("HugePages_Total", 0) if ok else 0


def verify_after_run(state, log) -> dict[str, list[str]]:
    """Checks that change nothing, so they are not operations: agents healthy, hugepages asked vs got."""
    problems: dict[str, list[str]] = {}
    for pyinfra_host in state.inventory.iter_activated_hosts():
        if pyinfra_host in state.failed_hosts:
            continue
        plan: NodePlan = pyinfra_host.data.clawbot_plan
        name = pyinfra_host.data.clawbot_name
        run_shell = shell_on(pyinfra_host)
        if plan.is_model and plan.hugepages is not None:
            got = reserved_pages(run_shell)
            note = "" if got >= plan.hugepages else (
                " (fewer: not enough contiguous free memory; the boot-time setting in /etc/sysctl.d applies early "
                "at the next boot)")
            log(f"  {name}: hugepages asked {plan.hugepages}, the kernel reserved {got}{note}")
        checks = []
        if plan.is_model:
            checks.append(("model (gateway /readyz: loaded and able to generate)", plan.model_health_url))
        if plan.is_chat:
            checks.append(("chat agent", plan.chat_health_url))
        for what, url in checks:
            ok, output = run_shell(health_probe(url, f"{plan.venv}/bin/python", plan.tls,
                                                deadline_s=plan.ready_deadline_s))
            if ok:
                log(f"  {name}: {what} healthy ({url})")
                if url == plan.model_health_url and plan.is_model:
                    problem = _settle_swap(pyinfra_host, plan, run_shell, log)
                    if problem:
                        problems.setdefault(name, []).append(problem)
            else:
                problems.setdefault(name, []).append(f"{what}: {output.strip()[-400:]}")
                log(f"  {name}: {what} NOT healthy: {output.strip()[-400:]}")
    return problems


def summarise(state) -> dict:
    """changed / unchanged / failed operations per host, and the service manager each host used."""
    summary = {}
    for pyinfra_host in state.inventory.iter_activated_hosts():
        changed = unchanged = failed = 0
        for op in state.ops[pyinfra_host].values():
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
