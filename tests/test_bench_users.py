"""`clawbot bench --users N`: simulated people using the chat node's conversation API.

Unit tests check how a reply stream is classified and how the report adds up. The slow tests run the real
command against a real chat agent and a real model agent (llama-server on a tiny GGUF behind the mTLS gateway)
with a single model slot, so that with three people some messages must wait, and against a chat node whose
gateway is down, whose messages must come back unavailable, not answered.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from clawbot.tools.bench import (
    FOLLOW_UPS, QUESTIONS, MessageResult, classify, format_users_table, pick_message, summarize_people, think_time,
)
from fixtures_chat import ChatAgent, ModelAgent, chat_config, chat_pki, free_port, model_config, running  # noqa: F401
from fixtures_models import models_dir, tiny_gguf  # noqa: F401
from tests.fixtures_agent import llama_server_binary  # noqa: F401  (builds the engine if no step did)


def bench_users(url: str, keys_file, cacert, *extra: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clawbot", "bench", url, "--keys", str(keys_file),
                           "--cacert", str(cacert), *extra], capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------- unit


def model_reply(wait: float = 0.0, **meta) -> tuple[str, dict]:
    return ("done", {"message": {"role": "assistant", "content": "Hello!", "source": "model", "status": "complete",
                                 "meta": {"queue_wait_s": wait, "completion_tokens": 12, "finish_reason": "stop",
                                          "model": "tiny", **meta}}})


def test_a_reply_that_waited_in_line_is_answered_and_waited():
    events = [("user", {"message": {}}),
              ("queued", {"position": 2, "ahead": 1, "estimate_s": 3.0, "waited_s": 0.0, "reason": "busy"}),
              ("queued", {"position": 1, "ahead": 0, "estimate_s": 1.0, "waited_s": 2.0, "reason": "busy"}),
              ("queued", {"position": 1, "ahead": 0, "estimate_s": 2.0, "waited_s": 2.5, "reason": "retrying"}),
              ("start", {"message": {}}), ("token", {"text": "Hel"}), ("token", {"text": "lo!"}), model_reply(4.25)]
    fields = classify(events)
    assert fields["outcome"] == "answered" and fields["waited"] is True
    assert (fields["queued_events"], fields["retrying_events"], fields["max_position"]) == (3, 1, 2)
    assert (fields["queue_wait_s"], fields["completion_tokens"], fields["finish_reason"]) == (4.25, 12, "stop")


def test_waited_without_queued_events_comes_from_queue_wait_s():
    assert classify([model_reply(0.0)])["waited"] is False
    assert classify([model_reply(0.2)])["waited"] is True


@pytest.mark.parametrize("message, outcome, detail", [
    ({"content": "From the docs...", "source": "knowledge_base", "status": "complete",
      "meta": {"model_error": "gateway unreachable"}}, "unavailable", "gateway unreachable"),
    ({"content": "Results...", "source": "web_search", "status": "complete", "meta": {"model_error": "not ready"}},
     "unavailable", "not ready"),
    ({"content": "The model is unavailable (connect failed) and no fallback could answer (knowledge_base: none).",
      "source": "none", "status": "error", "meta": {"model_error": "connect failed"}}, "unavailable", "connect failed"),
    ({"content": "The model refused the request: bad", "source": "none", "status": "error",
      "meta": {"model_error": "bad"}}, "failed", "The model refused the request: bad"),
    ({"content": "Hel", "source": "model", "status": "incomplete", "meta": {"error": "reply cut short: eof"}},
     "failed", "reply cut short: eof"),
    ({"content": "too long", "source": "none", "status": "error", "meta": {"error": "context_too_long"}},
     "failed", "context_too_long"),
])
def test_fallbacks_are_unavailable_and_other_replies_failed(message, outcome, detail):
    fields = classify([("user", {}), ("token", {"text": message["content"]}), ("done", {"message": message})])
    assert (fields["outcome"], fields["detail"]) == (outcome, detail)


def test_a_stream_without_done_or_a_cancelled_one_failed():
    broken = classify([("user", {}), ("start", {}), ("token", {"text": "x"})])
    assert (broken["outcome"], broken["detail"]) == ("failed", "the stream ended without a done event")
    cancelled = classify([("user", {}), ("queued", {"position": 1, "reason": "busy"}),
                          ("cancelled", {"reason": "cancelled by the person who sent it"})])
    assert cancelled["outcome"] == "failed" and cancelled["waited"] and cancelled["detail"].startswith("cancelled")


def result(outcome: str, wait: float | None = None, first: float | None = None, reply: float | None = None,
           waited: bool = False, detail: str = "", person: int = 1, tokens: int | None = None) -> MessageResult:
    return MessageResult(person=person, conversation=1, index=1, sent_at_s=0.0, outcome=outcome, waited=waited,
                         queue_wait_s=wait, first_token_s=first, reply_s=reply, detail=detail, completion_tokens=tokens)


def test_report_counts_add_up_and_percentiles_are_over_answered_messages():
    results = [result("answered", 0.0, 0.2, 1.0, tokens=10), result("answered", 0.0, 0.4, 1.2, tokens=10),
               result("answered", 0.0, 0.6, 1.4, tokens=10), result("answered", 1.0, 1.6, 2.4, waited=True, tokens=10),
               result("answered", 3.0, 3.8, 4.6, waited=True, tokens=10),
               result("unavailable", None, 0.01, 0.02, detail="gateway down"),
               result("unavailable", 30.0, 30.1, 30.2, waited=True, detail="waited 30 s"),
               result("failed", detail="HTTP 500: boom")]
    s = summarize_people(results, duration_s=120, wall_s=125.5)
    assert (s["sent"], s["answered"], s["unavailable"], s["failed"], s["waited"]) == (8, 5, 2, 1, 3)
    assert s["answered"] + s["unavailable"] + s["failed"] == s["sent"]
    assert s["wait_s"] == {"p50": 0.0, "p95": 2.6, "max": 3.0, "n": 5}  # 95th of [0, 0, 0, 1, 3]: 1 + 0.8 * 2
    assert s["wait_of_waited_s"] == {"p50": 2.0, "p95": 2.9, "max": 3.0, "n": 2}
    assert s["first_token_s"]["p50"] == 0.6 and s["reply_s"]["p50"] == 1.4 and s["reply_s"]["max"] == 4.6
    assert s["answered_per_min"] == 2.5 and s["completion_tokens"] == 50 and s["wall_s"] == 125.5
    assert s["unavailable_reasons"] == {"gateway down": 1, "waited 30 s": 1}
    assert s["failure_reasons"] == {"HTTP 500: boom": 1}


def test_an_empty_report_has_no_made_up_percentiles():
    s = summarize_people([], duration_s=10, wall_s=10)
    assert s["sent"] == 0 and s["wait_s"] == {"p50": None, "p95": None, "max": None, "n": 0}
    table = format_users_table({"url": "https://x", "users": 1, "duration_s": 10, "think_s": 5,
                                "messages_per_conversation": 5, "seed": 1, "status_before": {}, "summary": s,
                                "people": [{"account": "alice", **s}]})
    assert "alice" in table and " - " in table


def test_questions_and_think_times_repeat_with_the_seed():
    def draws(seed):
        rng = random.Random(f"clawbot-bench/{seed}/1")
        return [(pick_message(rng, i % 5), think_time(rng, 5.0)) for i in range(200)]

    first = draws(1)
    assert first == draws(1) and first != draws(2)
    assert all(text in QUESTIONS for text, _ in first[::5])  # a conversation opens with a question
    assert any(text in FOLLOW_UPS for text, _ in first)
    pauses = [t for _, t in first]
    assert max(pauses) <= 25.0 and 4.0 < sum(pauses) / len(pauses) < 6.0
    assert think_time(random.Random(1), 0) == 0.0


def test_fewer_keys_than_people_is_refused_before_anything_is_sent(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# two people's keys\ncb-aaaa\n\ncb-bbbb\n")
    done = bench_users("https://127.0.0.1:9", keys, tmp_path / "none.pem", "--users", "3", timeout=60)
    assert done.returncode == 2, done
    assert "2 key(s) for 3 people" in done.stderr and "per account" in done.stderr
    missing = subprocess.run([sys.executable, "-m", "clawbot", "bench", "https://127.0.0.1:9", "--users", "2"],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "--keys" in missing.stderr


# ---------------------------------------------------------------------------------------------- real agents


@pytest.fixture(scope="module")
def one_slot_model(chat_pki, tiny_gguf, llama_server_binary, tmp_path_factory):
    """The model node with one slot (gateway and llama-server): three people cannot all be served at once."""
    config = model_config(chat_pki, tiny_gguf, context_window=2048, max_tokens=48)
    config["model_gateway"]["max_concurrency"] = 1
    config["model_server"]["parallel_slots"] = 1
    agent = ModelAgent(config, tmp_path_factory.mktemp("bench-model"), chat_pki)
    with running(agent):
        yield agent


@pytest.fixture(scope="module")
def chat_node(chat_pki, one_slot_model, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("bench-chat")
    config = chat_config(chat_pki, workdir, one_slot_model.endpoint, context_window=2048, max_tokens=48,
                         fallbacks=["knowledge_base"])
    with running(ChatAgent(config, workdir, chat_pki)) as chat:
        yield chat


def people_keys(chat: ChatAgent, path, names: list[str]):
    keys = []
    for name in names:
        chat.add_user(name, f"{name}-password-1")
        keys.append(chat.api_key(name, "bench"))
    path.write_text("".join(k + "\n" for k in keys))
    return path


@pytest.mark.slow
def test_three_people_on_one_slot_are_answered_and_some_wait(chat_node, chat_pki, tmp_path):
    keys = people_keys(chat_node, tmp_path / "keys", ["ann", "ben", "cai"])
    out = tmp_path / "report.json"
    done = bench_users(chat_node.url, keys, chat_pki.ca, "--users", "3", "--duration", "15", "--think-s", "0.5",
                       "--messages-per-conversation", "3", "--json", str(out))
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    s, messages = report["summary"], report["messages"]
    assert s["sent"] == len(messages) >= 9
    assert s["answered"] + s["unavailable"] + s["failed"] == s["sent"]
    assert (s["answered"], s["unavailable"], s["failed"]) == (s["sent"], 0, 0), s  # the model is up: all answered
    assert s["waited"] > 0, "one slot and three people: some messages must have waited"
    assert s["wait_s"]["p95"] is not None and s["wait_s"]["p95"] > 0
    assert 0 < s["first_token_s"]["p50"] <= s["reply_s"]["p50"]
    assert s["first_token_s"]["p95"] >= s["first_token_s"]["p50"]
    assert report["status_before"]["queue"]["capacity"] == 1  # sized by the gateway's max_concurrency
    assert report["status_after"]["queue"]["active"] == 0 and report["status_after"]["queue"]["waiting"] == 0
    assert [p["account"] for p in report["people"]] == ["ann", "ben", "cai"]
    assert sum(p["sent"] for p in report["people"]) == s["sent"] and all(p["answered"] > 0 for p in report["people"])
    for person in (1, 2, 3):  # a new conversation every 3 messages, numbered in order
        mine = [(m["conversation"], m["index"]) for m in messages if m["person"] == person]
        assert mine == [(1 + n // 3, 1 + n % 3) for n in range(len(mine))], mine
    for m in messages:
        assert m["http_status"] == 200 and m["source"] == "model" and m["completion_tokens"] > 0
        assert m["sent_at_s"] < 15 and m["waited"] == (m["queued_events"] > 0 or m["queue_wait_s"] > 0)
    # the chat node counted the same messages through its line, and as many waits
    with chat_node.client() as admin:
        metrics = admin.get("/metrics").text
    assert f'clawbot_chat_queue_wait_seconds_count{{outcome="admitted"}} {float(s["sent"])}' in metrics
    assert "answered" in done.stdout and "ann" in done.stdout


@pytest.mark.slow
def test_two_keys_of_one_account_are_refused(chat_node, chat_pki, tmp_path):
    chat_node.add_user("dee", "dee-password-1")
    keys = tmp_path / "keys"
    keys.write_text(chat_node.api_key("dee", "one") + "\n" + chat_node.api_key("dee", "two") + "\n")
    done = bench_users(chat_node.url, keys, chat_pki.ca, "--users", "2", "--duration", "5")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "1 accounts for 2 people" in done.stderr and "dee" in done.stderr
    keys.write_text("cb-not-a-key\n")
    done = bench_users(chat_node.url, keys, chat_pki.ca, "--users", "1", "--duration", "5")
    assert done.returncode == 2 and "key 1 of --keys is not accepted" in done.stderr


@pytest.mark.slow
def test_a_chat_node_whose_gateway_is_down_reports_unavailable_not_answered(chat_pki, tmp_path):
    down = f"https://localhost:{free_port()}"  # nothing listens there
    config = chat_config(chat_pki, tmp_path, down, fallbacks=["knowledge_base"])
    with running(ChatAgent(config, tmp_path, chat_pki)) as chat:
        keys = people_keys(chat, tmp_path / "keys", ["eve", "fay"])
        out = tmp_path / "report.json"
        done = bench_users(chat.url, keys, chat_pki.ca, "--users", "2", "--duration", "5", "--think-s", "0.5",
                           "--json", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    s = json.loads(out.read_text())["summary"]
    assert s["sent"] > 0 and (s["answered"], s["unavailable"], s["failed"]) == (0, s["sent"], 0), s
    assert s["wait_s"]["n"] == 0 and s["first_token_s"]["p95"] is None  # nothing answered: no answer times
    assert sum(s["unavailable_reasons"].values()) == s["sent"]
    assert "unavailable" in done.stdout
