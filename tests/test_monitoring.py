"""`clawbot monitoring`: a real Prometheus (Debian's package) scrapes real agents with the files it writes.

A deploy-shaped cluster on loopback: an inventory with one host in both groups (as the default inventory), the
certificates deploy.py's own issue_certificates makes (the monitoring certificate included), the gateway's
allow-list as deploy fills it in, a real model agent (llama-server on a tiny GGUF) and chat agent. Prometheus runs
the generated prometheus.yml until every target is up; `promtool` accepts the config and the rules; every
expression of the alert rules and of the dashboard names only metrics the agents' /metrics really export and is
valid PromQL for that Prometheus. Every process is started here and stopped by its pid.
"""

from __future__ import annotations

import json
import re
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from clawbot.common import pki
from clawbot.control import monitoring, nodeconfig
from clawbot.control.inventory import load_inventory
from clawbot.control.state import CONTROL_NAME, MONITORING_NAME
from tests.fixtures_agent import llama_server_binary  # noqa: F401  (fixture)
from tests.fixtures_chat import ChatAgent, ClusterPKI, ModelAgent, chat_config, free_port, model_config
from tests.fixtures_models import models_dir, tiny_gguf  # noqa: F401  (fixtures)
from tests.fixtures_prometheus import Prometheus, targets_up

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
HOST = "clawbot-local"
# Series Prometheus makes itself for every target.
PROMETHEUS_OWN = {"up"}


def issue_like_deploy(inventory, state: Path):
    """deploy.py's own step 2 (the CA, the nodes' leaves, clawbot-control's and the monitoring certificate)."""
    sys.path.insert(0, str(ROOT))
    try:
        import deploy
    finally:
        sys.path.remove(str(ROOT))
    return deploy.issue_certificates(inventory, list(inventory.hosts.values()), state, rotate=False)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_gguf, llama_server_binary):  # noqa: F811
    """Inventory + state + running model and chat agents configured as deploy would configure them."""
    base = tmp_path_factory.mktemp("monitoring")
    inventory_dir = base / "inventory"
    (inventory_dir / ".clawbot").mkdir(parents=True)
    (inventory_dir / "hosts.yml").write_text(
        f"all:\n  hosts:\n    {HOST}:\n      ansible_connection: local\n      ansible_host: 127.0.0.1\n"
        f"  vars:\n    clawbot_state_dir: .clawbot/state\n  children:\n"
        f"    chat_nodes:\n      hosts:\n        {HOST}:\n    model_nodes:\n      hosts:\n        {HOST}:\n")
    inventory = load_inventory(str(inventory_dir))
    state = inventory_dir / ".clawbot" / "state"
    state.mkdir()
    _, materials = issue_like_deploy(inventory, state)
    node = materials[HOST]
    tls = ClusterPKI(state, node.ca_cert, (node.server_cert, node.server_key), (node.client_cert, node.client_key),
                     (node.server_cert, node.server_key), "")
    model = model_config(tls, tiny_gguf)
    model["model_gateway"]["allowed_clients"] = nodeconfig.gateway_clients(inventory, [])  # as deploy fills it in
    gateway_port = int(model["model_gateway"]["endpoint"].rsplit(":", 1)[1])
    chat = chat_config(tls, base / "chat", model["model_gateway"]["endpoint"])
    while chat["chat"]["port"] in (gateway_port, model["model_server"]["port"]):  # free_port() may repeat itself
        chat["chat"]["port"] = free_port()
    (inventory_dir / ".clawbot" / "clawbot.json").write_text(json.dumps(
        {"model_gateway": {"endpoint": f"https://{HOST}:{gateway_port}"}, "chat": {"port": chat["chat"]["port"]}}))
    model_agent = ModelAgent(model, base / "model", tls).start()
    chat_agent = ChatAgent(chat, base / "chat", tls).start()
    try:
        model_agent.wait_ready()
        chat_agent.wait_ready()
        yield {"inventory": inventory_dir, "state": state, "model": model_agent, "chat": chat_agent, "base": base,
               "key": chat_agent.api_key("admin", "prometheus")}
    finally:
        chat_agent.stop()
        model_agent.stop()


