"""Replicas behind the chat node (clawbot.chat.upstreams): two real model agents (llama-server on the tiny GGUF
behind the mTLS gateway) and the real chat agent routing over both. Spread, failover, rejoin, conversation
affinity, and what /api/status and /metrics say about each model node."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from fixtures_chat import ChatAgent, ModelAgent, chat_config, chat_pki, model_config, running, send  # noqa: F401
from fixtures_models import models_dir, tiny_gguf  # noqa: F401
from tests.fixtures_agent import llama_server_binary, wait_for  # noqa: F401

pytestmark = pytest.mark.slow


def upstreams_of(chat: ChatAgent) -> dict[str, dict]:
    with chat.client(timeout=20) as c:
        return {u["url"]: u for u in c.get("/api/status").json()["gateway"]["upstreams"]}


@pytest.fixture()
def two_model_nodes(chat_pki, tiny_gguf, llama_server_binary, tmp_path):
    agents = []
    for name in ("a", "b"):
        config = model_config(chat_pki, tiny_gguf, context_window=1024, max_tokens=48)
        agents.append(ModelAgent(config, tmp_path / f"model-{name}", chat_pki))
    for agent in agents:
        agent.start()
    try:
        for agent in agents:
            agent.wait_ready()
        yield agents
    finally:
        for agent in agents:
            agent.stop()


def test_replicas_spread_fail_over_and_rejoin(chat_pki, two_model_nodes, tmp_path):
    first, second = two_model_nodes
    config = chat_config(chat_pki, tmp_path / "chat", first.endpoint, context_window=1024, max_tokens=48)
    config["model_gateway"]["upstreams"] = [first.endpoint, second.endpoint]
    with running(ChatAgent(config, tmp_path / "chat", chat_pki)) as chat, chat.client(timeout=120) as c:
        wait_for(lambda: all(u["state"] == "up" for u in upstreams_of(chat).values()), 30, what="both model nodes up")
        assert sum(u["slots"] for u in upstreams_of(chat).values()) == 4
        with chat.client() as admin:
            assert admin.get("/api/status").json()["queue"]["capacity"] == 4  # the line sizes itself by both

        # 8 concurrent chats are spread over both model nodes
        conversations = [c.post("/api/conversations", json={}).json()["id"] for _ in range(8)]
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda cid: send(c, cid, "Hello, who are you?"), conversations))
        assert all(r.message["source"] == "model" for r in replies)
        served = {url: u["served"] for url, u in upstreams_of(chat).items()}
        assert served[first.endpoint] >= 1 and served[second.endpoint] >= 1 and sum(served.values()) == 8, served

        # a conversation's next turn goes back to the model node that served it (its prompt cache)
        before = {url: u["served"] for url, u in upstreams_of(chat).items()}
        for _ in range(3):
            assert send(c, conversations[0], "And then?").message["source"] == "model"
        after = {url: u["served"] for url, u in upstreams_of(chat).items()}
        assert sorted(after[u] - before[u] for u in after) == [0, 3], (before, after)

        # stop one model agent: every new message is answered by the other, with source `model`
        first.stop()
        answers = [send(c, cid, "Are you still there?").message for cid in conversations]
        assert [m["source"] for m in answers] == ["model"] * 8, [m.get("meta") for m in answers]
        state = upstreams_of(chat)
        # found down by the watch or by a request that tried it first (then counted in `errors`)
        assert state[first.endpoint]["state"] in ("down", "circuit_open") and state[first.endpoint]["last_error"]
        with chat.client() as admin:
            metrics = admin.get("/metrics").text
        assert f'clawbot_chat_upstream_up{{upstream="{first.endpoint}"}} 0.0' in metrics
        assert f'clawbot_chat_upstream_up{{upstream="{second.endpoint}"}} 1.0' in metrics

        # start it again: it rejoins without a deploy or a restart of the chat node
        first.start()
        first.wait_ready()
        wait_for(lambda: upstreams_of(chat)[first.endpoint]["state"] == "up", 90, interval=1,
                 what="the restarted model node back up")
        rejoined = upstreams_of(chat)[first.endpoint]["served"]
        fresh = [c.post("/api/conversations", json={}).json()["id"] for _ in range(4)]
        with ThreadPoolExecutor(4) as pool:
            assert all(r.message["source"] == "model"
                       for r in pool.map(lambda cid: send(c, cid, "Hello again."), fresh))
        assert upstreams_of(chat)[first.endpoint]["served"] > rejoined


def test_a_single_endpoint_still_means_one_upstream(chat_pki, two_model_nodes, tmp_path):
    """model_gateway.endpoint alone (no upstreams, as an agent started outside deploy): one upstream, as before."""
    first, _ = two_model_nodes
    config = chat_config(chat_pki, tmp_path / "chat", first.endpoint, context_window=1024, max_tokens=48)
    with running(ChatAgent(config, tmp_path / "chat", chat_pki)) as chat, chat.client(timeout=60) as c:
        assert list(upstreams_of(chat)) == [first.endpoint]
        conv = c.post("/api/conversations", json={}).json()["id"]
        assert send(c, conv, "Hello").message["source"] == "model"


def test_when_every_node_was_seen_down_the_next_request_still_tries_them():
    """The watch saw every model node down (say, during a rollout); a message a moment later still tries a node whose
    circuit is closed instead of answering "no model node" without asking; an open circuit is respected."""
    from clawbot.chat.upstreams import Upstream, UpstreamPool

    clock = [100.0]
    pool = UpstreamPool.__new__(UpstreamPool)
    pool.default_slots, pool._clock = 2, lambda: clock[0]
    pool.upstreams = [Upstream("https://a:5000", None, pool._clock), Upstream("https://b:5000", None, pool._clock)]
    pool._turn, pool._affinity = iter(range(10**6)), {}
    for u in pool.upstreams:
        u.observed({"ready": False, "error": "gateway unreachable"})
    assert pool.capacity() == 0 and pool.choose() is not None  # nothing "available", both still worth a try
    pool.upstreams[0].failed("connection refused")
    assert pool.choose().url == "https://b:5000"  # a's circuit is open now
    pool.upstreams[1].failed("connection refused")
    assert pool.choose() is None
    clock[0] += 6  # past the first backoff (5 s): tried again
    assert pool.choose() is not None
