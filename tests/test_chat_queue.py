"""The chat node's fair line (clawbot.chat.queueing): turns between people, places and estimates, cancelling,
closing when the model is down. A fake clock stands in for time where estimates are checked."""

from __future__ import annotations

import asyncio
import time

import pytest

from clawbot.chat.queueing import FairQueue, LineClosed


def test_a_burst_does_not_starve_a_newcomer():
    """Capacity 1: alice fires 20, bob sends 1 while alice's first answer runs: bob is next, not 20th."""
    async def scenario():
        queue = FairQueue(1)
        alice = [queue.join("alice") for _ in range(20)]
        assert alice[0].admitted and not any(t.admitted for t in alice[1:])
        bob = queue.join("bob")
        assert queue.place(bob)["ahead"] == 0 and queue.place(bob)["position"] == 1
        assert queue.place(alice[1])["ahead"] == 1  # bob's turn comes first
        queue.leave(alice[0])
        assert bob.admitted and not alice[1].admitted
        queue.leave(bob)
        assert alice[1].admitted

    asyncio.run(scenario())


def test_turns_alternate_between_people_and_places_match_the_order():
    """Places computed while waiting are exactly the order in which slots are then handed out."""
    async def scenario():
        queue = FairQueue(2)
        tickets = [queue.join("a"), queue.join("a")]  # both slots
        tickets += [queue.join("a") for _ in range(4)] + [queue.join("b") for _ in range(2)] + [queue.join("c")]
        waiting = [t for t in tickets if not t.admitted]
        predicted = sorted(waiting, key=lambda t: queue.place(t)["ahead"])
        assert sorted(queue.place(t)["ahead"] for t in waiting) == list(range(len(waiting)))
        actual = []
        holding = [t for t in tickets if t.admitted]
        while holding:
            queue.leave(holding.pop(0))
            for t in waiting:
                if t.admitted and t not in actual:
                    actual.append(t)
                    holding.append(t)
        assert [(t.person, t.number) for t in actual] == [(t.person, t.number) for t in predicted]
        assert [t.person for t in actual] == ["b", "c", "a", "b", "a", "a", "a"]

    asyncio.run(scenario())


def test_estimate_uses_measured_service_times():
    async def scenario():
        clock = [0.0]
        queue = FairQueue(1, clock=lambda: clock[0])
        first = queue.join("a")
        second = queue.join("b")
        assert queue.place(second)["estimate_s"] is None  # nothing measured yet: no made-up number
        clock[0] = 10.0
        queue.leave(first)  # 10 s answer
        third = queue.join("c")
        clock[0] = 14.0
        place = queue.place(third)
        assert (place["position"], place["ahead"], place["estimate_s"]) == (1, 0, 6.0)
        fourth = queue.join("d")
        assert queue.place(fourth)["estimate_s"] == 16.0  # 6 s left of b's answer, then c's 10 s

    asyncio.run(scenario())


def test_cancel_while_waiting_moves_the_others_up():
    async def scenario():
        queue = FairQueue(1)
        holder = queue.join("a")
        b, c = queue.join("b"), queue.join("c")
        assert queue.place(c)["ahead"] == 1
        waiter = asyncio.create_task(queue.wait(c, 5))
        await asyncio.sleep(0)
        queue.leave(b)  # cancelled before its turn
        assert await waiter is False  # woken: its place changed
        assert queue.place(c)["ahead"] == 0 and queue.waiting == 1
        queue.leave(holder)
        assert await queue.wait(c, 5) is True and queue.active == 1

    asyncio.run(scenario())