def written(cluster) -> Path:
    out = cluster["base"] / "out"
    if not (out / monitoring.CONFIG_FILE).exists():
        proc = subprocess.run([sys.executable, "-m", "clawbot", "monitoring", "-i", str(cluster["inventory"]), "--out",
                               str(out), "--scrape-interval", "1s"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"{HOST}: its /metrics needs an admin's API key" in proc.stdout  # no key yet: says how to add one
        key_file = out / f"{monitoring.CHAT_KEY_PREFIX}{HOST}"
        key_file.write_text(cluster["key"])
        key_file.chmod(0o600)
    return out


def test_the_monitoring_certificate_is_served_by_the_gateway_and_fits_every_cluster_ca(cluster):
    """Deploy's allow-list names Prometheus's certificate; its name lies under clawbot-control, which every
    cluster CA permits, so a CA made before it existed needs no rotation."""
    assert nodeconfig.gateway_clients(load_inventory(str(cluster["inventory"])), []) == [HOST, CONTROL_NAME,
                                                                                         MONITORING_NAME]
    material = cluster["state"] / "nodes" / MONITORING_NAME
    assert pki.san_identities(pki.load_certificate(material / "client.pem")).describe() == f"DNS:{MONITORING_NAME}"
    _, older_ca = pki.create_ca("a CA from before", permitted_dns=["clawbot.internal", HOST, CONTROL_NAME],
                                permitted_ips=["127.0.0.0/8"])
    assert pki.permits(older_ca, [MONITORING_NAME], []) == []


def test_files_pass_promtool_and_rewrite_nothing_when_nothing_changed(cluster):
    out = written(cluster)
    assert (out / monitoring.KEY_FILE).stat().st_mode & 0o777 == 0o600
    for kind, name in (("config", monitoring.CONFIG_FILE), ("rules", monitoring.RULES_FILE)):
        check = subprocess.run(["promtool", "check", kind, str(out / name)], capture_output=True, text=True,
                               timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    proc = subprocess.run([sys.executable, "-m", "clawbot", "monitoring", "-i", str(cluster["inventory"]), "--out",
                           str(out), "--scrape-interval", "1s"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "every file already up to date" in proc.stdout, proc.stdout + proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_without_the_monitoring_certificate_it_says_to_run_deploy_first(tmp_path):
    inventory = tmp_path / "inventory"
    (inventory / ".clawbot").mkdir(parents=True)
    (inventory / "hosts.yml").write_text("all:\n  vars:\n    clawbot_state_dir: .clawbot/state\n  children:\n"
                                         "    model_nodes:\n      hosts:\n        m: {ansible_host: 10.1.1.1}\n")
    (inventory / ".clawbot" / "clawbot.json").write_text('{"model_gateway": {"endpoint": "https://m:5000"}}')
    proc = subprocess.run([sys.executable, "-m", "clawbot", "monitoring", "-i", str(inventory)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "run deploy.py first" in proc.stderr, proc.stdout + proc.stderr


def exported_names(text: str) -> set[str]:
    """Every sample name a /metrics text can carry, from its TYPE lines: a labelled series nobody has touched yet
    has no sample but is exported as soon as it is."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "summary": ("_count", "_sum", "_created")}
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples}
    return names


FUNCTIONS_AND_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                          "unless", "offset"}


def metric_names(expression: str) -> set[str]:
    """The metric names a PromQL expression selects (labels, strings, ranges, functions and keywords left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expression)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    found = {m.group() for m in re.finditer(r"(?<![\w:$.])[a-zA-Z_:][a-zA-Z0-9_:]*", text)
             if not text[m.end():].lstrip().startswith("(")}  # a function call
    return found - FUNCTIONS_AND_KEYWORDS


def test_metric_name_extraction():
    assert metric_names('histogram_quantile(0.5, sum by (le, node) (rate(a_bucket{node=~"$node"}[$__rate_interval])))') \
        == {"a_bucket"}
    assert metric_names("b - time() < (b - c) / 3 or sum by (job) (rate(d_total[5m])) > 0") == {"b", "c", "d_total"}


def scrape(cluster) -> str:
    out = written(cluster)
    context = pki.client_ssl_context(out / monitoring.CERT_FILE, out / monitoring.KEY_FILE, out / monitoring.CA_FILE)
    model = httpx.get(f"{cluster['model'].endpoint}/metrics", verify=context, timeout=30)
    chat = httpx.get(f"{cluster['chat'].url}/metrics", headers={"Authorization": f"Bearer {cluster['key']}"},
                     verify=ssl.create_default_context(cafile=str(out / monitoring.CA_FILE)), timeout=30)
    assert model.status_code == 200 and chat.status_code == 200, (model.text, chat.text)
    return model.text + chat.text


def test_every_alert_and_panel_uses_metrics_the_agents_export(cluster):
    exported = exported_names(scrape(cluster)) | PROMETHEUS_OWN
    for expression in monitoring.expressions():
        missing = metric_names(expression) - exported
        assert not missing, f"{expression!r} names {sorted(missing)}, which no agent exports"
    dashboard = json.loads((written(cluster) / monitoring.DASHBOARD_FILE).read_text())
    in_file = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert in_file and set(in_file) <= set(monitoring.expressions())


def test_the_gateway_exports_what_its_status_knows(cluster, tiny_gguf):  # noqa: F811
    """The gauges behind the alerts read the same facts as GET /status: restarts, certificate lifetimes, the model's
    disk, huge pages; a streamed answer is timed token by token."""
    with cluster["model"].client() as client:
        with client.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Count to ten."}], "max_tokens": 12, "stream": True}) as r:
            assert r.status_code == 200
            r.read()
        status = client.get("/status").json()
        text = client.get("/metrics").text
    value = {(s.name, tuple(sorted(s.labels.items()))): s.value
             for family in text_string_to_metric_families(text) for s in family.samples}
    assert value[("clawbot_gateway_inter_token_seconds_count", ())] >= 1
    assert value[("clawbot_model_server_restarts_total", ())] == status["model"]["restarts"] == 0
    server = pki.load_certificate(cluster["model"].config["tls"]["server_cert"])
    assert value[("clawbot_certificate_expiry_timestamp_seconds", (("certificate", "server"),))] == \
        server.not_valid_after_utc.timestamp()
    assert value[("clawbot_certificate_not_before_timestamp_seconds", (("certificate", "ca"),))] > 0
    assert value[("clawbot_model_file_bytes", ())] == tiny_gguf.stat().st_size
    assert 0 < value[("clawbot_model_disk_free_bytes", ())] <= value[("clawbot_model_disk_size_bytes", ())]
    assert value[("clawbot_model_hugepages_wanted", ())] == 0  # model_server.hugepages off in this cluster
    assert value[("clawbot_model_hugepages_backed", ())] == int(status["model"]["memory"]["hugepages_effective"])
    assert value[("clawbot_model_server_resident_bytes", ())] > 0
    assert value[("clawbot_gateway_queue_capacity", ())] == status["gateway"]["queue_length"]


def test_every_completion_gets_one_json_log_line_with_its_request_id(cluster):
    """The gateway keeps a caller's X-Request-Id (or makes one), answers with it, and writes one JSON line per
    completion once the answer is complete: who asked, status, tokens, queue wait, first token, duration."""
    agent = cluster["model"]
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6}
    with agent.client() as client:
        plain = client.post("/v1/chat/completions", json=body, headers={"X-Request-Id": "chat-0001"})
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True},
                           headers={"X-Request-Id": "not a valid id!"}) as streamed:
            streamed.read()
    assert plain.status_code == 200 and plain.headers["x-request-id"] == "chat-0001"
    made = streamed.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{16}", made)

    def lines():
        found = {}
        for line in agent.log_path.read_text().splitlines():
            if "clawbot.model.requests: " in line:
                entry = json.loads(line.split("clawbot.model.requests: ", 1)[1])
                found[entry["request_id"]] = entry
        return found if {"chat-0001", made} <= set(found) else None

    found = None
    deadline = time.monotonic() + 10
    while found is None and time.monotonic() < deadline:  # the line is written once the answer is complete
        found = lines() or time.sleep(0.1)
    assert found, agent.log_tail()
    first, second = found["chat-0001"], found[made]
    for entry in (first, second):
        assert entry["status"] == 200 and entry["client"] == f"DNS:{HOST}, IP:127.0.0.1"
        assert entry["path"] == "/v1/chat/completions" and entry["model"]
        assert entry["completion_tokens"] >= 1 and entry["queue_wait_s"] >= 0 and entry["duration_s"] > 0
    assert first["prompt_tokens"] > 0 and "first_token_s" in second


def test_a_real_prometheus_scrapes_every_agent_with_the_generated_files(cluster):
    out = written(cluster)
    assert shutil.which("prometheus"), "Debian's prometheus package is needed (.ci/apt-packages.txt)"
    prometheus = Prometheus(out / monitoring.CONFIG_FILE, cluster["base"] / "prometheus-data")
    try:
        active = prometheus.wait("every target up", lambda: targets_up(prometheus))
        assert sorted((t["labels"]["job"], t["labels"]["node"]) for t in active) == [
            (monitoring.CHAT_JOB, HOST), (monitoring.MODEL_JOB, HOST)]
        # the clawbot series are there, from both kinds of node
        for series in ('clawbot_model_state{clawbot_model_state="ready"}', "clawbot_chat_user_requests_today",
                       "clawbot_certificate_expiry_timestamp_seconds", "clawbot_model_disk_free_bytes"):
            prometheus.wait(f"holding {series}", lambda: prometheus.api("query", query=series)["result"])
        ready = prometheus.api("query", query='clawbot_model_state{clawbot_model_state="ready"}')["result"]
        assert [r["value"][1] for r in ready] == ["1"]
        # every rule loaded and healthy, every panel's query valid PromQL for this Prometheus
        rules = prometheus.wait("loading the rules", lambda: prometheus.api("rules")["groups"])
        loaded = {r["name"]: r for g in rules for r in g["rules"]}
        assert set(loaded) == {name for name, *_ in monitoring.ALERTS}
        prometheus.wait("evaluating every rule", lambda: all(r.get("lastEvaluation", "").startswith("2")
                                                             and r["health"] == "ok"
                                                             for g in prometheus.api("rules")["groups"]
                                                             for r in g["rules"]))
        firing = {a["labels"]["alertname"] for a in prometheus.api("alerts")["alerts"]}
        assert not firing & {"ClawbotTargetDown", "ClawbotModelCrashLoop", "ClawbotCertificateExpiring"}, firing
        for expression in monitoring.expressions():
            prometheus.api("query", query=expression.replace("$__rate_interval", "1m").replace("$node", ".*"))
    finally:
        prometheus.stop()
