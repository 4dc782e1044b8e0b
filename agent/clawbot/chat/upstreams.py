"""The chat node's model nodes: every gateway it may send a request to, and which one gets the next.

Routing policy (docs/replicas.md): among the upstreams that are ready and whose circuit is closed, a request goes
to the one with the fewest requests in flight for its slots (ties rotate, so a burst spreads), except that a
conversation goes back to the upstream that served its previous turn while that one is ready and has a free
slot (its prompt cache holds the conversation). Health is active (every upstream's /readyz and /status every
10 s, by the chat node's gateway watch) and passive (a request that finds an upstream unreachable, not ready or
failing marks it down at once). A failure opens the upstream's circuit for a backoff (5 s, doubling to 60 s);
after it, the upstream is tried again (half-open) and closes on success. A request is retried on another
upstream only while nothing has been streamed to the client: a stream broken mid-answer ends with a clear
error, never a duplicated answer.

The pool offers what ModelClient offers (count_tokens, complete, stream, forward, health), so the context keeper,
the reply stream and the OpenAI API route through it without knowing how many model nodes there are.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from typing import AsyncIterator

import httpx

from clawbot.common.modelclient import Chunk, ModelClient, ModelUnavailable, StreamBroken, refusal

BACKOFF_FIRST_S = 5.0
BACKOFF_MAX_S = 60.0
AFFINITY_ENTRIES = 10000  # conversations whose last upstream is remembered (least recently used dropped)


class Upstream:
    """One model node's gateway and what the chat node knows of it."""

    def __init__(self, url: str, client: ModelClient, clock=time.monotonic):
        self.url, self.client, self._clock = url, client, clock
        self.ready: bool | None = None  # None: not asked yet
        self.slots: int | None = None  # its max_concurrency, as its /status said
        self.in_flight = 0
        self.served = 0
        self.errors = 0
        self.failures = 0  # consecutive
        self.open_until = 0.0
        self.backoff_s = 0.0
        self.last_error = ""
        self.model_card: dict | None = None
        self.last_ok = 0.0  # when it last answered a request (a streamed chunk counts)

    def capacity(self, default: int) -> int:
        return self.slots or default

    def available(self) -> bool:
        return self.ready is not False and self._clock() >= self.open_until

    @property
    def state(self) -> str:
        if self._clock() < self.open_until:
            return "circuit_open"
        return {None: "unknown", True: "up", False: "down"}[self.ready]

    def succeeded(self) -> None:
        self.ready, self.failures, self.backoff_s, self.open_until = True, 0, 0.0, 0.0
        self.last_ok = self._clock()

    def failed(self, reason: str) -> None:
        """Passive detection: this upstream could not answer; keep requests away from it for a backoff."""
        self.errors += 1
        self.failures += 1
        self.last_error = reason
        self.ready = False
        self.backoff_s = min(BACKOFF_MAX_S, max(BACKOFF_FIRST_S, self.backoff_s * 2))
        self.open_until = self._clock() + self.backoff_s

    def observed(self, health: dict) -> None:
        """Active detection: what its /readyz and /status said."""
        if isinstance(health.get("slots"), int) and health["slots"] > 0:
            self.slots = health["slots"]
        if isinstance(health.get("model_card"), dict):
            self.model_card = health["model_card"]
        if health.get("ready"):
            if self.ready is False and self._clock() < self.open_until:
                return  # circuit open: it is tried again (half-open) when the backoff ends, not before
            self.ready = True
        else:
            self.ready = False
            self.last_error = health.get("error") or "not ready"

    def describe(self, default_slots: int) -> dict:
        return {"url": self.url, "state": self.state, "in_flight": self.in_flight,
                "slots": self.capacity(default_slots), "served": self.served, "errors": self.errors,
                "last_error": self.last_error or None,
                "retry_in_s": round(max(0.0, self.open_until - self._clock()), 1) or None}


