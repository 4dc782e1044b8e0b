"""The model node's gateway: OpenAI-compatible API over mutual TLS in front of the loopback model server.

Why a gateway and not llama-server exposed directly: llama-server has no mTLS, no per-client
authorisation, no bounded queue with Retry-After and lets bad input reach C++ (where a malformed body
can turn into a 500). The gateway checks every request against pydantic models first (4xx with a clear
message, never 5xx), admits it through the token bucket / concurrency / queue (429 with Retry-After),
streams the answer through chunk by chunk, and cancels generation upstream when the client goes away.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import json
import logging
import os
import re
import secrets
import shutil
import struct
import time
from typing import Annotated, Literal, Union

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from clawbot.common import chattemplate, pki
from clawbot.model.admission import Admission, Rejected
from clawbot.model.engines import Refused
from clawbot.common.mtls import peer_cert_der

log = logging.getLogger("clawbot.model.gateway")
# One JSON line per API request (AuthorizeAndCount writes it, the handlers fill in what they learn), for the journal.
request_log = logging.getLogger("clawbot.model.requests")
# A caller's X-Request-Id is kept (the chat node can tie its own log line to the gateway's); anything else is replaced.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
LOGGED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})  # not /v1/tokenize: the chat node counts often

# Only these paths reach the app; everything llama-server has besides (/slots, /props, ...) stays private.
UPSTREAM_TIMEOUT = httpx.Timeout(connect=5.0, read=None, write=30.0, pool=30.0)
INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------- request models


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, Annotated[list[TextPart], Field(min_length=1)]]
    name: Annotated[str, Field(max_length=256)] | None = None

    def upstream(self) -> dict:
        """The plain shape every engine's chat template understands: text parts joined into one string,
        `developer` sent as `system` (llama_cpp.server's templates know neither list content nor
        `developer`, and raise a 500 on them)."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(_Strict):
    include_usage: bool = False


Stop = Union[Annotated[str, Field(max_length=512)], Annotated[list[Annotated[str, Field(max_length=512)]], Field(max_length=4)]]


class _Sampling(_Strict):
    """Sampling fields both endpoints share. Unknown fields are refused (an allowlist, so nothing the
    gateway did not check reaches llama.cpp)."""

    model: Annotated[str, Field(max_length=256)] | None = None
    max_tokens: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0, le=100000)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    repeat_penalty: Annotated[float, Field(ge=0, le=10)] | None = None
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] | None = None
    stop: Stop | None = None
    n: Literal[1] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    ignore_eos: bool | None = None


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=10000)]
    max_completion_tokens: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None


class CompletionRequest(_Sampling):
    prompt: Annotated[str, Field(min_length=1)]


class TokenizeRequest(_Strict):
    """Either `content` (plain text) or `messages` (rendered with the model's chat template first)."""

    content: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=10000)] | None = None
    add_special: bool | None = None
    add_generation_prompt: bool = True


class TokenizeResponse(BaseModel):
    count: int
    tokens: list[int]


# --------------------------------------------------------------------------- errors


class GatewayError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "code": code, "param": param}}


def _error_response(exc: GatewayError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.type, exc.code, exc.param), status_code=exc.status,
                        headers=exc.headers)


def _check_utf8(payload: dict) -> None:
    """Lone surrogates (legal in JSON escapes, not in UTF-8) would make llama.cpp's parser throw (500)."""
    try:
        json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise GatewayError(400, "request contains text that is not valid Unicode (a lone surrogate escape)",
                           code="invalid_unicode") from None


