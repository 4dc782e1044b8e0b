"""A model server that keeps dying while it loads ends in `failed: crash loop` instead of being restarted forever.

The engine is a fake llama-server: a shell script that logs a line, records that it ran, and kills itself with
SIGSEGV (as llama_cpp.server did on the GPU host, issue 16), or, for the "in a row" case, a small Python HTTP
server that answers /health and the readiness completion on the --port it was given, then exits.
"""

from __future__ import annotations

import asyncio
import copy
import stat
import sys
import time
from pathlib import Path

from clawbot.common.config import defaults
from clawbot.model.supervisor import Supervisor
from tests.fixtures_models import tiny_gguf, models_dir  # noqa: F401

CRASHING = """#!/bin/sh
echo "run" >> {runs}
echo "llama_model_load: loading model from $2"
echo "fake engine: about to crash"
kill -SEGV $$
"""

# odd runs crash during load; even runs become ready, serve 0.3 s, then exit 1: never two crashes in a row
ALTERNATING = """#!{python}
import http.server, sys, threading, time
from pathlib import Path
runs = Path({runs!r})
n = len(runs.read_text().splitlines()) + 1 if runs.exists() else 1
with runs.open("a") as f:
    f.write("run\\n")
if n % 2:
    print("fake engine: crashing during load", flush=True)
    sys.exit(3)
port = int(sys.argv[sys.argv.index("--port") + 1])
class H(http.server.BaseHTTPRequestHandler):
    def _ok(self):
        body = b'{{"choices": [{{"text": "x"}}]}}'
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def do_GET(self): self._ok()
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0))); self._ok()
    def log_message(self, *a): pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", port), H)
threading.Thread(target=server.serve_forever, daemon=True).start()
time.sleep(0.3)
sys.exit(1)
"""


def _engine(tmp_path: Path, text: str) -> tuple[Path, Path]:
    runs = tmp_path / "runs.txt"
    script = tmp_path / "fake-llama-server"
    script.write_text(text.format(runs=str(runs), python=sys.executable))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, runs


def _config(model: Path, port: int, crash_loop_after: int) -> dict:
    config = defaults()
    config["model_server"].update(model_path=str(model), accelerator="cpu", hugepages="off", load_mode="mmap",
                                  restart_backoff_s=[0.05, 0.1], startup_timeout_s=20, port=port,
                                  crash_loop_after=crash_loop_after)
    return config


def _runs(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


async def _until(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def _free_port() -> int:
    from tests.fixtures_agent import free_port
    return free_port()


def test_the_schema_default_gives_up_after_five_crashes():
    assert defaults()["model_server"]["crash_loop_after"] == 5


def test_crashes_during_load_end_in_a_crash_loop_until_a_reload(tmp_path, tiny_gguf):  # noqa: F811
    """Three SIGSEGVs in a row during load: `failed`, reason `crash loop: ...signal SIGSEGV...`, the engine's last
    lines in the snapshot's log_tail, and no fourth start while nothing changes; a reload (SIGHUP hands apply an
    equal config) and a config change each start it again."""
    script, runs = _engine(tmp_path, CRASHING)
    config = _config(tiny_gguf, _free_port(), crash_loop_after=3)

    async def scenario():
        sup = Supervisor(config, tmp_path / "state", find_engine=lambda accelerator: script)
        sup.start()
        try:
            await _until(lambda: sup.status.reason.startswith("crash loop:"))
            snap = sup.snapshot()
            assert snap["state"] == "failed"
            assert "signal SIGSEGV" in snap["reason"] and "3 starts in a row" in snap["reason"]
            assert "fake engine: about to crash" in snap["log_tail"]
            assert any(line.startswith("[clawbot] crash loop:") for line in snap["log_tail"])
            assert _runs(runs) == 3
            assert snap["restarts"] == 2  # started again twice; the third crash was not followed by a start
            await asyncio.sleep(1.0)  # 10x the longest backoff: still nothing started
            assert _runs(runs) == 3 and sup.status.state == "failed"

            # SIGHUP with the same settings: ModelNode.reload hands the supervisor a fresh, equal config object
            assert await sup.apply(copy.deepcopy(config)) is False
            await _until(lambda: _runs(runs) >= 4)
            await _until(lambda: sup.status.reason.startswith("crash loop:") and _runs(runs) == 6)
            await asyncio.sleep(0.5)
            assert _runs(runs) == 6

            # a config change starts it again at once, with a fresh count
            changed = copy.deepcopy(config)
            changed["model_server"]["crash_loop_after"] = 2
            assert await sup.apply(changed) is True
            await _until(lambda: sup.status.reason.startswith("crash loop:") and _runs(runs) == 8)
            assert "2 starts in a row" in sup.status.reason
        finally:
            await sup.stop()
        assert sup.status.state == "stopped"

    asyncio.run(scenario())


def test_a_start_that_reached_ready_resets_the_count(tmp_path, tiny_gguf):  # noqa: F811
    """Crash, ready, crash, ready, ...: never two crashes in a row, so crash_loop_after 2 never gives up."""
    script, runs = _engine(tmp_path, ALTERNATING)
    config = _config(tiny_gguf, _free_port(), crash_loop_after=2)

    async def scenario():
        sup = Supervisor(config, tmp_path / "state", find_engine=lambda accelerator: script)
        states: list[tuple[str, str]] = []
        sup.listeners.append(lambda state: states.append((state, sup.status.reason)))
        sup.start()
        try:
            await _until(lambda: _runs(runs) >= 6, timeout=30)
        finally:
            await sup.stop()
        assert not any(reason.startswith("crash loop:") for _, reason in states), states
        assert sum(1 for state, _ in states if state == "ready") >= 2
        assert any("exited during load with exit code 3" in reason for _, reason in states)

    asyncio.run(scenario())


def test_zero_never_gives_up(tmp_path, tiny_gguf):  # noqa: F811
    script, runs = _engine(tmp_path, CRASHING)
    config = _config(tiny_gguf, _free_port(), crash_loop_after=0)

    async def scenario():
        sup = Supervisor(config, tmp_path / "state", find_engine=lambda accelerator: script)
        sup.start()
        try:
            await _until(lambda: _runs(runs) >= 6)
            assert not sup.status.reason.startswith("crash loop:")
        finally:
            await sup.stop()

    asyncio.run(scenario())