def test_closing_the_line_ends_every_wait_at_once():
    """The model is down: nobody waits for it; each waiter gets the reason, slots already held are not touched."""
    async def scenario():
        queue = FairQueue(1)
        holder = queue.join("a")
        waiting = [queue.join("b"), queue.join("c")]
        tasks = [asyncio.create_task(queue.wait(t, 30)) for t in waiting]
        await asyncio.sleep(0)
        assert queue.close_all("gateway unreachable") == 2
        for task in tasks:
            with pytest.raises(LineClosed) as err:
                await asyncio.wait_for(task, 1)
            assert err.value.kind == "down" and "unreachable" in err.value.reason
        assert queue.waiting == 0 and queue.active == 1
        queue.leave(holder)
        assert queue.join("d").admitted

    asyncio.run(scenario())


def test_more_capacity_admits_waiters_and_memory_stays_bounded():
    async def scenario():
        queue = FairQueue(1)
        tickets = [queue.join(f"p{i}") for i in range(4)]
        queue.capacity = 3
        assert [t.admitted for t in tickets] == [True, True, True, False]
        for t in tickets:
            queue.leave(t)
        assert queue.active == 0 and queue.waiting == 0 and queue.served == 4
        assert queue._last_served == {}  # nobody left behind

    asyncio.run(scenario())


# ---------------------------------------------------------------------------------------------- real agents
# The chat agent and the model agent (llama-server on the tiny GGUF) as subprocesses, limited to one slot, so
# every message beyond the first waits in the chat node's line.

import socket  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

from fixtures_chat import ChatAgent, ModelAgent, chat_config, chat_pki, model_config, parse_sse, running  # noqa: E402,F401  (fixtures)
from fixtures_models import gguf_100m, models_dir, tiny_gguf  # noqa: E402,F401
from tests.fixtures_agent import llama_server_binary, wait_for  # noqa: E402,F401


@pytest.fixture(scope="module")
def one_slot_model(chat_pki, tiny_gguf, llama_server_binary, tmp_path_factory):
    config = model_config(chat_pki, tiny_gguf, context_window=1024, max_tokens=96)
    config["model_gateway"]["max_concurrency"] = 1
    config["model_server"]["parallel_slots"] = 1
    agent = ModelAgent(config, tmp_path_factory.mktemp("one-slot-model"), chat_pki)
    with running(agent):
        yield agent


@pytest.fixture(scope="module")
def slow_model(chat_pki, gguf_100m, llama_server_binary, tmp_path_factory):
    """One slot and a ~110 M model asked for long replies: a reply holds the slot for seconds."""
    config = model_config(chat_pki, gguf_100m, context_window=1024, max_tokens=400)
    config["model_gateway"]["max_concurrency"] = 1
    config["model_server"]["parallel_slots"] = 1
    agent = ModelAgent(config, tmp_path_factory.mktemp("slow-model"), chat_pki)
    with running(agent):
        yield agent