# --------------------------------------------------------------------------- metrics


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("clawbot_gateway_requests", "Requests answered, by path and HTTP status",
                                ["path", "status"], registry=r)
        self.rejections = Counter("clawbot_gateway_rejections", "Requests refused before reaching the model",
                                  ["reason"], registry=r)
        self.queue_depth = Gauge("clawbot_gateway_queue_depth", "Requests waiting for a slot", registry=r)
        self.in_flight = Gauge("clawbot_gateway_in_flight", "Requests admitted and being generated", registry=r)
        self.queue_wait = Histogram("clawbot_gateway_queue_wait_seconds", "Time spent in the queue", registry=r,
                                    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.first_token = Histogram("clawbot_gateway_first_token_seconds",
                                     "Admission to first generated token (streaming)", registry=r,
                                     buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.tokens_per_second = Histogram("clawbot_gateway_tokens_per_second",
                                           "Output tokens per second of generation, per request", registry=r,
                                           buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000))
        self.inter_token = Histogram("clawbot_gateway_inter_token_seconds",
                                     "Time between two generated tokens of a stream, as the gateway relays them",
                                     registry=r, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                                                          2.5))
        self.output_tokens = Counter("clawbot_gateway_output_tokens", "Tokens generated", registry=r)
        self.model_state = Enum("clawbot_model_state", "State of the supervised model server", registry=r,
                                states=["stopped", "loading", "ready", "restarting", "failed"])


