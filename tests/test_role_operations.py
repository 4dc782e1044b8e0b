"""Every custom operation in roles/, tested the way pyinfra tests its own (tests/operations/<module>.<op>/*.json
and tests/test_operations.py in pyinfra's repository): a fixture gives the facts the operation reads, its
arguments, and the exact commands it must yield, or that it yields none and the noop message it logs.

Fixtures: tests/fixtures/operations/<roles module>.<operation>/<case>.json with
- "args" / "kwargs": the operation's arguments
- "facts": {"<fact module>.<FactClass>": value} for a fact read without arguments, or
  {"<fact module>.<FactClass>": {"<arg>=<value>, ...": value}} (arguments sorted by name, as pyinfra's
  get_kwargs_str writes them); pyinfra's stock facts are keyed like `files.FileContents`, clawbot's like
  `facts.NodeMemory` (clawbot.control.facts). Strings "datetime:YYYY-mm-ddTHH:MM:SS" become datetimes.
- "commands": the commands, in order, as the shell receives them (a file upload as `upload SRC DEST`)
- "noop_description": the noop message, required when "commands" is empty
- "diff": with it, the case runs as `deploy.py --diff` does (state.config.DIFF) and these are the lines the
  operation logs (host.log and pyinfra's logger), in order; without it, DIFF is off and nothing may be logged
- "$FIXTURES/" at the start of a string argument is tests/fixtures/ (local files an operation copies or reads)
- the timestamp pyinfra puts in sed's in-place suffix is frozen at 2601010000

The operation's generator (`op._inner`) runs against a fake host answering only from the fixture: a fact the
fixture lacks fails the case, and so does a fixture fact the operation never reads. So a case for a secret or a
binary file that gives no FileContents fact also asserts that --diff never reads the node's copy. No SSH, no
network.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import subprocess
import sys
from datetime import datetime
from importlib import import_module
from pathlib import Path

import pytest
from pyinfra.api import Config, StringCommand
from pyinfra.api.command import FileUploadCommand
from pyinfra.api.util import get_kwargs_str
from pyinfra.context import ctx_host, ctx_state

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "operations"
FIXTURE_FILES = Path(__file__).resolve().parent / "fixtures"
CASES = sorted(FIXTURES.glob("*.*/*.json"))


def parse_value(value):
    """JSON → the Python values facts hold (pyinfra's tests/util.py convention for datetimes)."""
    if isinstance(value, str) and value.startswith("$FIXTURES/"):
        return str(FIXTURE_FILES / value[len("$FIXTURES/"):])
    if isinstance(value, str) and value.startswith("datetime:"):
        return datetime.strptime(value[len("datetime:"):], "%Y-%m-%dT%H:%M:%S")
    if isinstance(value, list):
        return [parse_value(v) for v in value]
    if isinstance(value, dict):
        return {k: parse_value(v) for k, v in value.items()}
    return value


class FakeState:
    """What an operation may ask of the state while it yields commands."""

    cwd = None  # files.put: no deploy directory to resolve sources against

    def __init__(self, diff: bool = False):
        self.config = Config(DIFF=diff)


class FakeHost:
    """A host whose facts come from a fixture; records the noop message and which facts were read."""

    name = "fixture-host"
    print_prefix = ""
    current_op_global_arguments = None

    def __init__(self, facts: dict):
        self.facts = facts
        self.read: set[tuple[str, str | None]] = set()
        self.noop_description: str | None = None

    def noop(self, description: str) -> None:
        self.noop_description = description

    def log(self, message: str, log_func=None) -> None:
        (log_func or logging.getLogger("pyinfra").info)(f"{self.print_prefix}{message}")

    def get_temp_filename(self, hash_key=None, hash_filename=True, *, temp_directory=None) -> str:
        return f"/tmp/pyinfra-{Path(str(hash_key)).name}"

    def get_temp_dir_config(self) -> str:
        return "/tmp"

    def get_fact(self, fact_cls, *args, **kwargs):
        key = f"{fact_cls.__module__.rsplit('.', 1)[-1]}.{fact_cls.__name__}"
        assert key in self.facts, f"the fixture has no fact {key}"
        if not args and not kwargs:
            self.read.add((key, None))
            return parse_value(self.facts[key])
        # like pyinfra's FakeHost: every argument must be an argument of the fact's command
        bound = inspect.signature(fact_cls.command).bind(None, *args, **kwargs).arguments
        bound.pop("self", None)
        arguments = get_kwargs_str(bound)
        assert arguments in self.facts[key], f"the fixture has no {key} for {arguments!r}"
        self.read.add((key, arguments))
        return parse_value(self.facts[key][arguments])

    def unread(self) -> list[str]:
        given = set()
        for key, value in self.facts.items():
            if (key, None) in self.read:
                continue
            if isinstance(value, dict) and any((key, arguments) in self.read for arguments in value):
                given.update(f"{key}({arguments})" for arguments in value if (key, arguments) not in self.read)
                continue
            given.add(key)
        return sorted(given)


class LogLines(logging.Handler):
    """The INFO messages pyinfra's logger gets (what --diff prints; host.log goes there too), in order; warnings
    (files.block's beta notice) are not part of a diff."""

    def __init__(self):
        super().__init__(level=logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno == logging.INFO:
            self.lines.append(record.getMessage())


def command_string(command) -> str:
    if isinstance(command, FileUploadCommand):
        return f"upload {command.src} {command.dest}"
    if isinstance(command, str):  # as pyinfra's operation wrapper does
        command = StringCommand(command.strip())
    assert isinstance(command, StringCommand), f"not a shell command: {command!r}"
    return command.get_raw_value()


def custom_operations() -> list[str]:
    """`<module>.<operation>` for every @operation defined in roles/ (not the stock ones it imports)."""
    found = []
    for path in sorted((ROOT / "roles").glob("*.py")):
        module = import_module(f"roles.{path.stem}")
        for name, value in vars(module).items():
            is_operation = hasattr(value, "_inner") and hasattr(value, "is_idempotent")  # deploys have deploy_name
            if is_operation and getattr(value, "__module__", None) == module.__name__:
                found.append(f"{path.stem}.{name}")
    return found


@pytest.mark.parametrize("fixture", CASES, ids=[f"{p.parent.name}/{p.stem}" for p in CASES])
def test_operation_yields_exactly_the_fixture_commands(fixture, monkeypatch):
    data = json.loads(fixture.read_text())
    # sed's in-place suffix is a timestamp (files.line): frozen, as pyinfra's own operation tests freeze time
    monkeypatch.setattr("pyinfra.operations.util.files.get_timestamp", lambda: "2601010000")
    module_name, op_name = fixture.parent.name.split(".")
    operation = getattr(import_module(f"roles.{module_name}"), op_name)
    host = FakeHost(data.get("facts", {}))
    logged = LogLines()
    pyinfra_logger = logging.getLogger("pyinfra")
    level = pyinfra_logger.level
    pyinfra_logger.addHandler(logged)
    pyinfra_logger.setLevel(logging.INFO)  # as deploy.py's logging.basicConfig(level=INFO)
    try:
        with ctx_state.use(FakeState(diff="diff" in data)), ctx_host.use(host):
            commands = [command_string(c) for c in operation._inner(*parse_value(data.get("args", [])),
                                                                     **parse_value(data.get("kwargs", {})))]
    finally:
        pyinfra_logger.removeHandler(logged)
        pyinfra_logger.setLevel(level)
    commands = [c.replace(str(FIXTURE_FILES), "$FIXTURES") for c in commands]
    assert commands == data["commands"]
    logged_lines = [line.replace(str(FIXTURE_FILES), "$FIXTURES") for line in logged.lines]
    assert logged_lines == data.get("diff", []), "what --diff shows (or, without --diff, nothing) differs"
    if not commands:
        assert "noop_description" in data, "a case without commands must name its noop message"
    if "noop_description" in data:
        assert host.noop_description == data["noop_description"]
    assert not host.unread(), f"the fixture gives facts the operation never reads: {host.unread()}"


def test_every_custom_operation_has_a_change_and_a_noop_fixture():
    operations = custom_operations()
    assert {"agent.agent_installed", "agent.venv_exists", "agent.config_installed", "hugepages.thp_policy",
            "hugepages.hugetlbfs_mounted", "services.supervisor_program_running"} <= set(operations)
    for name in operations:
        cases = [json.loads(p.read_text()) for p in sorted((FIXTURES / name).glob("*.json"))]
        assert any(case["commands"] for case in cases), f"{name}: no fixture where it changes something"
        assert any(not case["commands"] for case in cases), f"{name}: no fixture where it is a noop"
    assert {p.parent.name for p in CASES} <= set(operations), "fixtures for an operation that does not exist"


def test_every_public_role_function_documents_its_arguments():
    """pyinfra's style: one line, then `+ arg: meaning` for every argument."""
    missing = []
    for path in sorted((ROOT / "roles").glob("*.py")):
        module = import_module(f"roles.{path.stem}")
        for name, value in vars(module).items():
            function = getattr(value, "_inner", None) or getattr(value, "__wrapped__", None) or value
            if (name.startswith("_") or not inspect.isfunction(function) or
                    getattr(value, "__module__", None) != module.__name__):
                continue
            doc = inspect.getdoc(value) or ""
            missing += [f"{path.stem}.{name}: {arg}" for arg in inspect.signature(function).parameters
                        if f"+ {arg}:" not in doc]
    assert not missing, "undocumented arguments:\n" + "\n".join(missing)


_DIFF_RUN = r"""
import logging, sys
import pyinfra_cli  # noqa: F401  (patches gevent first, as deploy.py's import of pyinfra_cli.prints does)
from io import BytesIO
from pyinfra.api import Config, Inventory, State
from pyinfra.api.connect import connect_all
from pyinfra.operations import files
from pyinfra_cli.prints import build_plan_json
from clawbot.control import rollout
from roles.content import SECRET, block_in_file, file_copied

hosts_file, unit_file, key_src, key_dest = sys.argv[1:5]
logging.basicConfig(level=logging.INFO, format="  %(message)s")  # deploy.py's logging
logging.getLogger("pyinfra").addFilter(rollout.PyinfraNotices())
state = State(inventory=Inventory((["@local"], {})), config=Config(DIFF=True), check_for_changes=True)
connect_all(state)


def converge():
    block_in_file(name="Ensure the managed block", path=hosts_file, content="10.0.0.1 a\n10.0.0.2 b",
                  marker="# {mark} clawbot managed nodes")
    files.put(name="Ensure the unit", src=BytesIO(b"[Service]\nRestartSec=2\n"), dest=unit_file, mode="644")
    file_copied(name="Ensure the key", src=key_src, dest=key_dest, note=SECRET, mode="600")


diffs = rollout.DiffCollector()
logging.getLogger("pyinfra").addFilter(diffs)
rollout.add_deploy(state, converge)
logging.getLogger("pyinfra").removeFilter(diffs)
print("\n".join(rollout.describe_plan(build_plan_json(state), diffs, "would")))
"""


def test_diff_shows_each_file_under_its_operation_and_never_a_secret(tmp_path):
    """pyinfra on this machine (@local), as deploy.py --check --diff runs it: the managed block's and a unit's
    unified diffs, collected while the operations are planned, print under their operations; a secret gets one
    line and neither its old nor its new content appears anywhere; files.block's beta notice is dropped; nothing
    changes."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n# BEGIN clawbot managed nodes\n10.0.0.1 a\n10.9.9.9 b\n"
                     "# END clawbot managed nodes\n10.99.99.99 intruder\n")
    unit = tmp_path / "clawbot-model.service"
    unit.write_text("[Service]\nRestartSec=30\n")
    key_src, key_dest = tmp_path / "new.key", tmp_path / "node.key"
    key_src.write_text("NEW-SECRET-7f3a\n")
    key_dest.write_text("OLD-SECRET-9c1e\n")
    key_dest.chmod(0o600)
    before = {p: p.read_bytes() for p in (hosts, unit, key_dest)}
    script = tmp_path / "diff_run.py"  # a file: operations are ordered by their line in the deploy's file
    script.write_text(_DIFF_RUN)
    done = subprocess.run([sys.executable, str(script), str(hosts), str(unit), str(key_src), str(key_dest)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "agent")])})
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert out.splitlines() == [
        "  would: Ensure the managed block on @local",
        f"      @local: Will modify {hosts}",
        "          @@ -2,5 +2,5 @@",  # pyinfra's diff: two lines of context
        "            # BEGIN clawbot managed nodes",
        "            10.0.0.1 a",
        "          - 10.9.9.9 b",
        "          + 10.0.0.2 b",
        "            # END clawbot managed nodes",
        "            10.99.99.99 intruder",
        "  would: Ensure the unit on @local",
        f"      @local: Will modify {unit}",
        "          @@ -1,2 +1,2 @@",
        "            [Service]",
        "          - RestartSec=30",
        "          + RestartSec=2",
        "  would: Ensure the key on @local",
        f"      @local: Will modify {key_dest}: content differs (secret, not shown)",
    ], out
    everything = done.stdout + done.stderr
    assert "SECRET-7f3a" not in everything and "SECRET-9c1e" not in everything
    assert "beta" not in everything, done.stderr
    assert {p: p.read_bytes() for p in before} == before  # planned, not run


def test_only_pyinfras_beta_notice_is_dropped():
    from clawbot.control.rollout import PyinfraNotices

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("pyinfra", logging.WARNING, __file__, 1, message, None, None)

    notices = PyinfraNotices()
    assert not notices.filter(record("The `files.block` operation is currently in beta!"))
    assert notices.filter(record("The `files.block` operation is currently in beta! (and something else)"))
    assert notices.filter(record("No local file exists to get permissions from"))