def timed_send(client, conversation_id: str, content: str, path: str = "messages") -> dict:
    """Send a message and read its stream; returns the parsed events and when (monotonic) each arrived."""
    times: dict[str, float] = {}
    body = []
    sent = time.monotonic()
    with client.stream("POST", f"/api/conversations/{conversation_id}/{path}", json={"content": content}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("event:"):
                times.setdefault(line[6:].strip(), time.monotonic())
            body.append(line)
    reply = parse_sse("\n".join(body))
    return {"reply": reply, "times": times, "sent": sent, "ended": time.monotonic()}


def people(chat: ChatAgent, names: list[str]) -> dict:
    for name in names:
        chat.add_user(name, f"{name}-password-1")
    return {name: chat.login(name, f"{name}-password-1", timeout=300) for name in names}


def queue_of(chat: ChatAgent) -> dict:
    with chat.client(timeout=10) as c:
        return c.get("/api/status").json()["queue"]



@pytest.mark.slow
def test_six_people_on_one_slot_all_get_model_answers(chat_pki, one_slot_model, tmp_path):
    """One model slot, six people sending at once (two messages each): nobody gets "model unavailable"; the
    messages that waited saw their place in line, and every reply comes from the model."""
    config = chat_config(chat_pki, tmp_path, one_slot_model.endpoint, context_window=1024, max_tokens=96,
                         fallbacks=["knowledge_base"])
    with running(ChatAgent(config, tmp_path, chat_pki)) as chat:
        clients = people(chat, [f"person{i}" for i in range(6)])
        assert queue_of(chat)["capacity"] == 1  # sized by the gateway's own max_concurrency

        def converse(client):
            conv = client.post("/api/conversations", json={}).json()
            return [timed_send(client, conv["id"], f"Hello, tell me about item {n}.") for n in range(2)]

        with ThreadPoolExecutor(6) as pool:
            results = [r for rs in pool.map(converse, clients.values()) for r in rs]
        for c in clients.values():
            c.close()
        with chat.client() as admin:
            metrics = admin.get("/metrics").text
        assert 'clawbot_chat_queue_wait_seconds_count{outcome="admitted"} 12.0' in metrics, metrics
        assert "clawbot_chat_queue_capacity 1.0" in metrics and "clawbot_chat_queue_waiting 0.0" in metrics
    replies = [r["reply"].message for r in results]
    assert [(m["source"], m["status"]) for m in replies] == [("model", "complete")] * 12, replies
    waited = [r for r in results if r["reply"].of("queued")]
    assert waited, "with one slot and six people, some messages must have waited in line"
    for r in waited:
        first = r["reply"].of("queued")[0]
        assert first["position"] >= 1 and first["reason"] == "busy"
        assert r["reply"].message["meta"]["queue_wait_s"] > 0


@pytest.mark.slow
def test_a_burst_of_twenty_does_not_delay_someone_else_by_more_than_one_answer(chat_pki, one_slot_model, tmp_path):
    """alice fires 20 messages (20 conversations) at once; bob sends one while they wait: at most the answer in
    progress is served before bob's (turns between people), and bob waits no longer than about one answer."""
    config = chat_config(chat_pki, tmp_path, one_slot_model.endpoint, context_window=1024, max_tokens=96)
    with running(ChatAgent(config, tmp_path, chat_pki)) as chat:
        clients = people(chat, ["alice", "bob"])
        alice, bob = clients["alice"], clients["bob"]
        conversations = [alice.post("/api/conversations", json={}).json()["id"] for _ in range(20)]
        bob_conv = bob.post("/api/conversations", json={}).json()["id"]
        with ThreadPoolExecutor(20) as pool:
            burst = [pool.submit(timed_send, alice, cid, "Write a long story about a lighthouse keeper.")
                     for cid in conversations]
            wait_for(lambda: queue_of(chat)["waiting"] >= 10, 60, what="alice's burst waiting in line")
            bob_result = timed_send(bob, bob_conv, "What is a lighthouse?")
            alice_results = [f.result() for f in burst]
        for c in clients.values():
            c.close()
    bob_start = bob_result["times"]["start"]
    served_between = [r for r in alice_results if bob_result["sent"] < r["times"]["start"] < bob_start]
    assert len(served_between) <= 1, f"{len(served_between)} of alice's answers were served before bob's"
    assert bob_result["reply"].message["source"] == "model"
    assert all(r["reply"].message["source"] == "model" for r in alice_results)
    answer_times = sorted(r["reply"].message["meta"]["duration_s"] for r in alice_results)
    longest = answer_times[-1]
    bob_wait = bob_result["reply"].message["meta"]["queue_wait_s"]
    assert bob_wait <= longest * 1.5 + 0.5, (bob_wait, answer_times)  # one answer in progress, with slack


@pytest.mark.slow
def test_apps_wait_in_the_same_line(chat_pki, slow_model, tmp_path):
    """An app's request (official openai client, API key) waits for its turn while a person's reply holds the only
    slot, instead of getting a 429 or 503, and is then answered."""
    import ssl

    import httpx
    import openai

    config = chat_config(chat_pki, tmp_path, slow_model.endpoint, context_window=1024, max_tokens=400)
    with running(ChatAgent(config, tmp_path, chat_pki)) as chat:
        clients = people(chat, ["gail"])
        chat.add_user("app-owner", "app-owner-password-1")
        key = chat.api_key("app-owner")
        conv = clients["gail"].post("/api/conversations", json={}).json()["id"]
        with ThreadPoolExecutor(1) as pool:
            person = pool.submit(timed_send, clients["gail"], conv, "Write a long story about a lighthouse keeper.")
            wait_for(lambda: queue_of(chat)["active"] == 1, 30, what="the person's reply holding the slot")
            app = openai.OpenAI(base_url=chat.url + "/v1", api_key=key, max_retries=0,
                                http_client=httpx.Client(verify=ssl.create_default_context(cafile=str(chat_pki.ca)),
                                                         timeout=300))
            model = app.models.list().data[0].id
            answer = app.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
            assert person.result(timeout=120)["reply"].message["source"] == "model"
        assert answer.choices[0].message.content is not None and answer.usage.completion_tokens >= 1
        with chat.client() as admin:
            metrics = admin.get("/metrics").text
        assert 'clawbot_chat_queue_wait_seconds_count{outcome="admitted"} 2.0' in metrics
        assert 'clawbot_chat_queue_wait_seconds_bucket{le="0.5",outcome="admitted"} 1.0' in metrics  # the app waited
        clients["gail"].close()


@pytest.mark.slow
def test_a_model_that_is_down_gets_the_fallback_at_once(chat_pki, tmp_path):
    """A gateway that accepts TCP but never answers TLS (a hung node): the first message finds out (connect
    timeout); nobody else waits for it: every other message gets the knowledge base at once, not one timeout
    after another."""
    kb = tmp_path / "kb"
    kb.mkdir()
    (kb / "access.md").write_text("# Accounts\n\nAsk the administrator for an account on the chat node.\n")
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)  # never accepted: connections complete in the kernel, TLS never answers
    try:
        config = chat_config(chat_pki, tmp_path, f"https://localhost:{hung.getsockname()[1]}",
                             fallbacks=["knowledge_base"], kb_dir=kb, request_timeout_s=20)
        config["chat"]["queue"] = {"slots": 1, "max_wait_s": 300}
        with running(ChatAgent(config, tmp_path, chat_pki)) as chat, chat.client(timeout=120) as c:
            conversations = [c.post("/api/conversations", json={}).json()["id"] for _ in range(6)]
            with ThreadPoolExecutor(6) as pool:
                results = list(pool.map(lambda cid: timed_send(c, cid, "How do I get an account?"), conversations))
    finally:
        hung.close()
    assert all(r["reply"].message["source"] == "knowledge_base" for r in results), [r["reply"].message for r in results]
    durations = sorted(r["ended"] - r["sent"] for r in results)
    # whoever went first waits out one connect timeout (10 s); the other five are not lined up behind it (that
    # would be 20, 30, ... 60 s): they hear from the gateway watch or from that first failure
    assert durations[-1] < 15, durations
    assert durations[-2] < durations[-1] / 2, durations


