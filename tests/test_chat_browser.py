"""The web UI in headless Chromium (Debian's `chromium`, driven by Playwright), served by the real chat agent
over HTTPS, with the real model agent behind it.

Chromium is not told to ignore certificate errors in general: only the chat node's own server key is
accepted, by its SPKI hash (--ignore-certificate-errors-spki-list), which is what trusting the cluster CA
amounts to for this one server. Screenshots go to test-artifacts/ (git-ignored).

Every page signs in first, through the login form, as a person does. Accounts are made with the chat node's
own `clawbot users` (ChatAgent.add_user); the admin exists from the start (ChatAgent.admin). Every wait has a
deadline (Playwright's expect/wait_for_* timeouts).

Replies with known Markdown come from a knowledge base with the model down (kb_chat), not from the random-weight
model; stopping, regenerating and waiting in line use a model node with one slot and long replies (slow_nodes).
axe-core (npm, installed by .ci/run into ~/.cache/clawbot/npm) runs inside the page on the main states: no serious
or critical violation; each run's findings go to test-artifacts/axe-NAME.json.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from fixtures_chat import (ARTIFACTS, ChatAgent, ModelAgent, chat_config, chat_pki, free_port, model_config,  # noqa: F401
                           parse_sse, running)
from tests.fixtures_agent import llama_server_binary  # noqa: F401  (builds the engine if no step did)
from fixtures_models import gguf_100m, models_dir  # noqa: F401

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
LONG = "Tell me about the spring weather in Paris, the rain, the parks and the river Seine. "
GENERIC = "wrong user name or password"
IDLE_S = 10  # the shortest auth.session_idle_timeout_s the schema allows
THROTTLE = {"max_failures": 3, "max_failures_per_address": 1000, "window_s": 60}
USERS = ("alice", "bob", "carol", "dave", "frank")


def password_of(name: str) -> str:
    return f"{name}-password-1"


@pytest.fixture(scope="module")
def nodes(chat_pki, gguf_100m, llama_server_binary, tmp_path_factory):
    """A model node and a chat node with a knowledge base, as a person would reach them.

    The ~110 M-parameter random-weight model (not the 2-layer one) so tokens arrive over a visible
    stretch of time, as on a real node; with the tiny model a whole reply can land in one network read.
    Failed logins are throttled after 3 per account (per address: high, as every test comes from 127.0.0.1).
    """
    work = tmp_path_factory.mktemp("browser")
    kb = work / "kb"
    kb.mkdir()
    (kb / "garden.md").write_text("# Garden\n\n## Watering\n\nWater the tomatoes every evening in July.\n")
    model = ModelAgent(model_config(chat_pki, gguf_100m, context_window=512, max_tokens=48), work / "model", chat_pki)
    chat = ChatAgent(chat_config(chat_pki, work / "chat", model.endpoint, context_window=512, max_tokens=48,
                                 fallbacks=["web_search", "knowledge_base"], kb_dir=kb,
                                 summary={"enabled": True, "keep_recent_messages": 2, "max_tokens": 48},
                                 auth={"login_throttle": THROTTLE}),
                     work / "chat", chat_pki)
    with running(model), running(chat):
        for name in USERS:
            chat.add_user(name, password_of(name))
        yield model, chat


@pytest.fixture(scope="module")
def short_chat(nodes, chat_pki, tmp_path_factory):
    """A second chat node (same model node) whose sessions end after IDLE_S seconds without a request."""
    model, _ = nodes
    work = tmp_path_factory.mktemp("browser-idle")
    chat = ChatAgent(chat_config(chat_pki, work / "chat", model.endpoint, context_window=512, max_tokens=48,
                                 auth={"session_idle_timeout_s": IDLE_S}), work / "chat", chat_pki)
    with running(chat):
        yield chat


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


def expect(locator):
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


class Watched:
    """A browser context and page whose script errors and CSP violations are collected (both must stay empty)."""

    def __init__(self, browser, **options):
        self.context = browser.new_context(ignore_https_errors=False, **{
            "viewport": {"width": 1200, "height": 800}, "locale": "en-US", **options})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("console", lambda msg: self.errors.append(msg.text)
                     if msg.type == "error" and "Content Security Policy" in msg.text else None)


@contextlib.contextmanager
def watched(browser, **options):
    w = Watched(browser, **options)
    try:
        yield w
    except BaseException:
        if w.errors:  # a script error is often the cause: keep it next to the screenshots
            ARTIFACTS.mkdir(exist_ok=True)
            (ARTIFACTS / "chat-page-errors.txt").write_text("\n".join(w.errors))
        raise
    finally:
        with contextlib.suppress(Exception):
            w.context.close()
    assert not w.errors, w.errors


def sign_in(page, chat: ChatAgent, name: str | None = None, password: str | None = None) -> None:
    """Fill the login form and wait until the app shows the signed-in user."""
    name = name or chat.admin[0]
    password = password or (chat.admin[1] if name == chat.admin[0] else password_of(name))
    expect(page.locator("#login-form")).to_be_visible(timeout=30000)
    page.fill("#login-username", name)
    page.fill("#login-password", password)
    page.click("#login-submit")
    expect(page.locator("#who-name")).to_have_text(name, timeout=30000)
    expect(page.locator("#login-view")).to_be_hidden()


def clear_login_error(page) -> None:
    """So that the next expect on #login-error waits for the server's next answer, not the last one."""
    page.evaluate("(() => { const e = document.getElementById('login-error'); e.textContent = ''; e.hidden = true; })()")


def fetch_status(page, path: str, method: str = "GET", csrf: bool = False, body: dict | None = None) -> dict:
    """fetch() from inside the page (its cookies, same origin); with csrf=True the session's token is sent."""
    return page.evaluate("""async ([path, method, csrf, body]) => {
      const headers = {"Content-Type": "application/json"};
      if (csrf) headers["X-CSRF-Token"] = (await (await fetch("/api/session")).json()).csrf_token;
      const r = await fetch(path, {method, headers, body: body === null ? undefined : JSON.stringify(body)});
      let text = await r.text();
      return {status: r.status, body: text, retryAfter: r.headers.get("Retry-After")};
    }""", [path, method, csrf, body])


def session_cookie(context) -> str | None:
    return next((c["value"] for c in context.cookies() if c["name"] == "clawbot_session"), None)


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
    page.wait_for_function(  # answered, and the conversation read again (#messages is aria-busy until then)
        "n => document.querySelectorAll('.message.assistant:not(.streaming)').length > n"
        " && !document.getElementById('send').disabled && !document.getElementById('messages').hasAttribute('aria-busy')",
        arg=before, timeout=60000)


