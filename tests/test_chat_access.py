"""Who may use the chat node: every test talks HTTPS to the real chat agent (a subprocess) with real accounts.

The model node is down in these tests (nothing listens at the gateway endpoint): access is decided before the
model is asked, and the fallbacks answer. Tests with a model answering live in test_chat_model.py.
"""

from __future__ import annotations

import re
import time

import pytest

from fixtures_chat import ChatAgent, chat_config, chat_pki, free_port, running, send  # noqa: F401

PUBLIC = {("POST", "/api/login"), ("GET", "/api/auth/config")}


def dead_endpoint() -> str:
    return f"https://localhost:{free_port()}"


@pytest.fixture
def agent(chat_pki, tmp_path):
    kb = tmp_path / "kb"
    kb.mkdir()
    (kb / "router.md").write_text("# Router\n\nHold the reset button for ten seconds.\n")
    config = chat_config(chat_pki, tmp_path, dead_endpoint(), fallbacks=["knowledge_base"], kb_dir=kb,
                         auth={"login_throttle": {"max_failures": 3, "max_failures_per_address": 50, "window_s": 30}})
    with running(ChatAgent(config, tmp_path, chat_pki)) as chat:
        yield chat


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", lambda m: "0" * 32 if "conversation" in m.group(0) else "1", path)


def test_without_a_credential_every_api_route_is_401_and_says_nothing(agent):
    with agent.client() as c:
        conv = c.post("/api/conversations", json={"title": "secret plans"}).json()
        send(c, conv["id"], "router reset please")
        spec = c.get("/openapi.json").json()
    routes = [(method.upper(), concrete(path)) for path, item in spec["paths"].items() for method in item
              if path.startswith(("/api/", "/v1/")) or path == "/metrics"]
    routes.append(("GET", "/openapi.json"))
    routes += [("GET", f"/api/conversations/{conv['id']}"), ("GET", "/api/no-such-route"), ("PUT", "/v1/anything"),
               ("DELETE", f"/api/conversations/{conv['id']}")]
    assert len(routes) > 20
    with agent.anonymous() as anon:
        for method, path in routes:
            if (method, path) in PUBLIC:
                continue
            for extra in ({}, {"headers": {"Authorization": "Bearer cb-00000000_" + "x" * 43}},
                          {"headers": {"Authorization": "Basic YWRtaW46YWRtaW4="}},
                          {"headers": {"Cookie": "clawbot_session=forged"}}):
                response = anon.request(method, path, content=b"{not json", **extra)
                assert response.status_code == 401, (method, path, extra, response.text)
                assert "secret plans" not in response.text and "router" not in response.text
                if path.startswith("/v1/"):
                    assert response.json()["error"]["type"] == "authentication_error"
        assert anon.get("/healthz").status_code == 200
        assert anon.get("/").status_code == 200  # the page shell, which shows the login form
        favicon = anon.get("/favicon.ico")  # what a browser asks for by itself: public, and it leads to the icon
        assert favicon.status_code == 308 and favicon.headers["location"] == "/static/favicon.svg"
        assert anon.get("/static/favicon.svg").headers["content-type"].startswith("image/svg+xml")
    with agent.client() as c:  # nothing was deleted by the refused DELETE
        assert c.get(f"/api/conversations/{conv['id']}").status_code == 200


