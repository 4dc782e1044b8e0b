"""The agent runs as a supervised service: a hardened systemd unit, or Debian's supervisor without systemd.

Settings: `clawbot_service_manager` (`auto`: systemd when /run/systemd/system exists — systemd is PID 1 —
else supervisor, e.g. in containers, WSL or minimal VMs; deploy says which it used).

A service is restarted only when something it uses changed (its unit, certificates, the installed agent, the
engine), reloaded (SIGHUP) when only its clawbot.json or model file did (the agents take a new config live; the
model agent swaps a new model in beside the serving one), and started whenever it is not running (a stopped agent
is repaired).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from io import BytesIO

from pyinfra import host
from pyinfra.api import StringCommand, deploy, operation
from pyinfra.facts.files import Directory
from pyinfra.operations import apt, files, server, systemd, sysvinit

from clawbot.control.facts import SupervisorProgramStatus
from roles.agent import CONFIG_PATH, STATE_DIR

UNIT_DIR = "/etc/systemd/system"
SUPERVISOR_DIR = "/etc/supervisor/conf.d"
WRITABLE = (STATE_DIR, "/var/log/clawbot")  # all an agent's unit may write (ProtectSystem=strict)


@dataclass(frozen=True)
class Service:
    """One supervised clawbot service: what runs, as whom, and what it may see and write.

    + name: the unit (`<name>.service`) or supervisor program name, e.g. clawbot-model
    + description: the unit's Description= line
    + command: the command line it runs (agent_command)
    + user: the system user, and group of the same name, it runs as
    + writable: the only paths it may write (systemd: ReadWritePaths under ProtectSystem=strict)
    + environment: its environment variables (agent_environment)
    + accelerator: the GPU whose devices the unit lets through (cuda, vulkan, rocm); None or cpu: no devices
    + log_dir: where supervisor writes its output (systemd: the journal)
    """

    name: str
    description: str
    command: str
    user: str
    writable: tuple[str, ...] = WRITABLE
    environment: dict = field(default_factory=dict)
    accelerator: str | None = None
    log_dir: str = "/var/log/clawbot"


def agent_command(prefix: str, role: str) -> str:
    """The agent's command line for a role, from its venv under clawbot_prefix.

    + prefix: where the agent's venv lives (clawbot_prefix)
    + role: model or chat
    """
    return f"{prefix}/venv/bin/clawbot agent --config {CONFIG_PATH} --role {role}"


def agent_environment(prefix: str) -> dict:
    """The agent's environment: its cache (engines) under the prefix, its home in its state directory.

    + prefix: where the agent's venv lives (clawbot_prefix)
    """
    return {"XDG_CACHE_HOME": f"{prefix}/cache", "HOME": STATE_DIR, "PYTHONUNBUFFERED": "1"}


def systemd_is_pid1() -> bool:
    """Whether systemd runs the current host (/run/systemd/system exists): read once per host by roles/site.py."""
    return bool(host.get_fact(Directory, path="/run/systemd/system"))


def service_manager(setting: str, systemd_running: bool) -> str:
    """The service manager to use on the current host: `auto` is systemd when it is PID 1, else supervisor.

    + setting: clawbot_service_manager: systemd, supervisor or auto
    + systemd_running: systemd_is_pid1() for this host
    """
    if setting in ("systemd", "supervisor"):
        return setting
    return "systemd" if systemd_running else "supervisor"


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
    """The unit's device lines: none at all on a CPU node, the accelerator's device classes on a GPU node.

    + accelerator: cuda, vulkan or rocm; anything else (None, cpu) lets no device through
    """
    if accelerator not in GPU_DEVICES:
        return "PrivateDevices=yes\n"
    allow, groups = GPU_DEVICES[accelerator]
    lines = ["PrivateDevices=no", "DevicePolicy=closed", *(f"DeviceAllow={entry}" for entry in allow)]
    if groups:
        lines.append(f"SupplementaryGroups={' '.join(groups)}")
    return "\n".join(lines) + "\n"


def systemd_unit(service: Service) -> str:
    """The hardened systemd unit for a service.

    + service: what runs, as whom, with which rights
    """
    env = "".join(f'Environment="{k}={v}"\n' for k, v in sorted(service.environment.items()))
    return f"""# Managed by clawbot deploy; edits are replaced on the next run.
[Unit]
Description={service.description}
After=network-online.target
Wants=network-online.target
StartLimitIntervalSec=0