@pytest.fixture(autouse=True)
def explain_failure(request, nodes):
    """On a failure, keep what a person would need: the agents' logs next to the screenshots."""
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before:
        ARTIFACTS.mkdir(exist_ok=True)
        agents = list(nodes)
        if "short_chat" in request.fixturenames:
            agents.append(request.getfixturevalue("short_chat"))
        if "kb_chat" in request.fixturenames:
            agents.append(request.getfixturevalue("kb_chat"))
        if "base_model_chat" in request.fixturenames:
            agents.append(request.getfixturevalue("base_model_chat"))
        if "slow_nodes" in request.fixturenames:
            agents.extend(request.getfixturevalue("slow_nodes"))
        for n, agent in enumerate(agents):
            (ARTIFACTS / f"chat-{request.node.name}-{agent.role}{n}.log").write_text(agent.log_tail(100000))


# ---------------------------------------------------------------------------------------------- signing in


def test_login_wrong_password_and_logout(nodes, browser):
    """The login view first; a wrong password or an unknown name get one generic message; logout ends the session."""
    _, chat = nodes
    with watched(browser) as w:
        page = w.page
        page.goto(chat.url)
        expect(page.locator("#login-form")).to_be_visible(timeout=30000)
        expect(page.locator("#app")).to_be_hidden()
        expect(page.locator("#sso")).to_be_hidden()  # auth.oidc is off on this node
        assert page.locator("label[for=login-username]").inner_text() == "User name"
        assert page.locator("label[for=login-password]").inner_text() == "Password"
        axe_check(page, "login")
        shot(page, "login")

        for name, password in (("alice", "not-her-password"), ("nobody-here", "whatever-123")):
            page.fill("#login-username", name)
            page.fill("#login-password", password)
            clear_login_error(page)
            page.click("#login-submit")
            expect(page.locator("#login-error")).to_have_text(GENERIC, timeout=20000)
            expect(page.locator("#login-error")).to_be_visible()
            expect(page.locator("#app")).to_be_hidden()
            assert session_cookie(w.context) is None
        shot(page, "login-wrong")

        sign_in(page, chat, "alice")
        expect(page.locator("#login-error")).to_be_hidden()
        expect(page.locator("#open-admin")).to_be_hidden()  # alice is a user
        expect(page.locator("#status-chat")).to_have_attribute("data-state", "up", timeout=30000)
        cookie = session_cookie(w.context)
        assert cookie
        page.reload()  # the session outlives a reload
        expect(page.locator("#who-name")).to_have_text("alice", timeout=30000)

        page.click("#logout")
        expect(page.locator("#login-view")).to_be_visible(timeout=20000)
        expect(page.locator("#login-notice")).to_have_text("You are signed out.")
        expect(page.locator("#app")).to_be_hidden()
        assert page.locator("#conversations li").count() == 0
        assert fetch_status(page, "/api/session")["status"] == 401
        with chat.anonymous(cookies={"clawbot_session": cookie}) as old:  # the server forgot the session, too
            assert old.get("/api/session").status_code == 401
        page.reload()
        expect(page.locator("#login-form")).to_be_visible(timeout=20000)
        expect(page.locator("#app")).to_be_hidden()


def test_throttling_after_repeated_failures(nodes, browser):
    """After max_failures wrong passwords the account is throttled: the server's message and its Retry-After."""
    _, chat = nodes
    with watched(browser) as w:
        page = w.page
        retry_headers: list[str] = []
        page.on("response", lambda r: retry_headers.append(r.headers.get("retry-after"))
                if r.url.endswith("/api/login") and r.status == 429 else None)
        page.goto(chat.url)
        expect(page.locator("#login-form")).to_be_visible(timeout=30000)
        for _ in range(THROTTLE["max_failures"]):
            page.fill("#login-username", "carol")
            page.fill("#login-password", "wrong-wrong-wrong")
            clear_login_error(page)
            page.click("#login-submit")
            expect(page.locator("#login-error")).to_have_text(GENERIC, timeout=20000)
        # now even the right password is refused, with the reason and when to try again
        page.fill("#login-username", "carol")
        page.fill("#login-password", password_of("carol"))
        clear_login_error(page)
        page.click("#login-submit")
        expect(page.locator("#login-error")).to_contain_text("too many failed logins", timeout=20000)
        retry = page.locator("#login-retry")
        expect(retry).to_be_visible()
        expect(retry).to_contain_text(re.compile(r"Retry-After: \d+ s"))
        shown = int(re.search(r"Retry-After: (\d+) s", retry.inner_text()).group(1))
        assert retry_headers and retry_headers[-1] is not None
        assert 0 < shown <= int(retry_headers[-1]) <= THROTTLE["window_s"] + 1
        expect(page.locator("#app")).to_be_hidden()
        assert session_cookie(w.context) is None
        shot(page, "login-throttled")
        # the countdown runs
        page.wait_for_timeout(2200)
        later = int(re.search(r"Retry-After: (\d+) s", retry.inner_text()).group(1))
        assert later < shown


def test_session_expiry_returns_to_the_login_view(nodes, short_chat, browser):
    """With auth.session_idle_timeout_s = 10, an idle page goes back to the login view by itself, and the
    server has really ended the session; signing in again works."""
    chat = short_chat
    with watched(browser) as w:
        page = w.page
        page.goto(chat.url)
        sign_in(page, chat, chat.admin[0])
        signed_in_at = time.monotonic()
        cookie = session_cookie(w.context)
        page.click("#new-conversation")
        # idle from here on: the status strip stops polling, and the expiry check finds the session gone
        expect(page.locator("#login-notice")).to_contain_text("session expired", timeout=(IDLE_S + 35) * 1000)
        assert time.monotonic() - signed_in_at >= IDLE_S - 1
        expect(page.locator("#app")).to_be_hidden()
        expect(page.locator("#login-form")).to_be_visible()
        with chat.anonymous(cookies={"clawbot_session": cookie}) as old:
            assert old.get("/api/session").status_code == 401
        shot(page, "session-expired")
        sign_in(page, chat, chat.admin[0])
        expect(page.locator("#login-notice")).to_be_hidden()


