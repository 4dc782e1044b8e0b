"""The rollout roles' pure parts: what they write to nodes and how they read node facts."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from clawbot.common import preflight, sizing
from clawbot.control.facts import NodeMemory
from clawbot.control.rollout import check_node, health_probe, reserved_pages
from roles.hosts import hosts_block
from roles.services import Service, supervisor_program, systemd_unit


def test_hosts_block_is_sorted_and_stable():
    nodes = [("10.0.0.6", ["model-node", "llm.lab"]), ("10.0.0.5", ["chat-node"])]
    assert hosts_block(nodes) == "10.0.0.5 chat-node\n10.0.0.6 model-node llm.lab"
    assert hosts_block(list(reversed(nodes))) == hosts_block(nodes)


def test_systemd_unit_is_hardened_and_runs_as_its_own_user():
    unit = systemd_unit(Service("clawbot-model", "clawbot agent", "/opt/clawbot/venv/bin/clawbot agent --role model",
                                "clawbot", ("/var/lib/clawbot/hugepages",), {"HOME": "/var/lib/clawbot"}))
    for line in ("User=clawbot", "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes", "LimitMEMLOCK=infinity",
                 "Restart=on-failure", "RestartPreventExitStatus=78", "CapabilityBoundingSet=",
                 "ReadWritePaths=-/var/lib/clawbot/hugepages", 'Environment="HOME=/var/lib/clawbot"'):
        assert f"\n{line}\n" in unit, line


def test_gpu_node_unit_lets_only_the_gpu_devices_through():
    cpu = systemd_unit(Service("clawbot-model", "m", "/x", "clawbot", ()))
    assert "\nPrivateDevices=yes\n" in cpu and "DeviceAllow" not in cpu
    cuda = systemd_unit(Service("clawbot-model", "m", "/x", "clawbot", (), accelerator="cuda"))
    for line in ("PrivateDevices=no", "DevicePolicy=closed", "DeviceAllow=char-nvidia rw", "DeviceAllow=char-nvidiactl rw",
                 "DeviceAllow=char-nvidia-uvm rw", "NoNewPrivileges=yes", "CapabilityBoundingSet="):
        assert f"\n{line}\n" in cuda, line
    assert "PrivateDevices=yes" not in cuda
    rocm = systemd_unit(Service("clawbot-model", "m", "/x", "clawbot", (), accelerator="rocm"))
    assert "\nDeviceAllow=char-kfd rw\n" in rocm and "\nSupplementaryGroups=video render\n" in rocm


def test_supervisor_program_kills_the_whole_group():
    program = supervisor_program(Service("clawbot-chat", "d", "/x agent --role chat", "clawbot", environment={"A": "1"}))
    assert "[program:clawbot-chat]" in program and "user=clawbot" in program
    assert "stopasgroup=true" in program and "killasgroup=true" in program and 'environment=A="1"' in program


PROBE = ("MemTotal:       16000000 kB\nMemAvailable:    2000000 kB\nHugePages_Total:     125\nHugePages_Free:      3\n"
         "Hugepagesize:       2048 kB\nClawbotHeld: 1000000 kB\nCgroupLimit: max\nDiskFree: 5000000000\n")


def test_node_memory_counts_memory_held_by_the_running_services():
    node = NodeMemory().process(PROBE.splitlines())
    assert node.memory_total == 16000000 * 1024 and node.memory_available == 3000000 * 1024
    assert (node.hugepages_total, node.hugepages_free, node.disk_free) == (125, 3, 5000000000)
    assert node.hugepage_bytes == 2 << 20 and node.gpus == ()
    limited = NodeMemory().process(PROBE.replace("CgroupLimit: max", "CgroupLimit: 1048576").splitlines())
    assert limited.memory_available == 1048576 and limited.memory_source == "cgroup memory.max"


def test_node_memory_reads_gpus_with_preflights_parser():
    lines = [*PROBE.splitlines(), "Gpu: NVIDIA H200, 143771, 1024", "Gpu: NVIDIA H200, 143771, 0"]
    node = NodeMemory().process(lines)
    assert node.gpus == preflight.parse_gpus("NVIDIA H200, 143771, 1024\nNVIDIA H200, 143771, 0")
    assert node.gpus[0].memory_free == (143771 - 1024) * sizing.MIB and node.memory_total == 16000000 * 1024


def _info() -> sizing.ModelInfo:
    return sizing.ModelInfo(path="x.gguf", architecture="llama", name="x", file_bytes=10 * sizing.MIB,
                            tensor_bytes=9 * sizing.MIB, n_params=9_000_000, n_layer=6, n_embd=384, n_head=6,
                            n_head_kv=2, n_ff=1024, head_dim_k=64, head_dim_v=64, n_ctx_train=8192, n_vocab=1000,
                            n_expert=0, layer_bytes=(1 * sizing.MIB,) * 6, output_bytes=sizing.MIB // 2,
                            input_bytes=sizing.MIB // 2)


def _config() -> dict:
    from clawbot.common.config import check_bytes

    result = check_bytes(b'{"model_gateway": {"endpoint": "https://model-a:9443"}}', "clawbot.json")
    assert result.ok
    return result.config


class _Host:
    """A pyinfra host as check_node uses it: data (the node plan), name and get_fact."""

    def __init__(self, plan, facts):
        self.data = types.SimpleNamespace(clawbot_plan=plan)
        self.name = "model-a"
        self.facts, self.asked = facts, []

    def get_fact(self, cls, **kwargs):
        self.asked.append((cls, kwargs))
        return self.facts


def test_check_node_reads_the_node_memory_fact_for_the_plans_user():
    config = _config()
    facts = NodeMemory().process(PROBE.splitlines())
    host = _Host(plan=types.SimpleNamespace(user="llm"), facts=facts)
    report = check_node(host, _info(), config)
    model_dir = config["model_server"]["model_path"].rsplit("/", 1)[0]
    assert host.asked == [(NodeMemory, {"model_dir": model_dir, "user": "llm"})]
    assert report.node == facts and report.fits
    assert report.to_json() == preflight.check_config(_info(), config, facts).to_json()


def test_check_node_refuses_when_the_fact_cannot_be_read():
    from pyinfra.api import DeployError

    with pytest.raises(DeployError, match="cannot read"):
        check_node(_Host(plan=types.SimpleNamespace(user="clawbot"), facts=None), _info(), _config())


def test_reserved_pages_reads_the_hugepages_fact():
    asked = []

    def run_shell(command):
        asked.append(command)
        return True, "HugePages_Total:     125\nHugePages_Free:      3\nHugepagesize:       2048 kB"

    assert reserved_pages(run_shell) == 125 and asked == ["grep -E '^(HugePages_|Hugepagesize)' /proc/meminfo || true"]
    assert reserved_pages(lambda command: (False, "")) == 0


def test_health_probe_fails_fast_with_the_reason_when_nothing_listens(tmp_path):
    tls = {"ca_cert": str(tmp_path / "ca.pem"), "client_cert": str(tmp_path / "c.pem"), "client_key": str(tmp_path / "c.key")}
    from clawbot.common import pki

    ca_key, ca_cert = pki.create_ca("t", permitted_dns=["localhost"], permitted_ips=["127.0.0.1"])
    key, cert = pki.issue_client_cert(ca_key, ca_cert, "c", dns_names=["localhost"])
    pki.write_certificate(tls["ca_cert"], ca_cert)
    pki.write_certificate(tls["client_cert"], cert)
    pki.write_private_key(tls["client_key"], key)
    command = health_probe("https://127.0.0.1:9/healthz", sys.executable, tls, deadline_s=2)
    proc = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "not healthy after 2 s" in proc.stdout and "Connection refused" in proc.stdout
