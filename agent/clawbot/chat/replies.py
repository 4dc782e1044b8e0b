"""One reply of the web chat, as a stream of Server-Sent Events, and the watch on the gateway behind it.

The events, in order (docs/chat-api.md): `user` {message}; while the message waits for a model slot, `queued`
{position, ahead, estimate_s, waited_s, reason, detail}; `summary` {message} when older turns were summarised;
`start` {message}; `token` {text}...; then `done` {message} — or `cancelled` {user_message_id, reason} when the
person cancelled the wait (the user message is then `cancelled`, never sent).

Waiting: the message joins the chat node's fair line (clawbot.chat.queueing) and holds one of its slots
from the prompt's first token count to the reply's last token. A gateway that still answers busy (429, or 503
queue_timeout) is waited for as it asks (Retry-After), within `chat.queue.max_wait_s`; the person sees
`queued` events with reason `retrying`. Only a model that is down (unreachable, not ready, failing) or a
wait past the limit sends the message to the fallbacks, and a model known to be down sends it there at once.

Storage: the user message is committed before the stream starts (so an acknowledged message survives a
crash); the reply row is created when streaming starts, its text saved every couple of seconds and when
the stream ends: complete, or `incomplete` when it broke, the client left or the person stopped it. The
reply's meta keeps what the details view shows: model, finish_reason (stop | length | stopped), prompt and
completion tokens, first_token_s, duration_s, tokens_per_s, queue_wait_s.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from clawbot.chat.context import ContextTooLong
from clawbot.chat.queueing import LineClosed
from clawbot.common.modelclient import ModelUnavailable, StreamBroken

log = logging.getLogger("clawbot.chat.service")
request_log = logging.getLogger("clawbot.chat.requests")

SAVE_PARTIAL_EVERY_S = 2.0
PLACE_EVERY_S = 5.0  # a waiting message hears its place at least this often (also a keep-alive)
WATCH_EVERY_S = 10.0  # how often the chat node asks the gateway whether it is ready and how many slots it has
WATCH_MISSES_DOWN = 2  # failed rounds in a row before a node that is answering requests counts as down
DEFAULT_RETRY_S = 2.0  # a busy answer without Retry-After


# The reply stream's events, in order: name -> (data, when). docs/chat-api.md is generated from this.
EVENTS = {
    "user": ("`{message}`; on regenerate also `regenerated: true`, `removed: [ids]`",
             "first: the stored user message (committed before anything else happens)"),
    "queued": ("`{position, ahead, estimate_s, waited_s, reason, detail}`",
               "while the message waits for a model slot (`reason` busy), or waits out a gateway's Retry-After "
               "(`retrying`); again when the place changes, at least every 5 s"),
    "cancelled": ("`{user_message_id, reason}`", "the wait was cancelled (stop): the message is `cancelled`, never "
                  "sent; last event"),
    "summary": ("`{message}`", "older turns were summarised to fit the context window"),
    "start": ("`{message}`", "the reply row exists; tokens follow"),
    "token": ("`{text}`", "each piece of the reply (a fallback's whole answer comes as one token)"),
    "done": ("`{message}`; `user_status: rejected` when the message can never fit",
             "last event: the reply as stored (`status` complete, incomplete or error; `source` model, "
             "knowledge_base, web_search or none)"),
}


def sse(event: str, data: dict) -> bytes:
    assert event in EVENTS, event
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


@dataclass
class GatewayWatch:
    """What the chat node last learned about its gateway; kept across config reloads."""

    down: str | None = None  # why the model is known to be down (None: up or not known to be down)
    slots: int | None = None  # the gateway's max_concurrency as its /status reported it
    checked_at: float = 0.0
    last: dict | None = None  # the last health answer (what /api/status shows while it is fresh)
    missed: int = 0  # watch rounds in a row without a ready model node
    asked_at: float = 0.0

    def fresh(self, max_age_s: float = WATCH_EVERY_S) -> dict | None:
        return self.last if self.last is not None and time.monotonic() - self.asked_at < max_age_s else None

    def saw_down(self, reason: str) -> None:
        self.down, self.checked_at = reason, time.monotonic()
        self.asked_at = 0.0  # what /api/status last heard is stale now: the next one asks again

    def saw_up(self) -> None:
        self.down = None


def queue_capacity(config: dict, watch: GatewayWatch) -> int:
    """chat.queue.slots, else the gateway's reported slots, else model_gateway.max_concurrency (same cluster file)."""
    return config["chat"]["queue"]["slots"] or watch.slots or config["model_gateway"]["max_concurrency"]


