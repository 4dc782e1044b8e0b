"""The chat node against the real model node: `clawbot agent --role model` (llama-server on a tiny
random-weight GGUF behind the mTLS gateway) and `clawbot agent --role chat`, both as subprocesses.

Token counts are checked against the model's own tokenizer (the gateway's /v1/tokenize) and against the
prompt size llama-server itself reports for the request (usage.prompt_tokens).
"""

from __future__ import annotations

import signal
import time
import ssl

import httpx
import pytest

from fixtures_chat import (  # noqa: F401
    ChatAgent, ModelAgent, chat_config, chat_pki, model_config, running, send,
)
from tests.fixtures_agent import llama_server_binary  # noqa: F401  (builds the engine if no step did)
from fixtures_models import models_dir, tiny_gguf  # noqa: F401

pytestmark = pytest.mark.slow

CONTEXT_WINDOW = 512
MAX_TOKENS = 48
BUDGET = CONTEXT_WINDOW - MAX_TOKENS
SYSTEM = "You are a helpful assistant."
LONG = "Tell me everything about the spring weather in Paris, the rain, the parks and the river. "


@pytest.fixture(scope="module")
def model_node(chat_pki, tiny_gguf, llama_server_binary, tmp_path_factory):
    agent = ModelAgent(model_config(chat_pki, tiny_gguf, context_window=CONTEXT_WINDOW, max_tokens=MAX_TOKENS),
                       tmp_path_factory.mktemp("model-node"), chat_pki)
    with running(agent):
        yield agent


def small_chat(chat_pki, tmp_path, endpoint, **kwargs) -> ChatAgent:
    kwargs.setdefault("summary", {"enabled": True, "keep_recent_messages": 2, "max_tokens": 48})
    config = chat_config(chat_pki, tmp_path, endpoint, context_window=CONTEXT_WINDOW, max_tokens=MAX_TOKENS, **kwargs)
    return ChatAgent(config, tmp_path, chat_pki)


def test_streamed_reply_from_the_model(chat_pki, model_node, tmp_path):
    """A reply arrives token by token, is stored complete with source `model`, prompt size recorded exactly."""
    with running(small_chat(chat_pki, tmp_path, model_node.endpoint)) as chat, chat.client() as c:
        conv = c.post("/api/conversations", json={}).json()
        reply = send(c, conv["id"], "Hello there, who are you?")
        names = [name for name, _ in reply.events]
        assert names[:2] == ["user", "start"] and names[-1] == "done"
        assert names.count("token") >= 5, names
        message = reply.message
        assert message["source"] == "model" and message["status"] == "complete"
        assert message["content"] == reply.text and message["content"]
        expected = model_node.count_tokens([{"role": "system", "content": SYSTEM},
                                            {"role": "user", "content": "Hello there, who are you?"}])
        requests = c.get(f"/api/conversations/{conv['id']}/requests").json()
        assert [(r["kind"], r["prompt_tokens"], r["reported_prompt_tokens"], r["outcome"]) for r in requests] == [
            ("reply", expected, expected, "complete")]
        status = c.get("/api/status").json()
        assert status["gateway"]["ready"] is True and status["gateway"]["state"] == "ready"


def test_long_conversation_is_summarised_within_budget(chat_pki, model_node, tmp_path):
    """Every prompt fits context_window - max_tokens in real tokens; older turns become a stored summary."""
    with running(small_chat(chat_pki, tmp_path, model_node.endpoint)) as chat, chat.client() as c:
        conv = c.post("/api/conversations", json={}).json()
        sent = []
        for n in range(6):
            sent.append(f"Question {n}: {LONG}")
            reply = send(c, conv["id"], sent[-1])
            assert reply.message["source"] == "model"
        messages = c.get(f"/api/conversations/{conv['id']}").json()["messages"]
        requests = c.get(f"/api/conversations/{conv['id']}/requests").json()

    summaries = [m for m in messages if m["role"] == "summary"]
    assert summaries, "six long turns in a 512-token window must have produced a summary"
    replies = [r for r in requests if r["kind"] == "reply"]
    assert len(replies) == 6
    for r in requests:  # the model itself agrees on every prompt's size
        assert r["reported_prompt_tokens"] == r["prompt_tokens"], r
    assert all(r["prompt_tokens"] <= BUDGET for r in replies), replies
    assert all(r["prompt_tokens"] <= CONTEXT_WINDOW - 48 for r in requests if r["kind"] == "summary")
    assert max(r["prompt_tokens"] for r in replies) > BUDGET // 2  # the window was really used, not emptied

    # nothing dropped: every user message is still stored verbatim, summarised ones point at their summary
    assert [m["content"] for m in messages if m["role"] == "user"] == sent
    covered = [m for m in messages if m["summary_id"] is not None]
    assert covered and all(m["summary_id"] in {s["id"] for s in summaries} for m in covered)

    # the last prompt, rebuilt from what the UI shows (system + latest summary + uncovered turns), counted by
    # the model's tokenizer, is exactly what was recorded and stays within the budget
    top = [m for m in messages if m["summary_id"] is None]
    latest_summary = [m for m in top if m["role"] == "summary"][-1]
    turns = [m for m in top if m["role"] != "summary"][:-1]  # without the reply that prompt produced
    prompt = [{"role": "system", "content": f"{SYSTEM}\n\nSummary of the earlier conversation (older messages were "
                                            f"summarised):\n{latest_summary['content']}"}]
    prompt += [{"role": m["role"], "content": m["content"]} for m in turns]
    assert turns[-1]["content"] == sent[-1]
    assert model_node.count_tokens(prompt) == replies[-1]["prompt_tokens"] <= BUDGET


