"""The web UI in headless Chromium (Debian's `chromium`, driven by Playwright), served by the real chat agent
over HTTPS, with the real model agent behind it.

Chromium is not told to ignore certificate errors in general: only the chat node's own server key is
accepted, by its SPKI hash (--ignore-certificate-errors-spki-list), which is what trusting the cluster CA
amounts to for this one server. Screenshots go to test-artifacts/ (git-ignored).

Every page signs in first, through the login form, as a person does. Accounts are made with the chat node's
own `clawbot users` (ChatAgent.add_user); the admin exists from the start (ChatAgent.admin). Every wait has a
deadline (Playwright's expect/wait_for_* timeouts).
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time

import httpx
import pytest

from fixtures_chat import ARTIFACTS, ChatAgent, ModelAgent, chat_config, chat_pki, free_port, model_config, running  # noqa: F401
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
    page.wait_for_function(
        "n => document.querySelectorAll('.message.assistant:not(.streaming)').length > n && !document.getElementById('send').disabled",
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
        expect(page.locator("#usage-line")).not_to_contain_text(re.compile(r"^0 tokens"), timeout=20000)


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