[Service]
Type=simple
User={service.user}
Group={service.user}
ExecStart={service.command}
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
{device_access(service.accelerator)}ProtectKernelModules=yes
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
ReadWritePaths={' '.join('-' + path for path in service.writable)}

[Install]
WantedBy=multi-user.target
"""


def supervisor_program(service: Service) -> str:
    """The supervisor program section for a service.

    + service: what runs, as whom (supervisor has no sandbox: writable and accelerator do not apply)
    """
    env = ",".join(f'{k}="{v}"' for k, v in sorted(service.environment.items()))
    return f"""; Managed by clawbot deploy; edits are replaced on the next run.
[program:{service.name}]
command={service.command}
user={service.user}
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
stdout_logfile={service.log_dir}/{service.name}.log
stdout_logfile_maxbytes=10MB
stdout_logfile_backups=3
"""


@operation()
def supervisor_program_running(program: str):
    """Start a supervisor program unless supervisor shows it RUNNING.

    + program: the supervisor program name
    """
    if host.get_fact(SupervisorProgramStatus, program=program) == "RUNNING":
        host.noop(f"{program} already running")
        return
    yield StringCommand("supervisorctl", "start", program)


@deploy("Ensure the clawbot agent service runs")
def ensure_service(service: Service, manager: str, changed: list, reloaded: list | None = None):
    """Install the unit or program for a service and keep it running; restart it when its inputs changed.

    + service: what runs, as whom, with which rights (Service)
    + manager: systemd or supervisor (service_manager already resolved)
    + changed: operations (anything with did_change()) whose change means the service must restart; its own
      unit or program file is always one
    + reloaded: operations whose change the running service takes with SIGHUP instead (a new clawbot.json; the
      model agent's model file, which it swaps in without downtime); a restart covers them too

    Returns the (restart, reload) operations (reload None without `reloaded`): deploy's checks after the run ask
    whether this run restarted or reloaded the service."""
    name = service.name
    if manager == "systemd":
        unit = files.put(
            name=f"Ensure systemd unit {name}.service is current",
            src=BytesIO(systemd_unit(service).encode()),
            dest=f"{UNIT_DIR}/{name}.service",
            mode="644",
        )
        systemd.daemon_reload(name="Reload systemd units", _if=unit.did_change)
        systemd.service(name=f"Ensure {name} is enabled and running", service=f"{name}.service", running=True,
                        enabled=True)
        restart = _any_changed([unit, *changed])
        restarted = systemd.service(name=f"Restart {name} because its inputs changed", service=f"{name}.service",
                                    restarted=True, _if=restart)
        if not reloaded:
            return restarted, None
        return restarted, systemd.service(name=f"Reload {name} (SIGHUP) because its config or model changed",
                                          service=f"{name}.service", reloaded=True,
                                          _if=_reload_only(reloaded, restart))
    apt.packages(name="Ensure supervisor is installed (systemd is not PID 1 here)", packages=["supervisor"],
                 no_recommends=True)
    files.directory(name=f"Ensure {service.log_dir} exists", path=service.log_dir, user=service.user,
                    group=service.user, mode="750")
    # Without systemd as PID 1, Debian's supervisor is started by its init script.
    sysvinit.service(name="Ensure supervisord is running", service="supervisor", running=True)
    program = files.put(
        name=f"Ensure supervisor program {name} is current",
        src=BytesIO(supervisor_program(service).encode()),
        dest=f"{SUPERVISOR_DIR}/{name}.conf",
        mode="644",
    )
    server.shell(name="Let supervisor pick up the changed program", commands=["supervisorctl update"],
                 _if=program.did_change)
    restart_needed = _any_changed([program, *changed])
    restarted = server.shell(name=f"Restart {name} because its inputs changed",
                             commands=[f"supervisorctl restart {name}"], _if=restart_needed)
    reload = server.shell(name=f"Reload {name} (SIGHUP) because its config or model changed",
                          commands=[f"supervisorctl signal HUP {name}"],
                          _if=_reload_only(reloaded, restart_needed)) if reloaded else None
    supervisor_program_running(name=f"Ensure {name} is running", program=name)
    return restarted, reload


def _any_changed(ops: list):
    ops = [op for op in ops if op is not None]
    return lambda: any(op.did_change() for op in ops)


def _reload_only(ops: list, restart):
    """Changed, and no restart takes them anyway."""
    changed = _any_changed(ops)
    return lambda: changed() and not restart()
