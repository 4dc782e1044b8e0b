"""The chat node's /metrics (Prometheus text format; admins or an admin's API key only).

Labels per account are bounded by the accounts an admin (or SSO) created: no label takes request input.
Today's usage per account is read from the database at scrape time, so it survives restarts and agrees with
/api/usage; logins and refusals are counters of this process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

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

    def waited(self, seconds: float, outcome: str) -> None:
        self.line_waits.labels(outcome).observe(seconds)

    def login(self, outcome: str) -> None:
        self.logins.labels(outcome).inc()

    def limited(self, user: str, limit: str) -> None:
        self.limited_total.labels(user, limit).inc()

    def request(self, user: str, via: str) -> None:
        self.requests_total.labels(user, via).inc()
