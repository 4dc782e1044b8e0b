"""End to end: `python deploy.py` against two real Debian nodes (systemd + sshd) from the test harness.

Converge, re-run with zero changes (asserted on pyinfra's results), repair drift, --check, refuse a bad
config before touching a host, and converge after a rollout killed mid-way. The nodes share this machine's
kernel, so the hugepages and THP settings the rollout makes are kernel-wide: the fixture restores them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.nodes, pytest.mark.slow]

CONFIG = {
    "model_gateway": {"endpoint": "https://MODEL:5000", "max_tokens": 64, "max_concurrency": 2,
                      "rate_limit": {"requests_per_second": 5, "burst": 4}},
    "context_window": 1024,
    "fallback_strategies": ["knowledge_base"],
    "model_server": {"parallel_slots": 2, "chat_template": "gemma", "model_name": "gemma-3-270m", "threads": 1},
    "chat": {"summary": {"max_tokens": 64}},
}


def config_file(inventory: Path) -> Path:
    """clawbot.json where clawbot_config_file's default puts it: in .clawbot/, which Ansible's own tools skip."""
    return inventory / ".clawbot" / "clawbot.json"


def state_dir(inventory: Path) -> Path:
    return inventory / ".clawbot" / "state"


def deploy(inventory: Path, *extra: str, timeout: float = 1500) -> tuple[subprocess.CompletedProcess, dict | None]:
    out = inventory.parent / f"{inventory.name}-result-{time.monotonic_ns()}.json"  # not in the inventory: Ansible would read it
    proc = subprocess.run([sys.executable, str(ROOT / "deploy.py"), "-i", str(inventory), "--json", str(out), *extra],
                          capture_output=True, text=True, timeout=timeout)
    print(proc.stdout[-6000:], proc.stderr[-6000:], sep="\n")
    result = json.loads(out.read_text()) if out.exists() else None
    return proc, result


ADMIN_PASSWORD = "e2e-admin-password"
VAULT_PASSWORD = "e2e-vault-password"


def vaulted(value: str, indent: int = 2) -> str:
    """An inline `!vault |` YAML value, encrypted by ansible-core as `ansible-vault encrypt_string` does."""
    from ansible.parsing.vault import VaultLib, VaultSecret

    text = VaultLib([("default", VaultSecret(VAULT_PASSWORD.encode()))]).encrypt(value).decode()
    return "!vault |\n" + "\n".join(" " * indent + line for line in text.splitlines())


def changed_ops(result: dict) -> list[str]:
    return [f"{op['name']} on {','.join(op['success'])}" for op in result["results"]["operations"] if op["success"]]


@pytest.fixture(scope="module")
def kernel_settings():
    """Hugepages and THP are kernel-wide (the nodes share this kernel): put them back afterwards."""
    hugepages = Path("/proc/sys/vm/nr_hugepages").read_text()
    thp_path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    thp = thp_path.read_text().split("[")[1].split("]")[0] if thp_path.exists() else None
    yield
    Path("/proc/sys/vm/nr_hugepages").write_text(hugepages)
    if thp:
        try:
            thp_path.write_text(thp)
        except OSError:
            pass


@pytest.fixture(scope="module")
def cluster_inventory(nodes, kernel_settings, tmp_path_factory):
    """The harness's inventory plus a clawbot.json whose endpoint is the model node, a private CA state dir, and
    the first admin's password vault-encrypted (its vault password file named by ANSIBLE_VAULT_PASSWORD_FILE)."""
    inventory = tmp_path_factory.mktemp("inventory")
    shutil.copytree(nodes[0].inventory_dir, inventory, dirs_exist_ok=True)
    config = json.loads(json.dumps(CONFIG))
    config["model_gateway"]["endpoint"] = f"https://{nodes[1].address}:5000"
    config_file(inventory).parent.mkdir()
    config_file(inventory).write_text(json.dumps(config, indent=2))
    (inventory / "group_vars").mkdir(exist_ok=True)
    (inventory / "group_vars" / "all.yml").write_text(
        f"clawbot_state_dir: {state_dir(inventory)}\nclawbot_admin_password: {vaulted(ADMIN_PASSWORD)}\n")
    vault_file = tmp_path_factory.mktemp("vault") / "vault-pass"
    vault_file.write_text(VAULT_PASSWORD + "\n")
    vault_file.chmod(0o600)
    previous = os.environ.get("ANSIBLE_VAULT_PASSWORD_FILE")
    os.environ["ANSIBLE_VAULT_PASSWORD_FILE"] = str(vault_file)
    yield inventory
    if previous is None:
        os.environ.pop("ANSIBLE_VAULT_PASSWORD_FILE", None)
    else:
        os.environ["ANSIBLE_VAULT_PASSWORD_FILE"] = previous