def test_a_401_mid_use_shows_the_login_view(nodes, browser):
    """The session vanishes while the page is open (here: its cookie is gone); the next action gets 401 and the
    page says the session expired, showing nothing of the conversations any more."""
    _, chat = nodes
    with watched(browser) as w:
        page = w.page
        page.goto(chat.url)
        sign_in(page, chat, "alice")
        with chat.login("alice", password_of("alice")) as api:
            api.post("/api/conversations", json={"title": "alice mid-use"}).raise_for_status()
        page.click("#new-conversation")
        expect(page.locator("#conversations .title", has_text="alice mid-use").first).to_be_visible(timeout=20000)
        w.context.clear_cookies()
        page.fill("#input", "are you still there?")
        page.press("#input", "Enter")
        expect(page.locator("#login-notice")).to_contain_text("session expired", timeout=20000)
        expect(page.locator("#app")).to_be_hidden()
        assert page.locator("#conversations li").count() == 0
        assert page.locator("#messages .message").count() == 0


# ---------------------------------------------------------------------------------------------- privacy, CSRF


def test_user_cannot_see_or_open_another_users_conversation(nodes, browser):
    _, chat = nodes
    with chat.login("bob", password_of("bob")) as bob:
        secret = bob.post("/api/conversations", json={"title": "bob-secret-plans"}).json()
    with chat.login("alice", password_of("alice")) as alice:
        own = alice.post("/api/conversations", json={"title": "alice-own-notes"}).json()
    with watched(browser) as w:
        page = w.page
        page.goto(chat.url)
        sign_in(page, chat, "alice")
        expect(page.locator("#conversations .title", has_text="alice-own-notes").first).to_be_visible(timeout=20000)
        assert page.locator("#conversations", has_text="bob-secret-plans").count() == 0
        assert secret["id"] not in page.content()

        for address in (f"{chat.url}/#c={secret['id']}", f"{chat.url}/#{secret['id']}"):
            page.goto("about:blank")
            page.goto(address)
            expect(page.locator("#banner")).to_contain_text(f"no conversation {secret['id']}", timeout=20000)
            expect(page.locator("#who-name")).to_have_text("alice")
            assert page.locator("#messages .message").count() == 0
            assert page.locator("#conversations li.active").count() == 0
            assert secret["id"] not in page.evaluate("location.hash")
        shot(page, "foreign-conversation")

        assert fetch_status(page, f"/api/conversations/{secret['id']}")["status"] == 404
        assert fetch_status(page, f"/api/conversations/{secret['id']}/requests")["status"] == 404
        assert fetch_status(page, f"/api/conversations/{secret['id']}/messages", "POST", csrf=True,
                            body={"content": "hi"})["status"] == 404
        assert fetch_status(page, f"/api/conversations/{secret['id']}", "DELETE", csrf=True)["status"] == 404
        assert fetch_status(page, f"/api/conversations/{own['id']}")["status"] == 200
    with chat.login("bob", password_of("bob")) as bob:  # still there, untouched
        assert bob.get(f"/api/conversations/{secret['id']}").json()["title"] == "bob-secret-plans"


def test_csrf_less_post_is_refused(nodes, browser):
    _, chat = nodes
    with watched(browser) as w:
        page = w.page
        page.goto(chat.url)
        sign_in(page, chat, "alice")
        before = len(json.loads(fetch_status(page, "/api/conversations")["body"]))
        refused = fetch_status(page, "/api/conversations", "POST", body={"title": "forged"})
        assert refused["status"] == 403, refused
        assert "CSRF" in json.loads(refused["body"])["error"]
        assert fetch_status(page, "/api/keys", "POST", body={"name": "forged"})["status"] == 403
        assert fetch_status(page, "/api/logout", "POST")["status"] == 403
        assert len(json.loads(fetch_status(page, "/api/conversations")["body"])) == before
        made = fetch_status(page, "/api/conversations", "POST", csrf=True, body={"title": "with the token"})
        assert made["status"] == 201, made
        # the page's own calls carry the token: a new conversation made through the UI works
        page.fill("#input", "hello from a form with a CSRF token")
        page.press("#input", "Enter")
        expect(page.locator("#messages .message.user").first).to_have_text("hello from a form with a CSRF token",
                                                                          timeout=60000)


def test_two_tabs_share_one_session(nodes, browser):
    """Tabs of one browser share the cookie: a logout in one signs the other out; after a new login elsewhere a
    tab's stale CSRF token is replaced once, and if another account signed in, the tab shows that account only."""
    _, chat = nodes
    with watched(browser) as w:
        first = w.page
        first.goto(chat.url)
        sign_in(first, chat, "alice")
        second = w.context.new_page()
        second.goto(chat.url)
        expect(second.locator("#who-name")).to_have_text("alice", timeout=20000)
        second.click("#logout")
        expect(first.locator("#login-notice")).to_have_text("You signed out in another tab.", timeout=20000)
        expect(first.locator("#app")).to_be_hidden()

        sign_in(first, chat, "alice")
        sign_in(second, chat, "alice")  # a new session: the first tab's CSRF token is stale now
        first.click("#open-account")
        first.fill("#key-name", "from the first tab")
        first.click("#key-form button[type=submit]")
        expect(first.locator("#keys-message")).to_have_text("Key “from the first tab” created.", timeout=20000)

        with chat.login("bob", password_of("bob")) as bob:
            bob.post("/api/conversations", json={"title": "bob-two-tabs"}).raise_for_status()
        status = second.evaluate("""async (password) => (await fetch("/api/login", {method: "POST",
            headers: {"Content-Type": "application/json"}, body: JSON.stringify({username: "bob", password})})).status""",
                                 password_of("bob"))
        assert status == 200
        first.fill("#key-name", "must not be made for bob")
        first.click("#key-form button[type=submit]")
        expect(first.locator("#who-name")).to_have_text("bob", timeout=20000)
        expect(first.locator("#conversations .title", has_text="bob-two-tabs").first).to_be_visible(timeout=20000)
        assert first.locator("#conversations", has_text="alice-own-notes").count() == 0
        assert first.locator("#keys", has_text="from the first tab").count() == 0
        with chat.login("bob", password_of("bob")) as bob:
            assert "must not be made for bob" not in [k["name"] for k in bob.get("/api/keys").json()]


# ---------------------------------------------------------------------------------------------- account and admin


