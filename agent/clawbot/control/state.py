"""Where the control machine keeps what it must not lose (the cluster CA, issued certificates) and what it
can rebuild (wheelhouses, engines, the demo model): one place for deploy.py and `clawbot status`."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CONTROL_NAME = "clawbot-control"  # the control machine's client certificate (deploy issues it, `clawbot status` uses it)
# Prometheus's client certificate (deploy issues it, `clawbot monitoring` hands it out). A name under CONTROL_NAME:
# every cluster CA permits that subtree since it was created, so adding this name needs no CA rotation.
MONITORING_NAME = f"monitoring.{CONTROL_NAME}"


def state_directory(configured: str, base: Path) -> Path:
    """clawbot_state_dir (relative to the inventory directory `base`, or absolute), created 0700; empty: a
    directory per inventory under ~/.local/state/clawbot, so two clusters never share a CA by accident."""
    if configured:
        path = Path(os.path.expanduser(configured))
        path = path if path.is_absolute() else base / path
    else:
        cluster = hashlib.sha256(str(base.resolve()).encode()).hexdigest()[:10]
        path = Path(os.path.expanduser("~/.local/state/clawbot")) / f"{base.resolve().name}-{cluster}"
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def cache_directory() -> Path:
    """The control machine's build cache (XDG_CACHE_HOME/clawbot/deploy): safe to delete, rebuilt on demand."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    path = Path(base) / "clawbot" / "deploy"
    path.mkdir(parents=True, exist_ok=True)
    return path