class NodeCollector:
    """What /status knows, as metrics read at scrape time (so never stale), for alerting: restarts, limits,
    certificate lifetimes, room on the model's disk, whether huge pages really back the weights, memory.

    Every value comes from Gateway.status() (the supervisor's snapshot, the certificate watcher): /status and
    /metrics cannot disagree."""

    def __init__(self, gateway: "Gateway", sensors=None):
        self.gateway = gateway
        self._sensors = sensors  # clawbot.model.power.Sensors, opened at the first scrape
        self._energy = None  # its EnergyMeter: monotonic joules from counters that wrap (RAPL)

    def describe(self):
        return []  # collected only at scrape time: nothing to check for clashes at registration

    def _power(self):
        """This node's power and energy sensors (clawbot.model.power): none here, then no series but the count 0."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from clawbot.model import power

        if self._sensors is None:
            self._sensors = power.Sensors()
        if self._energy is None:
            self._energy = power.EnergyMeter()
        try:
            readings = self._sensors.read()
        except Exception:  # a sensor must never break /metrics
            log.exception("reading the power sensors failed")
            readings = []
        totals = self._energy.update(readings)
        labels = ["sensor", "kind", "label"]
        watts = GaugeMetricFamily("clawbot_node_power_watts", "Power a sensor of this node reports now (NVIDIA GPU "
                                  "power draw, hwmon power); absent when no sensor reports power", labels=labels)
        joules = CounterMetricFamily("clawbot_node_energy_joules", "Energy a sensor's counter measured since the "
                                     "agent first read it (NVIDIA total energy, RAPL energy_uj with its wrap-around, "
                                     "hwmon energy); absent when no sensor has a counter", labels=labels + ["counted"])
        for r in readings:
            if r.power_w is not None:
                watts.add_metric([r.sensor, r.kind, r.label], r.power_w)
            if r.sensor in totals:
                joules.add_metric([r.sensor, r.kind, r.label, "true" if r.counted else "false"], totals[r.sensor])
        yield watts
        yield joules
        family = GaugeMetricFamily("clawbot_node_power_sensors", "Power and energy sensors this agent can read (0: "
                                   "power and energy not available on this node)")
        family.add_metric([], len(readings))
        yield family

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        status = self.gateway.status()
        model, limits = status["model"], status["gateway"]

        def gauge(name: str, doc: str, value):
            family = GaugeMetricFamily(name, doc)
            if value is not None:
                family.add_metric([], float(value))
            return family

        yield CounterMetricFamily("clawbot_model_server_restarts", "Times the model server exited or failed to start "
                                  "and the agent started it again (since the agent started)", value=model["restarts"])
        yield gauge("clawbot_gateway_max_concurrency", "Requests the gateway passes to the model server at once",
                    limits["max_concurrency"])
        yield gauge("clawbot_gateway_queue_capacity", "Requests that may wait for a slot (model_gateway.queue_length)",
                    limits["queue_length"])
        yield gauge("clawbot_gateway_service_seconds", "Median time a request holds a slot over the last 64 (what "
                    "Retry-After is computed from; 5 until one was measured)", limits["service_s"])
        expiry = GaugeMetricFamily("clawbot_certificate_expiry_timestamp_seconds",
                                   "Unix time a certificate of this node stops being valid", labels=["certificate"])
        issued = GaugeMetricFamily("clawbot_certificate_not_before_timestamp_seconds",
                                   "Unix time a certificate of this node became valid", labels=["certificate"])
        for label, summary in (("server", status["tls"].get("server_cert")), ("ca", status["tls"].get("ca_cert"))):
            if summary and "not_after" in summary:
                expiry.add_metric([label], _timestamp(summary["not_after"]))
                issued.add_metric([label], _timestamp(summary["not_before"]))
        yield expiry
        yield issued
        disk = _disk(model["model_path"])
        yield gauge("clawbot_model_disk_free_bytes", "Free bytes (for the agent's user) on the filesystem that holds "
                    "model_server.model_path, where deploy stages the model", disk and disk.free)
        yield gauge("clawbot_model_disk_size_bytes", "Size of the filesystem that holds model_server.model_path",
                    disk and disk.total)
        yield gauge("clawbot_model_file_bytes", "Size of the model file at model_server.model_path",
                    _size(model["model_path"]))
        pages, memory = model["hugepages"], model["memory"] or {}
        yield gauge("clawbot_model_hugepages_wanted", "1 when the run plan stages the weights into huge pages "
                    "(model_server.hugepages)", int(bool(pages.get("wanted"))))
        backed = pages.get("hugepages_effective")
        yield gauge("clawbot_model_hugepages_backed", "1 when the running model server's mapping of the weights sits in "
                    "huge pages (/proc/PID/smaps), 0 when not; absent while no model server runs",
                    None if backed is None else int(bool(backed)))
        rss = memory.get("vm_rss_kib")
        yield gauge("clawbot_model_server_resident_bytes", "Resident memory of the model server (VmRSS; huge pages "
                    "are not in it)", None if rss is None else rss * 1024)
        huge = memory.get("model_hugetlb_rss_kib")
        yield gauge("clawbot_model_weights_hugetlb_bytes", "Bytes of the weights' mapping held in huge pages",
                    None if huge is None else huge * 1024)
        yield from self._power()


def _timestamp(iso: str) -> float:
    return dt.datetime.fromisoformat(iso).timestamp()


def _disk(path: str):
    try:
        return shutil.disk_usage(os.path.dirname(path) or ".")
    except OSError:
        return None


def _size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


# --------------------------------------------------------------------------- SSE observation


class StreamObserver:
    """Counts content tokens in an SSE stream as it passes (one llama-server event = one token)."""

    def __init__(self):
        self._buffer = b""
        self.tokens = 0
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.gaps: list[float] = []  # seconds between consecutive tokens (observed after the stream, off its path)
        self.usage_tokens: int | None = None

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk.replace(b"\r\n", b"\n")  # sse-starlette (llama_cpp.server) ends lines with CRLF
        while b"\n\n" in self._buffer:
            event, self._buffer = self._buffer.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if not data or data == b"[DONE]":
                    continue
                try:
                    obj = json.loads(data)
                except ValueError:
                    continue
                if isinstance(obj.get("usage"), dict):
                    self.usage_tokens = obj["usage"].get("completion_tokens", self.usage_tokens)
                for choice in obj.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
                    if text:
                        self.tokens += 1
                        now = time.monotonic()
                        if self.first_token_at is None:
                            self.first_token_at = now
                        else:
                            self.gaps.append(now - self.last_token_at)
                        self.last_token_at = now

    @property
    def output_tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.tokens


def sse_error(message: str, type_: str = "server_error", code: int = 502) -> bytes:
    return b"data: " + json.dumps({"error": {"message": message, "type": type_, "code": code}}).encode() + b"\n\n"


# --------------------------------------------------------------------------- the app


class Gateway:
    """Holds what the routes need and what SIGHUP may change (config, limits)."""

    def __init__(self, config: dict, supervisor, cert_watcher=None, agent_info: dict | None = None):
        self.config = config
        self.supervisor = supervisor
        self.cert_watcher = cert_watcher
        self.admission = Admission.from_config(self._limits(config))
        self.metrics = Metrics()
        # read at scrape time, so the gauges are never stale
        self.metrics.queue_depth.set_function(lambda: self.admission.queued)
        self.metrics.in_flight.set_function(lambda: self.admission.active)
        self.metrics.registry.register(NodeCollector(self))
        self.agent_info = agent_info or {}
        self.started = time.time()
        self.client = self._upstream_client()
        # requests sent to each model server and not finished yet, by id(supervisor): a staged swap waits for the
        # old server's to finish before it stops it
        self.unfinished: collections.Counter[int] = collections.Counter()
        self.swap = None  # the agent's clawbot.model.swap.Swapper: /status shows a model change in progress
        # which clawbot.json and model file (path and stat identity) the agent last took: deploy waits until these are
        # the files on disk before it reads the swap's outcome
        self.applied: dict = {}
        supervisor.listeners.append(self._on_state)
        self._on_state(supervisor.status.state)

    @property
    def served(self) -> dict:
        """model_server as the serving model server was started with it: during a staged swap the reloaded
        config already names the next model while this one still answers."""
        return self.supervisor.config["model_server"]

    def switch(self, supervisor) -> tuple:
        """Send every new request to `supervisor` from now on (a staged swap, clawbot.model.swap). Returns the old
        (supervisor, client): requests already sent finish on it; `drained` says when none is left."""
        old = (self.supervisor, self.client)
        if self._on_state in self.supervisor.listeners:
            self.supervisor.listeners.remove(self._on_state)
        self.supervisor = supervisor
        self.client = self._upstream_client()
        supervisor.listeners.append(self._on_state)
        self._on_state(supervisor.status.state)
        return old

    async def drained(self, supervisor, timeout_s: float) -> bool:
        """Wait until no request sent to `supervisor` is unfinished (True), or timeout_s passed (False)."""
        deadline = time.monotonic() + timeout_s
        while self.unfinished[id(supervisor)] > 0:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def _limits(self, config: dict) -> dict:
        """model_gateway with max_concurrency as the run plan the model server was started with allows
        (RunPlan.gateway_concurrency); before the first start, as configured."""
        gateway = config["model_gateway"]
        plan = self.supervisor.plan
        if plan is None:
            return gateway
        return {**gateway, "max_concurrency": plan.gateway_concurrency(gateway["max_concurrency"])}

    def _on_state(self, state: str) -> None:
        self.metrics.model_state.state(state)
        if state == "ready" and hasattr(self, "admission"):
            self.admission.update(self._limits(self.config))

    def apply(self, config: dict) -> None:
        """Live limits from a reloaded config (the listener and TLS paths are handled by the agent)."""
        self.config = config
        self.admission.update(self._limits(config))
        if self.supervisor.base_url != str(self.client.base_url).rstrip("/"):
            old = self.client
            self.client = self._upstream_client()
            asyncio.get_running_loop().create_task(old.aclose())

    def _upstream_client(self) -> httpx.AsyncClient:
        # llama-server (cpp-httplib) closes connections idle for 5 s; expiring ours at 2 s keeps the pool from
        # reusing one that is being closed (httpx's default expiry is the same 5 s: a race)
        return httpx.AsyncClient(base_url=self.supervisor.base_url, timeout=UPSTREAM_TIMEOUT,
                                 headers=self.supervisor.auth_headers,
                                 limits=httpx.Limits(max_connections=256, max_keepalive_connections=64,
                                                     keepalive_expiry=2.0))

    async def _send_upstream(self, request: httpx.Request, stream: bool = False, target=None) -> httpx.Response:
        """Send to the model server; once more on a fresh connection if the first one closed without any
        answer (a keep-alive close that raced the request: the server never read it, so nothing ran twice).

        + target: the (supervisor, client) the request was admitted for (default: the serving one)"""
        supervisor, client = target or (self.supervisor, self.client)
        try:
            return await client.send(request, stream=stream)
        except httpx.RemoteProtocolError as exc:
            if not supervisor.ready:
                raise
            log.info("model server closed the connection without answering (%s); sending once more", exc)
            return await client.send(request, stream=stream)

    async def close(self) -> None:
        await self.client.aclose()

    # -- helpers -------------------------------------------------------------------------------

    @property
    def gw(self) -> dict:
        return self.config["model_gateway"]

    def authorize(self, scope) -> str | None:
        """None when allowed; else why not. TLS already checked the certificate is from the cluster CA; a SAN
        must then be in allowed_clients (empty: any certificate of the CA), except on PROBE_PATHS."""
        der = peer_cert_der(scope)
        if not der:
            return "no client certificate was presented"
        allowed = self.gw["allowed_clients"]
        if not allowed or scope.get("path") in PROBE_PATHS:
            return None
        if pki.authorize_peer(der, allowed) is None:
            who = pki.peer_identities(der).describe()
            return (f"client certificate ({who}) is not in model_gateway.allowed_clients: this gateway serves "
                    "only the clients named there (deploy fills in the chat nodes)")
        return None

    def _require_ready(self) -> None:
        if not self.supervisor.ready:
            status = self.supervisor.status
            raise GatewayError(503, f"model is not ready ({status.state}: {status.reason})", "server_error",
                               code="model_not_ready", headers={"Retry-After": "5"})

    def _prepare(self, body: _Sampling, endpoint: str) -> dict:
        cap = self.gw["max_tokens"]
        if body.model is not None and body.model != self.served["model_name"]:
            raise GatewayError(404, f"model '{body.model}' does not exist; this gateway serves "
                               f"'{self.served['model_name']}'", code="model_not_found", param="model")
        payload = body.model_dump(exclude_none=True)
        if isinstance(body, ChatCompletionRequest):
            payload["messages"] = [m.upstream() for m in body.messages]
        requested = payload.pop("max_completion_tokens", None)
        if requested is None:
            requested = payload.get("max_tokens")
        if requested is not None and requested > cap:
            raise GatewayError(400, f"max_tokens ({requested}) is larger than this gateway allows ({cap}); "
                               f"ask for at most {cap}", code="max_tokens_too_large", param="max_tokens")
        payload["max_tokens"] = requested if requested is not None else cap
        payload.setdefault("temperature", self.gw["temperature"])
        payload.setdefault("repeat_penalty", self.gw["repeat_penalty"])
        if not payload.get("ignore_eos"):  # a client that asks to go on past the end gets no stop strings of ours
            stops = self.stop_sequences() if endpoint == "chat" else self._end_token_texts()
            if stops:
                payload["stop"] = chattemplate.merge_stops(payload.get("stop"), stops)
        payload["model"] = self.served["model_name"]
        for name in self.supervisor.engine.UNSUPPORTED_FIELDS:
            payload.pop(name, None)
        _check_utf8(payload)
        return payload

    _facts_problem: tuple[str, str] | None = None  # the last unreadable model file and why (logged once)

    def _model_facts(self) -> chattemplate.ModelFacts | None:
        """The served GGUF's chat facts (cached per file version); None when the file cannot be read."""
        path = self.supervisor.model_file
        try:
            return chattemplate.read_model_facts(path)
        except (OSError, ValueError, struct.error) as exc:
            if self._facts_problem != (path, str(exc)):
                self._facts_problem = (path, str(exc))
                log.warning("cannot read the chat facts of %s (no derived stop strings, no model card): %s", path, exc)
            return None

    def stop_sequences(self) -> tuple[str, ...]:
        """What every chat completion stops at (chattemplate.stop_sequences), a request's own `stop` besides."""
        server = self.served
        return chattemplate.stop_sequences(server["chat_template"], self._model_facts(), server["stop_sequences"])

    def _end_token_texts(self) -> tuple[str, ...]:
        """What a plain completion stops at: the model's end tokens as text (its prompt is the client's own format)."""
        facts = self._model_facts()
        return chattemplate.end_token_texts(facts) if facts else ()

    async def _admit(self) -> float:
        try:
            waited = await self.admission.acquire()
        except Rejected as exc:
            self.metrics.rejections.labels(exc.reason).inc()
            raise GatewayError(exc.status, str(exc), "rate_limit_error" if exc.status == 429 else "server_error",
                               code=exc.reason,
                               headers={"Retry-After": exc.retry_after_header}) from None
        self.metrics.queue_wait.observe(waited)
        return waited

    # -- proxying ------------------------------------------------------------------------------

    async def proxy(self, request: Request, path: str, payload: dict) -> Response:
        record = request_record(request)
        self._require_ready()
        deadline = time.monotonic() + self.gw["request_timeout_s"]
        record["queue_wait_s"] = round(await self._admit(), 4)
        admitted = time.monotonic()
        released = False
        # the model server this request goes to, chosen once: a staged swap that switches meanwhile lets it finish
        target = (self.supervisor, self.client)
        self.unfinished[id(target[0])] += 1
        record["model"] = target[0].config["model_server"]["model_name"]
        payload = {**payload, "model": record["model"]}

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.admission.release(time.monotonic() - admitted)
                self.unfinished[id(target[0])] -= 1
                if self.unfinished[id(target[0])] <= 0:
                    del self.unfinished[id(target[0])]

        try:
            if not target[0].ready:  # it may have died while we queued
                self._require_ready()
            if payload.get("stream"):
                return await self._stream(request, path, payload, deadline, admitted, release, target)
            return await self._plain(request, path, payload, deadline, admitted, release, target)
        except BaseException:
            release()
            raise

    async def _plain(self, request, path, payload, deadline, admitted, release, target) -> Response:
        try:
            upstream = asyncio.create_task(self._send_upstream(
                target[1].build_request("POST", path, json=payload), target=target))
            watcher = asyncio.create_task(_wait_disconnect(request))
            done, _ = await asyncio.wait({upstream, watcher}, timeout=max(0.0, deadline - time.monotonic()),
                                         return_when=asyncio.FIRST_COMPLETED)
            watcher.cancel()
            if upstream not in done:
                upstream.cancel()  # closes the upstream connection: llama-server stops generating
                if watcher in done:
                    return Response(status_code=499)
                raise GatewayError(504, f"no answer within request_timeout_s ({self.gw['request_timeout_s']:g} s)",
                                   "server_error", code="timeout")
            try:
                resp = upstream.result()
            except httpx.HTTPError as exc:
                raise GatewayError(502, f"model server failed: {exc.__class__.__name__}: {exc}", "server_error",
                                   code="upstream_error") from None
            if resp.status_code >= 500:
                raise GatewayError(502, f"model server answered {resp.status_code}: {resp.text[:500]}",
                                   "server_error", code="upstream_error")
            if resp.status_code == 200:
                try:
                    usage = resp.json().get("usage") or {}
                    tokens = int(usage.get("completion_tokens") or 0)
                    request_record(request).update(prompt_tokens=int(usage.get("prompt_tokens") or 0),
                                                   completion_tokens=tokens)
                except (ValueError, AttributeError, TypeError):
                    tokens = 0
                elapsed = time.monotonic() - admitted
                self.metrics.output_tokens.inc(tokens)
                if tokens and elapsed > 0:
                    self.metrics.tokens_per_second.observe(tokens / elapsed)
            return Response(resp.content, status_code=resp.status_code,
                            media_type=resp.headers.get("content-type", "application/json"))
        finally:
            release()

    async def _stream(self, request, path, payload, deadline, admitted, release, target) -> Response:
        try:
            # llama-server closes the connection after a streamed answer although its headers say keep-alive;
            # reused, that connection fails the next request about every other time. Connection: close keeps
            # it out of the pool (a new loopback connection costs well under a millisecond).
            req = target[1].build_request("POST", path, json=payload, headers={"Connection": "close"})
            resp = await asyncio.wait_for(self._send_upstream(req, stream=True, target=target),
                                          max(0.1, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            release()
            raise GatewayError(504, "model server did not start answering within request_timeout_s", "server_error",
                               code="timeout") from None
        except httpx.HTTPError as exc:
            release()
            raise GatewayError(502, f"model server failed: {exc.__class__.__name__}: {exc}", "server_error",
                               code="upstream_error") from None
        if resp.status_code != 200:
            body = await resp.aread()
            await resp.aclose()
            release()
            status = 502 if resp.status_code >= 500 else resp.status_code
            if status == 502:
                raise GatewayError(502, f"model server answered {resp.status_code}: {body[:500].decode('utf-8', 'replace')}",
                                   "server_error", code="upstream_error")
            return Response(body, status_code=status, media_type=resp.headers.get("content-type", "application/json"))

        metrics = self.metrics
        timeout_s = self.gw["request_timeout_s"]
        record = request_record(request)

        async def relay():
            observer = StreamObserver()
            chunks = resp.aiter_raw()
            try:
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        yield sse_error(f"generation cancelled: request_timeout_s ({timeout_s:g} s) reached",
                                        code=504)
                        break
                    try:
                        # asyncio.timeout, not wait_for: wait_for (Python 3.11) wraps every chunk in a new task
                        async with asyncio.timeout(remaining):
                            chunk = await chunks.__anext__()
                    except StopAsyncIteration:
                        break
                    except asyncio.TimeoutError:
                        continue  # loops once more and reports the timeout
                    except httpx.HTTPError as exc:
                        log.warning("upstream stream broke: %s", exc)
                        yield sse_error(f"model server stopped while generating ({exc.__class__.__name__}); "
                                        "the answer is incomplete")
                        break
                    observer.feed(chunk)
                    yield chunk
            finally:
                await resp.aclose()  # on client disconnect too: llama-server sees the close and stops
                release()
                record["completion_tokens"] = observer.output_tokens
                if observer.first_token_at is not None:
                    metrics.first_token.observe(observer.first_token_at - admitted)
                    record["first_token_s"] = round(observer.first_token_at - admitted, 4)
                    tokens = observer.output_tokens
                    metrics.output_tokens.inc(tokens)
                    gen_time = time.monotonic() - observer.first_token_at
                    if tokens > 1 and gen_time > 0:
                        metrics.tokens_per_second.observe((tokens - 1) / gen_time)
                    for gap in observer.gaps:
                        metrics.inter_token.observe(gap)

        async def cleanup() -> None:
            await resp.aclose()
            release()

        return _Relay(relay(), cleanup, media_type="text/event-stream",
                      headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def tokenize(self, body: TokenizeRequest) -> dict:
        if (body.content is None) == (body.messages is None):
            raise GatewayError(400, "give exactly one of `content` (text) or `messages` (a chat)", param="content")
        self._require_ready()
        _check_utf8(body.model_dump(exclude_none=True))

        async def post(path: str, json_body: dict) -> dict:
            r = await self.client.post(path, json=json_body)
            _raise_upstream(r)
            return r.json()

        try:
            tokens = await self.supervisor.engine.tokenize(
                post, self.supervisor.config, content=body.content,
                messages=None if body.messages is None else [m.upstream() for m in body.messages],
                add_special=body.add_special, add_generation_prompt=body.add_generation_prompt)
        except Refused as exc:
            raise GatewayError(exc.status, exc.message, exc.type, code=exc.code) from None
        except httpx.HTTPError as exc:
            raise GatewayError(502, f"model server failed: {exc}", "server_error", code="upstream_error") from None
        return {"count": len(tokens), "tokens": tokens}

    def status(self) -> dict:
        facts = self._model_facts()
        return {
            "role": "model",
            "uptime_s": round(time.time() - self.started, 1),
            **self.agent_info,
            "model": {**self.supervisor.snapshot(), "card": chattemplate.model_card(facts) if facts else None,
                      "stop_sequences": list(self.stop_sequences())},
            "gateway": {
                "active": self.admission.active,
                "queued": self.admission.queued,
                "max_concurrency": self.admission.max_concurrency,
                "queue_length": self.admission.queue_length,
                "service_s": round(self.admission.service_s, 3),
                "service_samples": self.admission.measured,
                "max_tokens": self.gw["max_tokens"],
            },
            "tls": self.cert_watcher.summary() if self.cert_watcher else {},
            "swap": self.swap.report() if self.swap is not None else {"state": "idle"},
        }


class _Relay(StreamingResponse):
    """A StreamingResponse that always frees its slot: if the client vanishes before the body starts,
    Starlette cancels the stream before the generator's own `finally` could run."""

    def __init__(self, content, cleanup, **kwargs):
        super().__init__(content, **kwargs)
        self._cleanup = cleanup

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._cleanup()


def request_record(request: Request) -> dict:
    """The fields of this request's log line (AuthorizeAndCount writes it when the answer is complete)."""
    return request.scope.setdefault("state", {}).setdefault("clawbot_request", {})


def _request_id(scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if REQUEST_ID.fullmatch(text):
                return text
    return secrets.token_hex(8)


def _raise_upstream(r: httpx.Response) -> None:
    if r.status_code >= 500:
        raise GatewayError(502, f"model server answered {r.status_code}: {r.text[:500]}", "server_error",
                           code="upstream_error")
    if r.status_code >= 400:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:500]
        raise GatewayError(400, f"model server refused the request: {message}")


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:10]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {err.get('msg')}")
    return "invalid request: " + "; ".join(parts)


def create_app(gateway: Gateway) -> FastAPI:
    app = FastAPI(title="clawbot model gateway", version="1",
                  description="OpenAI-compatible API of a clawbot model node (mutual TLS only).")
    app.state.gateway = gateway

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse(error_body(_validation_message(exc), "invalid_request_error", "invalid_request"),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    errors = {400: {"description": "invalid request"}, 403: {"description": "client not allowed"},
              429: {"description": "rate limited or queue full (see Retry-After)"},
              503: {"description": "model not ready, or waited queue_timeout_s in the queue (see Retry-After)"}}

    @app.post("/v1/chat/completions", responses=errors)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        """OpenAI chat completions; `stream: true` answers with server-sent events."""
        return await gateway.proxy(request, "/v1/chat/completions", gateway._prepare(body, "chat"))

    @app.post("/v1/completions", responses=errors)
    async def completions(body: CompletionRequest, request: Request):
        """OpenAI (legacy) text completions."""
        return await gateway.proxy(request, "/v1/completions", gateway._prepare(body, "completion"))

    @app.get("/v1/models")
    async def models():
        name = gateway.served["model_name"]
        return {"object": "list", "data": [{"id": name, "object": "model", "created": int(gateway.started),
                                            "owned_by": "clawbot",
                                            "meta": {"context_window": gateway.supervisor.config["context_window"],
                                                     "max_tokens": gateway.gw["max_tokens"],
                                                     "state": gateway.supervisor.status.state}}]}

    @app.post("/v1/tokenize", response_model=TokenizeResponse, responses=errors)
    async def tokenize(body: TokenizeRequest):
        """Exact token count with the model's own tokenizer: `messages` are rendered with the chat template
        (with the generation prompt, as a chat completion would see them), `content` is tokenized as is."""
        return await gateway.tokenize(body)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "model not ready"}})
    async def readyz():
        status = gateway.supervisor.status
        body = {"ready": gateway.supervisor.ready, "state": status.state, "reason": status.reason,
                # deploy waits here for a staged swap it started (any certificate of the cluster CA may ask)
                "swap": gateway.swap.summary() if gateway.swap is not None else {"state": "idle"},
                "applied": gateway.applied}
        return JSONResponse(body, status_code=200 if gateway.supervisor.ready else 503)

    @app.get("/status")
    async def status():
        return gateway.status()

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return AuthorizeAndCount(app, gateway)