def test_login_cookie_logout_and_one_message_for_wrong_user_or_password(agent):
    agent.add_user("alice", "alice-password")
    with agent.anonymous() as anon:
        wrong = [anon.post("/api/login", json={"username": u, "password": p})
                 for u, p in (("alice", "not-her-password"), ("mallory", "alice-password"))]
        assert [r.status_code for r in wrong] == [401, 401]
        assert wrong[0].json() == wrong[1].json() == {"error": "wrong user name or password"}
        ok = anon.post("/api/login", json={"username": "alice", "password": "alice-password"})
        assert ok.status_code == 200 and ok.json()["user"]["name"] == "alice" and ok.json()["user"]["role"] == "user"
        cookie = ok.headers["set-cookie"]
        assert "clawbot_session=" in cookie
        for attribute in ("Secure", "HttpOnly", "SameSite=strict", "Path=/"):
            assert attribute.lower() in cookie.lower(), cookie
        csrf = ok.json()["csrf_token"]
        assert anon.get("/api/session").json()["user"]["name"] == "alice"
        assert anon.post("/api/logout", headers={"X-CSRF-Token": csrf}).status_code == 204
        assert anon.get("/api/session").status_code == 401
        cross = anon.post("/api/login", json={"username": "alice", "password": "alice-password"},
                          headers={"Origin": "https://evil.example"})
        assert cross.status_code == 403
    log = agent.log_tail(100000)
    assert "login failed for user 'alice'" in log and "login failed for user 'mallory'" in log
    assert "login: user alice from 127.0.0.1" in log
    assert "alice-password" not in log and "not-her-password" not in log


def test_failed_logins_are_throttled_with_retry_after(agent):
    agent.add_user("bob", "bob-password")
    with agent.anonymous() as anon:
        for _ in range(3):
            assert anon.post("/api/login", json={"username": "bob", "password": "guess-guess"}).status_code == 401
        throttled = anon.post("/api/login", json={"username": "bob", "password": "bob-password"})
        assert throttled.status_code == 429, throttled.text
        assert 1 <= int(throttled.headers["retry-after"]) <= 31
        assert "too many failed logins" in throttled.json()["error"]


def test_conversations_are_private_to_their_user(agent):
    agent.add_user("alice", "alice-password")
    agent.add_user("bob", "bob-password")
    with agent.login("alice", "alice-password") as a, agent.login("bob", "bob-password") as b:
        conv = a.post("/api/conversations", json={"title": "alice only"}).json()
        send(a, conv["id"], "router reset")
        assert [c["id"] for c in a.get("/api/conversations").json()] == [conv["id"]]
        assert b.get("/api/conversations").json() == []
        for method, path, body in (("GET", f"/api/conversations/{conv['id']}", None),
                                   ("GET", f"/api/conversations/{conv['id']}/requests", None),
                                   ("POST", f"/api/conversations/{conv['id']}/messages", {"content": "hi"}),
                                   ("DELETE", f"/api/conversations/{conv['id']}", None)):
            response = b.request(method, path, json=body)
            assert response.status_code == 404, (method, path, response.text)
            assert "alice" not in response.text and "router" not in response.text
        with agent.client() as admin:  # an admin does not read other people's conversations either
            assert admin.get(f"/api/conversations/{conv['id']}").status_code == 404
        messages = a.get(f"/api/conversations/{conv['id']}").json()["messages"]
        assert [m["content"] for m in messages if m["role"] == "user"] == ["router reset"]


def test_state_changes_with_a_session_need_the_csrf_token(agent):
    with agent.client() as c:
        token = c.headers.pop("X-CSRF-Token")
        missing = c.post("/api/conversations", json={})
        assert missing.status_code == 403 and "CSRF" in missing.json()["error"]
        assert c.post("/api/conversations", json={}, headers={"X-CSRF-Token": "x" * 43}).status_code == 403
        assert c.get("/api/conversations").json() == []
        assert c.post("/api/conversations", json={}, headers={"X-CSRF-Token": token}).status_code == 201
    key = agent.api_key("admin")
    with agent.anonymous(headers={"Authorization": f"Bearer {key}"}) as app:  # a key needs no CSRF token
        assert app.post("/api/conversations", json={}).status_code == 201


