"""A real Prometheus (Debian's `prometheus` package) for tests: started on loopback with a given configuration,
polled through its HTTP API with a deadline, stopped by its pid."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import httpx

from tests.fixtures_chat import free_port

PROMETHEUS_DEADLINE_S = 90


class Prometheus:
    """Debian's prometheus with the generated configuration, on loopback; stopped by its pid."""

    def __init__(self, config: Path, data: Path):
        self.port = free_port()
        self.log = data.parent / "prometheus.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={data}",
                 f"--web.listen-address=127.0.0.1:{self.port}"], stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)

    def api(self, path: str, **params) -> dict:
        body = httpx.get(f"http://127.0.0.1:{self.port}/api/v1/{path}", params=params, timeout=10).json()
        assert body["status"] == "success", body
        return body["data"]

    def wait(self, what: str, check, timeout_s: float = PROMETHEUS_DEADLINE_S):
        deadline, last = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited:\n{self.log.read_text()[-3000:]}"
            try:
                last = check()
                if last:
                    return last
            except (httpx.HTTPError, AssertionError, KeyError, ValueError) as exc:
                last = exc
            time.sleep(0.25)
        raise AssertionError(f"prometheus: not {what} after {timeout_s} s (last: {last})\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


def targets_up(prometheus: Prometheus) -> list[dict] | None:
    active = prometheus.api("targets", state="active")["activeTargets"]
    return active if active and all(t["health"] == "up" for t in active) else None
