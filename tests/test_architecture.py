"""Rules of the package's shape, checked on its source: what differs between engines lives in the engine
package, the package never edits sys.path, and pages generated from code match the code."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from clawbot.common.config import load_schema
from clawbot.model.engines import engine_for, llama_server

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "agent" / "clawbot"
ENGINE_PACKAGE = PACKAGE / "model" / "engines"
ENGINE_NAMES = set(load_schema()["properties"]["model_server"]["properties"]["engine"]["enum"])
# The acceptance grep of issue 12: `grep -rnE '<this>' agent/clawbot` finds nothing outside the engine package.
ENGINE_COMPARISON_GREP = re.compile(r'(==|!=) *"(llama-server|llama-cpp-python)"|"(llama-server|llama-cpp-python)" *(==|!=)'
                                    r'|engine.*in \(')


def _package_modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _names_an_engine(node: ast.expr) -> bool:
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_names_an_engine(element) for element in node.elts)
    return isinstance(node, ast.Constant) and node.value in ENGINE_NAMES


def test_every_engine_of_the_schema_has_an_adapter():
    for name in ENGINE_NAMES:
        assert engine_for(name).NAME == name


def test_no_engine_name_comparison_outside_the_engine_package():
    """`engine == "llama-server"` and its kin belong in clawbot.model.engines: elsewhere, ask engine_for(name)."""
    found = []
    for path, tree in _package_modules():
        if ENGINE_PACKAGE in path.parents:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(_names_an_engine(n) for n in (node.left, *node.comparators)):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if ENGINE_COMPARISON_GREP.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "engine names compared outside clawbot/model/engines/:\n" + "\n".join(found)


def test_no_module_in_the_package_edits_sys_path():
    """An installed wheel has no repository on sys.path to reach: imports must work from the package alone."""
    found = []
    for path, tree in _package_modules():
        for node in ast.walk(tree):
            is_sys_path = isinstance(node, ast.Attribute) and node.attr == "path" \
                and isinstance(node.value, ast.Name) and node.value.id == "sys"
            imports_it = isinstance(node, ast.ImportFrom) and node.module == "sys" \
                and any(alias.name == "path" for alias in node.names)
            if is_sys_path or imports_it:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, "sys.path used in the package:\n" + "\n".join(found)


def test_llama_server_flags_page_is_generated_from_the_adapter():
    page = ROOT / "docs" / "llama-server-flags.md"
    assert page.read_text(encoding="utf-8") == llama_server.render_flags_doc(), f"{page} is stale: run `clawbot docs`"
