"""docs/chat-api.md is what `clawbot docs` writes from the chat node's OpenAPI description and its event list."""

from __future__ import annotations

from pathlib import Path

from clawbot.chat import apidoc
from clawbot.chat.replies import EVENTS

ROOT = Path(__file__).resolve().parent.parent


def test_the_committed_page_is_current():
    page = ROOT / "docs" / apidoc.PAGE
    assert page.read_text(encoding="utf-8") == apidoc.render(), f"{page} is stale: run `clawbot docs`"


def test_the_page_names_every_route_and_event():
    text = apidoc.render()
    for route in ("/api/conversations/{conversation_id}/messages", "/api/conversations/{conversation_id}/stop",
                  "/api/conversations/{conversation_id}/regenerate", "/v1/chat/completions", "/api/login"):
        assert f"`{route}`" in text
    for event in EVENTS:
        assert f"| `{event}` |" in text
