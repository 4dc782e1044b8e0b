"""Every custom operation in roles/, tested the way pyinfra tests its own (tests/operations/<module>.<op>/*.json
and tests/test_operations.py in pyinfra's repository): a fixture gives the facts the operation reads, its
arguments, and the exact commands it must yield, or that it yields none and the noop message it logs.

Fixtures: tests/fixtures/operations/<roles module>.<operation>/<case>.json with
- "args" / "kwargs": the operation's arguments
- "facts": {"<fact module>.<FactClass>": value} for a fact read without arguments, or
  {"<fact module>.<FactClass>": {"<arg>=<value>, ...": value}} (arguments sorted by name, as pyinfra's
  get_kwargs_str writes them); pyinfra's stock facts are keyed like `files.FileContents`, clawbot's like
  `facts.NodeMemory` (clawbot.control.facts). Strings "datetime:YYYY-mm-ddTHH:MM:SS" become datetimes.
- "commands": the commands, in order, as the shell receives them
- "noop_description": the noop message, required when "commands" is empty

The operation's generator (`op._inner`) runs against a fake host answering only from the fixture: a fact the
fixture lacks fails the case, and so does a fixture fact the operation never reads. No SSH, no network.
"""

from __future__ import annotations

import inspect
import json
from datetime import datetime
from importlib import import_module
from pathlib import Path

import pytest
from pyinfra.api import Config, StringCommand
from pyinfra.api.util import get_kwargs_str
from pyinfra.context import ctx_host, ctx_state

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "operations"
CASES = sorted(FIXTURES.glob("*.*/*.json"))


def parse_value(value):
    """JSON → the Python values facts hold (pyinfra's tests/util.py convention for datetimes)."""
    if isinstance(value, str) and value.startswith("datetime:"):
        return datetime.strptime(value[len("datetime:"):], "%Y-%m-%dT%H:%M:%S")
    if isinstance(value, list):
        return [parse_value(v) for v in value]
    if isinstance(value, dict):
        return {k: parse_value(v) for k, v in value.items()}
    return value


class FakeState:
    """What an operation may ask of the state while it yields commands."""

    def __init__(self):
        self.config = Config()


class FakeHost:
    """A host whose facts come from a fixture; records the noop message and which facts were read."""

    name = "fixture-host"

    def __init__(self, facts: dict):
        self.facts = facts
        self.read: set[tuple[str, str | None]] = set()
        self.noop_description: str | None = None

    def noop(self, description: str) -> None:
        self.noop_description = description

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


def command_string(command) -> str:
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
def test_operation_yields_exactly_the_fixture_commands(fixture):
    data = json.loads(fixture.read_text())
    module_name, op_name = fixture.parent.name.split(".")
    operation = getattr(import_module(f"roles.{module_name}"), op_name)
    host = FakeHost(data.get("facts", {}))
    with ctx_state.use(FakeState()), ctx_host.use(host):
        commands = [command_string(c) for c in operation._inner(*data.get("args", []), **data.get("kwargs", {}))]
    assert commands == data["commands"]
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
