"""The README's Layout section is the tree: every folder it names exists, every package folder is named."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "agent" / "clawbot"


def layout_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Layout", 1)[1]
    return section.split("```", 2)[1]


def test_readme_layout_names_exactly_the_tree():
    top, nested = set(), set()
    for line in layout_block().splitlines():
        match = re.match(r"^( *)([a-z_./]+)\s", line + " ")
        if not match:
            continue
        (nested if match.group(1) else top).add(match.group(2))
    for entry in top:
        assert (ROOT / entry).exists(), f"README Layout names {entry}, which does not exist"
    expected_top = {"deploy.py", "inventory/", "roles/", "agent/clawbot/", "schemas/", "tests/", "benchmarks/", "docs/"}
    assert top == expected_top, f"README Layout's top level: {sorted(top)}"
    packages = {p.name + "/" for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert nested == packages, f"README Layout lists {sorted(nested)}, agent/clawbot has {sorted(packages)}"


def test_every_package_folder_is_an_import_name():
    """Folder = import name: every folder with Python code under agent/clawbot is a package of that name."""
    for path in PACKAGE.rglob("*.py"):
        folder = path.parent
        assert (folder / "__init__.py").exists(), f"{folder} holds Python code but is not a package"
        assert re.fullmatch(r"[a-z_][a-z0-9_]*", folder.name), folder
