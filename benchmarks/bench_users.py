"""Simulated people on the default rollout: answered / waited / unavailable, waits, and whether memory stays flat.

Acceptance (issue 18): "On the default rollout on this machine kind: 8 simulated people for 10 minutes → 0
messages answered as unavailable while the model is up; wait p95 reported; RSS of every agent flat within 10 %."

What it stands up: the default inventory (inventory/: its group_vars and .clawbot/clawbot.json — max_concurrency
2, parallel_slots 2, the demo model Gemma 3 270M, knowledge-base fallback) rolled out by `python deploy.py` onto
one fresh node of the test harness (tests/nodes: a Debian bookworm machine with systemd as PID 1 and sshd, on this
machine's kernel and CPUs), which plays both roles as this machine does in the default inventory. Only the hosts
differ: the harness node instead of `clawbot-local`, so the gateway endpoint names that node. (The default
inventory aimed at this machine itself would install services into the shared machine, and here systemd is not
PID 1, so it would run them under supervisor instead of the units a server gets.)

Then: 8 accounts + API keys with `clawbot users -i INVENTORY`, `clawbot bench CHAT_URL --users N --duration S`,
and meanwhile, every --sample-s, the RSS (VmRSS, RssAnon, RssFile from /proc/PID/status, read on this host by the
host pid of each process) of the chat agent, the model agent (systemd's MainPID of clawbot-chat / clawbot-model
inside the node) and llama-server (the model agent's child), plus the model's readiness as the gateway reports it
(GET /readyz over mTLS with the control machine's certificate, as `clawbot status` connects), so "while the model
is up" is known, not assumed.

Writes benchmarks/results/users.json (the full report: every message) and users.md (the summary).
Run as root: python benchmarks/bench_users.py [--duration 600] [--users 8] [--think-s 5] [--sample-s 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_INVENTORY = ROOT / "inventory"
GOAL_RSS_RATIO = 1.10
UNITS = {"chat_agent": "clawbot-chat", "model_agent": "clawbot-model"}
FIRST_MINUTE_S = 60

from clawbot.common.config import gateway_host_port, load_config  # noqa: E402
from tests.nodes.cluster import Cluster  # noqa: E402
from tests.nodes.config import HarnessConfig, InstanceBusy, shifted_subnet  # noqa: E402

INSTANCE, SUBNET = "cbu", "10.231.31.0/24"  # apart from the test sessions' cbt, cbt1, … on 10.231.7.0/24 and up


def say(message: str) -> None:
    print(f"[bench_users] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- rollout


def default_inventory_on(node, directory: Path) -> Path:
    """The default inventory with the harness node as its one host (both roles); everything else as shipped."""
    inventory = directory / "inventory"
    (inventory / ".clawbot").mkdir(parents=True)
    shutil.copy(node.inventory_dir / "hosts.yml", inventory / "hosts.yml")
    shutil.copytree(DEFAULT_INVENTORY / "group_vars", inventory / "group_vars")
    with open(inventory / "group_vars" / "all.yml", "a") as handle:  # the CA and keys of this run: gone with it
        handle.write(f"\n# bench_users.py: this run's own state directory\nclawbot_state_dir: {directory / 'state'}\n")
    config = json.loads((DEFAULT_INVENTORY / ".clawbot" / "clawbot.json").read_text())
    config.pop("$schema", None)  # an editor hint relative to the repo's inventory/
    config["model_gateway"]["endpoint"] = config["model_gateway"]["endpoint"].replace("clawbot-local", node.name)
    (inventory / ".clawbot" / "clawbot.json").write_text(json.dumps(config, indent=2) + "\n")
    return inventory


def deploy(inventory: Path) -> float:
    out = inventory.parent / "deploy-result.json"  # not in the inventory: Ansible would read it
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "deploy.py"), "-i", str(inventory), "--json", str(out)],
                          capture_output=True, text=True, timeout=1800)
    elapsed = time.monotonic() - started
    (inventory.parent / "deploy.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"deploy failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return elapsed


def clawbot_users(inventory: Path, *argv: str, stdin: str | None = None) -> str:
    proc = subprocess.run([sys.executable, "-m", "clawbot", "users", "-i", str(inventory), *argv], input=stdin,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"clawbot users {' '.join(argv)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def make_people(inventory: Path, count: int, keys_file: Path) -> list[str]:
    names, keys = [], []
    for n in range(1, count + 1):
        name = f"person{n}"
        clawbot_users(inventory, "add", name, "--password-stdin", stdin=f"{name}-bench-password\n")
        keys.append(json.loads(clawbot_users(inventory, "--json", "add-key", name, "--key-name", "bench"))["key"])
        names.append(name)
    keys_file.write_text("".join(k + "\n" for k in keys))
    keys_file.chmod(0o600)
    return names


# ---------------------------------------------------------------------------------------------- processes


def _status_fields(pid: int) -> dict | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def host_pid(node, node_pid: int) -> int | None:
    """The host's pid of the process that is `node_pid` inside the node's pid namespace."""
    namespace = os.readlink(f"/proc/{node.init_pid}/ns/pid")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/pid") != namespace:
                continue
        except OSError:
            continue
        fields = _status_fields(int(entry))
        if fields and fields.get("NSpid", "").split()[-1:] == [str(node_pid)]:
            return int(entry)
    return None


def children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            found += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    except OSError:
        pass
    return found


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


class Processes:
    """The host pids of the chat agent, the model agent and llama-server, found again when one was restarted."""

    def __init__(self, node):
        self.node = node
        self.pids: dict[str, int | None] = {}
        self.seen: dict[str, list[int]] = {"chat_agent": [], "model_agent": [], "llama_server": []}

    def resolve(self) -> None:
        for role, unit in UNITS.items():
            if self.pids.get(role) and _status_fields(self.pids[role]):
                continue
            main = self.node.ssh(f"systemctl show -p MainPID --value {unit}.service", timeout_s=60).stdout.strip()
            self.pids[role] = host_pid(self.node, int(main)) if main.isdigit() and main != "0" else None
        server = self.pids.get("llama_server")
        if not (server and _status_fields(server) and self.pids.get("model_agent") in self._parents(server)):
            agent = self.pids.get("model_agent")
            self.pids["llama_server"] = next((c for c in self._descendants(agent) if comm(c).startswith("llama-server")),
                                             None) if agent else None
        for role, pid in self.pids.items():
            if pid and pid not in self.seen[role]:
                self.seen[role].append(pid)

    @staticmethod
    def _descendants(pid: int) -> list[int]:
        out, todo = [], [pid]
        while todo:
            for child in children(todo.pop()):
                out.append(child)
                todo.append(child)
        return out

    @staticmethod
    def _parents(pid: int) -> list[int]:
        out = []
        while pid > 1:
            fields = _status_fields(pid)
            if not fields:
                break
            pid = int(fields.get("PPid", "0"))
            out.append(pid)
        return out

    def sample(self) -> dict:
        self.resolve()
        row = {}
        for role, pid in self.pids.items():
            fields = _status_fields(pid) if pid else None
            if fields is None:
                row[role] = None
                continue
            kib = {k: int(fields.get(k, "0 kB").split()[0]) for k in ("VmRSS", "RssAnon", "RssFile", "RssShmem")}
            row[role] = {"pid": pid, **kib, "cpu_s": cpu_seconds(pid)}
        return row


def cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 2)
    except (OSError, IndexError, ValueError):
        return None


def gateway_context(state_dir: Path) -> ssl.SSLContext:
    """mTLS as `clawbot status` does it: the cluster trust and the control machine's client certificate."""
    from clawbot.control.certificates import trust_path
    from clawbot.control.state import CONTROL_NAME

    context = ssl.create_default_context(cafile=str(trust_path(state_dir)))
    control = state_dir / "nodes" / CONTROL_NAME
    context.load_cert_chain(str(control / "client.pem"), str(control / "client.key"))
    return context


