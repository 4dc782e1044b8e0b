"""The chat node's API and fallbacks, with the model node unreachable (nothing listens at the endpoint).

Every test talks HTTPS to the real chat agent (`clawbot agent --role chat`, a subprocess) that trusts
only the test cluster CA; the model gateway endpoint points at a closed loopback port, which is how a
chat node sees a model node that is down.
"""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from fixtures_chat import ChatAgent, SearchStub, chat_config, chat_pki, free_port, running, send  # noqa: F401

KB = {
    "router.md": "# Home router\n\nThe router sits in the hallway cupboard.\n\n## Factory reset\n\n"
                 "Hold the recessed reset button for ten seconds until the LED blinks amber.\n\n"
                 "## Guest wifi\n\nThe guest network is called clawnet-guest.\n",
    "printer.txt": "The office printer takes A4 paper only.\n\nToner cartridges are in the second drawer.\n",
}


@pytest.fixture
def kb_dir(tmp_path):
    directory = tmp_path / "kb"
    directory.mkdir()
    for name, text in KB.items():
        (directory / name).write_text(text)
    return directory


def dead_endpoint() -> str:
    return f"https://localhost:{free_port()}"


def test_knowledge_base_answers_when_gateway_is_unreachable(chat_pki, tmp_path, kb_dir):
    """The user still gets an answer, quoted from the KB with its source, and labelled as not from the model."""
    config = chat_config(chat_pki, tmp_path, dead_endpoint(), fallbacks=["knowledge_base"], kb_dir=kb_dir)
    with running(ChatAgent(config, tmp_path, chat_pki)) as agent, agent.client() as c:
        conv = c.post("/api/conversations", json={}).json()
        reply = send(c, conv["id"], "How do I do a factory reset of the router?")
        message = reply.message
        assert message["source"] == "knowledge_base"
        assert message["status"] == "complete"
        assert "ten seconds" in message["content"]
        assert message["meta"]["citations"][0] == {"source": "router.md", "heading": "Home router › Factory reset"}
        assert "gateway unreachable" in message["meta"]["model_error"]
        # the stored conversation says the same after a fresh read
        stored = c.get(f"/api/conversations/{conv['id']}").json()["messages"]
        assert [(m["role"], m["source"]) for m in stored] == [("user", None), ("assistant", "knowledge_base")]
        # the status strip's backend reports the model node down
        status = c.get("/api/status").json()
        assert status["chat"]["state"] == "ok" and status["gateway"]["reachable"] is False


def test_knowledge_base_reindexes_changed_files(chat_pki, tmp_path, kb_dir):
    """A document added or edited while the agent runs is found without a restart."""
    config = chat_config(chat_pki, tmp_path, dead_endpoint(), fallbacks=["knowledge_base"], kb_dir=kb_dir)
    with running(ChatAgent(config, tmp_path, chat_pki)) as agent, agent.client() as c:
        conv = c.post("/api/conversations", json={}).json()
        first = send(c, conv["id"], "Where is the espresso machine descaler?").message
        assert first["source"] == "none" and first["status"] == "error"
        assert "no passage" in first["content"]
        (kb_dir / "kitchen.md").write_text("# Kitchen\n\nThe espresso machine descaler is under the sink.\n")
        deadline = time.monotonic() + 15
        while True:
            answer = send(c, conv["id"], "Where is the espresso machine descaler?").message
            if answer["source"] == "knowledge_base" or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert answer["source"] == "knowledge_base"
        assert "under the sink" in answer["content"] and answer["meta"]["citations"][0]["source"] == "kitchen.md"