def test_keys_usage_and_password(nodes, browser):
    """Create a key (shown once, copyable), see it listed and used, revoke it; usage; change the password."""
    _, chat = nodes
    with watched(browser) as w:
        w.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=chat.url)
        page = w.page
        page.on("dialog", lambda d: d.accept())
        page.goto(chat.url)
        sign_in(page, chat, "dave")
        expect(page.locator("#usage-line")).to_contain_text("tokens today", timeout=20000)
        page.click("#open-account")
        expect(page.locator("#account-view")).to_be_visible()
        expect(page.locator("#usage [data-field=tokens]")).to_contain_text("no daily limit", timeout=20000)
        expect(page.locator("#keys")).to_contain_text("No API keys yet.", timeout=20000)

        page.fill("#key-name", "laptop script")
        page.click("#key-form button[type=submit]")
        expect(page.locator("#new-key")).to_be_visible(timeout=20000)
        expect(page.locator("#new-key")).to_contain_text("shown only once")
        key = page.locator("#new-key-value").inner_text()
        assert re.fullmatch(r"cb-[0-9a-f]{8}_[A-Za-z0-9_-]{20,}", key), key
        row = page.locator("#keys tr", has_text="laptop script")
        expect(row).to_have_count(1)
        assert key.split("_")[0] in row.inner_text() and key not in page.locator("#keys").inner_text()
        assert row.locator("td").nth(3).inner_text() == "never"
        page.click("#copy-key")
        expect(page.locator("#copy-result")).not_to_be_empty()
        if "Copied" in page.locator("#copy-result").inner_text():
            assert page.evaluate("navigator.clipboard.readText()") == key
        shot(page, "keys")

        with chat.anonymous(headers={"Authorization": f"Bearer {key}"}) as app:  # the key works for an app
            assert app.get("/api/usage").json()["user"] == "dave"
        page.reload()
        expect(page.locator("#account-view")).to_be_visible(timeout=20000)
        expect(page.locator("#new-key")).to_be_hidden()  # shown once: gone after a reload
        row = page.locator("#keys tr", has_text="laptop script")
        expect(row.locator("td").nth(3)).not_to_have_text("never", timeout=20000)
        row.get_by_role("button", name=re.compile("Revoke key laptop script")).click()
        expect(page.locator("#keys")).to_contain_text("No API keys yet.", timeout=20000)
        with chat.anonymous(headers={"Authorization": f"Bearer {key}"}) as app:
            assert app.get("/api/usage").status_code == 401

        page.fill("#current-password", "not-the-password")
        page.fill("#new-password", "dave-password-2")
        page.fill("#repeat-password", "dave-password-2")
        page.click("#password-form button[type=submit]")
        expect(page.locator("#password-message")).to_contain_text("current password is wrong", timeout=20000)
        page.fill("#current-password", password_of("dave"))
        page.fill("#new-password", "dave-password-2")
        page.fill("#repeat-password", "dave-password-2")
        page.click("#password-form button[type=submit]")
        # this session goes on (the server ends the account's other sessions); the new password is the one now
        expect(page.locator("#password-message")).to_have_text("Password changed.", timeout=20000)
        expect(page.locator("#who-name")).to_have_text("dave")
        page.click("#logout")
        expect(page.locator("#login-view")).to_be_visible(timeout=20000)
        sign_in(page, chat, "dave", "dave-password-2")
        page.click("#logout")
        expect(page.locator("#login-view")).to_be_visible(timeout=20000)
        page.fill("#login-username", "dave")
        page.fill("#login-password", password_of("dave"))
        clear_login_error(page)
        page.click("#login-submit")
        expect(page.locator("#login-error")).to_have_text(GENERIC, timeout=20000)


def test_admin_page(nodes, browser):
    """Only an admin sees the admin page; there: add a user, limits override, role, disable/enable, reset, remove."""
    _, chat = nodes
    with watched(browser) as w:  # a user has no admin page, and the API refuses them
        page = w.page
        page.goto(f"{chat.url}/#admin")
        sign_in(page, chat, "alice")
        expect(page.locator("#open-admin")).to_be_hidden()
        expect(page.locator("#admin-view")).to_be_hidden()
        expect(page.locator("#chat-view")).to_be_visible()
        assert fetch_status(page, "/api/admin/users")["status"] == 403
        assert fetch_status(page, "/api/admin/users", "POST", csrf=True,
                            body={"name": "mallory", "password": "mallory-pass-1", "role": "admin"})["status"] == 403

    with watched(browser) as w:
        page = w.page
        page.on("dialog", lambda d: d.accept())
        page.goto(chat.url)
        sign_in(page, chat)
        page.click("#open-admin")
        expect(page.locator("#admin-view")).to_be_visible()
        me = page.locator(f"#users [data-user={chat.admin[0]}]")
        expect(me).to_be_visible(timeout=20000)
        expect(me.locator("select[data-action=role]")).to_be_disabled()  # no locking oneself out

        page.fill("#new-user-name", "erin")
        page.fill("#new-user-password", "erin-password-1")
        page.select_option("#new-user-role", "user")
        page.click("#add-user-form button[type=submit]")
        card = page.locator("#users [data-user=erin]")
        expect(card).to_be_visible(timeout=20000)
        expect(page.locator("#admin-message")).to_contain_text("erin: added")
        expect(card.locator("[data-field=last-login]")).to_have_text("never")
        with chat.login("erin", "erin-password-1"):
            pass
        page.reload()
        card = page.locator("#users [data-user=erin]")
        expect(card.locator("[data-field=last-login]")).not_to_have_text("never", timeout=20000)
        expect(card.locator("[data-field=usage]")).to_contain_text("0 tokens")

        card.get_by_label("Requests per minute").fill("7")
        card.get_by_label("Tokens per day").fill("5000")
        card.get_by_role("button", name="Save limits").click()
        expect(card.locator("[data-field=limits]")).to_have_text(
            "7 requests/min (override), 5,000 tokens/day (override)", timeout=20000)
        with chat.client() as admin_api:
            erin = next(u for u in admin_api.get("/api/admin/users").json() if u["name"] == "erin")
            assert erin["limits_override"] == {"requests_per_minute": 7, "tokens_per_day": 5000}
        card.get_by_role("button", name="Clear the limit override of erin").click()
        expect(card.locator("[data-field=limits]")).not_to_contain_text("override", timeout=20000)

        card.get_by_label("Role").select_option("admin")
        expect(card.locator(".labels")).to_contain_text("admin", timeout=20000)
        card.get_by_label("Role").select_option("user")
        expect(card.locator(".label.role-user")).to_be_visible(timeout=20000)

        card.get_by_role("button", name="Disable erin").click()
        expect(card.locator(".labels")).to_contain_text("disabled", timeout=20000)
        with chat.anonymous() as anon:
            assert anon.post("/api/login", json={"username": "erin", "password": "erin-password-1"}).status_code == 401
        card.get_by_role("button", name="Enable erin").click()
        expect(card.locator(".labels")).not_to_contain_text("disabled", timeout=20000)

        card.get_by_label("New password for erin").fill("erin-password-2")
        card.get_by_role("button", name="Reset password").click()
        expect(page.locator("#admin-message")).to_contain_text("erin: password reset", timeout=20000)
        with chat.login("erin", "erin-password-2"):
            pass
        shot(page, "admin")

        card.get_by_role("button", name="Remove erin").click()
        expect(page.locator("#users [data-user=erin]")).to_have_count(0, timeout=20000)
        with chat.client() as admin_api:
            assert "erin" not in [u["name"] for u in admin_api.get("/api/admin/users").json()]


