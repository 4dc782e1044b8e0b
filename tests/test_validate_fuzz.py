"""Property tests: mutated configs never crash the checker, and every finding has a real position."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clawbot.common.config import check_bytes, load_schema

VALID = json.dumps(
    {
        "model_gateway": {"endpoint": "https://192.168.1.100:5000", "max_tokens": 4096, "temperature": 0.7,
                          "rate_limit": {"requests_per_second": 2, "burst": 8}, "max_concurrency": 2},
        "context_window": 32768,
        "fallback_strategies": ["web_search", "knowledge_base"],
        "model_server": {"engine": "llama-server", "parallel_slots": 2, "restart_backoff_s": [1, 30]},
        "chat": {"summary": {"enabled": True}, "web_search": {"endpoint": "https://s.example/search"}},
    },
    indent=2,
)

NASTY = ["", "{", "}", "[", "]", ",", ":", '"', "\\", "\n", "NaN", "-Infinity", "//", "/*", "\x00", "\ufeff", "\xe9",
         "'", "1e999", "00", "true", "null", "\t", "\u2028", "\ud800"]


def assert_well_formed(data: bytes):
    result = check_bytes(data, "fuzz.json")  # must never raise
    text = data.decode("utf-8", errors="replace")
    lines = text.split("\n")
    for d in result.diagnostics:
        assert d.severity in ("error", "warning")
        assert d.line >= 1 and d.col >= 1, d
        assert d.line <= max(len(lines), 1), d
        assert d.col <= len(lines[d.line - 1]) + 1 or d.line == 1, d
        assert d.message
    if not result.ok:
        assert result.config is None and any(d.severity == "error" for d in result.diagnostics)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(min_value=0, max_value=len(VALID)), st.integers(min_value=0, max_value=4),
                          st.sampled_from(NASTY) | st.text(max_size=3)), min_size=1, max_size=4))
def test_text_mutations_never_crash(edits):
    text = VALID
    for position, delete, insert in edits:
        position = min(position, len(text))
        text = text[:position] + insert + text[position + delete:]
    assert_well_formed(text.encode("utf-8", errors="surrogatepass"))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)


def _paths(schema, prefix=()):
    yield prefix
    for key, sub in schema.get("properties", {}).items():
        yield from _paths(sub, prefix + (key,))


SCHEMA_PATHS = [p for p in _paths(load_schema()) if p]


@settings(max_examples=250, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(SCHEMA_PATHS), json_values), min_size=1, max_size=4))
def test_value_mutations_never_crash(replacements):
    config = json.loads(VALID)
    for path, value in replacements:
        node = config
        for key in path[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[path[-1]] = value
    assert_well_formed(json.dumps(config, indent=1).encode())


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash(data):
    assert_well_formed(data)