@pytest.mark.slow
def test_stop_cancels_a_wait_and_ends_a_reply_and_regenerate_replaces_it(chat_pki, slow_model, tmp_path):
    """POST .../stop: a reply being written ends where it is (kept, finish_reason `stopped`); a message waiting in
    line is cancelled (event `cancelled`, never sent). POST .../regenerate replaces the last reply."""
    config = chat_config(chat_pki, tmp_path, slow_model.endpoint, context_window=1024, max_tokens=400)
    with running(ChatAgent(config, tmp_path, chat_pki)) as chat:
        clients = people(chat, ["erin", "finn"])
        erin, finn = clients["erin"], clients["finn"]
        writing = erin.post("/api/conversations", json={}).json()["id"]
        waiting = finn.post("/api/conversations", json={}).json()["id"]
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(timed_send, erin, writing, "Write a long story about a lighthouse keeper.")
            wait_for(lambda: queue_of(chat)["active"] == 1, 30, what="erin's reply holding the slot")
            second = pool.submit(timed_send, finn, waiting, "And what is a lighthouse?")
            wait_for(lambda: queue_of(chat)["waiting"] == 1, 30, what="finn's message in line")
            assert finn.post(f"/api/conversations/{waiting}/stop").json() == {"stopped": True, "phase": "queued"}
            cancelled = second.result(timeout=30)["reply"]
            wait_for(lambda: erin.get(f"/api/conversations/{writing}").json()["messages"][-1]["content"], 60,
                     what="erin's reply streaming")
            assert erin.post(f"/api/conversations/{writing}/stop").json() == {"stopped": True, "phase": "streaming"}
            stopped = first.result(timeout=60)["reply"]
        names = [name for name, _ in cancelled.events]  # a place is repeated every 5 s while it waits
        assert names[0] == "user" and names[-1] == "cancelled" and set(names[1:-1]) == {"queued"}, names
        messages = finn.get(f"/api/conversations/{waiting}").json()["messages"]
        assert [(m["role"], m["status"]) for m in messages] == [("user", "cancelled")]
        assert stopped.message["status"] == "incomplete" and stopped.message["meta"]["finish_reason"] == "stopped"
        assert 0 < stopped.message["meta"]["completion_tokens"] < 400
        with slow_model.client() as gateway:  # the gateway's slot was freed: the model stopped generating it
            wait_for(lambda: gateway.get("/status").json()["gateway"]["active"] == 0, 30, what="the gateway slot freed")
        assert finn.post(f"/api/conversations/{waiting}/regenerate").status_code == 409  # nothing was sent
        again = timed_send(erin, writing, "", path="regenerate")["reply"]
        opening = again.of("user")[0]
        assert opening["regenerated"] is True and opening["removed"] == [stopped.message["id"]]
        assert again.message["source"] == "model" and again.message["meta"]["finish_reason"] in ("stop", "length")
        assert again.message["meta"]["model"] and again.message["meta"]["completion_tokens"] >= 1
        messages = erin.get(f"/api/conversations/{writing}").json()["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"] and messages[1]["id"] == again.message["id"]
        assert erin.post(f"/api/conversations/{writing}/stop").json() == {"stopped": False, "phase": None}
        for c in clients.values():
            c.close()