def gateway_ready(gateway_url: str, context: ssl.SSLContext) -> bool | None:
    """The model node's own answer (GET /readyz on the gateway: 200 while llama-server serves); None: no answer.
    Asked directly rather than through the chat node, whose /api/status would also refresh its gateway watch."""
    try:
        with urllib.request.urlopen(gateway_url + "/readyz", context=context, timeout=20) as response:
            return response.status == 200
    except urllib.error.HTTPError:
        return False
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------- analysis


def rss_summary(samples: list[dict], role: str, duration_s: float, seen: list[int]) -> dict:
    rows = [(s["t"], s[role]) for s in samples if s.get(role)]
    if not rows:
        return {"samples": 0}
    mib = [(t, r["VmRSS"] / 1024) for t, r in rows]
    start, end = mib[0][1], mib[-1][1]
    peak, low = max(v for _, v in mib), min(v for _, v in mib)
    reference_s = min(FIRST_MINUTE_S, duration_s / 2)  # past the first answers' warm-up (KV cache pages touched)
    after_minute = next((v for t, v in mib if t >= reference_s), end)
    cpu = [r["cpu_s"] for _, r in rows if r.get("cpu_s") is not None]
    return {
        "pids": seen, "restarted": len(seen) > 1, "samples": len(rows),
        "start_mib": round(start, 1), "end_mib": round(end, 1), "max_mib": round(peak, 1), "min_mib": round(low, 1),
        "reference_s": reference_s, "after_first_minute_mib": round(after_minute, 1),
        "end_over_start": round(end / start, 3), "max_over_start": round(peak / start, 3),
        "end_over_first_minute": round(end / after_minute, 3),
        "anon_start_mib": round(rows[0][1]["RssAnon"] / 1024, 1), "anon_end_mib": round(rows[-1][1]["RssAnon"] / 1024, 1),
        "file_start_mib": round(rows[0][1]["RssFile"] / 1024, 1), "file_end_mib": round(rows[-1][1]["RssFile"] / 1024, 1),
        "cpu_s": round(cpu[-1] - cpu[0], 1) if len(cpu) > 1 and len(seen) == 1 else None,
        "flat_within_10pct": len(seen) == 1 and peak / start <= GOAL_RSS_RATIO and low / start >= 2 - GOAL_RSS_RATIO,
        "series": [[round(t, 1), round(v, 1)] for t, v in mib],
    }


