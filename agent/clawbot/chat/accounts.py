"""Accounts of the chat node: passwords, login sessions, API keys, login throttling and per-user limits.

Storage is clawbot.chat.store (one SQLite file); this module holds the policy, in one place for the web
API, the OpenAI API and `clawbot users`:

- Passwords and API-key secrets are hashed with argon2id (argon2-cffi's PasswordHasher, its RFC 9106 low-memory
  defaults). A wrong user name costs the same as a wrong password (a dummy hash is verified), and both give the
  same message.
- A session is a 256-bit random token in a cookie; the database keeps only its SHA-256 (a token that cannot be
  guessed needs no slow hash), its CSRF token and two clocks: idle expiry and absolute expiry.
- An API key reads `cb-<prefix>_<secret>`: the prefix finds the row (and is shown in lists), the secret is
  verified against its argon2id hash. A verified key is remembered in memory by its SHA-256 so that apps do not
  pay an argon2 verification per request; the row is still read every time, so a revoked key stops at once.
- Failed logins are counted in memory (a restart forgets them) per account *at* a client address and per client
  address: somebody guessing elsewhere cannot lock a person (or the admin) out, and one address cannot try many
  names. An attempt is counted before its password is checked, so parallel guesses cannot overrun the limit.
  Failed API-key checks count against the address too. Password and key verification (argon2id, ~0.1 s) is
  called from worker threads by the web layer, never on the event loop.
- Limits: requests per minute (sliding window, in memory) and tokens per UTC day (the usage table), from
  clawbot.json's auth.limits or the account's own override.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from clawbot.chat.store import NotFound, Store

log = logging.getLogger("clawbot.chat.accounts")

ROLES = ("admin", "user")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$")
MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_CHARS = 1024
KEY_PREFIX = "cb-"
SESSION_TOUCH_EVERY_S = 30.0
BOOTSTRAP_SETTING = "bootstrap_admin_hash"
LIMIT_NAMES = ("requests_per_minute", "tokens_per_day")

_hasher = PasswordHasher()
_DUMMY_HASH = _hasher.hash("clawbot: equalises the time of a login with an unknown user name")


class AccountError(ValueError):
    """A request about accounts that cannot be done; the message says why (shown to the user)."""


class LoginFailed(Exception):
    """Wrong user name or password, or a disabled account: callers show one generic message."""

    MESSAGE = "wrong user name or password"


class Throttled(Exception):
    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = max(1, int(retry_after_s))


class LimitReached(Throttled):
    """A per-user limit; the message names it, `limit` is its auth.limits key."""

    def __init__(self, message: str, retry_after_s: float, limit: str):
        super().__init__(message, retry_after_s)
        self.limit = limit


def hash_secret(secret: str) -> str:
    return _hasher.hash(secret)


def verify_secret(stored_hash: str | None, secret: str) -> bool:
    try:
        return _hasher.verify(stored_hash or _DUMMY_HASH, secret) and stored_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name or ""):
        raise AccountError(f"user name {name!r} is not valid: 1-64 characters, letters, digits and . _ @ + -, "
                           "starting with a letter or digit")
    return name


def check_password(password: str) -> str:
    if not isinstance(password, str) or not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
        raise AccountError(f"a password needs {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters")
    return password


def today(now: float | None = None) -> str:
    return datetime.fromtimestamp(now if now is not None else time.time(), timezone.utc).strftime("%Y-%m-%d")


def seconds_to_midnight(now: float | None = None) -> int:
    moment = datetime.fromtimestamp(now if now is not None else time.time(), timezone.utc)
    midnight = (moment + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return int((midnight - moment).total_seconds()) + 1


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Principal:
    """Who a request is from, and how it proved it."""

    user: dict
    via: str  # "session" or "key"
    session: dict | None = None
    key: dict | None = None

    @property
    def is_admin(self) -> bool:
        return self.user["role"] == "admin"


class Accounts:
    """Account policy over one Store; `settings` is clawbot.json's `auth` section (rebuilt on reload)."""

    def __init__(self, store: Store, settings: dict):
        self.store = store
        self.settings = settings
        self._lock = threading.Lock()
        self._failures: dict[str, deque] = {}
        self._minute: dict[int, deque] = {}
        self._verified_keys: dict[str, int] = {}

    def carry_over(self, old: "Accounts") -> None:
        """Keep throttling and rate-limit windows across a config reload."""
        self._failures, self._minute, self._verified_keys = old._failures, old._minute, old._verified_keys

    # ------------------------------------------------------------------ accounts

    def public(self, user: dict) -> dict:
        """The account as the API shows it (never a hash)."""
        override = {n: user[n] for n in LIMIT_NAMES if user.get(n) is not None}
        return {"id": user["id"], "name": user["name"], "role": user["role"], "disabled": bool(user["disabled"]),
                "created_at": user["created_at"], "last_login_at": user["last_login_at"],
                "limits": self.limits_for(user), "limits_override": override or None,
                "sso": user.get("sso_subject") is not None, "password": user.get("password_hash") is not None}

    def user(self, name: str) -> dict:
        user = self.store.find_user(name)
        if user is None:
            raise NotFound(name)
        return user

    def add_user(self, name: str, password: str | None, role: str = "user") -> dict:
        check_name(name)
        if role not in ROLES:
            raise AccountError(f"role {role!r} is not one of {', '.join(ROLES)}")
        if self.store.find_user(name) is not None:
            raise AccountError(f"user {name!r} exists already")
        user = self.store.create_user(name, role, hash_secret(check_password(password)) if password is not None else None)
        log.info("account %s created (role %s)", name, role)
        return user

    def set_password(self, user: dict, password: str) -> dict:
        return self.store.update_user(user["id"], password_hash=hash_secret(check_password(password)))

    def change_own_password(self, user: dict, current: str, new: str, session: dict | None = None) -> dict:
        """A new password ends every other session of the account; the one that changed it stays."""
        throttle = self.settings["login_throttle"]
        attempt = self._reserve_attempt([(f"user:{user['name'].lower()}@password", throttle["max_failures"],
                                          f"for user {user['name']!r}")])
        if not verify_secret(user.get("password_hash"), current):
            raise AccountError("the current password is wrong")
        self._release_attempt(attempt)
        return self.store.update_user(user["id"], keep_session=session["token_hash"] if session else None,
                                      password_hash=hash_secret(check_password(new)))

    def set_disabled(self, user: dict, disabled: bool) -> dict:
        if disabled:
            self._keep_an_admin(user, "disable")
        return self.store.update_user(user["id"], disabled=int(disabled))

    def set_role(self, user: dict, role: str) -> dict:
        if role not in ROLES:
            raise AccountError(f"role {role!r} is not one of {', '.join(ROLES)}")
        if role != "admin":
            self._keep_an_admin(user, "demote")
        return self.store.update_user(user["id"], role=role)

    def set_limits(self, user: dict, limits: dict | None) -> dict:
        """Override auth.limits for one account (None for a field: back to the config's value)."""
        limits = limits or {n: None for n in LIMIT_NAMES}
        for name, value in limits.items():
            if name not in LIMIT_NAMES:
                raise AccountError(f"unknown limit {name!r} (known: {', '.join(LIMIT_NAMES)})")
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise AccountError(f"limit {name} must be a whole number >= 0 (0: unlimited) or null")
        return self.store.update_user(user["id"], **limits)

    def remove(self, user: dict) -> None:
        self._keep_an_admin(user, "remove")
        self.store.delete_user(user["id"])
        log.info("account %s removed", user["name"])

    def _keep_an_admin(self, user: dict, action: str) -> None:
        if user["role"] == "admin" and not user["disabled"] and self.store.count_admins() <= 1:
            raise AccountError(f"cannot {action} {user['name']}: it is the last enabled admin")

    def ensure_bootstrap_admin(self) -> dict | None:
        """Create (or re-password) the admin named in auth.bootstrap_admin_file, which deploy writes.

        The password is reset only when the file's hash differs from the one applied last time, so a password
        changed in the UI survives restarts until the inventory's password itself changes."""
        path = Path(self.settings["bootstrap_admin_file"])
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            name, password_hash = check_name(data["name"]), data["password_hash"]
            if not str(password_hash).startswith("$argon2id$"):
                raise AccountError("password_hash is not an argon2id hash")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("%s is not usable, no admin created from it: %s", path, exc)
            return None
        user = self.store.find_user(name)
        if user is not None and user.get("sso_subject") is not None:
            log.error("%s names %s, which is an SSO account: no admin created from it (choose another "
                      "clawbot_admin_user)", path, name)
            return None
        if user is None:
            user = self.store.create_user(name, "admin", password_hash)
            log.info("admin %s created from %s", name, path)
        elif self.store.get_setting(BOOTSTRAP_SETTING) != password_hash:
            user = self.store.update_user(user["id"], password_hash=password_hash, role="admin", disabled=0)
            log.info("admin %s: password set from %s (the inventory's password changed)", name, path)
        self.store.set_setting(BOOTSTRAP_SETTING, password_hash)
        return user

    def sso_user(self, issuer: str, subject: str, username: str, is_admin: bool) -> dict:
        """The account of an SSO identity, created on its first login (role user, or admin by claim)."""
        user = self.store.find_sso_user(issuer, subject)
        role = "admin" if is_admin else "user"
        if user is None:
            name = username if NAME_PATTERN.fullmatch(username or "") else "sso-" + _sha256(issuer + subject)[:12]
            if self.store.find_user(name) is not None:  # a local account of that name: never take it over
                name = f"{name[:50]}-{_sha256(issuer + subject)[:8]}"
            user = self.store.create_user(name, role, None, sso=(issuer, subject))
            log.info("account %s created on first SSO login (role %s)", name, role)
        elif user["role"] != role:
            try:
                if role != "admin":
                    self._keep_an_admin(user, "demote")
                user = self.store.update_user(user["id"], role=role)
            except AccountError as exc:
                log.error("SSO login of %s: %s; the role stays admin", user["name"], exc)
        return user

    # ------------------------------------------------------------------ login and sessions

    def login(self, name: str, password: str, address: str) -> tuple[dict, str, dict]:
        """(user, session token, session row); LoginFailed or Throttled otherwise. Logs every outcome."""
        account_key, address_key = f"user:{(name or '').lower()}@{address}", "addr:" + address
        throttle = self.settings["login_throttle"]
        attempt = self._reserve_attempt([(account_key, throttle["max_failures"], f"for user {name!r} from {address}"),
                                         (address_key, throttle["max_failures_per_address"], f"from {address}")])
        user = self.store.find_user(name) if isinstance(name, str) and NAME_PATTERN.fullmatch(name) else None
        ok = verify_secret(user.get("password_hash") if user else None, password if isinstance(password, str) else "")
        if not ok or user["disabled"]:
            log.warning("login failed for user %r from %s%s", name, address,
                        " (account disabled)" if ok and user and user["disabled"] else "")
            raise LoginFailed(LoginFailed.MESSAGE)
        self._release_attempt(attempt, forget=[account_key])
        log.info("login: user %s from %s", user["name"], address)
        return self.start_session(user, address)

    def start_session(self, user: dict, address: str) -> tuple[dict, str, dict]:
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        self.store.add_session(_sha256(token), user["id"], csrf, address)
        user = self.store.update_user(user["id"], last_login_at=time.time())
        return user, token, self.store.get_session(_sha256(token))

    def session(self, token: str | None) -> Principal | None:
        """The session's principal, or None when missing, expired (idle or absolute) or the user is disabled."""
        if not token:
            return None
        token_hash = _sha256(token)
        row = self.store.get_session(token_hash)
        if row is None:
            return None
        now = time.time()
        if (now - row["last_seen_at"] > self.settings["session_idle_timeout_s"]
                or now - row["created_at"] > self.settings["session_max_age_s"]):
            self.store.delete_session(token_hash)
            return None
        try:
            user = self.store.get_user(row["user_id"])
        except NotFound:
            return None
        if user["disabled"]:
            return None
        if now - row["last_seen_at"] > min(SESSION_TOUCH_EVERY_S, self.settings["session_idle_timeout_s"] / 10):
            self.store.touch_session(token_hash, now)
            row["last_seen_at"] = now
        return Principal(user, "session", session=row)

    def session_expiry(self, row: dict) -> dict:
        return {"idle_expires_at": row["last_seen_at"] + self.settings["session_idle_timeout_s"],
                "expires_at": row["created_at"] + self.settings["session_max_age_s"]}

    def logout(self, token: str | None) -> None:
        if token:
            self.store.delete_session(_sha256(token))

    def expire_sessions(self) -> int:
        now = time.time()
        return self.store.delete_sessions_before(now - self.settings["session_max_age_s"],
                                                 now - self.settings["session_idle_timeout_s"])

    def _reserve_attempt(self, limits: list[tuple[str, int, str]]) -> tuple[float, list[str]]:
        """Count one attempt against every (key, limit) as a failure in advance (released on success), or raise
        Throttled naming the first limit reached. Check and count are one step, so parallel tries cannot slip by."""
        window, now = self.settings["login_throttle"]["window_s"], time.time()
        with self._lock:
            for key, limit, what in limits:
                failures = self._failures.get(key)
                while failures and failures[0] <= now - window:
                    failures.popleft()
                if failures is not None and len(failures) >= limit:
                    retry = failures[0] + window - now
                    log.warning("login throttled %s (%d failures in %d s)", what, len(failures), window)
                    raise Throttled(f"too many failed logins {what}; try again in {int(retry) + 1} s", retry + 1)
            for key, _, _ in limits:
                self._failures.setdefault(key, deque(maxlen=100000)).append(now)
        return now, [key for key, _, _ in limits]

    def _release_attempt(self, attempt: tuple[float, list[str]], forget: list[str] = ()) -> None:
        """The attempt succeeded: it was no failure (and `forget` keys start over)."""
        when, keys = attempt
        with self._lock:
            for key in keys:
                failures = self._failures.get(key)
                if failures is not None and when in failures:
                    failures.remove(when)
            for key in forget:
                self._failures.pop(key, None)

    # ------------------------------------------------------------------ API keys

    def create_key(self, user: dict, name: str) -> tuple[dict, str]:
        """(row, the full key): the key is shown once and only its hash is stored."""
        name = (name or "").strip() or "key"
        if len(name) > 100:
            raise AccountError("a key name has at most 100 characters")
        prefix, secret = secrets.token_hex(4), secrets.token_urlsafe(32)
        row = self.store.add_api_key(user["id"], name, prefix, hash_secret(secret))
        log.info("API key %s%s created for %s", KEY_PREFIX, prefix, user["name"])
        return row, f"{KEY_PREFIX}{prefix}_{secret}"

    def key_principal(self, presented: str, address: str = "unknown") -> Principal | None:
        """The key's owner, or None. A key not yet verified in this process costs an argon2id check; failed checks
        count against the address like failed logins, so wrong secrets cannot keep the node busy."""
        match = re.fullmatch(re.escape(KEY_PREFIX) + r"([0-9a-f]{8})_([A-Za-z0-9_-]{20,100})", presented or "")
        if not match:
            return None
        row = self.store.api_key_by_prefix(match.group(1))
        if row is None:
            return None
        digest = _sha256(presented)
        if self._verified_keys.get(digest) != row["id"]:
            limit = self.settings["login_throttle"]["max_failures_per_address"]
            try:
                attempt = self._reserve_attempt([("addr:" + address, limit, f"from {address}")])
            except Throttled:
                return None
            if not verify_secret(row["secret_hash"], match.group(2)):
                log.warning("API key %s%s: wrong secret from %s", KEY_PREFIX, row["prefix"], address)
                return None
            self._release_attempt(attempt)
            with self._lock:
                if len(self._verified_keys) > 10000:
                    self._verified_keys.clear()
                self._verified_keys[digest] = row["id"]
        user = self.store.get_user(row["user_id"])
        if user["disabled"]:
            return None
        now = time.time()
        if not row["last_used_at"] or now - row["last_used_at"] > 5:
            self.store.touch_api_key(row["id"], now)
        return Principal(user, "key", key=row)

    @staticmethod
    def public_key(row: dict) -> dict:
        return {"id": row["id"], "name": row["name"], "prefix": f"{KEY_PREFIX}{row['prefix']}",
                "created_at": row["created_at"], "last_used_at": row["last_used_at"]}

    # ------------------------------------------------------------------ limits and usage

    def limits_for(self, user: dict) -> dict:
        defaults = self.settings["limits"]
        return {n: (user[n] if user.get(n) is not None else defaults[n]) for n in LIMIT_NAMES}

    def admit(self, user: dict) -> None:
        """Count one model request for the user, or raise LimitReached naming the limit."""
        limits, now = self.limits_for(user), time.time()
        per_day = limits["tokens_per_day"]
        if per_day:
            used = self.store.usage(user["id"], today(now))
            spent = used["prompt_tokens"] + used["completion_tokens"]
            if spent >= per_day:
                raise LimitReached(f"tokens per day limit reached ({spent} of {per_day} tokens used today, UTC); "
                                   f"it resets at midnight UTC", seconds_to_midnight(now), "tokens_per_day")
        per_minute = limits["requests_per_minute"]
        with self._lock:
            window = self._minute.setdefault(user["id"], deque())
            while window and window[0] <= now - 60:
                window.popleft()
            if per_minute and len(window) >= per_minute:
                raise LimitReached(f"requests per minute limit reached ({per_minute} requests in the last 60 s)",
                                   window[0] + 60 - now + 1, "requests_per_minute")
            window.append(now)
        self.store.add_usage(user["id"], today(now), requests=1)

    def record_tokens(self, user: dict, prompt_tokens: int, completion_tokens: int) -> None:
        if prompt_tokens or completion_tokens:
            self.store.add_usage(user["id"], today(), prompt_tokens=max(0, int(prompt_tokens)),
                                 completion_tokens=max(0, int(completion_tokens)))

    def usage(self, user: dict) -> dict:
        now = time.time()
        used = self.store.usage(user["id"], today(now))
        with self._lock:
            minute = sum(1 for t in self._minute.get(user["id"], ()) if t > now - 60)
        return {"user": user["name"], "day": today(now),
                "today": dict(used, tokens=used["prompt_tokens"] + used["completion_tokens"]),
                "minute": {"requests": minute}, "limits": self.limits_for(user)}
