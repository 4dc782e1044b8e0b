"""The agent runs as a supervised service: a hardened systemd unit, or Debian's supervisor without systemd.

Settings: `clawbot_service_manager` (`auto`: systemd when /run/systemd/system exists — systemd is PID 1 —
else supervisor, e.g. in containers, WSL or minimal VMs; deploy says which it used).

A service is restarted only when something it uses changed (its unit, clawbot.json, certificates, the
installed agent, the model file), and started whenever it is not running (a stopped agent is repaired).
"""

from __future__ import annotations

from io import BytesIO

from pyinfra import host
from pyinfra.api import deploy, operation
from pyinfra.facts.files import Directory
from pyinfra.facts.server import Command
from pyinfra.operations import apt, files, server, systemd, sysvinit

UNIT_DIR = "/etc/systemd/system"
SUPERVISOR_DIR = "/etc/supervisor/conf.d"
WRITABLE = ("/var/lib/clawbot", "/var/log/clawbot")  # all an agent's unit may write (ProtectSystem=strict)


def agent_command(prefix: str, role: str) -> str:
    """The agent's command line for a role, from its venv under clawbot_prefix."""
    return f"{prefix}/venv/bin/clawbot agent --config /etc/clawbot/clawbot.json --role {role}"


def agent_environment(prefix: str) -> dict:
    """The agent's environment: its cache (engines) under the prefix, its home in its state directory."""
    return {"XDG_CACHE_HOME": f"{prefix}/cache", "HOME": "/var/lib/clawbot", "PYTHONUNBUFFERED": "1"}


def service_manager(setting: str) -> str:
    if setting in ("systemd", "supervisor"):
        return setting
    return "systemd" if host.get_fact(Directory, path="/run/systemd/system") else "supervisor"


# The device nodes a model server on a GPU must open (systemd's DeviceAllow names `char-<group>` as listed in
# /proc/devices), and the groups that own them. PrivateDevices=yes would hide them all, so a GPU node gets
# PrivateDevices=no with DevicePolicy=closed: only these and the standard pseudo-devices (/dev/null, …).
# NVIDIA's driver 580 lists /dev/nvidia0 and /dev/nvidiactl as `nvidia` and `nvidiactl` (checked on an
# H100 node), older drivers as `nvidia-frontend`; a group the kernel does not list is ignored by systemd.
GPU_DEVICES: dict[str, tuple[list[str], list[str]]] = {
    "cuda": (["char-nvidia rw", "char-nvidiactl rw", "char-nvidia-frontend rw", "char-nvidia-uvm rw",
              "char-nvidia-caps r"], []),
    "vulkan": (["char-drm rw"], ["video", "render"]),
    "rocm": (["char-drm rw", "char-kfd rw"], ["video", "render"]),
}


def device_access(accelerator: str | None) -> str:
    """The unit's device lines: none at all on a CPU node, the accelerator's device classes on a GPU node."""
    if accelerator not in GPU_DEVICES:
        return "PrivateDevices=yes\n"
    allow, groups = GPU_DEVICES[accelerator]
    lines = ["PrivateDevices=no", "DevicePolicy=closed", *(f"DeviceAllow={entry}" for entry in allow)]
    if groups:
        lines.append(f"SupplementaryGroups={' '.join(groups)}")
    return "\n".join(lines) + "\n"