def test_limit_reached_shows_in_the_conversation(nodes, browser):
    """Over their requests-per-minute limit, a user sees the server's message (which limit) in the conversation."""
    _, chat = nodes
    with chat.client() as admin_api:
        admin_api.patch("/api/admin/users/frank", json={"limits": {"requests_per_minute": 1}}).raise_for_status()
    with watched(browser) as w:
        page = w.page
        page.goto(chat.url)
        sign_in(page, chat, "frank")
        expect(page.locator("#usage-line")).to_contain_text("limit 1 requests/min", timeout=20000)
        ask(page, "First question, within the limit")
        page.fill("#input", "Second question, over the limit")
        page.press("#input", "Enter")
        notice = page.locator("#messages .limit-notice")
        expect(notice).to_contain_text("requests per minute limit", timeout=30000)
        expect(notice).to_contain_text(re.compile(r"Try again in \d+ s"))
        assert notice.get_attribute("role") == "alert"
        assert page.locator("#input").input_value() == "Second question, over the limit"  # not lost
        assert page.locator("#messages .message.user").count() == 1
        shot(page, "limit")


def test_sso_button_signs_in_through_the_provider(nodes, chat_pki, browser, tmp_path):
    """With auth.oidc on, the login view offers SSO; the button leads through a real OIDC provider and back."""
    from test_oidc import register, running_provider

    def command(port):
        return [sys.executable, "-m", "oidc_provider_mock", "--host", "127.0.0.1", "--port", str(port),
                "--require-registration", "true", "--require-nonce", "true",
                "--user-claims", json.dumps({"sub": "u-2001", "preferred_username": "ingrid", "groups": ["staff"]})]

    model, _ = nodes
    with running_provider(tmp_path / "provider.log", command) as provider:
        port = free_port()
        client_id, secret = register(provider, [f"https://localhost:{port}/auth/oidc/callback"])
        secret_file = tmp_path / "oidc-client-secret"
        secret_file.write_text(secret)
        secret_file.chmod(0o600)
        config = chat_config(chat_pki, tmp_path / "chat", model.endpoint, auth={"oidc": {
            "enabled": True, "issuer": provider, "client_id": client_id, "client_secret_file": str(secret_file)}})
        config["chat"]["port"] = port
        with running(ChatAgent(config, tmp_path / "chat", chat_pki)) as agent, watched(browser) as w:
            page = w.page
            page.goto(agent.url)
            sso = page.get_by_role("link", name="Sign in with SSO")
            expect(sso).to_be_visible(timeout=20000)
            assert sso.get_attribute("href") == "/auth/oidc/login"
            shot(page, "login-sso")
            sso.click()
            page.wait_for_url(f"{provider}/**", timeout=20000)
            page.fill("input[name=sub]", "u-2001")
            page.click("button[type=submit]:has-text('Authorize')")
            expect(page.locator("#who-name")).to_have_text("ingrid", timeout=30000)
            expect(page.locator("#who-role")).to_have_text("user")


# ---------------------------------------------------------------------------------------------- chatting


def test_chat_in_the_browser(nodes, browser):
    """Send a message, watch it stream in, reload: the conversation is still there, labelled by source."""
    model, chat = nodes
    with watched(browser) as w:
        page = w.page
        page.goto(chat.url)
        sign_in(page, chat)
        page.wait_for_selector("#status-model[data-state='up']", timeout=30000)
        assert page.locator("#status-chat").get_attribute("data-state") == "up"

        page.evaluate(STREAM_PROBE)
        ask(page, "Hello! What can you do?")
        lengths = page.evaluate("window.__lengths")
        # the visible text grows as tokens come (Markdown may shorten it a little when a ** or ` closes)
        rises = sum(1 for a, b in zip(lengths, lengths[1:]) if b > a)
        assert rises >= 3 and lengths[-1] > lengths[0], f"reply did not stream in: {lengths}"
        reply = page.locator(".message.assistant").last
        assert reply.locator(".label.source-model").inner_text() == "model"
        assert reply.locator(".text").inner_text().strip()
        shot(page, "streamed")

        page.reload()
        page.wait_for_selector(".message.assistant")
        assert page.locator(".message.user .text").first.inner_text() == "Hello! What can you do?"
        assert page.locator(".message.assistant .label").first.inner_text() == "model"
        assert page.locator(".conversations li.active .title").inner_text() == "Hello! What can you do?"
        expect(page.locator("#usage-line")).not_to_contain_text(re.compile(r"^0 tokens"), timeout=20000)


# ---------------------------------------------------------------------------------------------- the chat UI people expect

AXE = Path.home() / ".cache" / "clawbot" / "npm" / "node_modules" / "axe-core" / "axe.min.js"  # .ci/run installs it
SLOW_TOKENS = 2000  # ~30 s of reply here: long enough to stop one halfway and to keep others waiting meanwhile
KB_DOCS = {
    "operations.md": """# Operations

## Restarting the chat agent

Restart the **chat agent** with `systemctl` on the chat node, then read its log:
```sh
sudo systemctl restart clawbot-chat
journalctl -u clawbot-chat -n 20
```

## Pasted markup

One pasted snippet read <img src=x onerror="document.body.dataset.pwned='img'"> then \
<script>document.body.dataset.pwned='script'</script> and [a trap](javascript:document.body.dataset.pwned='link').
""",
}


def axe_check(page, name: str) -> list[dict]:
    """axe-core inside the page: no serious or critical violation. The full list goes to test-artifacts/axe-NAME.json."""
    assert AXE.is_file(), (f"axe-core is missing at {AXE}: bash .ci/run installs it "
                           "(npm install --prefix ~/.cache/clawbot/npm axe-core@<version in .ci/run>)")
    if not page.evaluate("typeof window.axe === 'object'"):
        page.evaluate(AXE.read_text())  # through the DevTools protocol: the page's own CSP stays in force
    violations = page.evaluate("""async () => (await axe.run(document, {resultTypes: ['violations']})).violations
        .map(v => ({id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.slice(0, 5).map(n => n.target.join(' '))}))""")
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / f"axe-{name}.json").write_text(json.dumps(violations, indent=2))
    serious = [v for v in violations if v["impact"] in ("serious", "critical")]
    assert not serious, f"axe-core, {name}: {json.dumps(serious, indent=1)}"
    return violations


def last_answer(page):
    return page.locator("#messages > article.message.assistant").last