@pytest.mark.slow
def test_a_gateway_that_answers_busy_is_waited_for_as_it_asks(chat_pki, tiny_gguf, llama_server_binary, tmp_path):
    """docs/waiting.md: when the gateway still refuses for load (here: the chat node is told it has 3 slots, the
    gateway has 1 and no queue, so it answers 429 queue_full), the chat node keeps the message's turn, waits as
    long as Retry-After asks, tells the person it is retrying, and the model answers every message."""
    model = model_config(chat_pki, tiny_gguf, context_window=1024, max_tokens=48)
    model["model_gateway"].update(max_concurrency=1, queue_length=0)
    model["model_server"]["parallel_slots"] = 1
    with running(ModelAgent(model, tmp_path / "model", chat_pki)) as gateway:
        config = chat_config(chat_pki, tmp_path / "chat", gateway.endpoint, context_window=1024, max_tokens=48)
        config["chat"]["queue"] = {"slots": 3, "max_wait_s": 120}
        with running(ChatAgent(config, tmp_path / "chat", chat_pki)) as chat, chat.client(timeout=180) as c:
            conversations = [c.post("/api/conversations", json={}).json()["id"] for _ in range(3)]
            with ThreadPoolExecutor(3) as pool:
                results = list(pool.map(lambda cid: timed_send(c, cid, "Hello there."), conversations))
        with gateway.client() as g:
            refused = g.get("/metrics").text
    assert [r["reply"].message["source"] for r in results] == ["model"] * 3, [r["reply"].message for r in results]
    retried = [q for r in results for q in r["reply"].of("queued") if q["reason"] == "retrying"]
    assert retried and all("busy" in q["detail"] for q in retried), retried
    assert 'clawbot_gateway_rejections_total{reason="queue_full"}' in refused
