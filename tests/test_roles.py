"""The rollout roles' pure parts: what they write to nodes and how they read node facts."""

from __future__ import annotations

import subprocess
import sys

from roles.hosts import hosts_block
from roles.preflight import parse_probe
from clawbot.control.rollout import health_probe
from roles.services import supervisor_program, systemd_unit


def test_hosts_block_is_sorted_and_stable():
    nodes = [("10.0.0.6", ["model-node", "llm.lab"]), ("10.0.0.5", ["chat-node"])]
    assert hosts_block(nodes) == "10.0.0.5 chat-node\n10.0.0.6 model-node llm.lab"
    assert hosts_block(list(reversed(nodes))) == hosts_block(nodes)


def test_systemd_unit_is_hardened_and_runs_as_its_own_user():
    unit = systemd_unit("clawbot-model", "clawbot agent", "/opt/clawbot/venv/bin/clawbot agent --role model", "clawbot",
                        ["/var/lib/clawbot/hugepages"], {"HOME": "/var/lib/clawbot"})
    for line in ("User=clawbot", "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes", "LimitMEMLOCK=infinity",
                 "Restart=on-failure", "RestartPreventExitStatus=78", "CapabilityBoundingSet=",
                 "ReadWritePaths=-/var/lib/clawbot/hugepages", 'Environment="HOME=/var/lib/clawbot"'):
        assert f"\n{line}\n" in unit, line


def test_gpu_node_unit_lets_only_the_gpu_devices_through():
    cpu = systemd_unit("clawbot-model", "m", "/x", "clawbot", [], {})
    assert "\nPrivateDevices=yes\n" in cpu and "DeviceAllow" not in cpu
    cuda = systemd_unit("clawbot-model", "m", "/x", "clawbot", [], {}, accelerator="cuda")
    for line in ("PrivateDevices=no", "DevicePolicy=closed", "DeviceAllow=char-nvidia rw", "DeviceAllow=char-nvidiactl rw",
                 "DeviceAllow=char-nvidia-uvm rw", "NoNewPrivileges=yes", "CapabilityBoundingSet="):
        assert f"\n{line}\n" in cuda, line
    assert "PrivateDevices=yes" not in cuda
    rocm = systemd_unit("clawbot-model", "m", "/x", "clawbot", [], {}, accelerator="rocm")
    assert "\nDeviceAllow=char-kfd rw\n" in rocm and "\nSupplementaryGroups=video render\n" in rocm


def test_supervisor_program_kills_the_whole_group():
    program = supervisor_program("clawbot-chat", "/x agent --role chat", "clawbot", {"A": "1"}, "/var/log/clawbot")
    assert "[program:clawbot-chat]" in program and "user=clawbot" in program
    assert "stopasgroup=true" in program and "killasgroup=true" in program and 'environment=A="1"' in program


def test_parse_probe_counts_memory_held_by_the_running_services():
    text = ("MemTotal:       16000000 kB\nMemAvailable:    2000000 kB\nHugePages_Total:     125\nHugePages_Free:      3\n"
            "ClawbotHeld: 1000000 kB\nCgroupLimit: max\nDiskFree: 5000000000\n")
    node = parse_probe(text)
    assert node.memory_total == 16000000 * 1024 and node.memory_available == 3000000 * 1024
    assert (node.hugepages_total, node.hugepages_free, node.disk_free) == (125, 3, 5000000000)
    limited = parse_probe(text.replace("CgroupLimit: max", "CgroupLimit: 1048576"))
    assert limited.memory_available == 1048576 and limited.memory_source == "cgroup memory.max"


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
