"""The chat node's /metrics (Prometheus text format; admins or an admin's API key only).

Labels per account are bounded by the accounts an admin (or SSO) created: no label takes request input.
Today's usage per account is read from the database at scrape time, so it survives restarts and agrees with
/api/usage; logins and refusals are counters of this process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from clawbot.chat.accounts import today


class UsageCollector:
    def __init__(self, store_of):
        self._store_of = store_of

    def collect(self):
        store = self._store_of()
        day = today()
        requests = GaugeMetricFamily("clawbot_chat_user_requests_today", "Model requests today (UTC) per account",
                                     labels=["user"])
        tokens = GaugeMetricFamily("clawbot_chat_user_tokens_today", "Prompt and completion tokens today (UTC) per account",
                                   labels=["user", "kind"])
        for user in store.list_users():
            used = store.usage(user["id"], day)
            requests.add_metric([user["name"]], used["requests"])
            tokens.add_metric([user["name"], "prompt"], used["prompt_tokens"])
            tokens.add_metric([user["name"], "completion"], used["completion_tokens"])
        yield requests
        yield tokens


class UpstreamCollector:
    """Each model node the chat node routes to, read from the pool at scrape time: up, in flight, served, errors."""

    def __init__(self, pool_of):
        self._pool_of = pool_of

    def collect(self):
        pool = self._pool_of()
        up = GaugeMetricFamily("clawbot_chat_upstream_up", "1 when the chat node sends requests to this model node "
                               "(ready, circuit closed)", labels=["upstream"])
        state = GaugeMetricFamily("clawbot_chat_upstream_state", "The chat node's view of a model node (1 for its "
                                  "current state: up, down, circuit_open, unknown)", labels=["upstream", "state"])
        flight = GaugeMetricFamily("clawbot_chat_upstream_in_flight", "Requests the chat node has in flight at this "
                                   "model node", labels=["upstream"])
        served = CounterMetricFamily("clawbot_chat_upstream_served", "Requests this model node answered",
                                     labels=["upstream"])
        errors = CounterMetricFamily("clawbot_chat_upstream_errors", "Requests that found this model node "
                                     "unreachable, not ready or failing", labels=["upstream"])
        for u in pool.upstreams:
            up.add_metric([u.url], 1 if u.available() and u.ready else 0)
            state.add_metric([u.url, u.state], 1)
            flight.add_metric([u.url], u.in_flight)
            served.add_metric([u.url], u.served)
            errors.add_metric([u.url], u.errors)
        yield from (up, state, flight, served, errors)


class ChatMetrics:
    def __init__(self, store_of):
        self.registry = CollectorRegistry()
        self.logins = Counter("clawbot_chat_logins", "Login attempts by outcome (ok, failed, throttled)", ["outcome"],
                              registry=self.registry)
        self.limited_total = Counter("clawbot_chat_limited", "Requests refused by a per-user limit",
                                     ["user", "limit"], registry=self.registry)
        self.requests_total = Counter("clawbot_chat_model_requests", "Model requests per account and entry point",
                                      ["user", "via"], registry=self.registry)
        self.line_waits = Histogram("clawbot_chat_queue_wait_seconds", "Time a message or app request waited in the "
                                    "chat node's line for a model slot, by how the wait ended (admitted, cancelled, "
                                    "timeout, down)", ["outcome"], registry=self.registry,
                                    buckets=(0.01, 0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600))
        self.line_waiting = Gauge("clawbot_chat_queue_waiting", "Messages and app requests waiting for a model slot",
                                  registry=self.registry)
        self.line_active = Gauge("clawbot_chat_queue_active", "Model slots this chat node is using",
                                 registry=self.registry)
        self.line_capacity = Gauge("clawbot_chat_queue_capacity", "Model slots this chat node may use at once "
                                   "(chat.queue.slots, or the gateway's max_concurrency)", registry=self.registry)
        self.registry.register(UsageCollector(store_of))

    def watch_line(self, queue) -> None:
        """Read the fair line's gauges at scrape time (the line outlives config reloads, so does this)."""
        self.line_waiting.set_function(lambda: queue.waiting)
        self.line_active.set_function(lambda: queue.active)
        self.line_capacity.set_function(lambda: queue.capacity)

    def watch_upstreams(self, pool_of) -> None:
        self.registry.register(UpstreamCollector(pool_of))

    def waited(self, seconds: float, outcome: str) -> None:
        self.line_waits.labels(outcome).observe(seconds)

    def login(self, outcome: str) -> None:
        self.logins.labels(outcome).inc()

    def limited(self, user: str, limit: str) -> None:
        self.limited_total.labels(user, limit).inc()

    def request(self, user: str, via: str) -> None:
        self.requests_total.labels(user, via).inc()