def systemd_unit(name: str, description: str, command: str, user: str, writable: list[str], environment: dict,
                 accelerator: str | None = None) -> str:
    env = "".join(f'Environment="{k}={v}"\n' for k, v in sorted(environment.items()))
    return f"""# Managed by clawbot deploy; edits are replaced on the next run.
[Unit]
Description={description}
After=network-online.target
Wants=network-online.target
StartLimitIntervalSec=0

[Service]
Type=simple
User={user}
Group={user}
ExecStart={command}
ExecReload=/bin/kill -HUP $MAINPID
{env}Restart=on-failure
RestartSec=2
RestartPreventExitStatus=78
KillMode=control-group
TimeoutStopSec=30
LimitMEMLOCK=infinity
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
{device_access(accelerator)}ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictSUIDSGID=yes
RestrictNamespaces=yes
RestrictRealtime=yes
LockPersonality=yes
CapabilityBoundingSet=
SystemCallArchitectures=native
UMask=0077
StateDirectory=clawbot
StateDirectoryMode=0750
LogsDirectory=clawbot
ReadWritePaths={' '.join('-' + path for path in writable)}

[Install]
WantedBy=multi-user.target
"""


def supervisor_program(name: str, command: str, user: str, environment: dict, log_dir: str) -> str:
    env = ",".join(f'{k}="{v}"' for k, v in sorted(environment.items()))
    return f"""; Managed by clawbot deploy; edits are replaced on the next run.
[program:{name}]
command={command}
user={user}
directory=/
environment={env}
autostart=true
autorestart=true
startsecs=2
stopasgroup=true
killasgroup=true
stopsignal=TERM
umask=077
redirect_stderr=true
stdout_logfile={log_dir}/{name}.log
stdout_logfile_maxbytes=10MB
stdout_logfile_backups=3
"""


@operation()
def supervisor_program_running(program: str):
    """Start the program if supervisor does not show it RUNNING."""
    status = host.get_fact(Command, command=f"supervisorctl status {program} 2>&1 || true") or ""
    if "RUNNING" in status:
        host.noop(f"{program} already running")
        return
    yield f"supervisorctl start {program}"


@deploy("Ensure the clawbot agent service runs")
def ensure_service(name: str, description: str, command: str, user: str, writable: list[str], environment: dict,
                   manager: str, changed: list, log_dir: str = "/var/log/clawbot", accelerator: str | None = None):
    """Install the unit/program for `command` and keep it running; restart when any op in `changed` changed.
    accelerator: the GPU whose devices the unit must let through (None or cpu: no devices at all)."""
    if manager == "systemd":
        unit = files.put(
            name=f"Ensure systemd unit {name}.service is current",
            src=BytesIO(systemd_unit(name, description, command, user, writable, environment, accelerator).encode()),
            dest=f"{UNIT_DIR}/{name}.service",
            mode="644",
        )
        systemd.daemon_reload(name="Reload systemd units", _if=unit.did_change)
        systemd.service(name=f"Ensure {name} is enabled and running", service=f"{name}.service", running=True,
                        enabled=True)
        systemd.service(name=f"Restart {name} because its inputs changed", service=f"{name}.service",
                        restarted=True, _if=_any_changed([unit, *changed]))
        return
    apt.packages(name="Ensure supervisor is installed (systemd is not PID 1 here)", packages=["supervisor"],
                 no_recommends=True)
    files.directory(name=f"Ensure {log_dir} exists", path=log_dir, user=user, group=user, mode="750")
    # Without systemd as PID 1, Debian's supervisor is started by its init script.
    sysvinit.service(name="Ensure supervisord is running", service="supervisor", running=True)
    program = files.put(
        name=f"Ensure supervisor program {name} is current",
        src=BytesIO(supervisor_program(name, command, user, environment, log_dir).encode()),
        dest=f"{SUPERVISOR_DIR}/{name}.conf",
        mode="644",
    )
    server.shell(name="Let supervisor pick up the changed program", commands=["supervisorctl update"],
                 _if=program.did_change)
    restart_needed = _any_changed([program, *changed])
    server.shell(name=f"Restart {name} because its inputs changed", commands=[f"supervisorctl restart {name}"],
                 _if=restart_needed)
    supervisor_program_running(name=f"Ensure {name} is running", program=name)


def _any_changed(ops: list):
    ops = [op for op in ops if op is not None]
    return lambda: any(op.did_change() for op in ops)