def ssh(node, command: str, check: bool = True) -> str:
    """Run a shell command on a test node over real SSH; its stdout."""
    return node.ssh(command, timeout_s=300, check=check).stdout


@pytest.fixture(scope="module")
def first_run(cluster_inventory, nodes):
    started = time.monotonic()
    proc, result = deploy(cluster_inventory)
    assert proc.returncode == 0, "first rollout failed"
    return {"seconds": time.monotonic() - started, "result": result, "stdout": proc.stdout}


def test_first_run_converges_both_nodes(first_run, nodes, cluster_inventory):
    chat, model = nodes
    out = first_run["stdout"]
    # First-run messages read as the normal first step they are, one line each; pyinfra's beta notice is gone.
    for node in nodes:
        assert f"{node.name}: issued its server and client certificates (first run for this node)" in out, out
    assert "is missing" not in out and "beta" not in out
    for node in nodes:
        hosts = ssh(node, "cat /etc/hosts")
        assert f"{chat.address} {chat.name}" in hosts and f"{model.address} {model.name}" in hosts
    assert ssh(chat, "systemctl is-active clawbot-chat").strip() == "active"
    assert ssh(model, "systemctl is-active clawbot-model").strip() == "active"
    assert int(Path("/proc/sys/vm/nr_hugepages").read_text()) > 0
    assert "vm.nr_hugepages" in ssh(model, "cat /etc/sysctl.d/60-clawbot-hugepages.conf")
    for node in nodes:
        assert ssh(node, "stat -c '%a %U' /etc/clawbot/tls/server.key").split() == ["600", "clawbot"]
        sans = ssh(node, "python3 - <<'EOF'\nimport ssl\nprint(ssl._ssl._test_decode_cert('/etc/clawbot/tls/server.pem')"
                         "['subjectAltName'])\nEOF")
        assert node.address in sans and node.name in sans, sans
        assert "ca.key" not in ssh(node, "ls -R /etc/clawbot")
    # The chat node reaches the model node's gateway over mutual TLS with its own client certificate.
    code = (
        "import httpx,json,ssl\n"
        "c=ssl.create_default_context(cafile='/etc/clawbot/tls/ca.pem')\n"
        "c.load_cert_chain('/etc/clawbot/tls/client.pem','/etc/clawbot/tls/client.key')\n"
        "r=httpx.post('https://%s:5000/v1/chat/completions',verify=c,timeout=120,"
        "json={'messages':[{'role':'user','content':'Say hello.'}],'max_tokens':8})\n"
        "print(r.status_code); print(json.dumps(r.json()))\n" % model.address
    )
    out = ssh(chat, f"/opt/clawbot/venv/bin/python -c \"{code}\"")
    status, body = out.strip().split("\n", 1)
    assert status == "200", body
    reply = json.loads(body)
    assert reply["choices"][0]["message"]["content"] is not None
    assert reply["usage"]["prompt_tokens"] > 5  # the chat template really carried the message
    # The gateway serves only its chat nodes: deploy filled allowed_clients in (clawbot.json leaves it empty), so
    # the model node's own client certificate, from the same CA, gets 403 with a JSON reason; probes stay open.
    installed = json.loads(ssh(model, "cat /etc/clawbot/clawbot.json"))
    assert installed["model_gateway"]["allowed_clients"] == [chat.name, "clawbot-control", "monitoring.clawbot-control"]
    code = (
        "import httpx,json,ssl\n"
        "c=ssl.create_default_context(cafile='/etc/clawbot/tls/ca.pem')\n"
        "c.load_cert_chain('/etc/clawbot/tls/client.pem','/etc/clawbot/tls/client.key')\n"
        "u='https://%s:5000'\n"
        "print(json.dumps([[p,(r:=httpx.get(u+p,verify=c,timeout=60)).status_code,r.json()] for p in ('/v1/models','/readyz')]))\n"
        % model.address
    )
    seen = {node.name: {path: (status, body) for path, status, body in
                        json.loads(ssh(node, f"/opt/clawbot/venv/bin/python -c \"{code}\""))} for node in nodes}
    assert seen[chat.name]["/v1/models"][0] == 200
    status, body = seen[model.name]["/v1/models"]
    assert status == 403 and body["error"]["code"] == "client_not_allowed", body
    assert f"DNS:{model.name}" in body["error"]["message"]
    assert seen[model.name]["/readyz"][0] == 200  # deploy's own health check runs with this certificate
    # ...and without a client certificate it is refused.
    code = ("import httpx\ntry:\n  httpx.get('https://%s:5000/healthz',verify='/etc/clawbot/tls/ca.pem');print('served')\n"
            "except Exception as e: print('refused', type(e).__name__)\n" % model.address)
    assert ssh(chat, f"/opt/clawbot/venv/bin/python -c \"{code}\"").startswith("refused")