def test_message_too_long_is_refused_clearly(chat_pki, model_node, tmp_path):
    """A message that cannot fit even alone is rejected with a message that says so; it is kept, marked."""
    with running(small_chat(chat_pki, tmp_path, model_node.endpoint)) as chat, chat.client() as c:
        conv = c.post("/api/conversations", json={}).json()
        reply = send(c, conv["id"], LONG * 8)
        assert reply.message["status"] == "error" and "too long for the model" in reply.message["content"]
        assert str(BUDGET) in reply.message["content"]
        messages = c.get(f"/api/conversations/{conv['id']}").json()["messages"]
        assert [(m["role"], m["status"]) for m in messages] == [("user", "rejected"), ("assistant", "error")]
        # the conversation goes on: the rejected message is not sent again
        assert send(c, conv["id"], "A short one.").message["source"] == "model"


def test_model_node_down_falls_back_to_knowledge_base(chat_pki, tiny_gguf, llama_server_binary, tmp_path):
    """Stop the model node mid-conversation: the next question is answered from the KB, labelled as such."""
    kb = tmp_path / "kb"
    kb.mkdir()
    (kb / "garden.md").write_text("# Garden\n\n## Watering\n\nWater the tomatoes every evening in July.\n")
    model = ModelAgent(model_config(chat_pki, tiny_gguf, context_window=CONTEXT_WINDOW, max_tokens=MAX_TOKENS),
                       tmp_path / "model", chat_pki)
    chat = small_chat(chat_pki, tmp_path, model.endpoint, fallbacks=["knowledge_base"], kb_dir=kb)
    with running(model), running(chat), chat.client() as c:
        conv = c.post("/api/conversations", json={}).json()
        assert send(c, conv["id"], "Hello!").message["source"] == "model"
        model.stop()
        message = send(c, conv["id"], "When should I water the tomatoes?").message
        assert message["source"] == "knowledge_base"
        assert "every evening in July" in message["content"]
        assert message["meta"]["citations"] == [{"source": "garden.md", "heading": "Garden › Watering"}]
        assert "gateway unreachable" in message["meta"]["model_error"]
        gateway = c.get("/api/status").json()["gateway"]
        assert gateway["reachable"] is False and "unreachable" in gateway["error"]


def test_sigkill_mid_reply_keeps_every_acknowledged_message(chat_pki, model_node, tmp_path):
    """SIGKILL the chat agent while a reply streams: after restart all acknowledged messages are there."""
    chat = small_chat(chat_pki, tmp_path, model_node.endpoint)
    acknowledged: list[tuple[str, str]] = []
    with running(chat), chat.client() as c:
        conv = c.post("/api/conversations", json={}).json()
        for n in range(3):
            reply = send(c, conv["id"], f"Turn {n}")
            acknowledged += [("user", f"Turn {n}"), ("assistant", reply.message["content"])]
        with c.stream("POST", f"/api/conversations/{conv['id']}/messages", json={"content": "Last words"}) as r:
            buffer = ""
            lines = r.iter_text()
            while "event: user" not in buffer:  # the server has committed the user message
                buffer += next(lines)
            acknowledged.append(("user", "Last words"))
            chat.kill()
            with pytest.raises((httpx.HTTPError, StopIteration)):
                for _ in range(10000):
                    next(lines)
        assert chat.proc.returncode == -signal.SIGKILL
    with running(chat), chat.client() as c:
        stored = c.get(f"/api/conversations/{conv['id']}").json()["messages"]
    pairs = [(m["role"], m["content"]) for m in stored]
    assert pairs[:len(acknowledged)] == acknowledged
    # a reply row that was in flight is kept and marked, never shown as complete when it was cut
    for extra in stored[len(acknowledged):]:
        assert extra["role"] == "assistant" and extra["status"] in ("incomplete", "complete")