def test_web_search_in_configured_order(chat_pki, tmp_path, kb_dir):
    """web_search first (SearchStub stands in for a real SearxNG engine), the KB only if it finds nothing."""
    results = [{"title": "Reset guide", "url": "https://example.org/reset", "content": "Press and hold reset."}]
    with SearchStub(results) as search:
        config = chat_config(chat_pki, tmp_path, dead_endpoint(), fallbacks=["web_search", "knowledge_base"],
                             kb_dir=kb_dir, search_endpoint=search.endpoint)
        with running(ChatAgent(config, tmp_path, chat_pki)) as agent, agent.client() as c:
            conv = c.post("/api/conversations", json={}).json()
            message = send(c, conv["id"], "router factory reset").message
            assert message["source"] == "web_search"
            assert "Press and hold reset." in message["content"] and "https://example.org/reset" in message["content"]
            assert message["meta"]["citations"] == [{"title": "Reset guide", "url": "https://example.org/reset"}]
            assert search.queries[-1] == {"q": "router factory reset", "format": "json"}
            search.results = []  # the engine finds nothing: the next strategy answers
            message = send(c, conv["id"], "router factory reset").message
            assert message["source"] == "knowledge_base"
            assert message["meta"]["fallbacks_tried"][0] == "web_search: the search returned no results"


def test_web_search_without_endpoint_is_skipped_with_reason(chat_pki, tmp_path, kb_dir):
    config = chat_config(chat_pki, tmp_path, dead_endpoint(), fallbacks=["web_search"], kb_dir=kb_dir)
    with running(ChatAgent(config, tmp_path, chat_pki)) as agent, agent.client() as c:
        conv = c.post("/api/conversations", json={}).json()
        message = send(c, conv["id"], "anything").message
        assert message["source"] == "none" and message["status"] == "error"
        assert message["meta"]["fallbacks_tried"] == ["web_search: skipped: no chat.web_search.endpoint configured"]
        assert "The model is unavailable" in message["content"]
    assert "skipped: no chat.web_search.endpoint configured" in agent.log_tail(20000)


def test_bad_input_gets_clear_4xx(chat_pki, tmp_path):
    """Hand-written bad requests: each is a 4xx whose JSON `error` says what is wrong; none is stored."""
    config = chat_config(chat_pki, tmp_path, dead_endpoint())
    with running(ChatAgent(config, tmp_path, chat_pki)) as agent, agent.client() as c:
        conv = c.post("/api/conversations", json={}).json()
        url = f"/api/conversations/{conv['id']}/messages"
        cases = [
            (c.post(url, json={"content": ""}), 422, "content"),
            (c.post(url, json={"content": "   \n"}), 422, "empty"),
            (c.post(url, json={"content": "a" * 32001}), 422, "32000"),
            (c.post(url, json={"content": 5}), 422, "string"),
            (c.post(url, json={}), 422, "content"),
            (c.post(url, json={"content": "hi", "role": "system"}), 422, "role"),
            (c.post(url, content=b"{not json", headers={"content-type": "application/json"}), 422, "JSON"),
            (c.post(url, content="\xff\xfe".encode("latin-1"), headers={"content-type": "application/json"}), 422, ""),
            (c.post(url, json={"content": "nul \x00 here"}), 422, "NUL"),
            (c.post("/api/conversations/" + "0" * 32 + "/messages", json={"content": "hi"}), 404, "no conversation"),
            (c.post("/api/conversations/not-an-id/messages", json={"content": "hi"}), 422, "conversation_id"),
            (c.get("/api/conversations/" + "f" * 32), 404, "no conversation"),
            (c.delete("/api/conversations/" + "f" * 32), 404, "no conversation"),
            (c.post("/api/conversations", json={"title": "x" * 201}), 422, "title"),
            (c.post("/api/conversations", json=[1, 2]), 422, ""),
            (c.put("/api/conversations"), 405, "Method Not Allowed"),
            (c.get("/api/nothing-here"), 404, "Not Found"),
        ]
        for response, status, words in cases:
            assert response.status_code == status, (response.request.method, response.request.url, response.text)
            body = response.json()
            assert isinstance(body.get("error"), str) and body["error"], body
            assert words.lower() in body["error"].lower(), body
        assert c.get(f"/api/conversations/{conv['id']}").json()["messages"] == []


