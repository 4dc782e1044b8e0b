"""One model across nodes (model_server.split, docs/split.md): RPC workers serve their memory to a main model node
through mutual-TLS tunnels. Nothing here speaks a protocol of its own: llama.cpp's ggml-rpc-server, and Debian's
stunnel4 for the TLS.

Settings: the inventory group `rpc_workers` and `clawbot_rpc_main` (who lends memory to whom), clawbot.json's
`model_server.split` (ports, worker threads, the tensor cache); clawbot.control.split turns them into the node
plans' `rpc_worker` / `rpc_main`.

- An RPC worker runs ggml-rpc-server on 127.0.0.1 only, as its own user (`<clawbot_user>-rpc`: it cannot read the
  node's TLS keys, its unit lets it reach loopback only), and stunnel in server mode on the node's address: TLS 1.3,
  a client certificate from the cluster CA required, and it must name the main node (checkHost/checkIP; OpenSSL
  also requires clientAuth). Any other certificate, a chat node's or another model node's included, gets no
  connection to ggml-rpc-server at all.
- The main model node runs stunnel in client mode: one loopback port per worker (llama-server's --rpc), presenting
  the node's client certificate and requiring the worker's server certificate to name that worker.

Both run under hardened systemd units (supervisor programs where systemd is not PID 1), restarted only when what
they use changed (unit, configuration, binary, certificates).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from io import BytesIO

from pyinfra.api import deploy
from pyinfra.operations import apt, files, server, systemd

from clawbot.control.split import MainRole, WorkerRole, rpc_user
from roles.content import BINARY, file_copied
from roles.services import UNIT_DIR, Service, ensure_service

RPC_CONFIG_DIR = "/etc/clawbot/rpc"
TUNNEL_CONFIG = f"{RPC_CONFIG_DIR}/stunnel.conf"
RPC_SERVICE = "clawbot-rpc"  # ggml-rpc-server (workers)
TUNNEL_SERVICE = "clawbot-rpc-tunnel"  # stunnel (workers: server mode; the main node: client mode)
RPC_STATE_DIR = "/var/lib/clawbot-rpc"  # ggml-rpc-server's tensor cache (model_server.split.worker_cache)
STUNNEL = "/usr/bin/stunnel4"  # Debian's stunnel4 package
PACKAGES = ["stunnel4"]
WORKER_PACKAGES = ["stunnel4", "libgomp1"]  # ggml-rpc-server is built with OpenMP, like llama-server
# RPC's sessions stay open while llama-server runs; stunnel would close one idle for its default 12 h (and the
# model server would have to restart). Just under what stunnel's poll timeout (milliseconds in an int) can hold.
TIMEOUT_IDLE_S = 2_000_000
# A dead peer (a worker powered off: no FIN) is noticed by TCP keepalive on the network side within ~1 min.
KEEPALIVE = ("SO_KEEPALIVE=yes", "TCP_KEEPIDLE=30", "TCP_KEEPINTVL=10", "TCP_KEEPCNT=3")
# ggml-rpc-server may negotiate RDMA over its TCP connection and then bypass it: never past the tunnel
RPC_ENVIRONMENT = {"GGML_RPC_NO_RDMA": "1", "LLAMA_CACHE": RPC_STATE_DIR, "HOME": RPC_STATE_DIR}


def _peer_check(name: str) -> str:
    """stunnel's subject check for a peer's certificate: checkIP for an address, checkHost for a name.

    + name: the inventory name the peer's certificate must carry
    """
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return f"checkHost = {name}"
    return f"checkIP = {name}"


def _tls_lines(cert: str, key: str, ca: str, peer: str) -> list[str]:
    return [f"cert = {cert}", f"key = {key}", f"CAfile = {ca}", "verifyChain = yes", _peer_check(peer),
            "sslVersionMin = TLSv1.3", f"TIMEOUTidle = {TIMEOUT_IDLE_S}"]


HEADER = ["; Managed by clawbot deploy; edits are replaced on the next run.",
          "; model_server.split (docs/split.md): llama.cpp's RPC only inside mutual TLS with the cluster CA.",
          "foreground = yes", "syslog = no", "pid ="]


def worker_tunnel_config(role: WorkerRole, tls: dict) -> str:
    """stunnel.conf of an RPC worker: the node address -> 127.0.0.1:rpc_port, for the main node's certificate only.

    + role: what the worker runs (clawbot.control.split.WorkerRole)
    + tls: clawbot.json's `tls` paths (the worker's server certificate and key, the trust bundle)
    """
    lines = [*HEADER, "", "[rpc]", f"accept = {role.address}:{role.tunnel_port}",
             f"connect = 127.0.0.1:{role.rpc_port}", "requireCert = yes",
             *_tls_lines(tls["server_cert"], tls["server_key"], tls["ca_cert"], role.main),
             *(f"socket = l:{option}" for option in KEEPALIVE)]
    return "\n".join(lines) + "\n"


def main_tunnel_config(role: MainRole, tls: dict) -> str:
    """stunnel.conf of a main model node: 127.0.0.1:local_port -> each worker, presenting this node's client
    certificate, to the worker named in the worker's server certificate only.

    + role: the main node's tunnels (clawbot.control.split.MainRole)
    + tls: clawbot.json's `tls` paths (the node's client certificate and key, the trust bundle)
    """
    lines = list(HEADER)
    for tunnel in role.tunnels:
        lines += ["", f"[{tunnel.worker}]", "client = yes", f"accept = 127.0.0.1:{tunnel.local_port}",
                  f"connect = {tunnel.address}:{tunnel.remote_port}", "delay = yes", "TIMEOUTconnect = 5",
                  *_tls_lines(tls["client_cert"], tls["client_key"], tls["ca_cert"], tunnel.worker),
                  *(f"socket = r:{option}" for option in KEEPALIVE)]
    return "\n".join(lines) + "\n"


def rpc_server_command(binary: str, role: WorkerRole) -> str:
    """ggml-rpc-server's command line: loopback only, every core it may use (`nproc`, or worker_threads).

    + binary: ggml-rpc-server on the node
    + role: what the worker runs (clawbot.control.split.WorkerRole)
    """
    # backquotes, not $(...): systemd expands `$` in ExecStart=, supervisor `%`; neither touches a backquote
    threads = str(role.threads) if role.threads else '"`nproc`"'
    cache = " -c" if role.cache else ""
    return f"/bin/sh -c 'exec {binary} -H 127.0.0.1 -p {role.rpc_port} -t {threads}{cache}'"


@dataclass(frozen=True)
class Unit:
    """One hardened service of the split: the same sandbox as the agents' units (roles.services.systemd_unit),
    plus what only it needs.

    + name: the unit or supervisor program name
    + description: the unit's Description=
    + command: what it runs
    + user: the system user (and group of the same name) it runs as
    + environment: its environment variables
    + extra: unit lines of its own (network allow lists, a state directory)
    """

    name: str
    description: str
    command: str
    user: str
    environment: dict = field(default_factory=dict)
    extra: tuple[str, ...] = ()

    def service(self, log_dir: str) -> Service:
        """The same service for Debian's supervisor (no sandbox there).

        + log_dir: where supervisor writes its output (one per user: the directory is that user's)
        """
        return Service(name=self.name, description=self.description, command=self.command, user=self.user,
                       environment=self.environment, log_dir=log_dir)


def systemd_unit(unit: Unit) -> str:
    """The hardened systemd unit text.

    + unit: what runs, as whom
    """
    env = "".join(f'Environment="{k}={v}"\n' for k, v in sorted(unit.environment.items()))
    extra = "".join(f"{line}\n" for line in unit.extra)
    return f"""# Managed by clawbot deploy; edits are replaced on the next run.
[Unit]
Description={unit.description}
After=network-online.target
Wants=network-online.target
StartLimitIntervalSec=0

[Service]
Type=simple
User={unit.user}
Group={unit.user}
ExecStart={unit.command}
{env}Restart=always
RestartSec=2
KillMode=control-group
TimeoutStopSec=30
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectKernelTunables=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictSUIDSGID=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK
LockPersonality=yes
CapabilityBoundingSet=
SystemCallArchitectures=native
UMask=0077
{extra}
[Install]
WantedBy=multi-user.target
"""


def rpc_unit(binary: str, role: WorkerRole, user: str) -> Unit:
    """ggml-rpc-server as a unit: its own user, loopback-only networking, its cache as its state directory.

    + binary: ggml-rpc-server on the node
    + role: what the worker runs
    + user: the RPC user (clawbot.control.split.rpc_user)
    """
    return Unit(name=RPC_SERVICE, description="ggml-rpc-server for a clawbot model split (loopback only)",
                command=rpc_server_command(binary, role), user=user, environment=dict(RPC_ENVIRONMENT),
                extra=("IPAddressDeny=any", "IPAddressAllow=localhost", "StateDirectory=clawbot-rpc",
                       "StateDirectoryMode=0750"))


def tunnel_unit(user: str, side: str) -> Unit:
    """stunnel with the split's configuration, as the agent's user (it reads the node's keys).

    + user: the agent's system user (clawbot_user), which owns the TLS keys
    + side: "worker" or "main", for the description
    """
    what = ("mTLS tunnel to this RPC worker's ggml-rpc-server (the main model node only)" if side == "worker"
            else "mTLS tunnels to this node's RPC workers")
    return Unit(name=TUNNEL_SERVICE, description=f"stunnel: {what}", command=f"{STUNNEL} {TUNNEL_CONFIG}",
                user=user)


def _any_changed(ops: list):
    ops = [op for op in ops if op is not None]
    return lambda: any(op.did_change() for op in ops)


def _ensure_unit(unit: Unit, manager: str, changed: list, log_dir: str) -> None:
    """Install a unit (or supervisor program) and keep it running; restart it when its inputs changed."""
    if manager != "systemd":
        ensure_service(unit.service(log_dir), manager, changed=changed)
        return
    unit_file = files.put(name=f"Ensure systemd unit {unit.name}.service is current",
                          src=BytesIO(systemd_unit(unit).encode()), dest=f"{UNIT_DIR}/{unit.name}.service", mode="644")
    systemd.daemon_reload(name="Reload systemd units", _if=unit_file.did_change)
    systemd.service(name=f"Ensure {unit.name} is enabled and running", service=f"{unit.name}.service", running=True,
                    enabled=True)
    systemd.service(name=f"Restart {unit.name} because its inputs changed", service=f"{unit.name}.service",
                    restarted=True, _if=_any_changed([unit_file, *changed]))


def _tunnel_config(text: str, user: str):
    files.directory(name=f"Ensure {RPC_CONFIG_DIR} exists", path=RPC_CONFIG_DIR, user="root", group=user, mode="750")
    return files.put(name=f"Ensure {TUNNEL_CONFIG} is current", src=BytesIO(text.encode()), dest=TUNNEL_CONFIG,
                     user="root", group=user, mode="640")


@deploy("Ensure this RPC worker serves the main model node through an mTLS tunnel only")
def ensure_rpc_worker(plan, manager: str, changed: list):
    """ggml-rpc-server on loopback as its own user, and stunnel on the node address for the main node.

    + plan: the node's clawbot.control.planning.NodePlan (its rpc_worker, tls, user, prefix, rpc_engine)
    + manager: systemd or supervisor (service_manager already resolved)
    + changed: operations whose change means the tunnel must restart (the node's certificates)
    """
    role: WorkerRole = plan.rpc_worker
    user = rpc_user(plan.user)
    apt.packages(name=f"Ensure {', '.join(WORKER_PACKAGES)} are installed", packages=WORKER_PACKAGES,
                 no_recommends=True)
    server.group(name=f"Ensure group {user} exists", group=user, system=True)
    server.user(name=f"Ensure system user {user} exists (ggml-rpc-server: no key, loopback only)", user=user,
                group=user, system=True, home=RPC_STATE_DIR, shell="/usr/sbin/nologin", create_home=False,
                ensure_home=False)
    files.directory(name=f"Ensure {RPC_STATE_DIR} exists (ggml-rpc-server's tensor cache)", path=RPC_STATE_DIR,
                    user=user, group=user, mode="750")
    bin_dir = f"{plan.prefix}/bin"
    files.directory(name=f"Ensure {bin_dir} exists", path=bin_dir, user="root", group="root", mode="755")
    binary_path = f"{bin_dir}/ggml-rpc-server"
    binary = file_copied(name=f"Ensure ggml-rpc-server is installed at {binary_path}", src=plan.rpc_engine,
                         dest=binary_path, note=BINARY, user="root", group="root", mode="755")
    _ensure_unit(rpc_unit(binary_path, role, user), manager, [binary], log_dir="/var/log/clawbot-rpc")
    config = _tunnel_config(worker_tunnel_config(role, plan.tls), plan.user)
    _ensure_unit(tunnel_unit(plan.user, "worker"), manager, [config, *changed], log_dir="/var/log/clawbot")


@deploy("Ensure the main model node's mTLS tunnels to its RPC workers run")
def ensure_rpc_tunnels(plan, manager: str, changed: list):
    """stunnel in client mode: one loopback port per RPC worker, for this node's llama-server (--rpc).

    + plan: the node's clawbot.control.planning.NodePlan (its rpc_main, tls, user)
    + manager: systemd or supervisor (service_manager already resolved)
    + changed: operations whose change means the tunnels must restart (the node's certificates)
    """
    apt.packages(name="Ensure stunnel4 is installed", packages=PACKAGES, no_recommends=True)
    config = _tunnel_config(main_tunnel_config(plan.rpc_main, plan.tls), plan.user)
    _ensure_unit(tunnel_unit(plan.user, "main"), manager, [config, *changed], log_dir="/var/log/clawbot")
