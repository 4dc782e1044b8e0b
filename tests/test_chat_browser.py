"""The web UI in headless Chromium (Debian's `chromium`, driven by Playwright), served by the real chat agent
over HTTPS, with the real model agent behind it.

Chromium is not told to ignore certificate errors in general: only the chat node's own server key is
accepted, by its SPKI hash (--ignore-certificate-errors-spki-list), which is what trusting the cluster CA
amounts to for this one server. Screenshots go to test-artifacts/ (git-ignored).
"""

from __future__ import annotations

import pytest

from fixtures_chat import ARTIFACTS, ChatAgent, ModelAgent, chat_config, chat_pki, model_config, running  # noqa: F401
from tests.fixtures_agent import llama_server_binary  # noqa: F401  (builds the engine if no step did)
from fixtures_models import gguf_100m, models_dir  # noqa: F401

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
LONG = "Tell me about the spring weather in Paris, the rain, the parks and the river Seine. "


@pytest.fixture(scope="module")
def nodes(chat_pki, gguf_100m, llama_server_binary, tmp_path_factory):
    """A model node and a chat node with a knowledge base, as a person would reach them.

    The ~110 M-parameter random-weight model (not the 2-layer one) so tokens arrive over a visible
    stretch of time, as on a real node; with the tiny model a whole reply can land in one network read.
    """
    work = tmp_path_factory.mktemp("browser")
    kb = work / "kb"
    kb.mkdir()
    (kb / "garden.md").write_text("# Garden\n\n## Watering\n\nWater the tomatoes every evening in July.\n")
    model = ModelAgent(model_config(chat_pki, gguf_100m, context_window=512, max_tokens=48), work / "model", chat_pki)
    chat = ChatAgent(chat_config(chat_pki, work / "chat", model.endpoint, context_window=512, max_tokens=48,
                                 fallbacks=["web_search", "knowledge_base"], kb_dir=kb,
                                 summary={"enabled": True, "keep_recent_messages": 2, "max_tokens": 48}),
                     work / "chat", chat_pki)
    with running(model), running(chat):
        yield model, chat


@pytest.fixture(scope="module")
def browser(chat_pki):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
            f"--ignore-certificate-errors-spki-list={chat_pki.chat_spki_sha256_b64}"])
        try:
            yield browser
        finally:
            browser.close()


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"chat-{name}.png"), full_page=False)


STREAM_PROBE = """() => {
  window.__lengths = [];
  new MutationObserver(() => {
    const live = document.querySelector('.message.streaming .text');
    if (live) window.__lengths.push(live.textContent.length);
  }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
}"""


def ask(page, text: str) -> None:
    before = page.locator(".message.assistant").count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_function(
        "n => document.querySelectorAll('.message.assistant:not(.streaming)').length > n && !document.getElementById('send').disabled",
        arg=before, timeout=60000)


@pytest.fixture(autouse=True)
def explain_failure(request, nodes):
    """On a failure, keep what a person would need: both agents' logs next to the screenshots."""
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before:
        ARTIFACTS.mkdir(exist_ok=True)
        for agent in nodes:
            (ARTIFACTS / f"chat-{request.node.name}-{agent.role}.log").write_text(agent.log_tail(100000))


def test_chat_in_the_browser(nodes, browser):
    """Send a message, watch it stream in, reload: the conversation is still there, labelled by source."""
    model, chat = nodes
    context = browser.new_context(ignore_https_errors=False, viewport={"width": 1200, "height": 800})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(chat.url)
    page.wait_for_selector("#status-model[data-state='up']", timeout=30000)
    assert page.locator("#status-chat").get_attribute("data-state") == "up"

    page.evaluate(STREAM_PROBE)
    ask(page, "Hello! What can you do?")
    lengths = page.evaluate("window.__lengths")
    assert len(set(lengths)) >= 3 and lengths == sorted(lengths), f"reply did not stream in: {lengths}"
    reply = page.locator(".message.assistant").last
    assert reply.locator(".label.source-model").inner_text() == "model"
    assert reply.locator(".text").inner_text().strip()
    shot(page, "streamed")

    page.reload()
    page.wait_for_selector(".message.assistant")
    assert page.locator(".message.user .text").first.inner_text() == "Hello! What can you do?"
    assert page.locator(".message.assistant .label").first.inner_text() == "model"
    assert page.locator(".conversations li.active .title").inner_text() == "Hello! What can you do?"
    assert not errors, errors
    context.close()


def test_summary_marker_and_fallback_label(nodes, browser):
    """A long conversation shows the expandable summary marker; with the model down, the KB label and banner."""
    model, chat = nodes
    context = browser.new_context(ignore_https_errors=False, viewport={"width": 1200, "height": 900})
    page = context.new_page()
    page.goto(chat.url)
    page.wait_for_selector("#status-model[data-state='up']", timeout=30000)
    page.click("#new-conversation")
    for n in range(5):
        ask(page, f"Question {n}: {LONG}")
    marker = page.locator("#messages > details.summary")
    assert marker.count() == 1 and marker.is_visible()  # one marker in the conversation; older ones nest inside
    heading = marker.locator(":scope > summary")
    assert heading.inner_text().startswith("Earlier messages summarised")
    first_question = page.locator(".originals .message.user", has_text="Question 0")
    assert not first_question.is_visible()  # collapsed
    for _ in range(10):  # expand the marker and every summary nested in it
        closed = page.locator("details.summary:not([open]) > summary")
        if closed.count() == 0:
            break
        closed.first.click()
    assert first_question.is_visible()
    covered = page.locator("details.summary .message").count()  # every original is rendered once, nested
    assert covered >= 4 and f"({covered} messages)" in heading.inner_text()
    shot(page, "summary")

    model.stop()
    page.evaluate("refreshStatus()")
    page.wait_for_selector("#status-model[data-state='down']", timeout=20000)
    assert "model node is unavailable" in page.locator("#banner").inner_text()
    ask(page, "When should I water the tomatoes?")
    reply = page.locator(".message.assistant").last
    assert reply.locator(".label.source-knowledge_base").inner_text() == "knowledge base"
    assert "every evening in July" in reply.locator(".text").inner_text()
    assert "garden.md" in reply.locator(".cite").first.inner_text()
    shot(page, "fallback")

    phone = browser.new_context(ignore_https_errors=False, viewport={"width": 390, "height": 844},
                                device_scale_factor=2, is_mobile=True, has_touch=True)
    small = phone.new_page()
    small.goto(page.url)
    small.wait_for_selector("#messages > .message.assistant")
    assert not small.locator("#sidebar").is_visible() or small.locator("#sidebar").bounding_box()["x"] < 0
    width = small.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"page scrolls sideways on a phone ({width}px)"
    shot(small, "phone")
    small.click("#menu")
    small.wait_for_timeout(400)
    assert small.locator("#sidebar").bounding_box()["x"] >= 0
    shot(small, "phone-menu")
    phone.close()
    context.close()
