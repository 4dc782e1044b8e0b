"""`clawbot monitoring [-i DIR] [--out DIR] [--chat-keys]`: Prometheus and Grafana for the cluster, from its inventory.

Writes into --out (default <state directory>/monitoring), each file only when its content changes:

  prometheus.yml          a complete Prometheus configuration (or the scrape_configs to copy into yours): job
                          clawbot-model scrapes every model node's gateway over mutual TLS with Prometheus's own
                          client certificate, job clawbot-chat every chat node over HTTPS with an admin's API key
  clawbot-alerts.yml      alert rules (ALERTS below), loaded by prometheus.yml's rule_files
  grafana-dashboard.json  a Grafana dashboard (PANELS below); Grafana asks for the Prometheus data source at import
  ca.pem                  the cluster's trust bundle (the server certificates of both kinds of node chain to it)
  monitoring.pem/.key     Prometheus's client certificate (monitoring.clawbot-control), issued by deploy.py; the
                          gateways serve it because deploy puts that name into model_gateway.allowed_clients

Paths inside prometheus.yml are relative to it, so the folder moves as a whole (e.g. to /etc/prometheus/clawbot/).
A chat node answers /metrics only to an admin, and each chat node has its own accounts: its job reads the key from
chat-api-key.NODE, which this command never overwrites; --chat-keys creates the missing ones over SSH
(`clawbot users -i DIR --limit NODE add-key ADMIN`), or put a key there yourself.

Alert rules and panels use only metrics the agents export (tests/test_monitoring.py checks every expression against
the real /metrics of running agents), plus Prometheus's own `up`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from clawbot.control.state import MONITORING_NAME

MODEL_JOB, CHAT_JOB = "clawbot-model", "clawbot-chat"
CONFIG_FILE, RULES_FILE, DASHBOARD_FILE = "prometheus.yml", "clawbot-alerts.yml", "grafana-dashboard.json"
CA_FILE, CERT_FILE, KEY_FILE = "ca.pem", "monitoring.pem", "monitoring.key"
CHAT_KEY_PREFIX = "chat-api-key."
KEY_NAME = "prometheus"  # the name --chat-keys gives the admin's API key on each chat node
HEADER = ("# Written by `clawbot monitoring` from the inventory {inventory}; re-run it after the inventory changes.\n"
          "# Paths are relative to this file. Docs: docs/monitoring.md\n")


def add_arguments(parser) -> None:
    parser.add_argument("-i", "--inventory", default="inventory", help="inventory directory (default: inventory)")
    parser.add_argument("--vault-password-file")
    parser.add_argument("--out", help="where to write the files (default: <state directory>/monitoring)")
    parser.add_argument("--scrape-interval", default="15s", help="Prometheus scrape and rule interval (default 15s)")
    parser.add_argument("--chat-keys", action="store_true",
                        help="create an admin API key on each chat node that has no chat-api-key.NODE here yet "
                             "(over SSH, as `clawbot users -i DIR --limit NODE add-key ADMIN` does)")


# --------------------------------------------------------------------------------------------- alert rules

# (name, expression, for, severity, summary): every expression is checked against the agents' real /metrics.
ALERTS = (
    ("ClawbotTargetDown", f'up{{job=~"{MODEL_JOB}|{CHAT_JOB}"}} == 0', "2m", "critical",
     "{{ $labels.node }} ({{ $labels.job }}) does not answer /metrics: agent down, network, or a refused "
     "credential (see the target's error on Prometheus's Targets page)"),
    ("ClawbotModelNotReady", 'clawbot_model_state{clawbot_model_state="ready"} == 0', "5m", "critical",
     "the model server on {{ $labels.node }} has not been ready for 5 minutes (GET /status says why)"),
    ("ClawbotModelCrashLoop", "increase(clawbot_model_server_restarts_total[15m]) >= 3", "0m", "critical",
     "the model server on {{ $labels.node }} was restarted {{ $value | humanize }} times in 15 minutes"),
    ("ClawbotQueueSaturated",
     "clawbot_gateway_queue_depth / clawbot_gateway_queue_capacity >= 0.8"
     ' or sum by (job, instance, node) (rate(clawbot_gateway_rejections_total{reason=~"queue_full|queue_timeout"}[5m]))'
     " > 0", "5m", "warning",
     "the gateway queue of {{ $labels.node }} is (nearly) full or turns requests away: more load than slots"),
    ("ClawbotCertificateRenewalDue",
     "clawbot_certificate_expiry_timestamp_seconds - time()"
     " < (clawbot_certificate_expiry_timestamp_seconds - clawbot_certificate_not_before_timestamp_seconds) / 3",
     "1h", "warning",
     "the {{ $labels.certificate }} certificate of {{ $labels.node }} has less than a third of its lifetime left: "
     "re-run deploy.py (it renews it, as `clawbot status` says)"),
    ("ClawbotCertificateExpiring", "clawbot_certificate_expiry_timestamp_seconds - time() < 3 * 86400", "0m",
     "critical", "the {{ $labels.certificate }} certificate of {{ $labels.node }} expires within 3 days: re-run "
                 "deploy.py now"),
    ("ClawbotModelDiskLow",
     "clawbot_model_disk_free_bytes < clawbot_model_file_bytes"
     " or clawbot_model_disk_free_bytes / clawbot_model_disk_size_bytes < 0.05", "10m", "warning",
     "the disk holding model_server.model_path on {{ $labels.node }} is nearly full: a new model of this size would "
     "not fit beside the one there"),
    ("ClawbotChatModelNodeUnused", "clawbot_chat_upstream_up == 0", "5m", "warning",
     "the chat node {{ $labels.node }} has sent nothing to the model node {{ $labels.upstream }} for 5 minutes: down, "
     "not ready or failing (/api/status: gateway.upstreams says why)"),
    ("ClawbotChatLongWaits",
     'histogram_quantile(0.95, sum by (le, job, instance, node) (rate(clawbot_chat_queue_wait_seconds_bucket'
     '{outcome="admitted"}[15m]))) > 60', "15m", "warning",
     "on the chat node {{ $labels.node }} one message in twenty waits over a minute for a model slot: more people "
     "than slots (add a model node, docs/replicas.md)"),
    ("ClawbotHugepagesNotBacking", "clawbot_model_hugepages_wanted == 1 and clawbot_model_hugepages_backed == 0",
     "5m", "warning",
     "model_server.hugepages asks for huge pages on {{ $labels.node }} but the weights are not in them "
     "(GET /status: model.hugepages.fallback_reason)"),
)


def alert_rules() -> dict:
    rules = [{"alert": name, "expr": expr, "for": wait, "labels": {"severity": severity},
              "annotations": {"summary": summary}} for name, expr, wait, severity, summary in ALERTS]
    return {"groups": [{"name": "clawbot", "rules": rules}]}


# --------------------------------------------------------------------------------------------- dashboard

NODE = '{node=~"$node"}'
RATE = "$__rate_interval"


def _quantiles(metric: str) -> list[tuple[str, str]]:
    return [(f"histogram_quantile({q}, sum by (le, node) (rate({metric}_bucket{NODE}[{RATE}])))", f"p{int(q * 100)} "
             "{{node}}") for q in (0.5, 0.95)]


# (title, unit, [(expression, legend)]): one time series panel each, two per row.
PANELS = (
    ("Output tokens per second", "short",
     [(f"sum by (node) (rate(clawbot_gateway_output_tokens_total{NODE}[{RATE}]))", "{{node}}")]),
    ("Model server ready", "short", [(f'clawbot_model_state{{clawbot_model_state="ready",node=~"$node"}}', "{{node}}")]),
    ("First-token latency (admission to first token)", "s", _quantiles("clawbot_gateway_first_token_seconds")),
    ("Inter-token latency", "s", _quantiles("clawbot_gateway_inter_token_seconds")),
    ("Queue depth and requests in flight", "short",
     [(f"clawbot_gateway_queue_depth{NODE}", "queued {{node}}"), (f"clawbot_gateway_in_flight{NODE}", "in flight {{node}}"),
      (f"clawbot_gateway_max_concurrency{NODE}", "slots {{node}}"),
      (f"clawbot_gateway_queue_capacity{NODE}", "queue capacity {{node}}")]),
    ("Queue wait", "s", _quantiles("clawbot_gateway_queue_wait_seconds")),
    ("Gateway requests by status", "reqps",
     [(f"sum by (status) (rate(clawbot_gateway_requests_total{NODE}[{RATE}]))", "{{status}}")]),
    ("Requests turned away before the model", "reqps",
     [(f"sum by (reason) (rate(clawbot_gateway_rejections_total{NODE}[{RATE}]))", "{{reason}}")]),
    ("Tokens per second per request", "short", _quantiles("clawbot_gateway_tokens_per_second")),
    ("Model server memory", "bytes",
     [(f"clawbot_model_server_resident_bytes{NODE}", "resident {{node}}"),
      (f"clawbot_model_weights_hugetlb_bytes{NODE}", "weights in huge pages {{node}}")]),
    ("Huge pages: wanted and backing the weights", "short",
     [(f"clawbot_model_hugepages_wanted{NODE}", "wanted {{node}}"),
      (f"clawbot_model_hugepages_backed{NODE}", "backed {{node}}")]),
    ("Model disk free", "bytes",
     [(f"clawbot_model_disk_free_bytes{NODE}", "free {{node}}"), (f"clawbot_model_file_bytes{NODE}", "model file {{node}}")]),
    ("Model server restarts", "short", [(f"increase(clawbot_model_server_restarts_total{NODE}[1h])", "{{node}}")]),
    ("Certificate days left", "d",
     [(f"(clawbot_certificate_expiry_timestamp_seconds{NODE} - time()) / 86400", "{{certificate}} {{node}}")]),
    ("Tokens today per account (chat nodes)", "short",
     [(f"sum by (user, kind) (clawbot_chat_user_tokens_today{NODE})", "{{user}} {{kind}}")]),
    ("Model requests per account", "reqps",
     [(f"sum by (user, via) (rate(clawbot_chat_model_requests_total{NODE}[{RATE}]))", "{{user}} via {{via}}")]),
    ("Requests refused by per-user limits", "reqps",
     [(f"sum by (user, limit) (rate(clawbot_chat_limited_total{NODE}[{RATE}]))", "{{user}} {{limit}}")]),
    ("People waiting for a model slot (chat nodes)", "short",
     [(f"clawbot_chat_queue_waiting{NODE}", "waiting {{node}}"), (f"clawbot_chat_queue_active{NODE}", "in flight {{node}}"),
      (f"clawbot_chat_queue_capacity{NODE}", "slots {{node}}")]),
    ("Wait for a model slot (chat nodes)", "s",
     [(f'histogram_quantile({q}, sum by (le, node) (rate(clawbot_chat_queue_wait_seconds_bucket{{outcome="admitted",'
       f'node=~"$node"}}[{RATE}])))', f"p{int(q * 100)} {{{{node}}}}") for q in (0.5, 0.95)]),
    ("Model nodes as the chat node sees them", "short",
     [(f"clawbot_chat_upstream_up{NODE}", "up {{upstream}}"),
      (f"clawbot_chat_upstream_in_flight{NODE}", "in flight {{upstream}}"),
      (f"sum by (upstream) (rate(clawbot_chat_upstream_errors_total{NODE}[{RATE}]))", "errors {{upstream}}")]),
    ("Logins by outcome", "reqps",
     [(f"sum by (outcome) (rate(clawbot_chat_logins_total{NODE}[{RATE}]))", "{{outcome}}")]),
)
NODE_VARIABLE_SERIES = f'up{{job=~"{MODEL_JOB}|{CHAT_JOB}"}}'
NODE_VARIABLE_QUERY = f"label_values({NODE_VARIABLE_SERIES}, node)"


def dashboard() -> dict:
    source = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    panels = []
    for index, (title, unit, targets) in enumerate(PANELS):
        panels.append({
            "id": index + 1, "type": "timeseries", "title": title, "datasource": source,
            "gridPos": {"x": 12 * (index % 2), "y": 8 * (index // 2), "w": 12, "h": 8},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"refId": chr(ord("A") + n), "datasource": source, "expr": expr, "legendFormat": legend}
                        for n, (expr, legend) in enumerate(targets)],
        })
    return {
        "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource", "pluginId": "prometheus",
                      "pluginName": "Prometheus"}],
        "__requires": [{"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"}],
        "title": "clawbot", "uid": "clawbot", "tags": ["clawbot"], "schemaVersion": 39, "version": 1,
        "editable": True, "time": {"from": "now-6h", "to": "now"}, "refresh": "30s",
        "templating": {"list": [{"name": "node", "label": "node", "type": "query", "datasource": source,
                                 "query": NODE_VARIABLE_QUERY, "definition": NODE_VARIABLE_QUERY, "refresh": 2,
                                 "multi": True, "includeAll": True, "allValue": ".*",
                                 "current": {"text": "All", "value": "$__all"}}]},
        "panels": panels,
    }


def expressions() -> list[str]:
    """Every PromQL expression this command writes (alert rules, panels, the node variable's metric)."""
    return [expr for _, expr, *_ in ALERTS] + [expr for _, _, targets in PANELS for expr, _ in targets] + \
        [NODE_VARIABLE_SERIES]


# --------------------------------------------------------------------------------------------- scrape configuration


def scrape_config(inventory, config: dict, interval: str) -> dict:
    """prometheus.yml: one mTLS job for the gateways, one job per chat node (each has its own accounts, so its own
    key file), relabelled to job clawbot-chat; targets are the inventory's addresses, which the nodes' server
    certificates carry."""
    from clawbot.common.config import gateway_host_port
    from clawbot.control.planning import CHAT_GROUP, MODEL_GROUP

    _, gateway_port = gateway_host_port(config["model_gateway"]["endpoint"])

    def targets(hosts, port):
        return [{"targets": [_host_port(h.address, port)], "labels": {"node": h.name}} for h in hosts]

    jobs = [{"job_name": MODEL_JOB, "scheme": "https", "metrics_path": "/metrics",
             "tls_config": {"ca_file": CA_FILE, "cert_file": CERT_FILE, "key_file": KEY_FILE},
             "static_configs": targets(inventory.group(MODEL_GROUP), gateway_port)}]
    for host in inventory.group(CHAT_GROUP):
        jobs.append({"job_name": f"{CHAT_JOB}-{host.name}", "scheme": "https", "metrics_path": "/metrics",
                     "tls_config": {"ca_file": CA_FILE},
                     "authorization": {"type": "Bearer", "credentials_file": CHAT_KEY_PREFIX + host.name},
                     "static_configs": targets([host], config["chat"]["port"]),
                     "relabel_configs": [{"target_label": "job", "replacement": CHAT_JOB}]})
    return {"global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [RULES_FILE], "scrape_configs": jobs}


def _host_port(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


# --------------------------------------------------------------------------------------------- writing


def _write(path: Path, data: bytes, mode: int = 0o644) -> bool:
    from clawbot.common import pki

    if path.exists() and path.read_bytes() == data and (path.stat().st_mode & 0o777) == mode:
        return False
    pki.atomic_write(path, data, mode)
    return True


def _yaml(value: dict, header: str) -> bytes:
    import yaml

    return (header + yaml.safe_dump(value, sort_keys=False, width=120, allow_unicode=True)).encode()


def write_files(out: Path, inventory, config: dict, state_dir: Path, interval: str = "15s") -> list[str]:
    """Write the files into `out`; the names of those that changed. FileNotFoundError when deploy.py has not issued
    the monitoring certificate yet."""
    from clawbot.control.certificates import trust_path

    material = state_dir / "nodes" / MONITORING_NAME
    if not (material / "client.pem").exists():
        raise FileNotFoundError(f"no monitoring certificate in {material}: run deploy.py first (it issues "
                                f"{MONITORING_NAME})")
    out.mkdir(parents=True, exist_ok=True)
    header = HEADER.format(inventory=inventory.source)
    files = {
        CONFIG_FILE: (_yaml(scrape_config(inventory, config, interval), header), 0o644),
        RULES_FILE: (_yaml(alert_rules(), header), 0o644),
        DASHBOARD_FILE: ((json.dumps(dashboard(), indent=2) + "\n").encode(), 0o644),
        CA_FILE: (trust_path(state_dir).read_bytes(), 0o644),
        CERT_FILE: ((material / "client.pem").read_bytes(), 0o644),
        KEY_FILE: ((material / "client.key").read_bytes(), 0o600),
    }
    return [name for name, (data, mode) in files.items() if _write(out / name, data, mode)]


def create_chat_keys(args, inventory, out: Path) -> list[str]:
    """An admin API key for each chat node without chat-api-key.NODE in `out`, made on that node over SSH; the
    nodes it failed on."""
    from clawbot.control.planning import CHAT_GROUP, cluster_var

    chat = inventory.group(CHAT_GROUP)
    admin = cluster_var(chat, "clawbot_admin_user", "chat nodes") if chat else ""
    failed = []
    for host in chat:
        key_file = out / (CHAT_KEY_PREFIX + host.name)
        if key_file.exists():
            continue
        argv = [sys.executable, "-m", "clawbot", "users", "-i", args.inventory, "--limit", host.name, "--json"]
        argv += ["--vault-password-file", args.vault_password_file] if args.vault_password_file else []
        done = subprocess.run(argv + ["add-key", admin, "--key-name", KEY_NAME], capture_output=True, text=True,
                              timeout=300)
        try:
            key = json.loads(done.stdout)["key"]
        except (ValueError, KeyError, TypeError):
            print(f"clawbot monitoring: {host.name}: cannot create an API key for {admin}:\n{done.stderr.strip()}",
                  file=sys.stderr)
            failed.append(host.name)
            continue
        _write(key_file, key.encode(), 0o600)
        print(f"{host.name}: API key '{KEY_NAME}' of {admin} written to {key_file}")
    return failed


def run(args) -> int:
    from clawbot.common.config import check_file
    from clawbot.control import planning
    from clawbot.control.inventory import load_for_command
    from clawbot.control.state import state_directory

    inventory = load_for_command(args.inventory, args.vault_password_file, "clawbot monitoring")
    base = planning.inventory_base(args.inventory)
    try:
        result = check_file(str(planning.config_path(inventory, base)))
        state_dir = state_directory(planning.cluster_var(inventory.hosts.values(), "clawbot_state_dir"), base)
    except (ValueError, OSError) as exc:
        print(f"clawbot monitoring: {exc}", file=sys.stderr)
        return 2
    if not result.ok:
        for d in result.diagnostics:
            print(d.text(), file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else state_dir / "monitoring"
    try:
        changed = write_files(out, inventory, result.config, state_dir, args.scrape_interval)
    except FileNotFoundError as exc:
        print(f"clawbot monitoring: {exc}", file=sys.stderr)
        return 1
    print(f"{out}: " + (f"wrote {', '.join(changed)}" if changed else "every file already up to date"))
    failed = create_chat_keys(args, inventory, out) if args.chat_keys else []
    missing = [h.name for h in inventory.group(planning.CHAT_GROUP) if not (out / (CHAT_KEY_PREFIX + h.name)).exists()]
    for name in missing:
        print(f"{name}: its /metrics needs an admin's API key in {out / (CHAT_KEY_PREFIX + name)}: run with --chat-keys "
              f"or `clawbot users -i {args.inventory} --limit {name} add-key ADMIN` and put the key there (0600)")
    tool = shutil.which("promtool")
    if tool and not missing:
        check = subprocess.run([tool, "check", "config", str(out / CONFIG_FILE)], capture_output=True, text=True,
                               timeout=60)
        if check.returncode != 0:
            print(f"clawbot monitoring: promtool check config failed:\n{check.stdout}{check.stderr}", file=sys.stderr)
            return 1
    print(f"run: prometheus --config.file={out / CONFIG_FILE}  (Grafana: import {out / DASHBOARD_FILE})")
    return 1 if failed else 0
