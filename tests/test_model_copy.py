"""The model file's copy to a node is resumable (roles/model.py model_copied): real pyinfra runs on this machine
(@local, the connector deploy.py uses for the default inventory), one killed half-way by its pid and run again.

The operation's exact commands are in tests/fixtures/operations/model.model_copied/ (test_role_operations.py);
here the commands really run: chunks are appended to the partial beside the target, the re-run continues from
the partial's size, and the target appears only once its sha256 matched on the "node".
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from roles.model import partial_path

ROOT = Path(__file__).resolve().parents[1]

_COPY_RUN = r"""
import logging, sys
import pyinfra_cli  # noqa: F401  (patches gevent first, as deploy.py's import of pyinfra_cli.prints does)
from pyinfra.api import Config, Inventory, State
from pyinfra.api.connect import connect_all
from pyinfra.api.exceptions import PyinfraError
from pyinfra.api.operations import run_ops
from clawbot.control import rollout
from roles.model import model_copied

src, dest, chunk = sys.argv[1], sys.argv[2], int(sys.argv[3])
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
state = State(inventory=Inventory((["@local"], {})), config=Config())
connect_all(state)


def converge():
    model_copied(name="Ensure the model is staged", src=src, dest=dest, group="root", chunk_bytes=chunk)


rollout.add_deploy(state, converge)
try:
    run_ops(state)
except PyinfraError as exc:  # every host failed (deploy.py says "rollout failed")
    print(f"rollout failed: {exc}")
