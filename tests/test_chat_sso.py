"""SSO on the real chat agent: `clawbot agent --role chat` with auth.oidc, against a real OpenID Connect provider
process (oidc-provider-mock, started by tests/test_oidc.py's helper) and a real HTTPS client following the flow.

Accounts are provisioned on first login with role `user`, admins come from the `groups` claim, the session is
the same cookie a password login gets, and a disabled account or a failed sign-in is refused with a reason.
"""

from __future__ import annotations

import contextlib

import httpx
import pytest

from fixtures_chat import ChatAgent, chat_config, chat_pki, free_port, running  # noqa: F401
from test_oidc import provider_command, register, running_provider

PEOPLE = [{"sub": "u-1001", "preferred_username": "ingrid", "email": "ingrid@lab.example", "groups": ["staff"]},
          {"sub": "u-1002", "preferred_username": "olaf", "email": "olaf@lab.example", "groups": ["clawbot-admins"]}]


@pytest.fixture(scope="module")
def provider(tmp_path_factory):
    with running_provider(tmp_path_factory.mktemp("idp") / "provider.log", provider_command(PEOPLE)) as base:
        yield base


def sign_in(agent: ChatAgent, sub: str) -> tuple[httpx.Client, httpx.Response]:
    """The browser's part: start at the chat node, answer the provider's form, come back to the callback."""
    browser = agent.anonymous(follow_redirects=False)
    start = browser.get("/auth/oidc/login")
    assert start.status_code == 302, start.text
    authorize = start.headers["location"]
    with httpx.Client(timeout=15) as idp:  # the provider is another site: none of the chat node's cookies go there
        assert idp.get(authorize).status_code == 200
        back = idp.post(authorize, data={"sub": sub})
    assert back.status_code == 302 and back.headers["location"].startswith(f"{agent.url}/auth/oidc/callback?")
    return browser, browser.get(back.headers["location"])


def test_sso_provisions_users_admins_by_claim_and_refuses_disabled_accounts(chat_pki, tmp_path, provider):
    port = free_port()
    client_id, secret = register(provider, [f"https://localhost:{port}/auth/oidc/callback"])
    secret_file = tmp_path / "oidc-client-secret"
    secret_file.write_text(secret)
    secret_file.chmod(0o600)
    config = chat_config(chat_pki, tmp_path, f"https://localhost:{free_port()}", auth={"oidc": {
        "enabled": True, "issuer": provider, "client_id": client_id, "client_secret_file": str(secret_file),
        "admin_values": ["clawbot-admins"]}})
    config["chat"]["port"] = port
    with running(ChatAgent(config, tmp_path, chat_pki)) as agent:
        with agent.anonymous() as anon:
            assert anon.get("/api/auth/config").json()["oidc"] == {"enabled": True, "login_url": "/auth/oidc/login"}
        browser, done = sign_in(agent, "u-1001")
        with contextlib.closing(browser):
            assert done.status_code == 303 and done.headers["location"] == "/", done.text
            cookie = done.headers["set-cookie"]
            assert "clawbot_session=" in cookie and "samesite=strict" in cookie.lower() and "httponly" in cookie.lower()
            me = browser.get("/api/session").json()
            assert (me["user"]["name"], me["user"]["role"], me["user"]["sso"]) == ("ingrid", "user", True)
            csrf = me["csrf_token"]
            assert browser.post("/api/conversations", json={}, headers={"X-CSRF-Token": csrf}).status_code == 201
            assert browser.get("/api/admin/users").status_code == 403
        admin_browser, done = sign_in(agent, "u-1002")
        with contextlib.closing(admin_browser):
            assert admin_browser.get("/api/session").json()["user"]["role"] == "admin"
            users = {u["name"]: u for u in admin_browser.get("/api/admin/users").json()}
            assert users["ingrid"]["sso"] and users["ingrid"]["role"] == "user"
            csrf = admin_browser.get("/api/session").json()["csrf_token"]
            assert admin_browser.patch("/api/admin/users/ingrid", json={"disabled": True},
                                       headers={"X-CSRF-Token": csrf}).status_code == 200
        again, refused = sign_in(agent, "u-1001")
        with contextlib.closing(again):
            assert refused.status_code == 400 and "disabled" in refused.text
            assert again.get("/api/session").status_code == 401
        with agent.anonymous(follow_redirects=False) as forged:  # a callback nobody started
            bad = forged.get("/auth/oidc/callback", params={"state": "x" * 43, "code": "stolen"})
            assert bad.status_code == 400 and "expired or was already used" in bad.text
        with agent.anonymous() as password:  # an SSO account has no password to guess
            assert password.post("/api/login", json={"username": "ingrid", "password": "anything-at-all"}).status_code == 401
        log = agent.log_tail(100000)
        assert "login: user ingrid from 127.0.0.1 (SSO" in log and "SSO login failed from 127.0.0.1" in log
        assert secret not in log


def test_sso_routes_are_404_when_sso_is_off(chat_pki, tmp_path):
    config = chat_config(chat_pki, tmp_path, f"https://localhost:{free_port()}")
    with running(ChatAgent(config, tmp_path, chat_pki)) as agent, agent.anonymous() as anon:
        assert anon.get("/api/auth/config").json()["oidc"]["enabled"] is False
        assert anon.get("/auth/oidc/login").status_code == 404
        assert anon.get("/auth/oidc/callback").status_code == 404