def test_the_printed_chat_url_opens_from_this_machine(first_run, nodes, cluster_inventory):
    """The harness's node names do not resolve here, so deploy prints the URL by address, says in one line how to
    open it by name, and that URL passes TLS verification with the cluster CA alone."""
    import httpx

    chat, _ = nodes
    lines = first_run["stdout"].splitlines()
    shown = [line.split("chat: ", 1)[1] for line in lines if "]: chat: " in line]
    assert shown == [f"https://{chat.address}:8443/"], lines[-12:]
    hint = lines[next(i for i, line in enumerate(lines) if "]: chat: " in line) + 1]
    assert hint.endswith(f"{chat.name} does not resolve on this machine; to open the chat by name, add "
                         f"`{chat.address} {chat.name}` to /etc/hosts"), hint
    ca = ssl.create_default_context(cafile=str(state_dir(cluster_inventory) / "ca" / "ca.pem"))
    response = httpx.get(shown[0], verify=ca, timeout=30)  # hostname checked against the certificate's SANs
    assert response.status_code == 200 and "<html" in response.text.lower(), response.status_code


def test_chat_node_needs_a_credential_and_serves_apps_with_keys(first_run, nodes, cluster_inventory):
    """From outside (this machine): no credential, no answer; the vaulted admin logs in; a user added over SSH
    with `clawbot users -i` chats through the official openai client with a key and only the cluster CA; over
    the user's limit, 429 with Retry-After."""
    import httpx
    import openai

    chat, _ = nodes
    ca = ssl.create_default_context(cafile=str(state_dir(cluster_inventory) / "ca" / "ca.pem"))
    base = f"https://{chat.address}:8443"
    with httpx.Client(base_url=base, verify=ca, timeout=30) as admin:
        assert admin.post("/api/login", json={"username": "admin", "password": ADMIN_PASSWORD}).status_code == 200
        paths = admin.get("/openapi.json").json()["paths"]
    with httpx.Client(base_url=base, verify=ca, timeout=30) as anon:
        assert anon.get("/openapi.json").status_code == 401
        for path, item in paths.items():
            if not path.startswith(("/api/", "/v1/")) or path in ("/api/login", "/api/auth/config"):
                continue
            for method in item:
                concrete = path.replace("{conversation_id}", "0" * 32).replace("{key_id}", "1").replace("{name}", "x")
                response = anon.request(method.upper(), concrete, json={})
                assert response.status_code == 401, (method, path, response.text)
        assert anon.post("/api/login", json={"username": "admin", "password": "wrong-password"}).status_code == 401

    def users(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "clawbot", "users", "-i", str(cluster_inventory), *argv],
                              input=stdin, capture_output=True, text=True, timeout=120)

    added = users("add", "alice", "--password-stdin", stdin="alice-password\n")
    assert added.returncode == 0, added.stdout + added.stderr
    made = users("--json", "add-key", "alice", "--key-name", "e2e")
    assert made.returncode == 0, made.stdout + made.stderr
    key = json.loads(made.stdout)["key"]
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, http_client=httpx.Client(verify=ca, timeout=120),
                           max_retries=0)
    assert [m.id for m in client.models.list().data] == ["gemma-3-270m"]
    reply = client.chat.completions.create(model="gemma-3-270m", max_tokens=8,
                                           messages=[{"role": "user", "content": "Say hello."}])
    assert reply.choices[0].message.content is not None and reply.usage.prompt_tokens > 5
    chunks = list(client.chat.completions.create(model="gemma-3-270m", max_tokens=8, stream=True,
                                                 messages=[{"role": "user", "content": "Count to three."}]))
    assert chunks and any(c.choices and c.choices[0].delta.content for c in chunks)
    assert users("set-limits", "alice", "--requests-per-minute", "2").returncode == 0  # 2 used already
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="gemma-3-270m", max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    assert 1 <= int(caught.value.response.headers["retry-after"]) <= 61
    assert "requests per minute" in caught.value.message
    listed = json.loads(users("--json", "list").stdout)
    assert {u["name"] for u in listed} == {"admin", "alice"}