def open_details(answer) -> dict[str, str]:
    """Open an answer's details disclosure; its rows as {data-field: text}."""
    answer.locator("details.answer-details > summary").click()
    expect(answer.locator("details.answer-details dl")).to_be_visible()
    return answer.locator("details.answer-details dd").evaluate_all(
        "nodes => Object.fromEntries(nodes.map(n => [n.dataset.field, n.textContent]))")


class Sender:
    """Another person sending one message through the chat API in a thread, as their browser would: the reply's
    events are collected as they arrive."""

    def __init__(self, chat: ChatAgent, name: str, content: str):
        self.client = chat.login(name, password_of(name), timeout=120)
        self.conversation = self.client.post("/api/conversations", json={"title": f"{name} in line"}).json()["id"]
        self.events: list[tuple[str, dict]] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(content,), daemon=True)
        self.thread.start()

    def _run(self, content: str) -> None:
        try:
            with self.client.stream("POST", f"/api/conversations/{self.conversation}/messages",
                                    json={"content": content}) as response:
                assert response.status_code == 200, response.read()
                buffer = ""
                for text in response.iter_text():
                    buffer += text
                    while "\n\n" in buffer:
                        block, buffer = buffer.split("\n\n", 1)
                        self.events.extend(parse_sse(block + "\n\n").events)
        except BaseException as exc:  # noqa: BLE001 (reported by wait_for / finish)
            self.error = exc

    def wait_for(self, event: str, timeout_s: float = 60) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, data in list(self.events):
                if name == event:
                    return data
            assert self.error is None, f"the stream failed: {self.error!r}"
            assert self.thread.is_alive(), f"the stream ended without {event}: {self.events}"
            time.sleep(0.05)
        raise AssertionError(f"no {event} event after {timeout_s} s: {self.events}")

    def of_done(self) -> list[dict]:
        return [data["message"] for event, data in list(self.events) if event == "done"]

    def finish(self) -> None:
        """Stop the reply (or the wait) and wait for the stream's end."""
        self.client.post(f"/api/conversations/{self.conversation}/stop").raise_for_status()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "the stream did not end after stop"
        self.client.close()


@pytest.fixture(scope="module")
def kb_chat(chat_pki, tmp_path_factory):
    """A chat node whose model node is down (nothing listens at its gateway's address): every question is answered
    at once from its knowledge base, whose documents are written here, so the reply's Markdown is known."""
    work = tmp_path_factory.mktemp("browser-kb")
    kb = work / "kb"
    kb.mkdir()
    for name, text in KB_DOCS.items():
        (kb / name).write_text(text)
    chat = ChatAgent(chat_config(chat_pki, work / "chat", f"https://localhost:{free_port()}", fallbacks=["knowledge_base"],
                                 kb_dir=kb), work / "chat", chat_pki)
    with running(chat):
        chat.add_user("alice", password_of("alice"))
        yield chat


@pytest.fixture(scope="module")
def slow_nodes(chat_pki, gguf_100m, llama_server_binary, tmp_path_factory):
    """A model node with one slot and long replies (up to SLOW_TOKENS), and a chat node that sends it one request at
    a time: an answer takes seconds, long enough to stop it, and a second person's message waits in line."""
    work = tmp_path_factory.mktemp("browser-slow")
    config = model_config(chat_pki, gguf_100m, context_window=4096, max_tokens=SLOW_TOKENS)
    config["model_gateway"]["max_concurrency"] = 1
    config["model_server"]["parallel_slots"] = 1
    model = ModelAgent(config, work / "model", chat_pki)
    config = chat_config(chat_pki, work / "chat", model.endpoint, context_window=4096, max_tokens=SLOW_TOKENS)
    config["chat"]["queue"] = {"slots": 1, "max_wait_s": 300}
    chat = ChatAgent(config, work / "chat", chat_pki)
    with running(model), running(chat):
        for name in ("alice", "bob", "carol"):
            chat.add_user(name, password_of(name))
        yield model, chat


@pytest.fixture(scope="module")
def base_model_chat(chat_pki, models_dir, llama_server_binary, tmp_path_factory):
    """A model node serving a base model: the tiny generated GGUF copied without its chat template (gguf's own
    gguf_new_metadata), so its card says base model, and a chat node in front of it."""
    from fixtures_models import write_model_file

    work = tmp_path_factory.mktemp("browser-base")
    base = work / "tiny-base.gguf"
    done = subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", "--remove-metadata",
                           "tokenizer.chat_template", "--general-name", "Tiny Base", "--force",
                           str(write_model_file(models_dir, "tiny", "Q8_0")), str(base)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    config = model_config(chat_pki, base, context_window=512, max_tokens=16)
    config["model_server"]["chat_template"] = "vicuna"  # a base model has none: name a plain transcript format
    model = ModelAgent(config, work / "model", chat_pki)
    chat = ChatAgent(chat_config(chat_pki, work / "chat", model.endpoint, context_window=512, max_tokens=16),
                     work / "chat", chat_pki)
    with running(model), running(chat):
        chat.add_user("alice", password_of("alice"))
        yield chat


def test_the_model_chip_says_base_model(base_model_chat, browser):
    """The model chip names the model and says it is a base model; the card's note is its tooltip and accessible
    description, and the empty conversation shows it too."""
    chat = base_model_chat
    with chat.client() as api:
        card = api.get("/api/status").json()["gateway"]["model_card"]
    assert card["base_model"] is True and card["name"] == "Tiny Base" and card["note"], card
    with watched(browser) as w:
        page = w.page
        page.goto(chat.url)
        sign_in(page, chat, "alice")
        chip = page.locator("#status-model")
        expect(chip).to_have_text("Tiny Base · base model", timeout=30000)
        expect(chip).to_have_attribute("data-state", "up")
        assert card["note"] in chip.get_attribute("title")
        assert page.locator("#" + chip.get_attribute("aria-describedby")).text_content() == card["note"]
        assert page.evaluate("""() => { const el = document.getElementById('status-model');
            return document.getElementById(el.getAttribute('aria-describedby')).textContent; }""") == card["note"]
        expect(page.locator("#messages .empty .model-note")).to_have_text(card["note"])
        axe_check(page, "base-model")
        shot(page, "base-model")