def test_api_keys_admin_pages_and_disabled_accounts(agent):
    agent.add_user("carol", "carol-password")
    with agent.login("carol", "carol-password") as carol:
        made = carol.post("/api/keys", json={"name": "my script"})
        assert made.status_code == 201
        key = made.json()["key"]
        listed = carol.get("/api/keys").json()
        assert listed == [{k: v for k, v in made.json().items() if k != "key"}]
        assert "key" not in listed[0] and key.startswith(listed[0]["prefix"] + "_")
        assert carol.get("/api/admin/users").status_code == 403
        assert carol.post("/api/admin/users", json={"name": "x", "password": "xxxxxxxx"}).status_code == 403
        with agent.anonymous(headers={"Authorization": f"Bearer {key}"}) as script:
            assert script.get("/api/session").json()["user"]["name"] == "carol"
            with agent.client() as admin:
                users = {u["name"]: u for u in admin.get("/api/admin/users").json()}
                assert users["carol"]["role"] == "user" and users["admin"]["role"] == "admin"
                assert all("password_hash" not in u for u in users.values())
                assert admin.patch("/api/admin/users/carol", json={"disabled": True}).json()["disabled"] is True
                assert script.get("/api/session").status_code == 401  # the key stops with the account
                assert carol.get("/api/conversations").status_code == 401  # and so does the session
                admin.patch("/api/admin/users/carol", json={"disabled": False})
                assert script.get("/api/session").status_code == 200
                last_used = next(k for k in carol_keys(agent) if k["name"] == "my script")["last_used_at"]
                assert last_used is not None
                made2 = admin.post("/api/admin/users", json={"name": "dan", "password": "dan-password", "role": "user"})
                assert made2.status_code == 201
                assert admin.post("/api/admin/users", json={"name": "dan", "password": "dan-password"}).status_code == 409
                assert admin.delete("/api/admin/users/admin").status_code == 400  # the last admin stays
            assert carol.delete(f"/api/keys/{made.json()['id']}").status_code == 401  # carol's session ended above
        with agent.login("carol", "carol-password") as again:
            assert again.delete(f"/api/keys/{made.json()['id']}").status_code == 204
        with agent.anonymous(headers={"Authorization": f"Bearer {key}"}) as script:
            assert script.get("/api/session").status_code == 401


def carol_keys(agent) -> list[dict]:
    import json

    return json.loads(agent.users("--json", "list-keys", "carol").stdout)


def test_per_user_limits_429_with_retry_after_usage_and_metrics(chat_pki, tmp_path):
    config = chat_config(chat_pki, tmp_path, dead_endpoint(), auth={"limits": {"requests_per_minute": 2}})
    with running(ChatAgent(config, tmp_path, chat_pki)) as agent:
        agent.add_user("erin", "erin-password")
        with agent.login("erin", "erin-password") as erin:
            conv = erin.post("/api/conversations", json={}).json()
            for n in range(2):
                assert erin.post(f"/api/conversations/{conv['id']}/messages", json={"content": f"q{n}"}).status_code == 200
            over = erin.post(f"/api/conversations/{conv['id']}/messages", json={"content": "q3"})
            assert over.status_code == 429, over.text
            assert "requests per minute limit" in over.json()["error"] and "(2 " in over.json()["error"]
            assert 1 <= int(over.headers["retry-after"]) <= 61
            key = agent.api_key("erin")
            with agent.anonymous(headers={"Authorization": f"Bearer {key}"}) as app:
                refused = app.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
                assert refused.status_code == 429 and refused.json()["error"]["code"] == "user_limit"
                assert "retry-after" in refused.headers
            usage = erin.get("/api/usage").json()
            assert usage["user"] == "erin" and usage["minute"]["requests"] == 2 and usage["limits"]["requests_per_minute"] == 2
            assert erin.get("/metrics").status_code == 403
        with agent.client() as admin:
            admin.patch("/api/admin/users/erin", json={"limits": {"requests_per_minute": 10}})
            with agent.login("erin", "erin-password") as erin:
                assert erin.post(f"/api/conversations/{conv['id']}/messages", json={"content": "q4"}).status_code == 200
            metrics = admin.get("/metrics")
            assert metrics.status_code == 200
            assert 'clawbot_chat_limited_total{limit="requests_per_minute",user="erin"} 2.0' in metrics.text
            assert 'clawbot_chat_user_requests_today{user="erin"} 3.0' in metrics.text
            everyone = {u["user"]: u for u in admin.get("/api/admin/usage").json()}
            assert everyone["erin"]["today"]["requests"] == 3


