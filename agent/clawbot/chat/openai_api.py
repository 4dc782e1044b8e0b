"""The OpenAI-compatible API of the chat node, for apps: /v1/models, /v1/chat/completions, /v1/completions.

An app authenticates with a per-user API key (`Authorization: Bearer cb-…`) and trusts the cluster CA; the chat
node checks the user's limits, then forwards the request to the model gateway over mutual TLS with its own client
certificate (apps never hold a cluster certificate). Requests are checked with the gateway's own request models,
so both refuse the same things. Tokens are counted from the usage the model server reports: streams ask for
it upstream (`stream_options.include_usage`), and the usage-only chunk is passed on only if the app asked for it.
Errors have OpenAI's shape, `{"error": {"message", "type", "code"}}`, so official clients raise the right class.
"""

from __future__ import annotations

import json
import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from clawbot.chat.access import Caller, runtime
from clawbot.chat.accounts import LimitReached, Principal
from clawbot.common.modelclient import ModelUnavailable
from clawbot.model.gateway import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("clawbot.chat.openai")


def openai_error(status: int, message: str, type_: str, code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "code": code, "param": None}},
                        status_code=status, headers=headers)


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 422: "invalid_request_error", 429: "rate_limit_exceeded"}


def routes() -> APIRouter:
    router = APIRouter(tags=["openai"])

    @router.get("/v1/models")
    async def models(request: Request, principal: Caller) -> Response:
        return await _forward_plain(request, "GET", "/v1/models", None, None)

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request, principal: Caller) -> Response:
        return await _complete(request, principal, "/v1/chat/completions", body)

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, principal: Caller) -> Response:
        return await _complete(request, principal, "/v1/completions", body)

    return router


async def _complete(request: Request, principal: Principal, path: str, body) -> Response:
    rt = runtime(request)
    try:
        rt.accounts.admit(principal.user)
    except LimitReached as exc:
        rt.metrics.limited(principal.user["name"], exc.limit)
        return openai_error(429, str(exc), "rate_limit_exceeded", "user_limit",
                            headers={"Retry-After": str(exc.retry_after_s)})
    payload = body.model_dump(exclude_none=True)
    if not body.stream:
        return await _forward_plain(request, "POST", path, payload, principal)
    wants_usage = bool(body.stream_options and body.stream_options.include_usage)
    payload["stream_options"] = {"include_usage": True}
    try:
        upstream = await rt.client.forward("POST", path, payload, stream=True, timeout_s=_timeout(rt))
    except ModelUnavailable as exc:
        return openai_error(503, f"the model is unavailable: {exc.reason}", "server_error", "model_unavailable")
    if upstream.status_code != 200:
        await upstream.aread()
        await upstream.aclose()
        return _passthrough(upstream)

    async def relay():
        usage, chunks = None, 0
        try:
            async for line in upstream.aiter_lines():
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
        finally:
            await upstream.aclose()
            # an app that hangs up before the usage chunk still pays for what it received (about a token a chunk)
            _record(rt, principal, usage or {"prompt_tokens": 0, "completion_tokens": chunks})

    return StreamingResponse(relay(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _forward_plain(request: Request, method: str, path: str, payload: dict | None,
                         principal: Principal | None) -> Response:
    rt = runtime(request)
    try:
        upstream = await rt.client.forward(method, path, payload, timeout_s=_timeout(rt))
    except ModelUnavailable as exc:
        return openai_error(503, f"the model is unavailable: {exc.reason}", "server_error", "model_unavailable")
    if principal is not None and upstream.status_code == 200:
        try:
            _record(rt, principal, upstream.json().get("usage"))
        except ValueError:
            pass
    return _passthrough(upstream)


def _timeout(rt) -> float:
    """Apps wait as long as the gateway lets a request run (model_gateway.request_timeout_s), not the web UI's
    shorter chat.request_timeout_s, after which the UI falls back."""
    return rt.config["model_gateway"]["request_timeout_s"] + 5


def _passthrough(upstream) -> Response:
    headers = {k: v for k, v in upstream.headers.items() if k.lower() in ("retry-after", "content-type")}
    return Response(upstream.content, status_code=upstream.status_code, headers=headers)


def _record(rt, principal: Principal, usage: dict | None) -> None:
    if isinstance(usage, dict):
        prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        rt.accounts.record_tokens(principal.user, prompt, completion)
    rt.metrics.request(principal.user["name"], "api")
