"""The agent wheel works on its own: built from this tree, installed into a fresh venv outside the repo, and
run from another directory (nodes get exactly this wheel; nothing of the source tree is on their path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    base = tmp_path_factory.mktemp("wheel")
    assert ROOT not in base.parents
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(base / "dist"), str(ROOT)],
                   check=True, env=env)
    wheel = next((base / "dist").glob("clawbot-*.whl"))
    venv.create(base / "venv", with_pip=True)
    python = base / "venv" / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheel)], check=True, env=env, timeout=600)
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    return wheel, base / "venv" / "bin" / "clawbot", python, elsewhere, env


def run(argv, cwd, env):
    return subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_wheel_carries_every_subpackage_the_schemas_and_the_web_ui(installed):
    wheel = installed[0]
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {str(p.parent.relative_to(ROOT / "agent")) for p in (ROOT / "agent" / "clawbot").rglob("__init__.py")}
    for package in packages:
        assert f"{package}/__init__.py" in names, package
    assert {"clawbot/schemas/clawbot.schema.json", "clawbot/schemas/inventory.schema.json",
            "clawbot/chat/web/index.html"} <= names


def test_installed_commands_run_from_another_directory(installed, tmp_path):
    _, clawbot, python, elsewhere, env = installed
    where = run([python, "-c", "import clawbot; print(clawbot.__file__)"], elsewhere, env)
    assert where.returncode == 0 and str(ROOT) not in where.stdout, where.stdout + where.stderr
    for argv in (["status", "--help"], ["agent", "--help"]):
        proc = run([clawbot, *argv], elsewhere, env)
        assert proc.returncode == 0 and "usage: clawbot" in proc.stdout, proc.stdout + proc.stderr
    good = elsewhere / "clawbot.json"
    good.write_text(json.dumps({"model_gateway": {"endpoint": "https://model-a:9443"}}))
    proc = run([clawbot, "validate", good], elsewhere, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bad = elsewhere / "bad.json"
    bad.write_text('{\n  "context_window": "big"\n}\n')
    proc = run([clawbot, "validate", bad], elsewhere, env)
    assert proc.returncode == 1 and "bad.json:2:" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
