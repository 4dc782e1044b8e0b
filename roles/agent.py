"""Every node has the clawbot agent installed in its own venv, its own user, and a checked clawbot.json.

Settings: `clawbot_user` (system user, default clawbot), `clawbot_prefix` (venv and binaries, default
/opt/clawbot). The agent and all its dependencies are installed from a wheelhouse built on the control
machine and pushed to the node, so nodes never need PyPI (privacy-first nodes often have no internet);
`clawbot_offline: false` lets the node's pip fetch the dependencies itself instead. With
`model_server.engine: llama-cpp-python`, model nodes' wheelhouses also carry llama-cpp-python (a portable CPU
wheel compiled here once, or the inventory's `clawbot_llama_cpp_python_wheel`) and its server's dependencies.

clawbot.json is copied next to the live file, checked there with the node's own `clawbot validate`, and
only then moved over the live file (atomic rename): a bad config never replaces a good one.
"""

from __future__ import annotations

from pathlib import Path

from pyinfra import host, logger, state
from pyinfra.api import DeployError, deploy, operation
from pyinfra.facts.files import FileContents, Sha256File
from pyinfra.operations import apt, files, server

from clawbot.common.config import NODE_CONFIG_DIR as CONFIG_DIR
from clawbot.common.config import NODE_CONFIG_PATH as CONFIG_PATH
from clawbot.control.facts import DirectoryListingDigest, RealPath, local_listing_digest
from roles.content import BINARY, content_diff_off, file_copied, local_lines, log_diff

STAGED_CONFIG = f"{CONFIG_DIR}/clawbot.json.staged"
STATE_DIR = "/var/lib/clawbot"


@operation()
def agent_installed(venv: str, wheelhouse: str, stamp: str, offline: bool):
    """pip-install the agent from the pushed wheelhouse unless the venv already holds this exact build.

    + venv: the agent's venv on the node
    + wheelhouse: the wheelhouse directory on the node (holds clawbot-*.whl and its dependencies)
    + stamp: the wheelhouse's build stamp; recorded in the venv's .clawbot-installed marker once installed (a
      stamp with `-llama-` installs the `llama` extra too)
    + offline: install from the wheelhouse only (`--no-index`); false lets pip fetch missing dependencies
    """
    marker = f"{venv}/.clawbot-installed"
    current = host.get_fact(FileContents, path=marker)
    if current and current[0].strip() == stamp:
        host.noop("agent already installed from this wheelhouse")
        return
    index = f"--no-index --find-links {wheelhouse}" if offline else f"--find-links {wheelhouse}"
    # the `llama` extra when the wheelhouse carries llama-cpp-python (model_server.engine llama-cpp-python)
    wheel = (f'"$(ls {wheelhouse}/clawbot-*.whl)[llama]"' if "-llama-" in stamp
             else f"{wheelhouse}/clawbot-*.whl")
    yield f"{venv}/bin/pip install -q --disable-pip-version-check {index} --force-reinstall --no-deps {wheelhouse}/clawbot-*.whl"
    yield f"{venv}/bin/pip install -q --disable-pip-version-check {index} {wheel}"
    yield f"echo {stamp} > {marker}"


@operation()
def venv_exists(venv: str, python: str = "/usr/bin/python3"):
    """A venv for the agent made from the distribution's Python, recreated when missing or made from another.

    + venv: the venv's directory
    + python: the interpreter it must be made from (never a per-user one like pyenv's, which the agent's user
      could not read); compared with symlinks resolved
    """
    current = host.get_fact(RealPath, path=f"{venv}/bin/python")
    wanted = host.get_fact(RealPath, path=python)
    if current and current == wanted:
        host.noop(f"venv {venv} already exists")
        return
    yield f"rm -rf {venv} && {python} -m venv {venv}"


@operation()
def wheelhouse_synced(src: str, dest: str):
    """Copy the agent's wheelhouse to the node unless the node's listing (names and sizes) matches this one's.

    One digest of the listing instead of every wheel's checksum: a no-change re-run stays fast (dozens of wheels
    would cost a round trip each), and a missing, extra or truncated wheel on the node still shows as a
    difference. An operation on every run, so first and later runs count the same operations; --diff says the
    wheels differ instead of printing them.

    + src: the wheelhouse on the control machine (clawbot.control.builds)
    + dest: the wheelhouse directory on the node (files.sync with delete: wheels of older builds are removed)
    """
    if host.get_fact(DirectoryListingDigest, path=dest) == local_listing_digest(Path(src)):
        host.noop("agent wheelhouse already on the node")
        return
    if state.config.DIFF:
        host.log(f"Will sync {dest}: its wheels differ from this machine's ({BINARY})", logger.info)
    with content_diff_off():
        commands = list(files.sync._inner(src=src, dest=dest, delete=True, exclude=[".complete", ".stamp"],
                                          mode="644", dir_mode="755"))
    yield from commands


