"""Accounts policy over a real SQLite store with real argon2id hashing (clawbot.chat.accounts), and `clawbot users`."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from clawbot.chat.accounts import (AccountError, Accounts, LimitReached, LoginFailed, Throttled, hash_secret,
                                   seconds_to_midnight, today)
from clawbot.chat.store import NotFound, Store
from clawbot.common.config import defaults
from fixtures_chat import clawbot_command

FIXTURES = Path(__file__).parent / "fixtures"


def settings(**overrides) -> dict:
    auth = defaults()["auth"]
    for key, value in overrides.items():
        auth[key] = dict(auth[key], **value) if isinstance(value, dict) else value
    return auth


@pytest.fixture
def accounts(tmp_path) -> Accounts:
    store = Store(tmp_path / "chat.sqlite3")
    yield Accounts(store, settings())
    store.close()


def test_database_of_todays_code_migrates_to_the_first_admin(tmp_path):
    """A version-1 database (written by clawbot before accounts) keeps every conversation; they belong to nobody
    until the first admin exists, then to that admin, and a plain user created earlier never sees them."""
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript((FIXTURES / "chat-db-v1.sql").read_text())
    before = db.execute("SELECT * FROM messages ORDER BY id").fetchall()
    titles = sorted(r[0] for r in db.execute("SELECT title FROM conversations"))
    db.close()
    store = Store(path)
    try:
        assert store.schema_version() == 2
        accounts = Accounts(store, settings())
        early = accounts.add_user("early", "user-password-1")
        assert store.list_conversations(early["id"]) == []
        admin = accounts.add_user("boss", "admin-password-1", "admin")
        mine = store.list_conversations(admin["id"])
        assert sorted(c["title"] for c in mine) == titles
        assert sum(c["message_count"] for c in mine) == 6
        after = sqlite3.connect(path).execute(
            "SELECT id, conversation_id, role, content, status, source, created_at, summary_id, covers_from, covers_to,"
            " meta FROM messages ORDER BY id").fetchall()
        assert after == before
        assert store.kb_search("hello", 3)[0]["source"] == "/kb/a.md"
        second = accounts.add_user("boss2", "admin-password-2", "admin")
        assert store.list_conversations(second["id"]) == []
    finally:
        store.close()


def test_passwords_are_argon2id_and_one_message_for_every_failure(accounts):
    accounts.add_user("alice", "correct horse", "user")
    row = accounts.store.find_user("alice")
    assert row["password_hash"].startswith("$argon2id$") and "correct horse" not in row["password_hash"]
    user, token, session = accounts.login("alice", "correct horse", "10.0.0.1")
    assert user["name"] == "alice" and len(token) >= 40 and accounts.session(token).user["id"] == user["id"]
    raw = sqlite3.connect(accounts.store.path).execute("SELECT token_hash FROM sessions").fetchall()
    assert token not in {r[0] for r in raw}
    messages = set()
    for name, password in (("alice", "wrong password"), ("nobody", "correct horse"), ("", "x"), ("a' OR 1=1", "x")):
        with pytest.raises(LoginFailed) as caught:
            accounts.login(name, password, "10.0.0.2")
        messages.add(str(caught.value))
    accounts.set_disabled(accounts.user("alice"), True)
    with pytest.raises(LoginFailed) as caught:
        accounts.login("alice", "correct horse", "10.0.0.3")
    messages.add(str(caught.value))
    assert messages == {"wrong user name or password"}
    assert accounts.session(token) is None  # disabling ends the sessions


def test_failed_logins_are_throttled_per_account_and_per_address(tmp_path):
    """Guesses at an account from one address throttle that address for that account (and the address as a whole
    after more names), but never lock the account's owner out from elsewhere."""
    store = Store(tmp_path / "db.sqlite3")
    accounts = Accounts(store, settings(login_throttle={"max_failures": 3, "max_failures_per_address": 5, "window_s": 60}))
    accounts.add_user("bob", "bob-password", "user")
    for _ in range(3):
        with pytest.raises(LoginFailed):
            accounts.login("BOB", "nope-nope", "192.0.2.1")  # names are case-insensitive, so is the counter
    with pytest.raises(Throttled) as caught:  # even the right password waits at that address
        accounts.login("bob", "bob-password", "192.0.2.1")
    assert "for user 'bob' from 192.0.2.1" in str(caught.value) and 1 <= caught.value.retry_after_s <= 61
    assert accounts.login("bob", "bob-password", "192.0.2.9")[0]["name"] == "bob"  # not locked out elsewhere
    for n in range(2):  # the address has 3 failures; 2 more on other names reach its limit of 5
        with pytest.raises(LoginFailed):
            accounts.login(f"other{n}", "nope-nope", "192.0.2.1")
    with pytest.raises(Throttled) as caught:
        accounts.login("somebody", "whatever1", "192.0.2.1")
    assert "from 192.0.2.1" in str(caught.value)
    row, key = accounts.create_key(accounts.user("bob"), "k")
    assert accounts.key_principal(key, "192.0.2.1") is None  # that address is throttled for keys too
    assert accounts.key_principal(key, "192.0.2.9").user["name"] == "bob"
    with pytest.raises(AccountError, match="not valid"):
        accounts.add_user("bob\n", "another-password")
    store.close()