def test_sessions_end_when_idle_and_at_their_absolute_age(chat_pki, tmp_path):
    config = chat_config(chat_pki, tmp_path, dead_endpoint(),
                         auth={"session_idle_timeout_s": 10, "session_max_age_s": 20})
    with running(ChatAgent(config, tmp_path, chat_pki)) as agent:
        with agent.client() as idle:
            expires = idle.get("/api/session").json()["idle_expires_at"]
            time.sleep(max(0.0, expires - time.time()) + 1)  # idle on purpose: no request may refresh it
            assert idle.get("/api/session").status_code == 401
        with agent.client() as busy:
            session = busy.get("/api/session").json()
            deadline = time.monotonic() + 60
            while busy.get("/api/session").status_code == 200 and time.monotonic() < deadline:
                time.sleep(1)  # active every second: only the absolute age can end it
            assert busy.get("/api/session").status_code == 401
            assert time.time() >= session["expires_at"] - 1


def test_password_change_keeps_this_session_and_ends_the_others(agent):
    agent.add_user("gina", "gina-password")
    with agent.login("gina", "gina-password") as here, agent.login("gina", "gina-password") as elsewhere:
        wrong = here.post("/api/password", json={"current_password": "not-it-at-all", "new_password": "gina-new-pass"})
        assert wrong.status_code == 400 and "current password is wrong" in wrong.json()["error"]
        assert here.post("/api/password", json={"current_password": "gina-password",
                                                "new_password": "gina-new-pass"}).status_code == 204
        assert here.get("/api/session").status_code == 200
        assert elsewhere.get("/api/session").status_code == 401
    with agent.anonymous() as anon:
        assert anon.post("/api/login", json={"username": "gina", "password": "gina-password"}).status_code == 401
        assert anon.post("/api/login", json={"username": "gina", "password": "gina-new-pass"}).status_code == 200


def test_an_api_key_cannot_manage_keys_passwords_or_accounts(agent):
    """A leaked key is contained by revoking it: it can neither mint a successor nor guess its owner's password."""
    key = agent.api_key("admin", "leaked")
    with agent.anonymous(headers={"Authorization": f"Bearer {key}"}) as app:
        for method, path, body in (("POST", "/api/keys", {"name": "successor"}), ("DELETE", "/api/keys/1", None),
                                   ("POST", "/api/password", {"current_password": "guess-guess",
                                                              "new_password": "whatever-1"}),
                                   ("POST", "/api/admin/users", {"name": "mallory", "password": "mallory-pass"}),
                                   ("PATCH", "/api/admin/users/admin", {"disabled": True}),
                                   ("DELETE", "/api/admin/users/admin", None), ("POST", "/api/logout", None)):
            response = app.request(method, path, json=body)
            assert response.status_code == 403 and "API key cannot" in response.json()["error"], (method, path)
        assert app.get("/api/keys").status_code == 200  # reading is fine
        assert app.get("/api/admin/users").status_code == 200
        assert app.get("/metrics").status_code == 200  # what a Prometheus scrape needs


def test_odd_input_is_refused_not_a_server_error(agent):
    with agent.client() as c:
        c.headers["X-CSRF-Token"] = "\u00e9" * 43
        assert c.post("/api/conversations", json={}).status_code == 403
    with agent.anonymous(follow_redirects=False) as anon:
        for path in ("/metrics/", "/openapi.json/", "/API/conversations", "//api/conversations", "/nothing-here"):
            assert anon.get(path).status_code == 401, path
        assert anon.get("/static/app.js").status_code == 200
        made = agent.users("add", "bob\n", "--password-stdin", stdin="bob-password\n")
        assert made.returncode != 0