def test_openai_client_with_a_key_through_the_chat_node(chat_pki, model_node, tmp_path):
    """The official openai client, given only the cluster CA and a user's key, lists the model, completes and
    streams through the chat node (which forwards over mTLS); the user's tokens are counted from the usage the
    model server reports, and a stream carries usage only when the app asked for it."""
    import openai

    with running(small_chat(chat_pki, tmp_path, model_node.endpoint)) as chat:
        chat.add_user("app-owner", "app-owner-password")
        key = chat.api_key("app-owner", "ide plugin")
        client = openai.OpenAI(base_url=f"{chat.url}/v1", api_key=key, max_retries=0,
                               http_client=httpx.Client(verify=ssl.create_default_context(cafile=str(chat_pki.ca)),
                                                        timeout=60))
        models = [m.id for m in client.models.list().data]
        assert models == ["clawbot"]  # model_server.model_name's default
        reply = client.chat.completions.create(model=models[0], max_tokens=8,
                                               messages=[{"role": "user", "content": "Say hello."}])
        assert reply.choices[0].message.content is not None and reply.usage.prompt_tokens > 0
        plain = list(client.chat.completions.create(model=models[0], max_tokens=8, stream=True,
                                                    messages=[{"role": "user", "content": "Count to three."}]))
        assert any(c.choices and c.choices[0].delta.content for c in plain)
        assert all(c.usage is None for c in plain)
        counted = list(client.chat.completions.create(model=models[0], max_tokens=8, stream=True,
                                                      stream_options={"include_usage": True},
                                                      messages=[{"role": "user", "content": "Count to four."}]))
        assert counted[-1].usage is not None and counted[-1].usage.completion_tokens > 0
        completion = client.completions.create(model=models[0], prompt="Once upon a time", max_tokens=4)
        assert completion.choices[0].text is not None
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=models[0], messages=[])
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{chat.url}/v1", api_key="cb-00000000_" + "x" * 43, max_retries=0,
                          http_client=httpx.Client(verify=ssl.create_default_context(cafile=str(chat_pki.ca)))
                          ).models.list()
        with chat.login("app-owner", "app-owner-password") as c:
            usage = c.get("/api/usage").json()["today"]
        assert usage["requests"] == 4  # the refused empty request never reached the limits
        assert usage["prompt_tokens"] >= reply.usage.prompt_tokens + counted[-1].usage.prompt_tokens
        assert usage["completion_tokens"] >= reply.usage.completion_tokens + counted[-1].usage.completion_tokens


@pytest.mark.timeout(600)
def test_schemathesis_on_the_openai_api_never_5xx(chat_pki, model_node, tmp_path):
    """Generated requests against /v1 with the model up (bounded): refusals are 4xx, never a 5xx."""
    import re
    import subprocess
    import sys

    with running(small_chat(chat_pki, tmp_path, model_node.endpoint)) as chat:
        key = chat.api_key("admin", "schemathesis")
        done = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "run", f"{chat.url}/openapi.json",
             "--tls-verify", str(chat_pki.ca), "--checks", "not_a_server_error", "--mode", "all",
             "-H", f"Authorization: Bearer {key}", "--include-path-regex", "^/v1/",
             "--max-examples", "15", "--phases", "examples,coverage,fuzzing", "--seed", "1",
             "--max-time", "90", "--request-timeout", "60", "--suppress-health-check", "all"],
            capture_output=True, text=True, timeout=420)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-6000:]
        summary = re.search(r"(\d+) generated, (\d+) passed", output)
        assert summary and int(summary.group(1)) >= 50 and "failed" not in summary.group(0), output[-3000:]


def test_one_request_id_in_the_chat_node_and_gateway_logs(chat_pki, model_node, tmp_path):
    """A model request leaves one JSON line in the chat node's journal and one in the gateway's, with one id: the
    app's own X-Request-Id when it sends one, a fresh one for a web UI message."""
    import json
    import re

    with running(small_chat(chat_pki, tmp_path, model_node.endpoint)) as chat:
        key = chat.api_key("admin", "tracing")
        with chat.anonymous(headers={"Authorization": f"Bearer {key}", "X-Request-Id": "app-trace-0042"}) as app:
            response = app.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                               "max_tokens": 4})
            assert response.status_code == 200 and response.headers["x-request-id"] == "app-trace-0042"
        with chat.client() as c:
            conv = c.post("/api/conversations", json={}).json()
            send(c, conv["id"], "Hello there")

        def lines(text: str) -> list[dict]:
            found = []
            for match in re.finditer(r'(\{"event": "(?:model_request|request)".*\})\s*$', text, re.M):
                found.append(json.loads(match.group(1)))
            return found

        def both_logged():
            mine = [l for l in lines(chat.log_tail(200000)) if l["event"] == "model_request"]
            theirs = {l["request_id"] for l in lines(model_node.log_tail(400000)) if l["event"] == "request"}
            return mine if len(mine) == 2 and all(l["request_id"] in theirs for l in mine) else None
        deadline = time.monotonic() + 20
        while not both_logged() and time.monotonic() < deadline:
            time.sleep(0.2)
        mine = both_logged()
        assert mine, (chat.log_tail(3000), model_node.log_tail(3000))
        api, web = sorted(mine, key=lambda l: l["via"])
        assert (api["via"], api["request_id"], api["user"], api["key"]) == ("api", "app-trace-0042", "admin",
                                                                            key.split("_")[0])
        assert web["via"] == "web" and web["outcome"] == "complete" and web["completion_tokens"] > 0