def test_sessions_expire_idle_and_absolute(tmp_path):
    store = Store(tmp_path / "db.sqlite3")
    accounts = Accounts(store, settings(session_idle_timeout_s=60, session_max_age_s=600))
    accounts.add_user("carol", "carol-password")
    _, idle_token, _ = accounts.login("carol", "carol-password", "127.0.0.1")
    _, old_token, _ = accounts.login("carol", "carol-password", "127.0.0.1")
    db = sqlite3.connect(store.path, isolation_level=None)
    now = time.time()
    db.execute("UPDATE sessions SET last_seen_at = ? WHERE token_hash = ?", (now - 61, _sha(idle_token)))
    db.execute("UPDATE sessions SET created_at = ? WHERE token_hash = ?", (now - 601, _sha(old_token)))
    assert accounts.session(idle_token) is None and accounts.session(old_token) is None
    assert db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] == 0  # expired rows are gone
    _, token, _ = accounts.login("carol", "carol-password", "127.0.0.1")
    accounts.logout(token)
    assert accounts.session(token) is None
    store.close()


def _sha(token: str) -> str:
    import hashlib

    return hashlib.sha256(token.encode()).hexdigest()


def test_api_keys_are_hashed_shown_once_and_revoked_at_once(accounts):
    user = accounts.add_user("dave", "dave-password")
    row, key = accounts.create_key(user, "ci job")
    assert key.startswith("cb-" + row["prefix"] + "_")
    assert row["secret_hash"].startswith("$argon2id$") and key.split("_", 1)[1] not in row["secret_hash"]
    principal = accounts.key_principal(key)
    assert principal.user["name"] == "dave" and principal.via == "key"
    assert accounts.store.api_keys(user["id"])[0]["last_used_at"] is not None
    assert accounts.key_principal(key[:-1] + ("A" if key[-1] != "A" else "B")) is None  # wrong secret, same prefix
    assert accounts.key_principal("cb-00000000_" + "x" * 40) is None
    accounts.store.delete_api_key(user["id"], row["id"])
    assert accounts.key_principal(key) is None  # the verified-key memory does not outlive the row


def test_limits_per_minute_per_day_and_admin_override(accounts):
    accounts.settings = settings(limits={"requests_per_minute": 2, "tokens_per_day": 100})
    user = accounts.add_user("erin", "erin-password")
    accounts.admit(user)
    accounts.admit(user)
    with pytest.raises(LimitReached) as caught:
        accounts.admit(user)
    assert caught.value.limit == "requests_per_minute" and "requests per minute" in str(caught.value)
    assert 1 <= caught.value.retry_after_s <= 61
    user = accounts.set_limits(user, {"requests_per_minute": 0, "tokens_per_day": None})  # 0: unlimited
    accounts.admit(user)
    accounts.record_tokens(user, 70, 40)
    with pytest.raises(LimitReached) as caught:
        accounts.admit(user)
    assert caught.value.limit == "tokens_per_day" and "110 of 100" in str(caught.value)
    assert caught.value.retry_after_s == pytest.approx(seconds_to_midnight(), abs=5)
    usage = accounts.usage(user)
    assert usage["today"]["tokens"] == 110 and usage["today"]["requests"] == 3 and usage["day"] == today()
    assert accounts.public(user)["limits_override"] == {"requests_per_minute": 0}
    with pytest.raises(AccountError):
        accounts.set_limits(user, {"requests_per_minute": -1})


def test_last_admin_cannot_be_removed_disabled_or_demoted(accounts):
    admin = accounts.add_user("root-admin", "admin-password", "admin")
    for action in (lambda: accounts.remove(admin), lambda: accounts.set_disabled(admin, True),
                   lambda: accounts.set_role(admin, "user")):
        with pytest.raises(AccountError, match="last enabled admin"):
            action()
    with pytest.raises(AccountError, match="exists already"):
        accounts.add_user("ROOT-ADMIN", "other-password", "user")  # names are case-insensitive
    with pytest.raises(AccountError, match="8 to"):
        accounts.add_user("shorty", "short")