async def watch_gateway(runtime_of, interval_s: float = WATCH_EVERY_S) -> None:
    """Forever: ask the gateway whether it is ready and how many slots it has; size the line by it, and when the
    model is down end every wait in line at once (those messages get the fallbacks, nobody waits for a model
    that is down)."""
    while True:
        runtime = runtime_of()
        try:
            health = await runtime.client.health()
        except Exception as exc:  # never let the watch die
            log.warning("gateway watch: %s", exc)
            health = {"ready": False, "error": str(exc)}
        apply_health(runtime, health)
        await asyncio.sleep(interval_s)


def apply_health(runtime, health: dict) -> None:
    watch = runtime.watch
    watch.last, watch.asked_at = health, time.monotonic()
    if isinstance(health.get("slots"), int) and health["slots"] > 0:
        watch.slots = health["slots"]
    runtime.queue.capacity = queue_capacity(runtime.config, watch)
    if health.get("ready"):
        watch.saw_up()
        watch.missed = 0
    else:
        reason = health.get("error") or "model is not ready"
        watch.missed += 1
        if watch.missed < WATCH_MISSES_DOWN and runtime.client.answered_within(2 * WATCH_EVERY_S):
            return  # a probe too slow on a node that is streaming answers right now is load, not an outage
        watch.saw_down(reason)
        closed = runtime.queue.close_all(reason)
        if closed:
            log.warning("model down (%s): %d waiting message(s) sent to the fallbacks", reason, closed)


@dataclass
class Running:
    """The reply a conversation is producing now, for POST .../stop."""

    stop: asyncio.Event = field(default_factory=asyncio.Event)
    phase: str = "queued"  # queued | streaming