def unavailable_while_up(report: dict, samples: list[dict], sample_s: float) -> tuple[int, int]:
    """(unavailable messages sent while every readiness sample around them said the model was up, all unavailable)."""
    down = [s["t_wall"] for s in samples if s.get("gateway_ready") is not True]
    started = report["started_at"]
    count = total = 0
    for m in report["messages"]:
        if m["outcome"] != "unavailable":
            continue
        total += 1
        begin, end = started + m["sent_at_s"] - sample_s, started + m["sent_at_s"] + (m["reply_s"] or 0) + sample_s
        if not any(begin <= t <= end for t in down):
            count += 1
    return count, total


def markdown(result: dict) -> str:
    s, rss, args = result["bench"]["summary"], result["rss"], result["run"]
    acc = result["acceptance"]
    reference_s = min(FIRST_MINUTE_S, args["duration_s"] / 2)

    def v(x, unit=" s"):
        return "-" if x is None else f"{x:.2f}{unit}"

    lines = [
        f"# {args['users']} simulated people on the default rollout (`benchmarks/bench_users.py`)", "",
        f"{args['users']} people for {args['duration_s']:g} s (think time mean {args['think_s']:g} s, a new conversation "
        f"every {args['messages_per_conversation']} messages, seed {args['seed']}) against the default inventory's "
        f"config rolled out by deploy.py onto one fresh harness node (systemd, both roles; {result['machine']['cpus']} "
        f"cores shared with the bench client and other work). Rollout {result['rollout']['deploy_s']:.0f} s; "
        f"chat node slots {result['rollout']['chat_slots']}. Config as shipped: "
        + ", ".join(f"{k} {json.dumps(v)}" for k, v in result["rollout"]["settings"].items())
        + f". Load average (1/5/15 min) before {result['machine']['loadavg_before']}, at the end "
        f"{result['machine']['loadavg_after']}.", "",
        "| measure | result | goal |", "| --- | --- | --- |",
        f"| messages sent | {s['sent']} ({s['answered_per_min']} answered/min) | |",
        f"| answered (model, complete) | {s['answered']} | all |",
        f"| waited in line | {s['waited']} (longest position {s['max_position'] if s['max_position'] is not None else '-'}) | |",
        f"| unavailable | {s['unavailable']} ({acc['unavailable_while_model_up']} while the model was up) | 0 while up |",
        f"| failed | {s['failed']} | 0 |",
        f"| wait p50 / p95 / max | {v(s['wait_s']['p50'])} / {v(s['wait_s']['p95'])} / {v(s['wait_s']['max'])} | p95 reported |",
        f"| first token p50 / p95 (send → first token) | {v(s['first_token_s']['p50'])} / {v(s['first_token_s']['p95'])} | |",
        f"| reply p50 / p95 (send → done) | {v(s['reply_s']['p50'])} / {v(s['reply_s']['p95'])} | |",
        f"| gateway ready in every sample | {acc['model_up_every_sample']} ({len(result['samples'])} samples) | |",
        "", f"| process | RSS start | end | max | at {reference_s:g} s | max / start | end / start | end / at {reference_s:g} s "
        "| restarts | flat within 10 % |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for role, r in rss.items():
        if not r.get("samples"):
            lines.append(f"| {role} | no samples | | | | | | | |")
            continue
        lines.append(f"| {role} | {r['start_mib']} MiB | {r['end_mib']} MiB | {r['max_mib']} MiB | "
                     f"{r['after_first_minute_mib']} MiB | {r['max_over_start']:.3f} | {r['end_over_start']:.3f} | "
                     f"{r['end_over_first_minute']:.3f} | {len(r['pids']) - 1} | {'yes' if r['flat_within_10pct'] else 'no'} |")
    lines += ["", "Flat within 10 %: no restart, and every sample within 10 % of the first (taken after the rollout, "
              "before the first message). The acceptance judges the two agents; llama-server is reported beside them "
              "(its growth is RssAnon, not the weights' RssFile: consistent with KV-cache pages becoming resident as "
              "conversations get longer, not verified here; it runs with `--cache-ram 0`, so no prompt cache grows; "
              "the end / at-reference ratio shows whether it levels off). The chat agent frees what closed TLS "
              "connections leave in reference cycles every few seconds (clawbot.chat.memory); issue 18's first "
              "10-minute run, before that, measured it growing 71.3 → 84.3 MiB (1.18).",
              "", f"Acceptance: {'met' if acc['met'] else 'not met'} "
              f"(unavailable while up {acc['unavailable_while_model_up']}, wait p95 {v(acc['wait_p95_s'])}, "
              f"agents' RSS flat: {acc['agents_rss_flat']}, llama-server's RSS flat: {acc['llama_server_rss_flat']}).",
              "", "Per person:", "", "| account | sent | answered | waited | unavailable | failed | wait p95 | reply p50 |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in result["bench"]["people"]:
        lines.append(f"| {p['account']} | {p['sent']} | {p['answered']} | {p['waited']} | {p['unavailable']} | "
                     f"{p['failed']} | {v(p['wait_s']['p95'])} | {v(p['reply_s']['p50'])} |")
    reasons = {**{f"unavailable: {k}": n for k, n in s["unavailable_reasons"].items()},
               **{f"failed: {k}": n for k, n in s["failure_reasons"].items()}}
    if reasons:
        lines += ["", "Reasons:", ""] + [f"- {n}x {k}" for k, n in reasons.items()]
    lines += ["", "RSS is VmRSS from /proc/PID/status (RssAnon and RssFile are in users.json); times are as the simulated "
              "person sees them, percentiles over answered messages; wait is the chat node's own queue_wait_s.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main


def start_cluster() -> Cluster:
    base = HarnessConfig.from_env(instance=INSTANCE, subnet=SUBNET)
    for slot in range(4):
        config = HarnessConfig.from_env(instance=base.instance + (str(slot) if slot else ""),
                                        subnet=shifted_subnet(base.subnet, slot))
        cluster = Cluster(config, log=lambda m: say(f"nodes: {m}"))
        try:
            cluster.up(1)
            return cluster
        except InstanceBusy:
            continue
    raise SystemExit("every bench_users harness instance is in use")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600, help="seconds people send messages (default 600)")
    parser.add_argument("--users", type=int, default=8, help="simulated people (default 8)")
    parser.add_argument("--think-s", type=float, default=5.0, help="mean think time (default 5, as clawbot bench)")
    parser.add_argument("--messages-per-conversation", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--sample-s", type=float, default=5.0, help="RSS and readiness sampling period (default 5)")
    parser.add_argument("--drain-s", type=float, default=400.0,
                        help="how long messages in flight at the end may finish (default 400: past chat.queue."
                             "max_wait_s's 300 s, so none is cut while the chat node still holds it)")
    parser.add_argument("--out", default=str(RESULTS / "users"), help="results path without extension "
                        "(default benchmarks/results/users: .json and .md)")
    args = parser.parse_args()

    hugepages = Path("/proc/sys/vm/nr_hugepages").read_text()
    thp_path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    thp = thp_path.read_text().split("[")[1].split("]")[0] if thp_path.exists() else None
    load_before = os.getloadavg()
    cluster = start_cluster()
    bench_proc = None
    try:
        node = cluster.nodes[0]
        with tempfile.TemporaryDirectory(prefix="bench-users-") as tmp:
            tmp = Path(tmp)
            inventory = default_inventory_on(node, tmp)
            say(f"deploying the default inventory's config onto {node.name} ({node.address})")
            deploy_s = deploy(inventory)
            say(f"rolled out in {deploy_s:.1f} s; creating {args.users} accounts and keys")
            keys_file = tmp / "keys"
            accounts = make_people(inventory, args.users, keys_file)
            ca = tmp / "state" / "ca" / "ca.pem"
            config = load_config(inventory / ".clawbot" / "clawbot.json")  # with its defaults (chat.port)
            chat_url = f"https://{node.address}:{config['chat']['port']}"
            gateway_url = f"https://{node.address}:{gateway_host_port(config['model_gateway']['endpoint'])[1]}"
            context = gateway_context(tmp / "state")
            processes = Processes(node)
            samples: list[dict] = []
            started = time.time()

            def take_sample() -> None:
                row = {"t": time.time() - started, "t_wall": time.time(), **processes.sample()}
                row["gateway_ready"] = gateway_ready(gateway_url, context)
                samples.append(row)

            take_sample()
            report_path = tmp / "report.json"
            say(f"{args.users} people for {args.duration:g} s against {chat_url}")
            bench_proc = subprocess.Popen(
                [sys.executable, "-m", "clawbot", "bench", chat_url, "--users", str(args.users),
                 "--duration", str(args.duration), "--think-s", str(args.think_s),
                 "--messages-per-conversation", str(args.messages_per_conversation), "--seed", str(args.seed),
                 "--drain-s", str(args.drain_s), "--keys", str(keys_file), "--cacert", str(ca),
                 "--json", str(report_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            output: dict = {}
            reader = threading.Thread(target=lambda: output.update(zip(("stdout", "stderr"), bench_proc.communicate())))
            reader.start()
            next_at = time.monotonic() + args.sample_s
            while bench_proc.poll() is None:
                time.sleep(max(0.0, min(next_at - time.monotonic(), 0.5)))
                if time.monotonic() >= next_at and bench_proc.poll() is None:
                    take_sample()
                    next_at += args.sample_s
            reader.join()
            take_sample()
            load_after = os.getloadavg()
            print(output.get("stdout", ""))
            if bench_proc.returncode not in (0, 1) or not report_path.exists():
                raise SystemExit(f"clawbot bench failed ({bench_proc.returncode}):\n{output.get('stderr', '')}")
            report = json.loads(report_path.read_text())
            chat_slots = (report.get("status_before") or {}).get("queue", {}).get("capacity")
            settings = {"model": config["model_server"].get("model_name"), "max_tokens": config["model_gateway"]["max_tokens"],
                        "max_concurrency": config["model_gateway"]["max_concurrency"],
                        "parallel_slots": config["model_server"]["parallel_slots"], "chat_queue": config["chat"]["queue"],
                        "fallback_strategies": config["fallback_strategies"], "limits": config["auth"]["limits"]}
    finally:
        if bench_proc is not None and bench_proc.poll() is None:
            bench_proc.kill()
            bench_proc.wait(timeout=30)
        cluster.down()
        Path("/proc/sys/vm/nr_hugepages").write_text(hugepages)
        if thp:
            try:
                thp_path.write_text(thp)
            except OSError:
                pass

    rss = {role: rss_summary(samples, role, args.duration, processes.seen[role])
           for role in ("chat_agent", "model_agent", "llama_server")}
    while_up, unavailable = unavailable_while_up(report, samples, args.sample_s)
    s = report["summary"]
    agents_flat = all(rss[r].get("flat_within_10pct") for r in ("chat_agent", "model_agent"))
    result = {
        "benchmark": "simulated people (clawbot bench --users) on the default inventory's config, rolled out onto one "
                     "harness node (systemd, both roles)",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release(),
                    # the machine is shared: its 1/5/15-minute load before the rollout and when the people stopped
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in load_after]},
        "run": {"users": args.users, "duration_s": args.duration, "think_s": args.think_s,
                "messages_per_conversation": args.messages_per_conversation, "seed": args.seed,
                "sample_s": args.sample_s, "drain_s": args.drain_s},
        "rollout": {"deploy_s": round(deploy_s, 1), "accounts": accounts, "chat_slots": chat_slots,
                    "config": "inventory/.clawbot/clawbot.json (gateway endpoint: the harness node)",
                    "settings": settings},
        "acceptance": {
            "goal": "0 unavailable while the model is up; wait p95 reported; RSS of every agent flat within 10 %",
            "unavailable_while_model_up": while_up, "unavailable": unavailable,
            "model_up_every_sample": all(x.get("gateway_ready") is True for x in samples),
            "wait_p95_s": s["wait_s"]["p95"], "agents_rss_flat": agents_flat,
            "llama_server_rss_flat": bool(rss["llama_server"].get("flat_within_10pct")),
            "met": while_up == 0 and s["wait_s"]["p95"] is not None and agents_flat and s["failed"] == 0,
        },
        "rss": rss,
        "samples": [{k: v for k, v in x.items() if k != "t_wall"} for x in samples],
        "bench": report,
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