@pytest.mark.timeout(600)
def test_schemathesis_never_5xx_and_fuzzed_logins_never_authenticate(chat_pki, tmp_path, kb_dir):
    """Generated valid and invalid requests against the agent's own OpenAPI (bounded), signed in with an admin's
    API key so the fuzzing reaches every route but /v1 (the model is down here, so 503 is its right answer):
    no 5xx, ever; and no generated login body signs anybody in."""
    config = chat_config(chat_pki, tmp_path, dead_endpoint(), fallbacks=["knowledge_base"], kb_dir=kb_dir)
    with running(ChatAgent(config, tmp_path, chat_pki)) as agent:
        with agent.client() as c:  # the one successful login of this test
            c.post("/api/conversations", json={"title": "seed"})
        for n in range(8):  # fuzzed DELETE /api/keys/{id} hits small ids: keep the key in use out of their way
            agent.api_key("admin", f"decoy {n}")
        key = agent.api_key("admin", "schemathesis")
        done = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "run", f"{agent.url}/openapi.json",
             "--tls-verify", str(chat_pki.ca), "--checks", "not_a_server_error", "--mode", "all",
             "-H", f"Authorization: Bearer {key}",  # /v1 needs the model: test_chat_model.py fuzzes it live
             "--exclude-path-regex", "^/v1/",
             "--max-examples", "20", "--phases", "examples,coverage,fuzzing", "--seed", "1",
             "--max-time", "90", "--request-timeout", "30", "--suppress-health-check", "all"],
            capture_output=True, text=True, timeout=420)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-6000:]
        summary = re.search(r"(\d+) generated, (\d+) passed", output)
        assert summary and int(summary.group(1)) >= 300 and "failed" not in summary.group(0), output[-3000:]
        log = agent.log_tail(400000)
    assert "Traceback" not in log, log[-4000:]
    assert len(re.findall(r"login: user \S+ from", log)) == 1  # the fixture's own login, no generated body
    assert len(re.findall(r"login failed for user", log)) > 10  # the fuzzer did try


def test_store_survives_sigkill_and_migrates(chat_pki, tmp_path, kb_dir):
    """Messages acknowledged by the API are in the database after a SIGKILL; the schema is versioned."""
    config = chat_config(chat_pki, tmp_path, dead_endpoint(), fallbacks=["knowledge_base"], kb_dir=kb_dir)
    agent = ChatAgent(config, tmp_path, chat_pki)
    acknowledged: list[str] = []
    with running(agent), agent.client() as c:
        conv = c.post("/api/conversations", json={}).json()
        for n in range(5):
            reply = send(c, conv["id"], f"question {n} about the router reset")
            acknowledged += [reply.of("user")[0]["message"]["content"], reply.message["content"]]
        agent.kill()
    db = sqlite3.connect(config["chat"]["database"])
    assert db.execute("PRAGMA user_version").fetchone()[0] >= 1
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    with running(agent), agent.client() as c:
        stored = [m["content"] for m in c.get(f"/api/conversations/{conv['id']}").json()["messages"]]
    assert stored == acknowledged


def test_sighup_reloads_config(chat_pki, tmp_path, kb_dir):
    """SIGHUP applies a changed config without a restart; an invalid one is refused and the old one kept."""
    config = chat_config(chat_pki, tmp_path, dead_endpoint(), fallbacks=[], kb_dir=kb_dir)
    agent = ChatAgent(config, tmp_path, chat_pki)
    with running(agent), agent.client() as c:
        pid = agent.proc.pid
        assert c.get("/api/status").json()["fallback_strategies"] == []
        agent.config["fallback_strategies"] = ["knowledge_base"]
        agent.write_config()
        agent.signal(signal.SIGHUP)
        agent.wait_until(lambda: c.get("/api/status").json()["fallback_strategies"] == ["knowledge_base"],
                         "reloaded", 20)
        conv = c.post("/api/conversations", json={}).json()
        assert send(c, conv["id"], "router reset").message["source"] == "knowledge_base"
        agent.config_path.write_text(json.dumps({"context_window": "big"}))
        agent.signal(signal.SIGHUP)
        agent.wait_until(lambda: "last_reload_error" in c.get("/api/status").json()["chat"], "refusing", 20)
        assert c.get("/api/status").json()["fallback_strategies"] == ["knowledge_base"]
        assert agent.proc.pid == pid and agent.proc.poll() is None
