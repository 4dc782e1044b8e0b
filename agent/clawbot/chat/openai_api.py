"""The OpenAI-compatible API of the chat node, for apps: /v1/models, /v1/chat/completions, /v1/completions.

An app authenticates with a per-user API key (`Authorization: Bearer cb-…`) and trusts the cluster CA; the chat
node checks the user's limits, waits for the user's turn in the fair line (clawbot.chat.queueing: the same line
as the web chat, so one app's loop cannot starve people; past chat.queue.max_wait_s it answers 429 with
Retry-After), then forwards the request to the model gateway over mutual TLS with its own client
certificate (apps never hold a cluster certificate). Requests are checked with the gateway's own request models,
so both refuse the same things. Tokens are counted from the usage the model server reports: streams ask for
it upstream (`stream_options.include_usage`), and the usage-only chunk is passed on only if the app asked for it.
Errors have OpenAI's shape, `{"error": {"message", "type", "code"}}`, so official clients raise the right class.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from clawbot.chat.access import Caller, runtime
from clawbot.chat.accounts import LimitReached, Principal
from clawbot.chat.queueing import LineClosed, Ticket
from clawbot.chat.replies import DEFAULT_RETRY_S
from clawbot.common.modelclient import ModelUnavailable, StreamBroken, refusal
from clawbot.model.gateway import REQUEST_ID, ChatCompletionRequest, CompletionRequest

log = logging.getLogger("clawbot.chat.openai")
request_log = logging.getLogger("clawbot.chat.requests")


def openai_error(status: int, message: str, type_: str, code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "code": code, "param": None}},
                        status_code=status, headers=headers)


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 422: "invalid_request_error", 429: "rate_limit_exceeded"}


def routes() -> APIRouter:
    router = APIRouter(tags=["openai"])

    @router.get("/v1/models")
    async def models(request: Request, principal: Caller) -> Response:
        """The model the model nodes serve (OpenAI's shape)."""
        return await _forward_plain(request, "GET", "/v1/models", None, None)

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request, principal: Caller) -> Response:
        """OpenAI chat completion for apps, streamed or not; waits for the user's turn in the line, then goes to a model node."""
        return await _complete(request, principal, "/v1/chat/completions", body)

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, principal: Caller) -> Response:
        """OpenAI text completion for apps, streamed or not; as chat completions."""
        return await _complete(request, principal, "/v1/completions", body)

    return router


def request_id_of(request: Request) -> str:
    """The app's own X-Request-Id when it is a plain token (so its logs, ours and the gateway's line up), else new."""
    given = request.headers.get("x-request-id", "")
    return given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def _log(principal: Principal, request_id: str, path: str, status: int, started: float, usage: dict | None) -> None:
    """One journal line per model request of an app, with the id the gateway logs for it too."""
    line = {"event": "model_request", "request_id": request_id, "via": "api", "user": principal.user["name"],
            "key": f"cb-{principal.key['prefix']}" if principal.key else None, "path": path, "status": status,
            "duration_s": round(time.monotonic() - started, 3)}
    if isinstance(usage, dict):
        line.update(prompt_tokens=usage.get("prompt_tokens"), completion_tokens=usage.get("completion_tokens"))
    request_log.info(json.dumps(line))


