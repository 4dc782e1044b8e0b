"""The chat node's client for the model node's gateway: mutual TLS, token counting, streamed chat.

Every call presents this node's client certificate and trusts only the cluster CA. Failures that
should send a question to the fallbacks (unreachable, 429, 5xx, timeout before the first token) are
raised as `ModelUnavailable` with a reason a person can read; everything else is a bug and raised as is.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import AsyncIterator

import httpx

from clawbot.common import pki

log = logging.getLogger("clawbot.chat.service.model")


async def sse_events(response: httpx.Response) -> AsyncIterator[dict]:
    """The JSON events of an OpenAI-style server-sent-event stream. After `data: [DONE]` the body is still
    read to its end, not abandoned: an abandoned body closes the keep-alive connection, and the next request
    would pay a new (mutual) TLS handshake. Used by the chat node and by `clawbot bench`."""
    done = False
    async for line in response.aiter_lines():
        if done or not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            done = True
            continue
        yield json.loads(payload)


BUSY_CODES = frozenset({"rate_limited", "queue_full", "queue_timeout"})  # the gateway's admission refusals


class ModelUnavailable(Exception):
    """The gateway could not serve the request; `reason` says why (shown to the user, logged).

    `busy`: the gateway is up and refused for load (its admission's 429, or 503 queue_timeout), so waiting
    `retry_after` seconds and trying again is the answer, not a fallback."""

    def __init__(self, reason: str, status: int | None = None, code: str | None = None,
                 retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.code = code
        self.retry_after = retry_after

    @property
    def busy(self) -> bool:
        return self.status == 429 or (self.status == 503 and self.code in BUSY_CODES)

    @property
    def down(self) -> bool:
        """The gateway cannot answer anyone now (unreachable, not ready, failing), as opposed to: busy, or this
        one request was refused."""
        return not self.busy and (self.status is None or self.status >= 500)


def refusal(response: httpx.Response) -> ModelUnavailable:
    """The ModelUnavailable for a gateway answer that is not 200 (the body must have been read)."""
    code = _error_code(response)
    retry = response.headers.get("retry-after")
    try:
        retry_after = float(retry) if retry is not None else None
    except ValueError:
        retry_after = None
    if response.status_code == 429 or code in BUSY_CODES:
        why = _error_text(response)
        reason = f"gateway is busy ({response.status_code} {code or ''}{', retry after ' + retry + ' s' if retry else ''}: {why})"
    elif response.status_code >= 500:
        reason = f"gateway answered {response.status_code}: {_error_text(response)}"
    else:
        reason = f"gateway refused the request ({response.status_code}: {_error_text(response)})"
    return ModelUnavailable(reason, response.status_code, code, retry_after)


class StreamBroken(Exception):
    """The reply stream broke after tokens had arrived (the partial reply is kept, marked incomplete)."""


@dataclass
class Chunk:
    text: str = ""
    finish_reason: str | None = None
    usage: dict | None = None
    model: str | None = None


def _describe(exc: Exception) -> str:
    if isinstance(exc, httpx.ConnectTimeout):
        return "gateway did not accept the connection in time"
    if isinstance(exc, httpx.TimeoutException):
        return "gateway timed out"
    if isinstance(exc, httpx.ConnectError):
        text = str(exc) or type(exc).__name__
        if "CERTIFICATE" in text.upper() or "SSL" in text.upper():
            return f"TLS handshake with the gateway failed ({text})"
        return f"gateway unreachable ({text})"
    return f"gateway request failed ({type(exc).__name__}: {exc})"


class ModelClient:
    def __init__(self, endpoint: str, tls: dict, timeout_s: float, model: str | None = None):
        self.endpoint = endpoint.rstrip("/")
        self.timeout_s = timeout_s
        self.model = model
        context = pki.client_ssl_context(tls["client_cert"], tls["client_key"], tls["ca_cert"])
        # keep the mTLS connection across messages (a handshake per message costs milliseconds of first-token
        # time), but drop it well before the gateway does (GATEWAY_KEEP_ALIVE_S): reusing a connection the
        # server is closing fails the request
        self._http = httpx.AsyncClient(
            base_url=self.endpoint, verify=context,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=30.0))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, *, timeout: float | None = None, **kwargs) -> httpx.Response:
        try:
            response = await self._http.request(method, path, timeout=timeout or httpx.USE_CLIENT_DEFAULT, **kwargs)
        except httpx.HTTPError as exc:
            raise ModelUnavailable(_describe(exc)) from exc
        if response.status_code == 429 or response.status_code >= 500:
            raise refusal(response)
        return response

    async def forward(self, method: str, path: str, body: dict | None = None, stream: bool = False,
                      timeout_s: float | None = None, request_id: str | None = None) -> httpx.Response:
        """A request passed through as it is (the chat node's OpenAI API): any status comes back to the caller;
        ModelUnavailable only when the gateway cannot be reached. With stream=True the caller closes the response.
        timeout_s: the longest wait for the gateway (an app's long completion may take the gateway's own limit)."""
        timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)) if timeout_s else httpx.USE_CLIENT_DEFAULT
        request = self._http.build_request(method, path, json=body, timeout=timeout,
                                           headers={"X-Request-Id": request_id} if request_id else None)
        try:
            return await self._http.send(request, stream=stream)
        except httpx.HTTPError as exc:
            raise ModelUnavailable(_describe(exc)) from exc

    async def count_tokens(self, messages: list[dict]) -> int:
        """Tokens of the chat-templated prompt, counted by the model's own tokenizer on the model node."""
        response = await self._request("POST", "/v1/tokenize", json={"messages": messages})
        if response.status_code != 200:
            raise refusal(response)
        return int(response.json()["count"])

    async def complete(self, messages: list[dict], max_tokens: int, temperature: float) -> tuple[str, dict | None]:
        """A whole (non-streamed) completion: text and usage. Used for summaries."""
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": temperature, "stream": False}
        if self.model:
            body["model"] = self.model
        response = await self._request("POST", "/v1/chat/completions", json=body)
        if response.status_code != 200:
            raise refusal(response)
        data = response.json()
        return data["choices"][0]["message"].get("content") or "", data.get("usage")

    async def stream(self, messages: list[dict], max_tokens: int, temperature: float,
                     request_id: str | None = None) -> AsyncIterator[Chunk]:
        """Stream a chat completion. ModelUnavailable before the first chunk; StreamBroken after it. request_id goes
        to the gateway as X-Request-Id, so its log line and the chat node's carry the same id."""
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": temperature, "stream": True,
                "stream_options": {"include_usage": True}}
        if self.model:
            body["model"] = self.model
        started = False
        try:
            async with self._http.stream("POST", "/v1/chat/completions", json=body,
                                         headers={"X-Request-Id": request_id} if request_id else None) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise refusal(response)
                async for event in sse_events(response):
                    if "error" in event:
                        raise StreamBroken(f"model error: {event['error']}")
                    started = True
                    choices = event.get("choices") or []
                    chunk = Chunk(usage=event.get("usage"), model=event.get("model"))
                    if choices:
                        chunk.text = (choices[0].get("delta") or {}).get("content") or ""
                        chunk.finish_reason = choices[0].get("finish_reason")
                    yield chunk
        except httpx.HTTPError as exc:
            if started:
                raise StreamBroken(_describe(exc)) from exc
            raise ModelUnavailable(_describe(exc)) from exc
        except ValueError as exc:  # an event cut in half (the model node died mid-line): the stream is broken
            if started:
                raise StreamBroken(f"the gateway's stream ended inside an event ({exc})") from exc
            raise ModelUnavailable(f"the gateway's stream ended inside an event ({exc})") from exc

    async def health(self, timeout_s: float = 3.0) -> dict:
        """The gateway as the status strip shows it: reachable, ready, and its own /status if it answers (with
        `model_card`: what the model is, whether a base model; see chattemplate.model_card)."""
        result: dict = {"endpoint": self.endpoint, "reachable": False, "ready": False}
        try:
            ready = await self._http.get("/readyz", timeout=timeout_s)
            result.update(reachable=True, ready=ready.status_code == 200, readyz_status=ready.status_code)
            try:
                status = await self._http.get("/status", timeout=timeout_s)
                if status.status_code == 200:
                    data = status.json()
                    if isinstance(data, dict):  # the model agent nests the model server's state under "model"
                        model = data.get("model") if isinstance(data.get("model"), dict) else {}
                        result["state"] = data.get("state") or model.get("state")
                        limits = data.get("gateway") if isinstance(data.get("gateway"), dict) else {}
                        if isinstance(limits.get("max_concurrency"), int):
                            result["slots"] = limits["max_concurrency"]  # the chat node's line sizes itself by it
                        if model.get("reason"):
                            result["reason"] = model["reason"]
                        if isinstance(model.get("card"), dict):  # what the model is (base model or not), for the chip
                            result["model_card"] = model["card"]
            except (httpx.HTTPError, ValueError):
                pass
            if not result["ready"]:
                result["error"] = f"gateway is up but not ready ({result.get('state') or ready.status_code})"
        except httpx.HTTPError as exc:
            result["error"] = _describe(exc)
        return result


def _error_code(response: httpx.Response) -> str | None:
    try:
        data = response.json()
    except ValueError:
        return None
    error = data.get("error") if isinstance(data, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


def _error_text(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(data, dict):
        error = data.get("error") or data.get("detail") or data
        if isinstance(error, dict):
            error = error.get("message") or error
        return str(error)[:300]
    return str(data)[:300]