def test_empty_state_favicon_and_keyboard(nodes, browser):
    """The empty conversation: a favicon, the composer's labels and hint, Enter sends and Shift+Enter is a new line;
    axe-core finds nothing serious, in light and in dark mode (which follows the system)."""
    _, chat = nodes
    for scheme in ("light", "dark"):
        with watched(browser, color_scheme=scheme) as w:
            page = w.page
            page.goto(chat.url)
            sign_in(page, chat, "bob")
            page.click("#new-conversation")
            expect(page.locator("#messages .empty")).to_be_visible(timeout=20000)
            expect(page.locator("#status-model")).to_have_attribute("data-state", "up", timeout=30000)
            icon = page.locator("link[rel=icon]")
            assert icon.get_attribute("href") == "/static/favicon.svg"
            answer = fetch_status(page, "/static/favicon.svg")
            assert answer["status"] == 200 and answer["body"].startswith("<svg"), answer
            background = page.evaluate("getComputedStyle(document.documentElement).backgroundColor")
            assert background == {"light": "rgb(246, 247, 249)", "dark": "rgb(20, 23, 28)"}[scheme], background
            assert page.get_by_label("Message", exact=True).evaluate("n => n.id") == "input"
            assert "Shift+Enter" in page.locator("#composer-hint").inner_text()
            assert page.locator("#input").get_attribute("aria-describedby") == "composer-hint"
            axe_check(page, f"empty-{scheme}")
            shot(page, f"empty-{scheme}")
            if scheme == "dark":
                break
            # Shift+Enter: a new line, nothing sent; Enter: sent as typed, both lines
            page.click("#input")
            page.keyboard.type("first line")
            page.keyboard.press("Shift+Enter")
            page.keyboard.type("second line")
            assert page.locator("#input").input_value() == "first line\nsecond line"
            assert page.locator("#messages .message").count() == 0
            page.keyboard.press("Enter")
            expect(page.locator("#messages .message.user .text")).to_have_text("first line\nsecond line", timeout=30000)
            expect(last_answer(page)).not_to_have_class(re.compile("streaming"), timeout=60000)
            expect(page.locator("#send")).to_be_visible(timeout=20000)


def test_markdown_code_copy_and_model_down(kb_chat, browser):
    """With the model down the knowledge base answers: its Markdown is rendered (bold, inline code, a fenced block
    with a Copy button that copies exactly the code); raw HTML and a javascript: link in it are shown, never run."""
    chat = kb_chat
    with watched(browser) as w:
        w.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=chat.url)
        page = w.page
        page.goto(chat.url)
        sign_in(page, chat, "alice")
        expect(page.locator("#status-model")).to_have_attribute("data-state", "down", timeout=30000)
        expect(page.locator("#banner")).to_contain_text("model node is unavailable")
        ask(page, "How do I restart the chat agent?")
        answer = last_answer(page)
        expect(answer.locator(".label.source-knowledge_base")).to_have_text("knowledge base")
        code = answer.locator(".codeblock pre code")
        expect(code).to_have_count(1)
        assert code.inner_text().strip() == "sudo systemctl restart clawbot-chat\njournalctl -u clawbot-chat -n 20"
        assert answer.locator(".codeblock .lang").inner_text() == "sh"
        assert answer.locator(".text strong", has_text="chat agent").count() == 1
        assert answer.locator(".text p code", has_text="systemctl").count() == 1
        assert answer.locator(".text blockquote").count() >= 1  # the passage is quoted
        expect(answer.get_by_role("button", name="Copy sh code", exact=True)).to_have_count(1)
        copy = answer.locator(".codeblock button.copy-code")  # its name changes to "Copied sh code"
        copy.click()
        expect(copy.locator(".copy-label")).to_have_text("Copied", timeout=5000)
        assert page.evaluate("navigator.clipboard.readText()") == "sudo systemctl restart clawbot-chat\njournalctl -u clawbot-chat -n 20"
        details = open_details(answer)
        assert details["source"] == "knowledge base" and details["finish"] == "complete", details
        assert "model-error" in details, details
        axe_check(page, "answer-code")
        shot(page, "answer-code")
        shot(page, "model-down")

        ask(page, "What did the pasted snippet read?")
        answer = last_answer(page)
        text = answer.locator(".text")
        expect(text).to_contain_text("<img src=x onerror=")
        expect(text).to_contain_text("<script>document.body.dataset.pwned='script'</script>")
        assert text.locator("img, script, iframe, [onerror]").count() == 0
        trap = text.locator("a", has_text="a trap")
        expect(trap).to_have_count(1)
        assert not (trap.get_attribute("href") or "").lower().startswith("javascript")
        trap.click()  # no href left: nothing happens
        page.wait_for_timeout(300)
        assert page.evaluate("document.body.dataset.pwned") is None
        assert page.evaluate("document.querySelectorAll('#messages img, #messages script').length") == 0
        shot(page, "markup-escaped")

    with watched(browser, color_scheme="dark") as w:
        page = w.page
        page.goto(chat.url)
        sign_in(page, chat, "alice")
        page.locator("#conversations .open").first.click()
        expect(page.locator("#messages .codeblock").first).to_be_visible(timeout=20000)
        axe_check(page, "answer-code-dark")
        shot(page, "answer-code-dark")


