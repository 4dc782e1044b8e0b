"""The chat node's /metrics (Prometheus text format; admins or an admin's API key only).

Labels per account are bounded by the accounts an admin (or SSO) created: no label takes request input.
Today's usage per account is read from the database at scrape time, so it survives restarts and agrees with
/api/usage; logins and refusals are counters of this process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter
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
        self.registry.register(UsageCollector(store_of))

    def login(self, outcome: str) -> None:
        self.logins.labels(outcome).inc()

    def limited(self, user: str, limit: str) -> None:
        self.limited_total.labels(user, limit).inc()

    def request(self, user: str, via: str) -> None:
        self.requests_total.labels(user, via).inc()