class UpstreamPool:
    def __init__(self, urls: list[str], tls: dict, timeout_s: float, default_slots: int,
                 previous: "UpstreamPool | None" = None, clock=time.monotonic):
        self.default_slots = default_slots
        self._clock = clock
        kept = {u.url: u for u in previous.upstreams} if previous is not None else {}
        self.upstreams: list[Upstream] = []
        self._clients: list[ModelClient] = []  # this pool's own (a reload's new pool takes over the Upstreams)
        for url in dict.fromkeys(u.rstrip("/") for u in urls):
            client = ModelClient(url, tls, timeout_s)
            self._clients.append(client)
            upstream = kept.get(url)
            if upstream is None:
                upstream = Upstream(url, client, clock)
            else:  # same node after a reload: keep what was learned, use the new TLS material
                upstream.client = client
            self.upstreams.append(upstream)
        self._turn = itertools.count()
        self._affinity: collections.OrderedDict[str, str] = (previous._affinity if previous is not None
                                                             else collections.OrderedDict())

    @property
    def endpoint(self) -> str:
        return ", ".join(u.url for u in self.upstreams)

    # -- choosing ------------------------------------------------------------------------------

    def choose(self, affinity: str | None = None, exclude: set[str] = frozenset()) -> Upstream | None:
        candidates = [u for u in self.upstreams if u.available() and u.url not in exclude]
        if not candidates:
            # every node the watch saw down: try those whose circuit is closed anyway (one may be back since the
            # last round; a node that is really down fails fast, and a failure opens its circuit)
            candidates = [u for u in self.upstreams if u.url not in exclude and self._clock() >= u.open_until]
        if not candidates:
            return None
        if affinity is not None:
            preferred = self._affinity.get(affinity)
            for u in candidates:
                if u.url == preferred and u.in_flight < u.capacity(self.default_slots):
                    return u
        offset = next(self._turn)
        order = candidates[offset % len(candidates):] + candidates[:offset % len(candidates)]
        return min(order, key=lambda u: u.in_flight / u.capacity(self.default_slots))

    def remember(self, affinity: str | None, upstream: Upstream) -> None:
        if affinity is None:
            return
        self._affinity[affinity] = upstream.url
        self._affinity.move_to_end(affinity)
        while len(self._affinity) > AFFINITY_ENTRIES:
            self._affinity.popitem(last=False)

    def capacity(self) -> int:
        """Slots of the upstreams that may take requests now (what the chat node's line may send at once)."""
        return sum(u.capacity(self.default_slots) for u in self.upstreams if u.available())

    def _none_left(self, last: ModelUnavailable | None) -> ModelUnavailable:
        if last is not None and len(self.upstreams) == 1:
            return last
        why = "; ".join(f"{u.url}: {u.last_error or u.state}" for u in self.upstreams)
        return ModelUnavailable(f"no model node can answer ({why})")

    # -- requests ------------------------------------------------------------------------------

    def _take(self, affinity: str | None, tried: set[str], last: ModelUnavailable | None) -> Upstream:
        """The next upstream to try for one request, counted in flight (the caller gives it back), or
        ModelUnavailable naming every node when none is left."""
        upstream = self.choose(affinity, tried)
        if upstream is None:
            raise self._none_left(last)
        upstream.in_flight += 1
        return upstream

    def _move_on(self, upstream: Upstream, exc: ModelUnavailable, affinity: str | None,
                 tried: set[str]) -> ModelUnavailable:
        """`upstream` could not take the request: a down one is marked failed, a busy one is passed over when
        another can take it; either way the next is tried (returns exc). Anything else is the caller's (raised)."""
        if exc.down:
            upstream.failed(exc.reason)
        elif not (exc.busy and self.choose(affinity, tried | {upstream.url})):
            raise exc
        tried.add(upstream.url)
        return exc

    async def _each(self, affinity: str | None, call):
        """Run `call(upstream)` on the chosen upstream, and on the next while one is down."""
        tried: set[str] = set()
        last: ModelUnavailable | None = None
        while True:
            upstream = self._take(affinity, tried, last)
            try:
                result = await call(upstream)
            except ModelUnavailable as exc:
                last = self._move_on(upstream, exc, affinity, tried)
                continue
            finally:
                upstream.in_flight -= 1
            upstream.succeeded()  # a token count or a summary: healthy, but not a reply served (`served` counts those)
            return result

    async def count_tokens(self, messages: list[dict], affinity: str | None = None) -> int:
        return await self._each(affinity, lambda u: u.client.count_tokens(messages))

    async def complete(self, messages: list[dict], max_tokens: int, temperature: float,
                       affinity: str | None = None) -> tuple[str, dict | None]:
        return await self._each(affinity, lambda u: u.client.complete(messages, max_tokens, temperature))

    async def stream(self, messages: list[dict], max_tokens: int, temperature: float, request_id: str | None = None,
                     affinity: str | None = None) -> AsyncIterator[Chunk]:
        """Stream from the chosen upstream; before the first chunk a down upstream is left for the next one,
        after it a broken stream is StreamBroken (the partial answer is kept, never repeated elsewhere)."""
        tried: set[str] = set()
        last: ModelUnavailable | None = None
        while True:
            upstream = self._take(affinity, tried, last)
            try:
                async for chunk in upstream.client.stream(messages, max_tokens, temperature, request_id=request_id):
                    upstream.last_ok = self._clock()
                    yield chunk
            except ModelUnavailable as exc:
                last = self._move_on(upstream, exc, affinity, tried)
                continue
            except StreamBroken as exc:
                upstream.failed(str(exc))
                raise StreamBroken(f"{exc} (model node {upstream.url})") from exc
            finally:
                upstream.in_flight -= 1
            upstream.succeeded()
            upstream.served += 1
            self.remember(affinity, upstream)
            return

    async def forward(self, method: str, path: str, body: dict | None = None, stream: bool = False,
                      timeout_s: float | None = None, request_id: str | None = None,
                      affinity: str | None = None) -> tuple[httpx.Response, Upstream]:
        """A request passed through as it is (the OpenAI API): the first upstream that is not down answers, any
        status; the caller releases the upstream (`done(upstream)`) when the response is finished."""
        tried: set[str] = set()
        last: ModelUnavailable | None = None
        while True:
            upstream = self._take(affinity, tried, last)
            try:
                response = await upstream.client.forward(method, path, body, stream=stream, timeout_s=timeout_s,
                                                         request_id=request_id)
            except ModelUnavailable as exc:
                upstream.in_flight -= 1
                upstream.failed(exc.reason)
                tried.add(upstream.url)
                last = exc
                continue
            if response.status_code >= 500:
                if stream:
                    await response.aread()
                refused = refusal(response)
                if refused.down and self.choose(affinity, tried | {upstream.url}) is not None:
                    upstream.in_flight -= 1
                    upstream.failed(refused.reason)
                    if stream:
                        await response.aclose()
                    tried.add(upstream.url)
                    last = refused
                    continue
            return response, upstream

    def done(self, upstream: Upstream, ok: bool, reason: str = "", affinity: str | None = None) -> None:
        upstream.in_flight -= 1
        if ok:
            upstream.succeeded()
            upstream.served += 1
            self.remember(affinity, upstream)
        elif reason:
            upstream.failed(reason)

    # -- health --------------------------------------------------------------------------------

    async def health(self, timeout_s: float = 3.0) -> dict:
        """Ask every upstream; the result reads like one gateway's (ready when any is) plus `upstreams`."""
        results = await asyncio.gather(*(u.client.health(timeout_s) for u in self.upstreams), return_exceptions=True)
        for upstream, health in zip(self.upstreams, results):
            upstream.observed(health if isinstance(health, dict) else {"ready": False, "error": str(health)})
        ready = [h for u, h in zip(self.upstreams, results) if isinstance(h, dict) and h.get("ready")]
        first = next((h for h in results if isinstance(h, dict)), {})
        summary = dict(ready[0] if ready else first)
        summary.update(endpoint=self.endpoint, ready=bool(ready), reachable=any(
            isinstance(h, dict) and h.get("reachable") for h in results),
            slots=self.capacity() or None,
            upstreams=self.describe())
        if ready:
            summary.pop("error", None)
        elif len(self.upstreams) > 1:
            summary["error"] = "no model node is ready: " + "; ".join(
                f"{u.url}: {u.last_error or u.state}" for u in self.upstreams)
        return summary

    def answered_within(self, seconds: float) -> bool:
        """Some model node answered a request in the last `seconds` (the watch's probes may be slow under load)."""
        return any(self._clock() - u.last_ok < seconds for u in self.upstreams)

    def describe(self) -> list[dict]:
        return [u.describe(self.default_slots) for u in self.upstreams]

    async def aclose(self) -> None:
        await asyncio.gather(*(c.aclose() for c in self._clients), return_exceptions=True)