def test_stop_and_regenerate(slow_nodes, browser):
    """Stop while an answer streams: the server is told (POST .../stop), the answer stays, marked stopped, and the
    model slot is free again; Regenerate replaces it with a new answer (stopped here with Esc)."""
    _, chat = slow_nodes
    with watched(browser) as w:
        page = w.page
        stops: list[str] = []
        page.on("request", lambda r: stops.append(r.headers.get("x-csrf-token"))
                if r.method == "POST" and r.url.endswith("/stop") else None)
        page.goto(chat.url)
        sign_in(page, chat, "alice")
        expect(page.locator("#status-model")).to_have_attribute("data-state", "up", timeout=30000)
        page.fill("#input", "Tell me a very long story about the sea.")
        page.press("#input", "Enter")
        live = page.locator("#messages .message.streaming .text")
        page.wait_for_function("() => (document.querySelector('#messages .message.streaming .text') || {}).textContent?.length > 20",
                               timeout=60000)
        expect(page.locator("#stop")).to_be_visible()
        expect(page.locator("#stop")).to_have_text("Stop")
        expect(page.locator("#send")).to_be_hidden()
        expect(page.locator("#reply-status")).to_have_text("The answer is being written…")  # role=status, polite
        page.click("#stop")
        answer = page.locator("#messages > article.message.assistant[data-finish=stopped]")
        expect(answer).to_have_count(1, timeout=20000)
        expect(live).to_have_count(0)
        expect(page.locator("#send")).to_be_visible()
        expect(page.locator("#stop")).to_be_hidden()
        assert len(stops) == 1 and stops[0], "Stop did not call POST .../stop with the CSRF token"
        expect(page.locator("#reply-status")).to_have_text("Stopped.")
        expect(answer.locator(".label.stopped")).to_have_text("stopped")
        assert answer.locator(".text").inner_text().strip()
        details = open_details(answer)
        assert details["finish"] == "stopped by you", details
        assert details.get("model"), details
        assert int(details["completion-tokens"].replace(",", "")) < SLOW_TOKENS, details
        assert details["first-token"].endswith(" s"), details
        with chat.login("alice", password_of("alice")) as api:
            conversation = page.evaluate("location.hash").split("=")[1]
            stored = api.get(f"/api/conversations/{conversation}").json()["messages"]
            assert [m["role"] for m in stored] == ["user", "assistant"]
            assert stored[1]["meta"]["finish_reason"] == "stopped" and stored[1]["status"] == "incomplete"
            deadline = time.monotonic() + 15  # the model slot is given back: nobody holds it after a stop
            while api.get("/api/status").json()["queue"]["active"] and time.monotonic() < deadline:
                time.sleep(0.2)
            assert api.get("/api/status").json()["queue"]["active"] == 0
        axe_check(page, "stopped")
        shot(page, "stopped")

        old_id = answer.get_attribute("data-id")
        regenerate = page.get_by_role("button", name="Regenerate this answer")
        expect(regenerate).to_have_count(1)
        regenerate.click()
        expect(page.locator(f"#messages article[data-id='{old_id}']")).to_have_count(0, timeout=20000)
        page.wait_for_function("() => (document.querySelector('#messages .message.streaming .text') || {}).textContent?.length > 5",
                               timeout=60000)
        assert page.locator("#messages .message.user").count() == 1  # the same question, not sent twice
        page.focus("#input")
        page.keyboard.press("Escape")
        expect(page.locator("#messages > article.message.assistant[data-finish=stopped]")).to_have_count(1, timeout=20000)
        assert page.locator("#messages > article.message.assistant").get_attribute("data-id") != old_id
        assert len(stops) == 2
        with chat.login("alice", password_of("alice")) as api:
            stored = api.get(f"/api/conversations/{conversation}").json()["messages"]
            assert [m["role"] for m in stored] == ["user", "assistant"] and str(stored[1]["id"]) != old_id


def test_waiting_in_line_and_cancel(slow_nodes, browser):
    """One model slot: alice's long answer holds it and carol waits; bob's message waits behind carol, the page
    shows his place and an estimate, and Cancel takes it out of the line: never sent, shown as such."""
    _, chat = slow_nodes
    warm = Sender(chat, "alice", "Warm up: say anything.")  # one measured answer, so the line can estimate
    warm.wait_for("token")
    warm.finish()
    alice = carol = None
    with watched(browser) as w:
        page = w.page
        page.goto(chat.url)
        sign_in(page, chat, "bob")
        page.click("#new-conversation")
        expect(page.locator("#status-model")).to_have_attribute("data-state", "up", timeout=30000)
        try:
            alice = Sender(chat, "alice", "Tell me a very long story about mountains.")
            alice.wait_for("token")
            carol = Sender(chat, "carol", "And one about rivers, please.")
            assert carol.wait_for("queued")["ahead"] == 0
            page.fill("#input", "Is it my turn yet?")
            page.press("#input", "Enter")
            notice = page.locator("#messages .queue-notice")
            expect(notice).to_be_visible(timeout=30000)
            expect(notice.locator(".queue-text")).to_have_text(
                re.compile(r"^Waiting — 1 in line ahead of you, about \d+ s$"), timeout=20000)
            assert page.locator("#messages .message.user .text").inner_text() == "Is it my turn yet?"
            expect(page.locator("#reply-status")).to_contain_text("Waiting — 1 in line ahead of you")
            expect(page.locator("#stop")).to_have_text("Cancel")
            with chat.login("bob", password_of("bob")) as api:
                line = api.get("/api/status").json()["queue"]
                assert line["active"] == 1 and line["waiting"] == 2, line
            axe_check(page, "queued")
            shot(page, "queued")
            assert not alice.of_done(), "alice's answer ended before the test could look at the line"

            notice.get_by_role("button", name="Cancel this message").click()
            user = page.locator("#messages .message.user")
            expect(user.locator(".note.cancelled")).to_have_text("cancelled (not sent)", timeout=20000)
            expect(user).to_have_attribute("data-status", "cancelled")
            expect(notice).to_have_count(0)
            expect(page.locator("#messages .message.assistant")).to_have_count(0)
            expect(page.locator("#send")).to_be_visible()
            expect(page.locator("#reply-status")).to_have_text("Cancelled: your message was not sent.")
            expect(page.locator("#input")).to_be_focused()  # focus does not vanish with the Cancel button
            with chat.login("bob", password_of("bob")) as api:
                conversation = page.evaluate("location.hash").split("=")[1]
                stored = api.get(f"/api/conversations/{conversation}").json()["messages"]
                assert [(m["role"], m["status"]) for m in stored] == [("user", "cancelled")], stored
                assert api.get("/api/status").json()["queue"]["waiting"] == 1  # carol still waits
        finally:
            for sender in (alice, carol):
                if sender is not None:
                    sender.finish()
        page.reload()  # what the server kept says so too
        expect(page.locator("#messages .message.user .note.cancelled")).to_have_text("cancelled (not sent)",
                                                                                      timeout=20000)
        axe_check(page, "cancelled")
        shot(page, "cancelled")
    done = alice.of_done()
    assert done and done[0]["meta"]["finish_reason"] == "stopped", alice.events[-3:]


def test_summary_marker_and_fallback_label(nodes, browser):
    """A long conversation shows the expandable summary marker; with the model down, the KB label and banner.

    Last in this module: it stops the model node."""
    model, chat = nodes
    with watched(browser, viewport={"width": 1200, "height": 900}) as w:
        page = w.page
        page.goto(chat.url)
        sign_in(page, chat)
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

        with watched(browser, viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                     has_touch=True) as phone:
            small = phone.page
            small.goto(page.url)
            sign_in(small, chat)
            small.wait_for_selector("#messages > .message.assistant")
            assert not small.locator("#sidebar").is_visible() or small.locator("#sidebar").bounding_box()["x"] < 0
            width = small.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, f"page scrolls sideways on a phone ({width}px)"
            shot(small, "phone")
            small.click("#menu")
            small.wait_for_timeout(400)
            assert small.locator("#sidebar").bounding_box()["x"] >= 0
            expect(small.locator("#logout")).to_be_visible()
            shot(small, "phone-menu")
            small.click("#open-account")
            expect(small.locator("#account-view")).to_be_visible()
            small.wait_for_timeout(400)  # the drawer slides shut
            width = small.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, f"the account page scrolls sideways on a phone ({width}px)"
            shot(small, "phone-account")
