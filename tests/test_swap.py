"""Staged model swap on a real model agent (clawbot.model.swap): the new model starts beside the serving one, passes
health and the quality gate, and the gateway switches with no failed request; a model that fails the gate leaves
the old one serving, also after the agent restarts.

Models: modelgen's tiny preset in F16 (random weights, seed 1), its Q8_0 made by the vendored llama-quantize (the
ordinary re-quantization the gate must accept), and a block-shuffled copy (random weights of the same shape, which
it must reject). Random weights cannot pass the smoke set (they pass only the over-long refusal), so these configs
set `min_smoke_pass_rate: 0` and the distribution check is what decides; tests/test_quality.py covers the smoke set.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from pathlib import Path

import httpx
import pytest

from clawbot.model import swap
from clawbot.model.engines import build as engine
from fixtures_quality import swap_models
from tests.fixtures_agent import Agent, llama_server_binary, pki_files, start_agent, wait_for  # noqa: F401

pytestmark = pytest.mark.slow

GATE = {"min_smoke_pass_rate": 0.0}


@pytest.fixture(scope="module")
def models(tmp_path_factory, llama_server_binary):  # noqa: F811
    for tool in ("llama-quantize", "llama-perplexity"):
        assert engine.find_tool(tool), f"{tool} is built with the engine (clawbot build-engine)"
    return swap_models(tmp_path_factory.mktemp("swap-models"))


def put_model(source: Path, model_path: Path) -> None:
    """What deploy's model_copied does on the node: keep the serving file as MODEL.previous, then rename the new
    file over model_path (the old server keeps its inode)."""
    partial = model_path.with_name(model_path.name + ".partial-test")
    shutil.copyfile(source, partial)
    if model_path.exists() and not Path(swap.previous_path(str(model_path))).exists():
        os.link(model_path, swap.previous_path(str(model_path)))
    os.replace(partial, model_path)


def relink_previous(model_path: Path) -> None:
    previous = Path(swap.previous_path(str(model_path)))
    previous.unlink(missing_ok=True)
    os.link(model_path, previous)


class Streamer:
    """A client streaming chat completions through the gateway one after another, counting failures."""

    def __init__(self, agent: Agent):
        self.agent = agent
        self.ok = 0
        self.failures: list[str] = []
        self.models: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.agent.client(timeout=60) as client:
            while not self._stop.is_set():
                try:
                    with client.stream("POST", "/v1/chat/completions", json={
                            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True}) as r:
                        if r.status_code != 200:
                            self.failures.append(f"HTTP {r.status_code}: {r.read()[:300]!r}")
                            continue
                        done, model = False, None
                        for line in r.iter_lines():
                            if line == "data: [DONE]":
                                done = True
                            elif line.startswith("data: "):
                                event = json.loads(line[6:])
                                if "error" in event:
                                    self.failures.append(f"error event: {event['error']}")
                                model = event.get("model", model)
                        if not done:
                            self.failures.append("stream ended without [DONE]")
                        else:
                            self.ok += 1
                            self.models.append(model)
                except httpx.HTTPError as exc:
                    self.failures.append(f"{exc.__class__.__name__}: {exc}")

    def __enter__(self) -> "Streamer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=90)


def served_name(agent: Agent) -> str:
    return agent.get("/v1/models").json()["data"][0]["id"]


def swap_state(agent: Agent) -> dict:
    return agent.status()["swap"]


def reload_with(agent: Agent, config: dict) -> None:
    agent.config_path.write_text(json.dumps(config, indent=2))
    agent.signal(signal.SIGHUP)


def settled(agent: Agent, timeout: float = 240) -> dict:
    wait_for(lambda: swap_state(agent)["state"] not in swap.ACTIVE_STATES + ("idle",), timeout, 0.2,
             "the swap to finish")
    return swap_state(agent)


def test_a_requantized_model_swaps_in_without_a_failed_request_and_a_broken_one_is_refused(
        tmp_path, pki_files, models):  # noqa: F811
    model_path = tmp_path / "models" / "model.gguf"
    model_path.parent.mkdir()
    put_model(models["f16"], model_path)
    agent = start_agent(tmp_path / "agent", pki_files, model_path, quality_gate=GATE,
                        model_server={"model_name": "tiny-f16"})
    try:
        first = agent.wait_ready()["model"]
        assert served_name(agent) == "tiny-f16"

        # 1. an ordinary re-quantization under a new name, while a client streams
        config = json.loads(agent.config_path.read_text())
        config["model_server"]["model_name"] = "tiny-q8"
        with Streamer(agent) as streamer:
            wait_for(lambda: streamer.ok >= 3, 60, 0.1, "the client to stream")
            put_model(models["q8"], model_path)
            reload_with(agent, config)
            record = settled(agent)
            wait_for(lambda: streamer.models[-3:] == ["tiny-q8"] * 3, 60, 0.1, "answers from the new model")
        assert record["state"] == "done", record
        assert streamer.failures == [], streamer.failures[:5]
        assert streamer.ok > 5 and "tiny-f16" in streamer.models
        assert served_name(agent) == "tiny-q8"
        gate = {c["threshold"]: c for c in record["gate"]["checks"]}
        assert gate["max_mean_kld"]["passed"] and gate["max_mean_kld"]["value"] < 0.1, gate
        assert record["reference"] == swap.previous_path(str(model_path))  # measured against the serving file
        now = agent.status()["model"]
        assert now["pid"] != first["pid"] and now["port"] != first["port"]
        assert not Path(f"/proc/{first['pid']}").exists()  # the old model server stopped after the switch

        # 2. random weights of the same shape: the gate refuses, the old model keeps serving, the numbers are told
        relink_previous(model_path)  # deploy removes .previous after a swap and keeps the serving file on the next
        config["model_server"]["model_name"] = "tiny-broken"
        with Streamer(agent) as streamer:
            put_model(models["scrambled"], model_path)
            reload_with(agent, config)
            record = settled(agent)
        assert record["state"] == "failed", record
        failed = [c for c in record["gate"]["checks"] if not c["passed"]]
        assert failed and all(c["value"] is not None for c in failed), record["gate"]  # measured, with numbers
        assert "quality gate failed" in record["reason"]
        assert all(f"quality_gate.{c['threshold']}" in record["reason"] for c in failed), record["reason"]
        assert streamer.failures == [] and set(streamer.models) == {"tiny-q8"}
        assert agent.status()["model"]["pid"] == now["pid"] and served_name(agent) == "tiny-q8"

        # 3. restarted, the agent serves the model it kept (not the rejected file) and tries the swap again
        agent.stop()
        agent.start()
        status = agent.wait_ready()
        assert status["model"]["model_file"] == swap.previous_path(str(model_path))
        assert served_name(agent) == "tiny-q8"
        record = settled(agent)
        assert record["state"] == "failed" and served_name(agent) == "tiny-q8"
    finally:
        agent.stop()


def test_a_model_that_does_not_fit_beside_the_serving_one_is_named_with_the_bytes(tmp_path, models, monkeypatch):
    """The fit check runs preflight on the node as it is; too little memory beside the serving model means the
    swap says so (need vs have) and the agent restarts instead (the old server cannot stay)."""
    from dataclasses import replace as dc_replace

    from clawbot.common import config as configuration
    from clawbot.common import preflight
    from clawbot.model.supervisor import Supervisor

    settings = configuration.defaults()
    settings["model_server"] = {**settings["model_server"], "model_path": str(models["q8"]), "accelerator": "cpu"}
    serving = Supervisor(settings, tmp_path)  # not running: no page cache of its own to count
    read_node = preflight.read_node
    monkeypatch.setattr(preflight, "read_node", lambda *a, **k: dc_replace(read_node(*a, **k),
                                                                           memory_available=4 << 20))
    fit = swap.fits_beside(serving, settings)
    assert not fit.fits and "does not fit beside the serving model" in fit.reason
    assert "MiB" in fit.reason and "available" in fit.reason, fit.reason
    monkeypatch.setattr(preflight, "read_node", read_node)
    assert swap.fits_beside(serving, settings).fits