def test_bootstrap_admin_from_the_file_deploy_writes(tmp_path, accounts):
    path = tmp_path / "admin.json"
    accounts.settings = settings(bootstrap_admin_file=str(path))
    assert accounts.ensure_bootstrap_admin() is None  # no file: nothing created
    path.write_text(json.dumps({"name": "admin", "password_hash": hash_secret("inventory-password")}))
    admin = accounts.ensure_bootstrap_admin()
    assert admin["role"] == "admin"
    accounts.login("admin", "inventory-password", "127.0.0.1")
    accounts.set_password(accounts.user("admin"), "changed-in-the-ui")
    accounts.ensure_bootstrap_admin()  # same file: the UI's password survives a restart
    accounts.login("admin", "changed-in-the-ui", "127.0.0.1")
    path.write_text(json.dumps({"name": "admin", "password_hash": hash_secret("new-inventory-password")}))
    accounts.ensure_bootstrap_admin()  # the inventory's password changed: it wins
    accounts.login("admin", "new-inventory-password", "127.0.0.1")
    path.write_text(json.dumps({"name": "admin", "password_hash": "plaintext"}))
    assert accounts.ensure_bootstrap_admin() is None


def test_sso_accounts_are_users_unless_the_claim_says_admin(accounts):
    accounts.add_user("frank", "local-password")
    first = accounts.sso_user("https://idp.example", "sub-1", "frank", is_admin=False)
    assert first["name"] != "frank" and first["role"] == "user"  # a local account is never taken over
    again = accounts.sso_user("https://idp.example", "sub-1", "frank", is_admin=True)
    assert again["id"] == first["id"] and again["role"] == "admin"
    with pytest.raises(LoginFailed):  # no password: an SSO account cannot log in with one
        accounts.login(first["name"], "", "127.0.0.1")


def test_users_command_on_the_chat_node(tmp_path):
    """`clawbot users --config` manages the database the chat agent uses; errors name the problem, exit non-zero."""
    config = tmp_path / "clawbot.json"
    config.write_text(json.dumps({"chat": {"database": str(tmp_path / "chat.sqlite3")},
                                  "auth": {"bootstrap_admin_file": str(tmp_path / "none.json")}}))

    def users(*argv, stdin=None):
        return subprocess.run(clawbot_command() + ["users", "--config", str(config), *argv], input=stdin,
                              capture_output=True, text=True, timeout=60)

    made = users("add", "grace", "--role", "admin")
    assert made.returncode == 0 and "password:" in made.stdout
    password = made.stdout.split("password: ")[1].split()[0]
    assert users("add", "heidi", "--password-stdin", stdin="heidi-password\n").returncode == 0
    listed = json.loads(users("--json", "list").stdout)
    assert [(u["name"], u["role"], u["disabled"]) for u in listed] == [("grace", "admin", False), ("heidi", "user", False)]
    assert users("disable", "heidi").returncode == 0
    assert json.loads(users("--json", "list").stdout)[1]["disabled"] is True
    assert users("enable", "heidi").returncode == 0
    assert users("set-limits", "heidi", "--tokens-per-day", "5000").returncode == 0
    key = json.loads(users("--json", "add-key", "heidi", "--key-name", "scripts").stdout)
    assert key["key"].startswith(key["prefix"] + "_")
    assert json.loads(users("--json", "list-keys", "heidi").stdout)[0]["name"] == "scripts"
    assert users("revoke-key", "heidi", str(key["id"])).returncode == 0
    reset = users("reset-password", "heidi", "--password-stdin", stdin="heidi-new-password\n")
    assert reset.returncode == 0
    missing = users("disable", "nobody")
    assert missing.returncode == 1 and "no such user: nobody" in missing.stderr
    last = users("remove", "grace")
    assert last.returncode == 1 and "last enabled admin" in last.stderr
    assert users("remove", "heidi").returncode == 0
    store = Store(tmp_path / "chat.sqlite3")
    try:
        accounts = Accounts(store, settings())
        assert accounts.login("grace", password, "127.0.0.1")[0]["name"] == "grace"
        with pytest.raises(NotFound):
            accounts.user("heidi")
    finally:
        store.close()
    bad = tmp_path / "bad.json"
    bad.write_text('{"auth": {"limits": {"requests_per_minute": -1}}}')
    refused = subprocess.run(clawbot_command() + ["users", "--config", str(bad), "list"], capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 78 and "requests_per_minute" in refused.stderr