def test_units_stay_hardened(first_run, nodes):
    """Accounts added no privilege: `systemd-analyze security` rates both agents' units 3.6 or better (lower is
    better), as before; the chat agent still writes only its state and log directories."""
    import re

    chat, model = nodes
    for node, unit in ((chat, "clawbot-chat"), (model, "clawbot-model")):
        out = ssh(node, f"systemd-analyze security --no-pager {unit}.service | tail -1")
        level = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out)
        assert level and float(level.group(1)) <= 3.6, out
    assert ssh(chat, "stat -c '%a %U' /etc/clawbot/admin.json").split() == ["600", "clawbot"]


def test_status_reads_every_node_over_mtls(first_run, nodes, cluster_inventory):
    proc = subprocess.run([sys.executable, "-m", "clawbot", "status", "-i", str(cluster_inventory), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {row["role"]: row for row in json.loads(proc.stdout)}
    assert rows["model"]["host"] == nodes[1].name and rows["model"]["body"]["model"]["state"] == "ready"
    assert rows["chat"]["host"] == nodes[0].name and rows["chat"]["http"] == 200
    for row in rows.values():
        assert row["certificate"]["days_left"] > 300 and not row["renewal_due"]


def test_ansible_and_prometheus_work_with_the_rolled_out_inventory(first_run, nodes, cluster_inventory, tmp_path):
    """The inventory deploy used stays an Ansible inventory: Ansible's own `ansible all -m ping`, run as a user runs
    it, reaches exactly the two nodes with the SSH settings deploy uses. `clawbot monitoring --chat-keys` gives a
    real Prometheus (Debian's package, on this machine) every target up: the gateway over mTLS with the monitoring
    certificate deploy issued, the chat node with the admin API key it made there."""
    from tests.fixtures_prometheus import Prometheus, targets_up

    chat, model = nodes
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_") or k == "ANSIBLE_VAULT_PASSWORD_FILE"}
    ping = subprocess.run(["ansible", "all", "-i", str(cluster_inventory), "-m", "ansible.builtin.ping", "-o"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert sorted(line.split(" | ")[0] for line in ping.stdout.splitlines()) == sorted([chat.name, model.name])
    assert all(" | SUCCESS => " in line and '"pong"' in line for line in ping.stdout.splitlines()), ping.stdout
    assert "inventory source" not in ping.stderr and "Skipping" not in ping.stderr, ping.stderr
    out = tmp_path / "monitoring"
    made = subprocess.run([sys.executable, "-m", "clawbot", "monitoring", "-i", str(cluster_inventory), "--out",
                           str(out), "--scrape-interval", "1s", "--chat-keys"], capture_output=True, text=True,
                          timeout=300)
    assert made.returncode == 0, made.stdout + made.stderr
    prometheus = Prometheus(out / "prometheus.yml", tmp_path / "prometheus-data")
    try:
        active = prometheus.wait("every target up", lambda: targets_up(prometheus))
        assert sorted((t["labels"]["job"], t["labels"]["node"]) for t in active) == [
            ("clawbot-chat", chat.name), ("clawbot-model", model.name)]
        ready = prometheus.wait("holding the model's state", lambda: prometheus.api(
            "query", query='clawbot_model_state{clawbot_model_state="ready"}')["result"])
        assert [(r["metric"]["node"], r["value"][1]) for r in ready] == [(model.name, "1")]
        assert prometheus.wait("holding the chat node's usage",
                               lambda: prometheus.api("query", query="clawbot_chat_user_requests_today")["result"])
    finally:
        prometheus.stop()


def operation_counts(result: dict) -> dict[str, int]:
    return {name: row["changed"] + row["unchanged"] + row["failed"] for name, row in result["summary"].items()}


def test_second_run_changes_nothing(first_run, cluster_inventory):
    started = time.monotonic()
    proc, result = deploy(cluster_inventory)
    assert proc.returncode == 0
    assert changed_ops(result) == []
    assert all(row["changed"] == 0 and row["failed"] == 0 for row in result["summary"].values())
    # every run counts the same operations (the wheelhouse copy is an operation on later runs too)
    assert operation_counts(result) == operation_counts(first_run["result"])
    print(f"re-run with nothing drifted: {time.monotonic() - started:.1f} s")


def test_check_lists_drift_and_changes_nothing_then_drift_is_repaired(first_run, nodes, cluster_inventory):
    chat, model = nodes
    # Drift inside clawbot's block (a wrong address for the model node) and a line of someone else's outside it.
    ssh(chat, f"sed -i '/# BEGIN clawbot/,/# END clawbot/ s/^{model.address} /10.99.0.1 /' /etc/hosts "
              "&& echo '10.99.99.99 intruder' >> /etc/hosts")
    ssh(model, "rm /etc/clawbot/tls/server.pem")
    ssh(chat, "systemctl stop clawbot-chat")
    ssh(model, "sed -i 's/^RestartSec=.*/RestartSec=30/' /etc/systemd/system/clawbot-model.service")

    proc = subprocess.run([sys.executable, str(ROOT / "deploy.py"), "-i", str(cluster_inventory), "--check"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "would:" in proc.stdout and "/etc/hosts" in proc.stdout and "server.pem" in proc.stdout
    assert ssh(model, "test -e /etc/clawbot/tls/server.pem || echo missing").strip() == "missing"
    assert ssh(chat, "systemctl is-active clawbot-chat || true").strip() != "active"

    proc, result = deploy(cluster_inventory)
    assert proc.returncode == 0
    assert changed_ops(result)
    hosts = ssh(chat, "cat /etc/hosts")
    assert "10.99.99.99 intruder" in hosts  # lines outside the managed block are left alone
    assert f"{model.address} {model.name}" in hosts and "10.99.0.1" not in hosts.split("# BEGIN")[1]
    assert ssh(model, "test -e /etc/clawbot/tls/server.pem && echo ok").strip() == "ok"
    assert ssh(chat, "systemctl is-active clawbot-chat").strip() == "active"
    assert "RestartSec=2" in ssh(model, "cat /etc/systemd/system/clawbot-model.service")

    proc, result = deploy(cluster_inventory)
    assert proc.returncode == 0 and changed_ops(result) == []


def test_check_diff_prints_unified_diffs_of_drifted_files_and_changes_nothing(first_run, nodes, cluster_inventory):
    """After editing the /etc/hosts block, clawbot.json, a unit and the sysctl file on the nodes, `--check --diff`
    prints each file's unified diff under the operation that would repair it; a drifted private key gets one line,
    never its content; nothing changes on the nodes; then a run with --diff shows them once and repairs it all, and
    a re-run changes nothing."""
    chat, model = nodes
    sysctl = "/etc/sysctl.d/60-clawbot-hugepages.conf"
    pages = ssh(model, f"sed -n 's/^vm.nr_hugepages = //p' {sysctl}").strip()
    assert pages.isdigit(), pages
    ssh(chat, f"sed -i '/# BEGIN clawbot/,/# END clawbot/ s/^{model.address} /10.99.0.1 /' /etc/hosts")
    ssh(model, "sed -i 's/\"context_window\": 1024/\"context_window\": 999/' /etc/clawbot/clawbot.json")
    ssh(model, "sed -i 's/^RestartSec=.*/RestartSec=30/' /etc/systemd/system/clawbot-model.service")
    ssh(model, f"sed -i 's/^vm.nr_hugepages = .*/vm.nr_hugepages = 1/' {sysctl}")
    ssh(model, "echo e2e-secret-marker >> /etc/clawbot/tls/server.key")
    watched = f"/etc/hosts /etc/clawbot/clawbot.json /etc/clawbot/tls/server.key /etc/systemd/system/*.service {sysctl}"
    before = {node.name: ssh(node, f"sha256sum {watched} 2>/dev/null || true") for node in nodes}
    key_pem = (state_dir(cluster_inventory) / "nodes" / model.name / "server.key").read_text()

    proc, result = deploy(cluster_inventory, "--check", "--diff", timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    lines = out.splitlines()

    def block(operation: str, host: str) -> list[str]:
        """The lines printed under `would: <deploy> | <operation> on ...` for one host, whitespace collapsed."""
        start = next(i for i, line in enumerate(lines)
                     if line.startswith("  would: ") and (f"| {operation} on " in line or f": {operation} on " in line))
        end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith("      ")), len(lines))
        mine, inside = [], False
        for line in lines[start + 1:end]:
            if line.startswith("      ") and not line.startswith("        "):
                inside = line.startswith(f"      {host}:")
            if inside:
                mine.append(" ".join(line.split()))
        return mine

    hosts_diff = block("Ensure the clawbot block in /etc/hosts lists every node", chat.name)
    assert hosts_diff[0] == f"{chat.name}: Will modify /etc/hosts" and hosts_diff[1].startswith("@@ "), hosts_diff
    assert f"- 10.99.0.1 {model.name}" in hosts_diff and f"+ {model.address} {model.name}" in hosts_diff
    assert "# BEGIN clawbot managed nodes" in hosts_diff  # context lines around the change
    config_diff = block("Ensure clawbot.json is installed after the node's clawbot validate accepts it", model.name)
    assert config_diff[0] == f"{model.name}: Will modify /etc/clawbot/clawbot.json", config_diff
    assert '- "context_window": 999,' in config_diff and '+ "context_window": 1024,' in config_diff
    unit_diff = block("Ensure systemd unit clawbot-model.service is current", model.name)
    assert "- RestartSec=30" in unit_diff and "+ RestartSec=2" in unit_diff, unit_diff
    sysctl_diff = block(f"Ensure vm.nr_hugepages is {pages} at boot ({sysctl})", model.name)
    assert "- vm.nr_hugepages = 1" in sysctl_diff and f"+ vm.nr_hugepages = {pages}" in sysctl_diff, sysctl_diff
    key_diff = block("Ensure /etc/clawbot/tls/server.key is installed", model.name)
    assert key_diff == [f"{model.name}: Will modify /etc/clawbot/tls/server.key: content differs (secret, not shown)"]
    everything = proc.stdout + proc.stderr
    assert "e2e-secret-marker" not in everything and "PRIVATE KEY" not in everything
    assert not any(line in everything for line in key_pem.splitlines()[1:-1])
    assert "beta" not in everything
    planned = next(op for op in result["plan"]  # --json carries the same diffs
                   if op["name"].endswith("Ensure the clawbot block in /etc/hosts lists every node"))
    assert f"+ {model.address} {model.name}" in [" ".join(line.split()) for line in planned["diff"][chat.name]]
    assert {node.name: ssh(node, f"sha256sum {watched} 2>/dev/null || true") for node in nodes} == before

    # A run with --diff shows the same diffs once, before it changes anything, then repairs
    proc, result = deploy(cluster_inventory, "--diff")
    assert proc.returncode == 0 and changed_ops(result)
    assert proc.stdout.count(f"+ {model.address} {model.name}") == 1, proc.stdout
    assert "  will: " in proc.stdout and "content differs (secret, not shown)" in proc.stdout
    assert "e2e-secret-marker" not in proc.stdout + proc.stderr and "PRIVATE KEY" not in proc.stdout + proc.stderr
    assert "e2e-secret-marker" not in ssh(model, "cat /etc/clawbot/tls/server.key")
    assert json.loads(ssh(model, "cat /etc/clawbot/clawbot.json"))["context_window"] == 1024
    proc, result = deploy(cluster_inventory)
    assert proc.returncode == 0 and changed_ops(result) == []


def test_check_plans_an_engine_build_on_a_node_that_has_an_nvidia_gpu(first_run, nodes, cluster_inventory):
    """No GPU here: a GPU listed by nvidia-smi on the model node is what `accelerator: auto` looks for (the agent
    decides by the same rule, clawbot.model.runplan.node_accelerator), so with one the rollout plans the CUDA
    toolchain and a build of llama-server on that node (shown by --check only). The stand-in prints what
    `nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader,nounits` prints on an H100."""
    model = nodes[1]
    ssh(model, "printf '#!/bin/sh\\necho \"NVIDIA H100 80GB HBM3, 81559, 0\"\\n' > /usr/local/bin/nvidia-smi "
               "&& chmod 755 /usr/local/bin/nvidia-smi")
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "deploy.py"), "-i", str(cluster_inventory), "--check"],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out = proc.stdout
        assert "nvidia-cuda-toolkit" in out and "Ensure llama-server is built for cuda" in out, out
        assert "llama-cpp-python sdist" in out
        assert ssh(model, "test -e /opt/clawbot/cache/clawbot/sdist || echo absent").strip() == "absent"  # check only
    finally:
        ssh(model, "rm -f /usr/local/bin/nvidia-smi")
    proc = subprocess.run([sys.executable, str(ROOT / "deploy.py"), "-i", str(cluster_inventory), "--check"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "built for cuda" not in proc.stdout


def test_bad_config_refused_before_any_host_is_touched(first_run, nodes, cluster_inventory):
    model = nodes[1]
    before = ssh(model, "sha256sum /etc/clawbot/clawbot.json")
    good = config_file(cluster_inventory).read_text()
    try:
        config_file(cluster_inventory).write_text(good.replace('"context_window": 1024', '"context_window": "big"'))
        proc = subprocess.run([sys.executable, str(ROOT / "deploy.py"), "-i", str(cluster_inventory)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1
        assert f"{config_file(cluster_inventory)}:" in proc.stderr and "/context_window" in proc.stderr
        assert "no host was touched" in proc.stderr
        assert "connecting" not in proc.stdout
    finally:
        config_file(cluster_inventory).write_text(good)
    assert ssh(model, "sha256sum /etc/clawbot/clawbot.json") == before


def test_rollout_killed_midway_converges_when_rerun(first_run, nodes, cluster_inventory):
    chat, model = nodes
    # Give the run something to do, then kill it while it works on the nodes.
    ssh(model, "rm -f /opt/clawbot/venv/.clawbot-installed /etc/clawbot/tls/client.pem")
    ssh(chat, "rm -f /opt/clawbot/venv/.clawbot-installed")
    proc = subprocess.Popen([sys.executable, str(ROOT / "deploy.py"), "-i", str(cluster_inventory)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    seen = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        seen += line
        if "connecting to" in seen and ("Ensure" in line or "Starting operation" in line or "[node" in line):
            break
        if proc.poll() is not None:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc, result = deploy(cluster_inventory)
    assert proc.returncode == 0
    proc, result = deploy(cluster_inventory)
    assert proc.returncode == 0 and changed_ops(result) == []


def test_a_name_under_the_cluster_domain_keeps_the_ca(first_run, nodes, cluster_inventory):
    """Adding a name under clawbot_cluster_domain fits the CA's NameConstraints: ca.pem stays byte-identical (so
    browsers and apps that imported it keep working), only the model node's leaves are reissued, and the chat
    node reaches the gateway by the new name with the CA it already held."""
    chat, model = nodes
    ca = state_dir(cluster_inventory) / "ca" / "ca.pem"
    before = ca.read_bytes()
    chat_leaves = ssh(chat, "sha256sum /etc/clawbot/tls/*.pem")
    name = f"{model.name}.clawbot.internal"
    (cluster_inventory / "host_vars").mkdir(exist_ok=True)
    (cluster_inventory / "host_vars" / f"{model.name}.yml").write_text(f"clawbot_names: [{name}]\n")
    proc, _ = deploy(cluster_inventory)
    assert proc.returncode == 0
    assert "created cluster CA" not in proc.stdout
    assert ca.read_bytes() == before
    assert f"{model.name}: reissued server certificate: SANs changed" in proc.stdout
    assert ssh(chat, "sha256sum /etc/clawbot/tls/*.pem") == chat_leaves
    code = (
        "import httpx,ssl\n"
        "c=ssl.create_default_context(cafile='/etc/clawbot/tls/ca.pem')\n"
        "c.load_cert_chain('/etc/clawbot/tls/client.pem','/etc/clawbot/tls/client.key')\n"
        "print(httpx.get('https://%s:5000/v1/models',verify=c,timeout=60).status_code)\n" % name
    )
    assert ssh(chat, f"/opt/clawbot/venv/bin/python -c \"{code}\"").strip() == "200"


def test_llama_cpp_python_engine_rolls_out_with_its_wheel(first_run, nodes, cluster_inventory, tmp_path):
    """model_server.engine llama-cpp-python: the model node's wheelhouse carries llama-cpp-python and its
    server's dependencies, the agent runs `python -m llama_cpp.server`, and the model answers. The wheel is
    the one pip built for this machine's own `llama` extra (from pip's cache: no second compile), handed
    over through clawbot_llama_cpp_python_wheel; the harness nodes run on this very CPU."""
    chat, model = nodes
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "--disable-pip-version-check",
                    "-w", str(wheels), "llama-cpp-python==0.3.36"], check=True, timeout=3600)
    wheel = next(wheels.glob("llama_cpp_python-0.3.36-*.whl"))
    inventory = tmp_path / "inventory"
    shutil.copytree(cluster_inventory, inventory, ignore=shutil.ignore_patterns("result-*.json"))
    config = json.loads(config_file(inventory).read_text())
    config["model_server"]["engine"] = "llama-cpp-python"
    config_file(inventory).write_text(json.dumps(config, indent=2))
    (inventory / "group_vars" / "model_nodes.yml").write_text(f"clawbot_llama_cpp_python_wheel: {wheel}\n")
    try:
        proc, result = deploy(inventory)
        assert proc.returncode == 0, "rollout with the llama-cpp-python engine failed"
        assert "model (gateway /readyz: loaded and able to generate) healthy" in proc.stdout
        assert ssh(model, "/opt/clawbot/venv/bin/python -c 'import llama_cpp; print(llama_cpp.__version__)'").strip() == "0.3.36"
        assert ssh(model, "pgrep -f 'llama_cpp.server --config_file' >/dev/null && echo running").strip() == "running"
        # the chat node's agent has no use for it: its wheelhouse and venv stay without llama-cpp-python
        assert ssh(chat, "/opt/clawbot/venv/bin/python -c 'import llama_cpp' 2>/dev/null || echo absent").strip() == "absent"
    finally:
        proc, _ = deploy(cluster_inventory)  # back to llama-server for anything that runs after
        assert proc.returncode == 0