@operation()
def config_installed(staged: str, live: str, validator: str, user: str, desired: str | None = None):
    """Move the staged clawbot.json over the live one, only if it differs and the node's validator accepts it.

    + staged: the new clawbot.json, already copied next to the live one
    + live: the clawbot.json the agent reads
    + validator: the node's clawbot executable (`validator validate staged` must pass before the atomic rename)
    + user: the agent's group owns the live file (mode 640)
    + desired: the clawbot.json nodes get, on the control machine: with --diff, the live file's unified diff
      against it is printed (the staged copy may not hold it yet when --check changes nothing)
    """
    staged_sum = host.get_fact(Sha256File, path=staged)
    live_sum = host.get_fact(Sha256File, path=live)
    if staged_sum and staged_sum == live_sum:
        host.noop("clawbot.json already installed")
        return
    if state.config.DIFF and desired:
        current, wanted = host.get_fact(FileContents, path=live), local_lines(desired)
        if current != wanted:  # else only the staged copy drifted: its own line says so
            log_diff(live, current, wanted)
    tmp = f"{live}.tmp"
    yield (f"{validator} validate {staged} && cp {staged} {tmp} && chown root:{user} {tmp} && chmod 640 {tmp} "
           f"&& mv -f {tmp} {live}")


@deploy("Ensure the clawbot system user exists")
def ensure_service_user(user: str):
    """The agent's own user: owns its keys and state, nothing else (needed before certificates are installed).

    + user: the system user and its group (clawbot_user)
    """
    server.group(name=f"Ensure group {user} exists", group=user, system=True)
    server.user(name=f"Ensure system user {user} exists", user=user, group=user, system=True, home=STATE_DIR,
                shell="/usr/sbin/nologin", create_home=False, ensure_home=False)


@deploy("Ensure the clawbot agent is installed with a checked clawbot.json")
def ensure_agent(config_file: str, wheelhouse: Path, stamp: str, user: str, prefix: str, offline: bool):
    """The agent's directories, wheelhouse, venv, installed build and checked clawbot.json on the node.

    + config_file: the clawbot.json nodes get, on the control machine (checked there; rendered into the state
      directory by clawbot.control.nodeconfig, with model_gateway.allowed_clients filled in)
    + wheelhouse: the control machine's wheelhouse for this node's Python (clawbot.control.builds)
    + stamp: the wheelhouse's build stamp (agent_installed)
    + user: the agent's system user (clawbot_user)
    + prefix: where the venv and the wheelhouse go on the node (clawbot_prefix)
    + offline: nodes install from the wheelhouse only (clawbot_offline)

    Returns the operations whose change means the agent must restart.
    """
    apt.packages(name="Ensure Python's venv module is installed", packages=["python3-venv"], no_recommends=True)
    files.directory(name=f"Ensure {prefix} exists", path=prefix, user="root", group="root", mode="755")
    files.directory(name=f"Ensure {CONFIG_DIR} exists", path=CONFIG_DIR, user="root", group=user, mode="750")
    files.directory(name=f"Ensure {STATE_DIR} exists", path=STATE_DIR, user=user, group=user, mode="750")
    remote_house = f"{prefix}/wheelhouse"
    if not wheelhouse.is_dir() or not any(wheelhouse.glob("clawbot-*.whl")):
        raise DeployError(f"no agent wheel in {wheelhouse}")
    wheelhouse_synced(name="Ensure the agent wheelhouse is on the node", src=str(wheelhouse), dest=remote_house)
    venv = f"{prefix}/venv"
    venv_exists(name=f"Ensure the agent venv exists at {venv}", venv=venv)
    installed = agent_installed(name="Ensure the agent is installed in the venv", venv=venv,
                                wheelhouse=remote_house, stamp=stamp, offline=offline)
    # --diff shows clawbot.json's change once, for the live file (config_installed), not again for this copy
    file_copied(name="Ensure the new clawbot.json is staged on the node", src=config_file, dest=STAGED_CONFIG,
                note=f"the staged copy: the diff of {CONFIG_PATH} shows the change", user="root", group=user,
                mode="640")
    config = config_installed(name="Ensure clawbot.json is installed after the node's clawbot validate accepts it",
                              staged=STAGED_CONFIG, live=CONFIG_PATH, validator=f"{venv}/bin/clawbot", user=user,
                              desired=config_file)
    return [installed, config]
