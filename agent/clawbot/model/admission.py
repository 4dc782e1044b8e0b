"""Admission control for the gateway: a token bucket (rate), a concurrency limit and a bounded FIFO queue.

Why in the gateway and not left to llama-server: llama-server queues excess requests invisibly and
without bound; a client needs a fast, explicit answer it can act on, and the gateway's metrics need to
see the queue. The answers are truthful about why:

- 429 `rate_limited`: the client exceeded the token bucket; Retry-After is when the bucket has a token again.
- 429 `queue_full`: every slot is busy and the bounded queue is full; Retry-After is when the oldest running
  request should end by the measured service times, which frees a place in the queue.
- 503 `queue_timeout`: the request waited `queue_timeout_s` in the queue without a slot (the server is slower
  than its queue promises); Retry-After estimates when a request queued now would be served.

Who waits where (docs/waiting.md): the chat node keeps its own fair line per person and sends at most as many
requests as the gateway has slots, so its people wait there (with their place shown), not in this queue; this
queue absorbs other clients and short overlaps, and the chat node honours the Retry-After of every refusal.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from dataclasses import dataclass


PRIOR_SERVICE_S = 5.0  # assumed slot time until the first request has been measured
SERVICE_SAMPLES = 64  # recent service times the estimates use (their median)
STATUS = {"rate_limited": 429, "queue_full": 429, "queue_timeout": 503}


@dataclass
class Rejected(Exception):
    """Not admitted: `reason` is rate_limited | queue_full | queue_timeout; retry_after in seconds."""

    reason: str
    retry_after: float
    message: str

    @property
    def status(self) -> int:
        return STATUS[self.reason]

    def __str__(self) -> str:
        return self.message

    @property
    def retry_after_header(self) -> str:
        return str(max(1, math.ceil(self.retry_after)))


class Admission:
    """All on one event loop (no locks needed). Limits can change live (SIGHUP) via update()."""

    def __init__(self, *, requests_per_second: float, burst: int, max_concurrency: int, queue_length: int,
                 queue_timeout_s: float, clock=time.monotonic):
        self._clock = clock
        self.rate = float(requests_per_second)
        self.burst = int(burst)
        self.max_concurrency = int(max_concurrency)
        self.queue_length = int(queue_length)
        self.queue_timeout_s = float(queue_timeout_s)
        self._tokens = float(burst)
        self._last = clock()
        self.active = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._service_s: collections.deque[float] = collections.deque(maxlen=SERVICE_SAMPLES)
        self._running: list[float] = []  # admission times of the requests holding a slot (clock values)

    @classmethod
    def from_config(cls, gateway: dict) -> "Admission":
        return cls(requests_per_second=gateway["rate_limit"]["requests_per_second"],
                   burst=gateway["rate_limit"]["burst"], max_concurrency=gateway["max_concurrency"],
                   queue_length=gateway["queue_length"], queue_timeout_s=gateway["queue_timeout_s"])

    def update(self, gateway: dict) -> None:
        """Apply new limits to the running gateway; waiters freed by a higher limit are admitted now."""
        self._refill()
        self.rate = float(gateway["rate_limit"]["requests_per_second"])
        self.burst = int(gateway["rate_limit"]["burst"])
        self._tokens = min(self._tokens, self.burst)
        self.max_concurrency = int(gateway["max_concurrency"])
        self.queue_length = int(gateway["queue_length"])
        self.queue_timeout_s = float(gateway["queue_timeout_s"])
        self._hand_off()

    @property
    def queued(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now

    @property
    def service_s(self) -> float:
        """Median time a request held a slot, over the last SERVICE_SAMPLES (PRIOR_SERVICE_S before any)."""
        if not self._service_s:
            return PRIOR_SERVICE_S
        ordered = sorted(self._service_s)
        return ordered[len(ordered) // 2]

    @property
    def measured(self) -> int:
        return len(self._service_s)

    def _next_slot_free_s(self) -> float:
        """When the oldest running request should end, by the measured service times."""
        if not self._running:
            return 0.0
        elapsed = self._clock() - min(self._running)
        return max(0.5, self.service_s - elapsed)

    def _queue_wait_estimate(self, position: int) -> float:
        """Wait for the request at `position` in the queue: the next slot frees, then one per service time / slots."""
        return self._next_slot_free_s() + self.service_s * position / max(1, self.max_concurrency)

    async def acquire(self) -> float:
        """Wait for a slot; returns seconds spent queued. Raises Rejected."""
        self._refill()
        if self._tokens < 1.0:
            wait = (1.0 - self._tokens) / self.rate
            raise Rejected("rate_limited", wait,
                           f"rate limit of {self.rate:g} requests/s (burst {self.burst}) exceeded; retry in {wait:.1f} s")
        if self.active < self.max_concurrency and not self.queued:
            self._tokens -= 1.0
            self._admit_one()
            return 0.0
        if self.queued >= self.queue_length:
            wait = self._next_slot_free_s()
            raise Rejected("queue_full", wait,
                           f"server busy: {self.active} requests running and {self.queued} queued "
                           f"(max_concurrency {self.max_concurrency}, queue_length {self.queue_length})")
        self._tokens -= 1.0
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        start = self._clock()
        try:
            await asyncio.wait_for(asyncio.shield(future), self.queue_timeout_s)
        except asyncio.TimeoutError:
            if future.done() and not future.cancelled():
                return self._clock() - start  # admitted at the last moment: keep the slot
            future.cancel()
            wait = self._queue_wait_estimate(self.queued)
            raise Rejected("queue_timeout", wait,
                           f"waited {self.queue_timeout_s:g} s in the queue without a free slot "
                           f"(model_gateway.queue_timeout_s); requests take {self.service_s:.1f} s each here") from None
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(0.0)  # admitted but the client went away: pass the slot on
            else:
                future.cancel()
            raise
        finally:
            try:
                self._waiters.remove(future)
            except ValueError:
                pass
        return self._clock() - start

    def _admit_one(self) -> None:
        self.active += 1
        self._running.append(self._clock())

    def release(self, service_s: float | None = None) -> None:
        """A slot is free again; `service_s` (how long it was held) feeds the estimates, when it was measured."""
        if service_s is not None and service_s > 0:
            self._service_s.append(service_s)
        if self._running:
            self._running.remove(min(self._running, key=lambda t: abs((self._clock() - t) - (service_s or 0))))
        self.active = max(0, self.active - 1)
        self._hand_off()

    def _hand_off(self) -> None:
        """Give free slots to the oldest waiters (the slot moves directly: no thundering herd)."""
        while self.active < self.max_concurrency:
            waiter = next((w for w in self._waiters if not w.done()), None)
            if waiter is None:
                return
            self._admit_one()
            waiter.set_result(True)