# Liveness and readiness say only whether the agent runs and the model answers: any certificate of the cluster CA
# may ask, so deploy's health check on a model node works with that node's own certificate (not in allowed_clients).
PROBE_PATHS = frozenset({"/healthz", "/readyz"})

KNOWN_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/tokenize", "/healthz", "/readyz",
               "/status", "/metrics", "/openapi.json", "/docs"}


class AuthorizeAndCount:
    """Pure ASGI middleware (BaseHTTPMiddleware would buffer streams and hide client disconnects):
    refuse clients the allowlist does not name, count every answer by path and status, answer with X-Request-Id
    and write one JSON line per API request (request_log) once its answer is complete."""

    def __init__(self, app, gateway: Gateway):
        self.app = app
        self.gateway = gateway
        self.state = app.state  # so tests and callers can reach app.state.gateway

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        label = path if path in KNOWN_PATHS else "other"
        status_seen = {"code": 500}
        request_id = _request_id(scope)
        record = scope.setdefault("state", {}).setdefault("clawbot_request", {})
        started = time.monotonic()

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status_seen["code"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        problem = self.gateway.authorize(scope)
        try:
            if problem:
                response = JSONResponse(error_body(problem, "permission_error", "client_not_allowed"), status_code=403)
                await response(scope, receive, counting_send)
            else:
                await self.app(scope, receive, counting_send)
        finally:
            self.gateway.metrics.requests.labels(label, str(status_seen["code"])).inc()
            if path in LOGGED_PATHS:
                der = peer_cert_der(scope)
                client = pki.peer_identities(der).describe() if der else "none"
                request_log.info(json.dumps({"event": "request", "request_id": request_id, "client": client,
                                             "method": scope.get("method"), "path": path,
                                             "status": status_seen["code"], **record,
                                             "duration_s": round(time.monotonic() - started, 4)}))