failed = [h for h in state.inventory if h not in state.activated_hosts or state.results[h].error_ops]
sys.exit(1 if failed else 0)
"""

COPIED = re.compile(r"copied (?P<name>\S+): (?P<sent>\d+) bytes this run \(resumed at (?P<resumed>\d+), "
                    r"file (?P<total>\d+) bytes\)")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "agent")]), "PYTHONUNBUFFERED": "1"}


def _start(script: Path, src: Path, dest: Path, chunk: int, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, str(script), str(src), str(dest), str(chunk)], cwd=ROOT, env=_env(),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def model(tmp_path) -> Path:
    path = tmp_path / "control" / "model.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + os.urandom((48 << 20) - 4))  # 48 MiB: 192 chunks of 256 KiB
    return path


def test_a_copy_killed_half_way_resumes_from_the_partial_and_ends_with_the_right_checksum(tmp_path, model):
    node = tmp_path / "node" / "models"
    node.mkdir(parents=True)
    dest = node / "model.gguf"
    stale = node / "model.gguf.partial-0123456789ab"  # a partial of another model: removed, not continued
    stale.write_bytes(b"old" * 1000)
    script = tmp_path / "copy_run.py"
    script.write_text(_COPY_RUN)
    size, chunk = model.stat().st_size, 256 << 10
    partial = Path(partial_path(str(dest), _sha256(model)))

    first = _start(script, model, dest, chunk, tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and first.poll() is None:
            if partial.exists() and partial.stat().st_size >= size * 0.4:
                break
            time.sleep(0.01)
        assert first.poll() is None, ("the first copy ended before it could be killed half-way:\n"
                                      + (tmp_path / "first.log").read_text())
        os.killpg(first.pid, signal.SIGKILL)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    kept = partial.stat().st_size
    assert 0 < kept < size, kept
    assert not dest.exists(), "the target appeared before the copy was complete"
    assert not stale.exists(), "another model's partial copy was kept"
    assert model.read_bytes()[:kept].startswith(partial.read_bytes()), "the partial is not a prefix of the model"

    second = _start(script, model, dest, chunk, tmp_path / "second.log")
    try:
        assert second.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
            second.wait(timeout=30)
    log = (tmp_path / "second.log").read_text()
    match = COPIED.search(log)
    assert match, log
    assert int(match["total"]) == size
    assert int(match["resumed"]) >= kept - chunk, "the re-run did not continue from the partial's size"
    assert int(match["sent"]) == size - int(match["resumed"]) < size, log
    assert "resuming the copy of model.gguf at" in log, log
    assert _sha256(dest) == _sha256(model)
    assert not partial.exists() and not Path(f"{partial}.chunk").exists()
    assert oct(dest.stat().st_mode & 0o777) == "0o640"

    third = _start(script, model, dest, chunk, tmp_path / "third.log")  # nothing left to do: no copy at all
    assert third.wait(timeout=120) == 0, (tmp_path / "third.log").read_text()
    assert not COPIED.search((tmp_path / "third.log").read_text())
    assert _sha256(dest) == _sha256(model)


def test_a_corrupted_partial_fails_the_checksum_and_is_removed_so_the_next_run_starts_over(tmp_path, model):
    node = tmp_path / "node"
    node.mkdir()
    dest = node / "model.gguf"
    partial = Path(partial_path(str(dest), _sha256(model)))
    partial.write_bytes(b"X" * (1 << 20))  # the right name, the wrong bytes: only the end-to-end check can tell
    script = tmp_path / "copy_run.py"
    script.write_text(_COPY_RUN)
    chunk = 4 << 20
    failed = _start(script, model, dest, chunk, tmp_path / "failed.log")
    assert failed.wait(timeout=300) == 1
    log = (tmp_path / "failed.log").read_text()
    assert f"{partial}: sha256" in log and "the partial copy is removed" in log, log
    assert not dest.exists() and not partial.exists()
    again = _start(script, model, dest, chunk, tmp_path / "again.log")
    assert again.wait(timeout=300) == 0, (tmp_path / "again.log").read_text()
    match = COPIED.search((tmp_path / "again.log").read_text())
    assert match and int(match["resumed"]) == 0 and int(match["sent"]) == model.stat().st_size
    assert _sha256(dest) == _sha256(model)


def test_progress_lines_say_how_far_how_fast_and_how_long_is_left(caplog, monkeypatch):
    from roles import model as role

    clock = iter([100.0, 102.0, 104.0, 106.0])
    monkeypatch.setattr(role.time, "monotonic", lambda: next(clock))
    progress = role.CopyProgress("big.gguf", total=100 << 20, resumed_at=40 << 20, prefix="[node] ", every_s=1.0)
    with caplog.at_level("INFO", logger="pyinfra"):
        progress.advance(0)  # the first read: where it resumes
        progress.advance(20 << 20)  # 60 of 100 MiB after 2 s: 10 MiB/s, 40 MiB left
        progress.advance(20 << 20)
        progress.advance(20 << 20)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "[node] resuming the copy of big.gguf at 40.0 MiB of 100.0 MiB (a partial copy from an earlier run): "
        "60.0 MiB to copy",
        "[node] copying big.gguf: 60.0 MiB of 100.0 MiB (60 %), 10 MiB/s, ETA 4s",
        "[node] copying big.gguf: 80.0 MiB of 100.0 MiB (80 %), 10 MiB/s, ETA 2s",
        f"[node] copied big.gguf: {60 << 20} bytes this run (resumed at {40 << 20}, file {100 << 20} bytes) in 6.0 s, "
        "10 MiB/s; checking its sha256 on the node",
    ]


def test_a_file_slice_reads_only_its_bytes_and_counts_a_retried_upload_once(tmp_path):
    from roles.model import CopyProgress, FileSlice

    path = tmp_path / "f"
    path.write_bytes(bytes(range(100)))
    progress = CopyProgress("f", total=100, resumed_at=0, every_s=1e9)
    part = FileSlice(str(path), 10, 20, progress)
    assert part.read(5) == bytes(range(10, 15)) and part.tell() == 5
    assert part.read() == bytes(range(15, 30)) and part.read() == b""
    part.seek(0)  # pyinfra's SFTP upload retries from the start
    assert part.read() == bytes(range(10, 30))
    assert progress.sent == 20
    assert str(part) == f"{path}[10:30]"