async def until_stopped(items: AsyncIterator, stop: asyncio.Event) -> AsyncIterator:
    """`items` until they end or `stop` is set; on stop the pending read is cancelled and the source closed
    (for a model stream: its connection, so the gateway cancels the generation upstream)."""
    iterator = items.__aiter__()
    stopper = asyncio.ensure_future(stop.wait())
    try:
        while True:
            step = asyncio.ensure_future(iterator.__anext__())
            done, _ = await asyncio.wait({step, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if step not in done:
                step.cancel()
                try:
                    await step
                except (asyncio.CancelledError, StopAsyncIteration):
                    pass
                return
            try:
                yield step.result()
            except StopAsyncIteration:
                return
    finally:
        stopper.cancel()
        close = getattr(iterator, "aclose", None)
        if close is not None:
            await close()


async def sleep_unless(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep, or return True early when stop is set."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
        return True
    except asyncio.TimeoutError:
        return False


async def reply_stream(runtime, running: dict, lock: asyncio.Lock, conv_id: str, user: dict, account: dict,
                       first: dict | None = None):
    """The reply to `user` (a stored user message): one conversation answers one message at a time (summaries
    must not race). `first`: extra fields of the opening `user` event (regenerate says what it removed)."""
    yield sse("user", {"message": user, **(first or {})})
    async with lock:
        run = Running()
        running[conv_id] = run
        try:
            async for event in _answer(runtime, run, conv_id, user, account):
                yield event
        finally:
            if running.get(conv_id) is run:
                del running[conv_id]


async def _answer(runtime, run: Running, conv_id: str, user: dict, account: dict):
    store, queue, watch = runtime.store, runtime.queue, runtime.watch
    max_wait = runtime.config["chat"]["queue"]["max_wait_s"]
    ticket = queue.join(str(account["id"]))
    reply: dict | None = None
    parts: list[str] = []
    finished = answered = False  # answered: a whole model reply, whose slot time the line's estimates may use
    request_id = None
    prompt = None
    trace = {"event": "model_request", "request_id": uuid.uuid4().hex, "via": "web", "user": account["name"],
             "conversation": conv_id, "outcome": "cancelled"}
    try:
        # ---- in line
        try:
            if not ticket.admitted and watch.down:
                raise LineClosed(watch.down, "down")
            shown, shown_at = None, 0.0
            while not ticket.admitted:
                if ticket.waited_s >= max_wait:
                    raise LineClosed(f"waited {max_wait:g} s for a model slot (chat.queue.max_wait_s)", "timeout")
                place = queue.place(ticket)
                if (place["ahead"], place["estimate_s"]) != shown or time.monotonic() - shown_at >= PLACE_EVERY_S - 0.1:
                    shown, shown_at = (place["ahead"], place["estimate_s"]), time.monotonic()
                    yield sse("queued", {**place, "reason": "busy",
                                         "detail": f"every model slot is busy ({queue.capacity})"})
                waiter = asyncio.ensure_future(queue.wait(ticket, min(PLACE_EVERY_S, max_wait - ticket.waited_s)))
                stopper = asyncio.ensure_future(run.stop.wait())
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
                if run.stop.is_set() and not ticket.admitted:
                    waiter.cancel()
                    raise LineClosed("cancelled by the person who sent it", "cancelled")
                waiter.result()  # raises LineClosed when the line was closed for it
        except LineClosed as closed:
            runtime.metrics.waited(ticket.waited_s, closed.kind)
            if closed.kind == "cancelled":
                store.update_message(user["id"], status="cancelled")
                finished = True
                yield sse("cancelled", {"user_message_id": user["id"], "reason": closed.reason})
                return
            reply = await fallback(runtime, conv_id, user, ModelUnavailable(closed.reason), None)
            finished = True
            yield sse("token", {"text": reply["content"]})
            yield sse("done", {"message": reply})
            return
        queue_wait = round(ticket.waited_s, 3)
        trace["queue_wait_s"] = queue_wait
        runtime.metrics.waited(queue_wait, "admitted")

        # ---- the prompt (the token count and a summary may need the model too)
        try:
            prompt = await runtime.keeper.build(conv_id)
        except ContextTooLong as exc:
            store.update_message(user["id"], status="rejected")
            reply = store.add_message(conv_id, "assistant", str(exc), status="error", source="none",
                                      meta={"error": "context_too_long"})
            finished = True
            yield sse("done", {"message": reply, "user_status": "rejected"})
            return
        except ModelUnavailable as exc:
            if exc.down:
                watch.saw_down(exc.reason)
            reply = await fallback(runtime, conv_id, user, exc, None)
            finished = True
            yield sse("token", {"text": reply["content"]})
            yield sse("done", {"message": reply})
            return
        if prompt.new_summary is not None:
            yield sse("summary", {"message": prompt.new_summary})
        request_id = store.record_request(conv_id, "reply", prompt.tokens, prompt.budget)
        reply = store.add_message(conv_id, "assistant", "", status="incomplete", source="model",
                                  meta={"prompt_tokens": prompt.tokens, "budget": prompt.budget,
                                        "queue_wait_s": queue_wait})
        store.finish_request(request_id, "streaming", message_id=reply["id"])
        run.phase = "streaming"
        yield sse("start", {"message": reply})

        # ---- the reply, waiting again while the gateway says it is busy and nothing has been streamed
        gateway = runtime.config["model_gateway"]
        usage, model, finish = None, None, None
        saved_at = time.monotonic()
        while True:
            sent = time.monotonic()
            try:
                stream = runtime.client.stream(prompt.messages, gateway["max_tokens"], gateway["temperature"],
                                               request_id=trace["request_id"], affinity=conv_id)
                async for chunk in until_stopped(stream, run.stop):
                    if chunk.usage:
                        usage = chunk.usage
                    model = chunk.model or model
                    finish = chunk.finish_reason or finish
                    if chunk.text:
                        trace.setdefault("first_token_s", round(time.monotonic() - sent, 3))
                        parts.append(chunk.text)
                        yield sse("token", {"text": chunk.text})
                        if time.monotonic() - saved_at > SAVE_PARTIAL_EVERY_S:
                            store.update_message(reply["id"], content="".join(parts))
                            saved_at = time.monotonic()
                watch.saw_up()
                break
            except ModelUnavailable as exc:
                left = max_wait - ticket.waited_s - (time.monotonic() - ticket.admitted_at)
                if exc.busy and not parts and left > 0:
                    pause = min(left, exc.retry_after or DEFAULT_RETRY_S)
                    yield sse("queued", {"position": 1, "ahead": 0, "estimate_s": round(pause, 1),
                                         "waited_s": round(ticket.waited_s, 1), "reason": "retrying",
                                         "detail": exc.reason})
                    if await sleep_unless(run.stop, pause):
                        break  # stopped while waiting: nothing was generated
                    continue
                if exc.down:
                    watch.saw_down(exc.reason)
                    queue.close_all(exc.reason)
                trace["outcome"] = f"unavailable: {exc.reason}"
                store.finish_request(request_id, f"unavailable: {exc.reason}")
                reply = await fallback(runtime, conv_id, user, exc, reply)
                finished = True
                yield sse("token", {"text": reply["content"]})
                yield sse("done", {"message": reply})
                return
            except StreamBroken as exc:
                trace["outcome"] = f"broken: {exc}"
                meta = dict(reply["meta"], error=f"reply cut short: {exc}",
                            **_details(trace, time.monotonic() - sent, model, None, usage, parts))
                reply = store.update_message(reply["id"], content="".join(parts), status="incomplete", meta=meta)
                store.finish_request(request_id, f"broken: {exc}")
                finished = True
                yield sse("done", {"message": reply})
                return
        stopped = run.stop.is_set()
        reported = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        completion = usage.get("completion_tokens") if isinstance(usage, dict) else None
        meta = dict(reply["meta"], **_details(trace, time.monotonic() - sent, model, "stopped" if stopped else finish,
                                              usage, parts))
        if reported is not None:
            meta["reported_prompt_tokens"] = reported
        reply = store.update_message(reply["id"], content="".join(parts),
                                     status="incomplete" if stopped else "complete", meta=meta)
        store.finish_request(request_id, "stopped" if stopped else "complete", reported)
        runtime.accounts.record_tokens(account, reported if reported is not None else prompt.tokens,
                                       completion if completion is not None else len(parts))
        trace.update(outcome="stopped" if stopped else "complete",
                     prompt_tokens=reported if reported is not None else prompt.tokens,
                     completion_tokens=completion if completion is not None else len(parts))
        finished = True
        answered = not stopped
        yield sse("done", {"message": reply})
    finally:
        queue.leave(ticket, measured=answered)
        if not finished and not ticket.admitted:  # the person left while waiting: the message was never sent
            store.update_message(user["id"], status="cancelled")
            runtime.metrics.waited(ticket.waited_s, "cancelled")
        if reply is not None and not finished:  # client went away or the task was cancelled mid-reply
            meta = dict(reply["meta"], error="reply cut short: the connection was closed")
            store.update_message(reply["id"], content="".join(parts), status="incomplete", meta=meta)
            runtime.accounts.record_tokens(account, prompt.tokens, len(parts))  # hanging up is not free
            if request_id is not None:
                store.finish_request(request_id, "cancelled")
        if request_id is not None:  # one line per model request, with the id the gateway logs too
            trace["duration_s"] = round(time.monotonic() - (ticket.admitted_at or ticket.joined), 3)
            request_log.info(json.dumps(trace, ensure_ascii=False))


def _details(trace: dict, duration_s: float, model: str | None, finish: str | None, usage: dict | None,
             parts: list[str]) -> dict:
    """What the reply's details show: model, finish reason, tokens, time to first token, speed after it."""
    completion = usage.get("completion_tokens") if isinstance(usage, dict) else None
    completion = completion if completion is not None else len(parts)
    details = {"model": model, "finish_reason": finish, "completion_tokens": completion,
               "duration_s": round(duration_s, 3)}
    if isinstance(usage, dict) and usage.get("prompt_tokens") is not None:
        details["prompt_tokens"] = usage["prompt_tokens"]
    first = trace.get("first_token_s")
    if first is not None:
        details["first_token_s"] = first
        if completion > 1 and duration_s > first:
            details["tokens_per_s"] = round((completion - 1) / (duration_s - first), 2)
    return {k: v for k, v in details.items() if v is not None}


async def fallback(runtime, conv_id: str, user: dict, exc: ModelUnavailable, reply: dict | None) -> dict:
    """Answer from the fallbacks (or say clearly that nothing could), into `reply` or a new message."""
    store = runtime.store
    reason = exc.reason
    if exc.status is not None and exc.status < 500 and not exc.busy:
        content, source, status, meta = f"The model refused the request: {reason}", "none", "error", {"model_error": reason}
    else:
        log.warning("conversation %s: model unavailable (%s); trying fallbacks %s",
                    conv_id, reason, runtime.fallbacks.strategies)
        outcome = await runtime.fallbacks.answer(user["content"])
        meta = {"model_error": reason, "fallbacks_tried": outcome.tried}
        if outcome.answer is not None:
            content, source, status = outcome.answer.text, outcome.answer.source, "complete"
            meta["citations"] = outcome.answer.citations
        else:
            tried = "; ".join(outcome.tried)
            content = f"The model is unavailable ({reason}) and no fallback could answer ({tried})."
            source, status = "none", "error"
    if reply is None:
        return store.add_message(conv_id, "assistant", content, status=status, source=source, meta=meta)
    return store.update_message(reply["id"], content=content, status=status, source=source,
                                meta=dict(reply["meta"], **meta))