async def _complete(request: Request, principal: Principal, path: str, body) -> Response:
    rt = runtime(request)
    try:
        rt.accounts.admit(principal.user)
    except LimitReached as exc:
        rt.metrics.limited(principal.user["name"], exc.limit)
        return openai_error(429, str(exc), "rate_limit_exceeded", "user_limit",
                            headers={"Retry-After": str(exc.retry_after_s)})
    payload = body.model_dump(exclude_none=True)
    request_id, started = request_id_of(request), time.monotonic()
    try:
        ticket = await _wait_turn(rt, principal)
    except LineClosed as closed:
        _log(principal, request_id, path, 503 if closed.kind == "down" else 429, started, None)
        if closed.kind == "down":
            return openai_error(503, f"the model is unavailable: {closed.reason}", "server_error", "model_unavailable",
                                headers={"X-Request-Id": request_id})
        retry = rt.queue.service_s or DEFAULT_RETRY_S
        return openai_error(429, f"the model is busy: {closed.reason}", "rate_limit_exceeded", "queue_timeout",
                            headers={"Retry-After": str(max(1, round(retry))), "X-Request-Id": request_id})
    holding = True
    try:
        if not body.stream:
            return await _forward_plain(request, "POST", path, payload, principal, request_id, started, ticket)
        wants_usage = bool(body.stream_options and body.stream_options.include_usage)
        payload["stream_options"] = {"include_usage": True}
        try:
            upstream, node = await _forward_in_turn(rt, ticket, path, payload, True, request_id)
        except ModelUnavailable as exc:
            _log(principal, request_id, path, 503, started, None)
            return openai_error(503, f"the model is unavailable: {exc.reason}", "server_error", "model_unavailable",
                                headers={"X-Request-Id": request_id})
        if upstream.status_code != 200:
            await upstream.aread()
            await upstream.aclose()
            _release(rt, node, upstream)
            _log(principal, request_id, path, upstream.status_code, started, None)
            return _passthrough(upstream, request_id)
        holding = False  # the relay holds the turn now, to its last chunk
    finally:
        if holding:
            rt.queue.leave(ticket)

    async def relay():
        usage, chunks, broken = None, 0, ""
        try:
            async for line in _lines(upstream):
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data != "[DONE]":
                    try:
                        event = json.loads(data)
                    except ValueError:
                        event = {}
                    if isinstance(event, dict) and event.get("choices"):
                        chunks += 1
                    if isinstance(event, dict) and event.get("usage"):
                        usage = event["usage"]
                        if not wants_usage and not event.get("choices"):
                            continue
                        if not wants_usage:
                            event.pop("usage")
                            data = json.dumps(event, ensure_ascii=False)
                yield f"data: {data}\n\n".encode()
        except StreamBroken as exc:  # the model node went away mid-answer: say so, never start it again elsewhere
            broken = str(exc)
            yield ("data: " + json.dumps({"error": {"message": f"reply cut short: {exc}", "type": "server_error",
                                                     "code": "stream_broken"}}) + "\n\n").encode()
        finally:
            await upstream.aclose()
            rt.client.done(node, not broken, broken)
            rt.queue.leave(ticket)
            # an app that hangs up before the usage chunk still pays for what it received (about a token a chunk)
            usage = usage or {"prompt_tokens": 0, "completion_tokens": chunks}
            _record(rt, principal, usage)
            _log(principal, request_id, path, 200, started, usage)

    return StreamingResponse(relay(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Request-Id": request_id})


async def _wait_turn(rt, principal: Principal) -> Ticket:
    """The app's turn in the fair line (its user's line), within chat.queue.max_wait_s. Raises LineClosed."""
    queue, max_wait = rt.queue, rt.config["chat"]["queue"]["max_wait_s"]
    ticket = queue.join(str(principal.user["id"]))
    try:
        if not ticket.admitted and rt.watch.down:
            raise LineClosed(rt.watch.down, "down")
        while not ticket.admitted:
            left = max_wait - ticket.waited_s
            if left <= 0:
                raise LineClosed(f"waited {max_wait:g} s for a model slot (chat.queue.max_wait_s)", "timeout")
            await queue.wait(ticket, left)
    except LineClosed as closed:
        queue.leave(ticket)
        rt.metrics.waited(ticket.waited_s, closed.kind)
        raise
    except BaseException:  # the app hung up while waiting
        queue.leave(ticket)
        rt.metrics.waited(ticket.waited_s, "cancelled")
        raise
    rt.metrics.waited(ticket.waited_s, "admitted")
    return ticket


async def _lines(response):
    """The upstream's SSE lines; a connection lost mid-stream is StreamBroken."""
    try:
        async for line in response.aiter_lines():
            yield line
    except httpx.HTTPError as exc:
        raise StreamBroken(f"{type(exc).__name__}: {exc}") from exc


def _release(rt, node, response) -> None:
    """The model node answered this response (read to its end): a failing 5xx counts against it."""
    if response.status_code < 500:
        rt.client.done(node, True)
        return
    refused = refusal(response)
    rt.client.done(node, False, "" if refused.busy else refused.reason)


async def _forward_in_turn(rt, ticket: Ticket, path: str, payload: dict, stream: bool, request_id: str):
    """Forward while holding a turn (to the model node the pool picks); a gateway that answers busy is waited for
    as it asks (Retry-After) until the turn's max_wait_s is spent, then its refusal goes to the app as it is."""
    max_wait = rt.config["chat"]["queue"]["max_wait_s"]
    while True:
        try:
            upstream, node = await rt.client.forward("POST", path, payload, stream=stream, timeout_s=_timeout(rt),
                                                     request_id=request_id)
        except ModelUnavailable as exc:
            if exc.down:
                rt.watch.saw_down(exc.reason)
            raise
        if upstream.status_code in (429, 503):
            await upstream.aread()
            refused = refusal(upstream)
            left = max_wait - (time.monotonic() - ticket.joined)
            if refused.busy and left > 0:
                await upstream.aclose()
                rt.client.done(node, False)
                await asyncio.sleep(min(left, refused.retry_after or DEFAULT_RETRY_S))
                continue
        return upstream, node


async def _forward_plain(request: Request, method: str, path: str, payload: dict | None,
                         principal: Principal | None, request_id: str | None = None, started: float = 0.0,
                         ticket: Ticket | None = None) -> Response:
    rt = runtime(request)
    request_id = request_id or request_id_of(request)
    try:
        if ticket is not None:
            upstream, node = await _forward_in_turn(rt, ticket, path, payload, False, request_id)
        else:
            upstream, node = await rt.client.forward(method, path, payload, timeout_s=_timeout(rt),
                                                     request_id=request_id)
    except ModelUnavailable as exc:
        if principal is not None:
            _log(principal, request_id, path, 503, started, None)
        return openai_error(503, f"the model is unavailable: {exc.reason}", "server_error", "model_unavailable",
                            headers={"X-Request-Id": request_id})
    _release(rt, node, upstream)
    if principal is not None:
        usage = None
        if upstream.status_code == 200:
            try:
                usage = upstream.json().get("usage")
            except ValueError:
                pass
            _record(rt, principal, usage)
        _log(principal, request_id, path, upstream.status_code, started, usage)
    return _passthrough(upstream, request_id)


def _timeout(rt) -> float:
    """Apps wait as long as the gateway lets a request run (model_gateway.request_timeout_s), not the web UI's
    shorter chat.request_timeout_s, after which the UI falls back."""
    return rt.config["model_gateway"]["request_timeout_s"] + 5


def _passthrough(upstream, request_id: str) -> Response:
    headers = {k: v for k, v in upstream.headers.items() if k.lower() in ("retry-after", "content-type")}
    headers["X-Request-Id"] = request_id
    return Response(upstream.content, status_code=upstream.status_code, headers=headers)


def _record(rt, principal: Principal, usage: dict | None) -> None:
    if isinstance(usage, dict):
        prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        rt.accounts.record_tokens(principal.user, prompt, completion)
    rt.metrics.request(principal.user["name"], "api")
