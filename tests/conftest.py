"""Shared pytest fixtures. The two-node harness's fixtures (`nodes`, `node_cluster`) live in tests/nodes/."""

import sys
from pathlib import Path

_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:  # plain `pytest` (unlike `python -m pytest`) does not put the repo root there
    sys.path.insert(0, _REPO_ROOT)

pytest_plugins = ["tests.nodes.fixtures"]
