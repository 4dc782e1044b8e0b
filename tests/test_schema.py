"""The schemas are the single source of truth: complete, self-consistent, and mirrored by the docs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from clawbot.common.config import check_bytes, defaults, load_schema
from clawbot.common.schemadocs import PAGES, render

ROOT = Path(__file__).resolve().parents[1]


def _walk(schema, path="#"):
    yield path, schema
    for key, sub in schema.get("properties", {}).items():
        yield from _walk(sub, f"{path}/{key}")


@pytest.mark.parametrize("name", list(PAGES))
def test_schema_is_valid_2020_12_with_stable_id(name):
    schema = load_schema(name)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"].startswith("urn:clawbot:schema:")
    jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("name", list(PAGES))
def test_every_property_documented_with_default_and_example(name):
    schema = load_schema(name)
    for path, node in _walk(schema):
        assert node.get("description"), f"{path} has no description"
        assert "default" in node, f"{path} has no default"
        assert node.get("examples"), f"{path} has no example"
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, f"{path} allows unknown keys"
        validator = jsonschema.Draft202012Validator(node)
        for example in node["examples"]:
            assert not list(validator.iter_errors(example)), f"{path}: example {example!r} fails its own schema"
        if path != "#" and name == "clawbot.schema.json":
            assert not list(validator.iter_errors(node["default"])), f"{path}: default fails its own schema"


def test_defaults_form_a_valid_config():
    import json

    result = check_bytes(json.dumps(defaults()).encode(), "defaults.json")
    assert result.ok, [d.text() for d in result.diagnostics]


def test_schema_example_is_valid():
    import json

    example = load_schema()["examples"][0]
    result = check_bytes(json.dumps(example).encode(), "example.json")
    assert result.ok, [d.text() for d in result.diagnostics]


@pytest.mark.parametrize("name", list(PAGES))
def test_reference_docs_are_generated_from_schema(name):
    page = ROOT / "docs" / PAGES[name][0]
    assert page.read_text(encoding="utf-8") == render(name), f"{page} is stale: run `clawbot docs`"


def test_shipped_configs_validate_against_their_inventories():
    for inventory in (ROOT / "inventory", ROOT / "docs" / "examples" / "two-node"):
        proc = subprocess.run([sys.executable, "-m", "clawbot", "validate", "--inventory", str(inventory),
                               str(inventory / ".clawbot" / "clawbot.json")], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
